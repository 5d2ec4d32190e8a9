"""Composite PTransforms for each stage of `cpt prepare`, around one generic filter DoFn.

The text logic lives in `cpt.pipelines.text` (pure functions, no Beam). Here a *step* is a small
picklable object: `setup()` builds heavy state on the worker (models, langdetect profiles) and
`__call__(doc)` annotates the document and returns a reject reason or None.

Why one channel instead of tagged outputs: every record (document, reject, dead letter) travels in
one PCollection with a `status`, and each step passes records it did not keep through untouched.
Beam 2.77's DaskRunner ignores output tags (its bag visitor feeds a multi-output ParDo's *whole*
output to every consumer, see apache_beam/runners/dask/dask_runner.py `visit_transform`), so tagged
`rejected` / dead-letter outputs would be duplicated there and break byte-identical shards. The
writer splits the channel by status at the end, which also makes the accounting exact.
"""

from __future__ import annotations

import math

import apache_beam as beam
from apache_beam.metrics import Metrics

from cpt.pipelines.faults import NO_FAULTS, Faults
from cpt.shared.dataset import pii_column, shard_index  # noqa: F401  (shard_index: used by write.py)

KEPT, REJECTED, DEAD = "ok", "rejected", "dead"


def is_live(doc: dict) -> bool:
    return doc["status"] == KEPT


def dead_letter(doc: dict, step_name: str, error: str) -> dict:
    """A live document turned into a dead letter by `step_name` (the error names the step; `dead_step` counts it)."""
    raw = doc.get("text") or ""
    return {**doc, "status": DEAD, "raw": raw, "error": f"{step_name}: {error}", "dead_step": step_name}


class FilterDoFn(beam.DoFn):
    """Run one step on live documents: keep, reject with a reason, or dead-letter on an exception.

    Records already rejected or dead-lettered pass through unchanged. A `Metrics.counter` is kept
    per (step, outcome): "kept", each reject reason, and "dead_letter". `faults` (CPT_INJECT_FAULTS by
    default, see cpt.pipelines.faults) makes chosen documents fail here, to test this very guard.
    """

    def __init__(self, step_name: str, step, faults: Faults | None = None):
        self.step_name = step_name
        self.step = step
        self.faults = Faults.from_env() if faults is None else faults
        self._counters = {}

    def setup(self):
        if hasattr(self.step, "setup"):
            self.step.setup()

    def _count(self, outcome: str) -> None:
        if outcome not in self._counters:
            self._counters[outcome] = Metrics.counter(self.step_name, outcome)
        self._counters[outcome].inc()

    def process(self, doc: dict, *side_inputs):
        if not is_live(doc):
            yield doc
            return
        try:
            self.faults.check(self.step_name, doc["id"])
            reason = self.step(doc, *side_inputs)
        # A step's library may raise anything on hostile input; that record becomes a dead letter,
        # the job goes on. (Not a bare except: KeyboardInterrupt / SystemExit still stop the run.)
        except Exception as err:  # noqa: BLE001
            self._count("dead_letter")
            yield dead_letter(doc, self.step_name, repr(err))
            return
        if reason is None:
            self._count("kept")
            yield doc
        else:
            self._count(reason)
            yield {**doc, "status": REJECTED, "reason": reason}


class ApplyStep(beam.PTransform):
    """One pipeline stage as a composite: `'Language' >> ApplyStep('language', LanguageStep(...))`."""

    def __init__(self, step_name: str, step, *side_inputs, faults: Faults | None = None):
        super().__init__()
        self.step_name = step_name
        self.step = step
        self.side_inputs = side_inputs
        self.faults = faults

    def expand(self, docs):
        return docs | "Filter" >> beam.ParDo(FilterDoFn(self.step_name, self.step, self.faults), *self.side_inputs)


# ---- steps: thin adapters from the document dict to the pure text functions ----


#: Record formats (one document per record, the text from a column) as opposed to one-document files.
RECORD_FORMATS = ("jsonl", "parquet", "arrow")


class HtmlStep:
    """HTML -> text for documents that are HTML, noting why in `doc["html"]` (counted in the manifest).

    .html files ("file"); records when the input says so ("field": --html-field or records_are_html); other
    records whose text sniffs as an HTML document when `sniff` is on ("doctype", "html_root",
    "markup_density"). Text and code files are never parsed as HTML: that would damage `if a < b and c > d:`.
    """

    def __init__(self, records_are_html: bool = False, sniff: bool = False, mode: str = "full"):
        self.records_are_html, self.sniff, self.mode = records_are_html, sniff, mode

    def setup(self):
        from cpt.pipelines.text import html_to_text, sniff_html

        self._html_to_text, self._sniff = html_to_text, sniff_html

    def why_html(self, doc: dict) -> str | None:
        if doc["format"] == "html":
            return "file"
        if doc["format"] not in RECORD_FORMATS:
            return None
        if self.records_are_html:
            return "field"
        return self._sniff(doc["text"]) if self.sniff else None

    def __call__(self, doc: dict) -> None:
        why = self.why_html(doc)
        if why is not None:
            doc["html"] = why
            doc["text"] = self._html_to_text(doc["text"], mode=self.mode)
        return None


class HtmlSniffStep:
    """Runs when no step cleans HTML: marks records that look like HTML (`doc["html"] = "not_cleaned"`)."""

    def setup(self):
        from cpt.pipelines.text import sniff_html

        self._sniff = sniff_html

    def __call__(self, doc: dict) -> None:
        if doc["format"] in RECORD_FORMATS + ("html",) and self._sniff(doc["text"]) is not None:
            doc["html"] = "not_cleaned"
        return None


class PiiStep:
    """Mask PII (and secrets for code) with typed placeholders; store per-type counts."""

    def __init__(self, secrets: bool):
        self.secrets = secrets

    def setup(self):
        from cpt.pipelines.text import mask_pii

        self._mask_pii = mask_pii

    def __call__(self, doc: dict) -> None:
        doc["text"], counts = self._mask_pii(doc["text"], secrets=self.secrets)
        for kind, n in counts.items():
            doc[pii_column(kind)] = n
        return None


class LengthStep:
    def __init__(self, min_chars: int, max_chars: int, min_words: int):
        self.min_chars, self.max_chars, self.min_words = min_chars, max_chars, min_words

    def setup(self):
        from cpt.pipelines.text import check_length

        self._check = check_length

    def __call__(self, doc: dict) -> str | None:
        return self._check(doc["text"], min_chars=self.min_chars, max_chars=self.max_chars, min_words=self.min_words)


class LanguageStep:
    """Language ID (fastText, then langdetect) on a bounded sample; stores lang / lang_prob on every document."""

    def __init__(self, langs: list[str], min_prob: float, max_chars: int, backend: str = "cascade"):
        self.langs, self.min_prob, self.max_chars, self.backend = tuple(langs), min_prob, max_chars, backend

    def setup(self):
        from cpt.pipelines.text import detect_language, language_reason
        from cpt.pipelines.text.language import FASTTEXT_THRESHOLD

        self._detect, self._reason = detect_language, language_reason
        # fastText decides alone only where its answer clears this filter's floor (see check_language)
        self._threshold = max(FASTTEXT_THRESHOLD, self.min_prob)

    def __call__(self, doc: dict) -> str | None:
        lang, prob = self._detect(doc["text"], self.max_chars, self.backend, self._threshold)
        doc["lang"], doc["lang_prob"] = lang, prob
        return self._reason(lang, prob, langs=self.langs, min_prob=self.min_prob)


class QualityStep:
    """The Gopher repetition, Gopher quality, C4 and FineWeb rules that are switched on, in that order.

    prose_only: the Gopher and FineWeb rules measure the document's prose (quality.prose_text: code blocks,
    signatures, symbol lines and repeats of long lines left out; alphabetic words counted as whitespace words;
    Gopher's duplicate n-gram rules and C4's curly-bracket rule off), so documentation pages are judged on their
    text. The kept text is always the whole one (less C4's bad lines).
    """

    def __init__(self, gopher_repetition: bool, gopher_quality: bool, c4: bool, fineweb: bool, prose_only=False):
        self.gopher_repetition, self.gopher_quality, self.c4, self.fineweb = (
            gopher_repetition,
            gopher_quality,
            c4,
            fineweb,
        )
        self.prose_only = prose_only

    def setup(self):
        from cpt.pipelines.text import quality

        self._q = quality
        self._gopher = quality.GopherQuality(alpha_ratio_of_tokens=not self.prose_only)
        self._c4 = quality.C4Lines(filter_curly_bracket=not self.prose_only)
        # Duplicate n-grams off on prose: API entries repeat phrases in parallel ("Return the arc sine of z.");
        # whole repeated lines and paragraphs, top n-grams and a page of copies are still caught.
        self._repetition = quality.GopherRepetition(dup_n_grams=()) if self.prose_only else quality.GopherRepetition()

    def __call__(self, doc: dict) -> str | None:
        q, text = self._q, doc["text"]
        measured = text
        if self.prose_only:
            prose = q.prose_text(text, collapse_repeats=False)
            measured = q.prose_text(text)
            if len(measured) < MAX_REPEATED_PROSE * len(prose):
                return "gopher_repetition_repeated_prose"  # collapsing repeats would hide a page of copies
        reason = (self.gopher_repetition and q.check_gopher_repetition(measured, self._repetition)) or (
            self.gopher_quality and q.check_gopher_quality(measured, self._gopher)
        )
        if reason == "gopher_few_words" and self.prose_only and len(q.split_words(prose)) < len(q.split_words(text)):
            if len(q.split_words(text)) >= self._gopher.min_doc_words:
                reason = None  # a page of code with a few lines of prose: too little prose to judge, enough page
        if reason:
            return reason
        if self.c4:
            cleaned, reason = q.c4_lines(text, self._c4)
            if reason:
                return reason
            doc["text"] = text = cleaned
        return (self.fineweb and q.check_fineweb_lines(q.prose_text(text) if self.prose_only else text)) or None


#: prose_only: a page whose prose is under this share of itself once repeated long lines are collapsed is rejected.
MAX_REPEATED_PROSE = 0.5


class CodeStep:
    """Python source quality: parses (ast, never exec), comment ratio, line length, size."""

    def __init__(self, min_chars: int, max_chars: int, max_comment_ratio: float, max_line_length: int):
        self.kwargs = dict(
            min_chars=min_chars,
            max_chars=max_chars,
            max_comment_ratio=max_comment_ratio,
            max_line_length=max_line_length,
        )

    def setup(self):
        from cpt.pipelines.text import check_code

        self._check = check_code

    def __call__(self, doc: dict) -> str | None:
        return self._check(doc["text"], **self.kwargs)


class TokenizeStep:
    """input_ids (uint32 in the shard) and n_tokens with the given tokenizer, no special tokens."""

    def __init__(self, tokenizer_dir: str):
        self.tokenizer_dir = tokenizer_dir

    def setup(self):
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir, trust_remote_code=False)

    def __call__(self, doc: dict) -> None:
        ids = self._tokenizer(doc["text"], add_special_tokens=False)["input_ids"]
        doc["input_ids"], doc["n_tokens"] = list(ids), len(ids)
        return None


class PerplexityCut:
    """Reject documents whose perplexity is above an absolute threshold or outside a percentile band."""

    def __init__(self, max_ppl: float | None = None):
        self.max_ppl = max_ppl

    def __call__(self, doc: dict, band: tuple[float, float] | None = None) -> str | None:
        ppl = doc["ppl"]
        if ppl is None or math.isnan(ppl):
            return "perplexity"
        if band is not None:
            return None if band[0] <= ppl <= band[1] else "perplexity"
        return "perplexity" if self.max_ppl is not None and ppl > self.max_ppl else None


def percentile_band(values: list[float], lo: float, hi: float) -> tuple[float, float] | None:
    """The [lo, hi] percentile band of this run's scores (linear interpolation, like numpy's default)."""
    import numpy as np

    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    low, high = np.percentile(np.asarray(finite, dtype=np.float64), [lo, hi])
    return float(low), float(high)


class ScorePerplexity(beam.PTransform):
    """RunInference over live documents, then an absolute or percentile cut (CCNet-style first pass)."""

    def __init__(self, handler, max_ppl: float | None, keep_percentile: list[float] | None, as_channels: bool = False):
        super().__init__()
        self.handler = handler
        self.max_ppl = max_ppl
        self.keep_percentile = keep_percentile
        self.as_channels = as_channels

    def expand(self, docs):
        live = docs | "Live" >> beam.Filter(is_live)
        decided = docs | "Decided" >> beam.Filter(lambda doc: not is_live(doc))
        attached = live | "RunInference" >> _run_inference(self.handler) | "AttachPpl" >> beam.Map(attach_score)
        scored = attached | "Scored" >> beam.Filter(is_live)
        failed = attached | "Failed" >> beam.Filter(lambda doc: not is_live(doc))
        side = ()
        if self.keep_percentile is not None:
            lo, hi = self.keep_percentile
            band = (
                scored
                | "Scores" >> beam.Map(lambda doc: doc["ppl"])
                | "AllScores" >> beam.combiners.ToList()
                | "Band" >> beam.Map(percentile_band, lo, hi)
            )
            side = (beam.pvalue.AsSingleton(band),)
        # The cut only compares numbers; faults for this step are injected in the handler, where scoring runs.
        cut = scored | "Cut" >> ApplyStep("perplexity", PerplexityCut(self.max_ppl), *side, faults=NO_FAULTS)
        if self.as_channels:
            # Three channels, not one Flatten: the next shuffle takes them all (cpt.pipelines.shuffle.channels).
            return cut, failed, decided
        return (cut, failed, decided) | "Merge" >> beam.Flatten()


_PPL_DEAD = Metrics.counter("perplexity", "dead_letter")


def attach_score(result) -> dict:
    """A RunInference result -> the document with its `ppl`, or a dead letter if it could not be scored."""
    from cpt.pipelines.perplexity import ScoringFailure

    if isinstance(result.inference, ScoringFailure):
        _PPL_DEAD.inc()
        return dead_letter(result.example, "perplexity", result.inference.error)
    return {**result.example, "ppl": result.inference}


def _run_inference(handler):
    from apache_beam.ml.inference.base import RunInference

    return RunInference(handler)


def dedup_group(item) -> list[dict]:
    """Documents sharing a dedup key: keep the smallest id, reject the rest as `duplicate`.

    Records decided earlier (rejects, dead letters) pass through as they are, even if two share a key.
    """
    key, docs = item
    if key.startswith("decided:"):
        return list(docs)
    docs = sorted(docs, key=lambda doc: (doc["id"], doc["source"], doc["offset"]))
    return [docs[0]] + [{**doc, "status": REJECTED, "reason": "duplicate"} for doc in docs[1:]]


class DedupKey:
    """Key for exact dedup: the normalised-text hash for live documents, a unique key for the others.

    A document whose key cannot be computed becomes a dead letter of step `dedup` (with a unique key).
    """

    def __init__(self, faults: Faults | None = None):
        self.faults = Faults.from_env() if faults is None else faults

    def setup(self):
        from cpt.pipelines.text import dedup_key

        self._dedup_key = dedup_key

    def __call__(self, doc: dict) -> tuple[str, dict]:
        if not hasattr(self, "_dedup_key"):
            self.setup()
        if is_live(doc):
            try:
                self.faults.check("dedup", doc["id"])
                return self._dedup_key(doc["text"]), doc
            except Exception as err:  # noqa: BLE001 - as in FilterDoFn: one record, not the job
                _DEDUP_DEAD.inc()
                doc = dead_letter(doc, "dedup", repr(err))
        # Already decided: must not collide with any text hash (those are 64 hex chars). The
        # source (unique per input file, see io.expand_inputs) and offset make the key unique.
        return f"decided:{doc['source']}:{doc.get('offset')}:{doc['id']}", doc


class ExactDedup(beam.PTransform):
    """Exact dedup on the normalised text: group by key, keep the smallest id."""

    def __init__(self, shuffle=None):
        super().__init__()
        self.shuffle = shuffle

    def expand(self, docs):
        from cpt.pipelines.shuffle import FileGroupByKey, each

        return (
            each(docs, "Key", lambda: beam.Map(DedupKey()))
            | "Group" >> FileGroupByKey(self.shuffle, "dedup")
            | "KeepSmallestId" >> beam.FlatMap(dedup_group)
            | "Count" >> beam.Map(_count_duplicates)
        )


_DUPLICATES = Metrics.counter("dedup", "duplicate")
_DEDUP_KEPT = Metrics.counter("dedup", "kept")
_DEDUP_DEAD = Metrics.counter("dedup", "dead_letter")


def _count_duplicates(doc: dict) -> dict:
    if doc.get("reason") == "duplicate":
        _DUPLICATES.inc()
    elif is_live(doc):
        _DEDUP_KEPT.inc()
    return doc
