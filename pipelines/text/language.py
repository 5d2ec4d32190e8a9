"""Language identification with langdetect, deterministic and bounded, and the language filter."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory
from langdetect.lang_detect_exception import LangDetectException

#: The seed of every detection: langdetect samples n-grams at random, so an unseeded call can flip between
#: two close languages from one run (or process) to the next.
SEED = 0
_LETTER = re.compile(r"[^\W\d_]")


@functools.cache
def _factory() -> DetectorFactory:
    """Our own loaded factory (about 1 s, once per process), not langdetect's mutable module-level one."""
    factory = DetectorFactory()
    factory.load_profile(PROFILES_DIRECTORY)
    factory.set_seed(SEED)
    return factory


def detect_language(text: str, max_chars: int = 1000) -> tuple[str, float]:
    """(ISO code, probability) of the most likely language of `text`, e.g. ("en", 0.99); ("und", 0.0) if no letters.

    Reads at most `max_chars` characters, starting at the first letter: langdetect costs time linear in the
    text and a 1,000-character prefix already decides the language of a document. Each call builds a fresh
    seeded detector, so the answer is the same on every call, thread and process.
    """
    first_letter = _LETTER.search(text)
    if first_letter is None:
        return "und", 0.0
    sample = text[first_letter.start() : first_letter.start() + max_chars]
    detector = _factory().create()
    detector.append(sample)
    try:
        best = detector.get_probabilities()[0]
    except (LangDetectException, IndexError):  # letters langdetect has no profile n-grams for
        return "und", 0.0
    return best.lang, float(best.prob)


def language_reason(lang: str, prob: float, langs: Sequence[str] = ("en",), min_prob: float = 0.65) -> str | None:
    """ "language" if `lang` is not one of `langs` (empty = any), "language_low_confidence" if prob < min_prob.

    A region suffix is ignored when matching, so langs=("zh",) accepts langdetect's "zh-cn" and "zh-tw".
    """
    if langs and lang not in langs and lang.split("-")[0] not in langs:
        return "language"
    if prob < min_prob:
        return "language_low_confidence"
    return None


def check_language(text: str, langs: Sequence[str] = ("en",), min_prob: float = 0.65) -> str | None:
    """The language filter: `language_reason(*detect_language(text), langs, min_prob)`."""
    return language_reason(*detect_language(text), langs=langs, min_prob=min_prob)
