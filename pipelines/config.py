"""`cpt prepare` configuration: dataclasses, presets (web/text/code) and their merge with YAML and flags.

Precedence, lowest first: the preset's YAML (pipelines/presets/NAME.yaml) < the user's `--config` YAML
< command-line flags. The merged dict is validated all at once by `cpt.shared.config.load_config`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from cpt.shared.config import ConfigError, load_config, read_yaml

PRESETS_DIR = Path(__file__).parent / "presets"
STEPS = (
    "html", "pii", "length", "language", "quality", "perplexity", "code", "dedup", "near_dedup", "decontaminate"
)  # fmt: skip
# Steps that can reject a document (html and pii only rewrite the text).
REJECTING_STEPS = ("length", "language", "quality", "perplexity", "code", "dedup", "near_dedup", "decontaminate")
FORMATS = ("jsonl", "parquet", "arrow", "text", "html", "code")


class InputError(ValueError):
    """A user error in --input (missing file, empty glob, unknown format); the message says how to fix it."""


@dataclass
class PIIConfig:
    secrets: bool = False
    """Also mask secrets in code (cloud keys, tokens); the code preset turns this on."""


@dataclass
class FilterConfig:
    min_chars: int = 50
    """Documents shorter than this (after cleaning) are rejected as too_short."""
    max_chars: int = 100_000
    """Documents longer than this are rejected as too_long."""
    min_words: int = 0
    """Documents with fewer whitespace-separated words are rejected as too_few_words."""
    langs: list[str] = field(default_factory=lambda: ["en"])
    """Languages to keep (ISO 639-1 codes as langdetect reports them)."""
    min_lang_prob: float = 0.65
    """Minimum langdetect probability of the detected language."""
    lang_max_chars: int = 1000
    """Language ID reads at most this many characters: the start, middle and end of a longer document."""
    lang_backend: str = "cascade"
    """cascade (fastText lid.176, langdetect below 0.65 or min_lang_prob), fasttext or langdetect."""

    def problems(self) -> list[str]:
        out = []
        if self.min_chars < 0 or self.max_chars <= self.min_chars:
            out.append(f"min_chars/max_chars: need 0 <= min_chars < max_chars, got {self.min_chars}/{self.max_chars}")
        if not 0.0 <= self.min_lang_prob <= 1.0:
            out.append(f"min_lang_prob: must be within [0, 1], got {self.min_lang_prob}")
        if not self.langs:
            out.append("langs: list at least one language, or --skip language")
        from cpt.pipelines.text.language import BACKENDS

        if self.lang_backend not in BACKENDS:
            out.append(f"lang_backend: must be one of {', '.join(BACKENDS)}, got {self.lang_backend!r}")
        return out


@dataclass
class HtmlConfig:
    mode: str = "full"
    """main (main content: drops menus, link lists, comments, banners), full (the whole page minus chrome) or
    trafilatura (the trafilatura extra: slowest, most precise)."""
    sniff: bool = False
    """Also clean JSONL / Parquet / Arrow records whose text looks like an HTML document (doctype, <html>/<body>
    root, or markup density); the web preset turns this on."""

    def problems(self) -> list[str]:
        from cpt.pipelines.text.html import HTML_MODES

        if self.mode not in HTML_MODES:
            return [f"html.mode: unknown mode {self.mode!r}; choose one of {', '.join(HTML_MODES)}"]
        return []


@dataclass
class QualityConfig:
    """Which document-quality rule sets the quality step runs (thresholds: the published defaults)."""

    gopher_repetition: bool = True
    """Duplicate lines/paragraphs and repeated n-grams (gopher_repetition_* reasons)."""
    gopher_quality: bool = False
    """Word count, word length, symbols, bullets, alphabetic words, stop words (gopher_* reasons)."""
    c4: bool = False
    """C4's line filter (removes javascript/cookie/short lines, keeps code) and its lorem/bracket/sentence rules."""
    fineweb: bool = False
    """FineWeb's line rules (fineweb_* reasons)."""
    prose_only: bool = False
    """Judge a page by its prose (quality.prose_text): code blocks, signatures, symbol lines and repeats of long
    lines left out of the Gopher/FineWeb statistics, C4's curly-bracket rule off; documentation pages pass."""


@dataclass
class CodeConfig:
    max_comment_ratio: float = 0.5
    """Files whose comment lines exceed this share of non-blank lines are rejected as comment_ratio."""
    max_line_length: int = 1000
    """Files with a longer line (minified or generated code) are rejected as max_line_length."""


@dataclass
class PerplexityConfig:
    model: str | None = None
    """Local folder of a Hugging Face causal LM (--ppl-model); without it the step is skipped."""
    max_ppl: float | None = None
    """Absolute cut: documents with a higher perplexity are rejected as perplexity."""
    keep_percentile: list[float] | None = None
    """[LO, HI]: keep the band between these percentiles of this run's scores (CCNet head/middle/tail)."""
    max_tokens: int = 256
    """Texts are truncated to this many tokens before scoring."""
    batch_size: int = 8
    """Documents scored per forward pass (padded to a length bucket; scores do not depend on batch mates)."""
    device: str = "cpu"
    """Where the perplexity model runs on each worker: cpu, cuda or cuda:N (--ppl-device)."""

    def problems(self) -> list[str]:
        out = []
        if self.max_ppl is not None and self.keep_percentile is not None:
            out.append("max_ppl and keep_percentile: choose one cut (--max-ppl X or --ppl-keep-percentile LO HI)")
        if self.keep_percentile is not None:
            band = self.keep_percentile
            if len(band) != 2 or not 0 <= band[0] < band[1] <= 100:
                out.append(f"keep_percentile: need [LO, HI] with 0 <= LO < HI <= 100, got {band}")
        if self.max_tokens < 2:
            out.append(f"max_tokens: need at least 2 tokens to score, got {self.max_tokens}")
        if self.batch_size < 1:
            out.append(f"batch_size: must be >= 1, got {self.batch_size}")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            out.append(f"device: cpu, cuda or cuda:N, got {self.device!r} (--ppl-device)")
        return out

    def requested(self) -> bool:
        """True when a cut was asked for: then a missing model is an error, not a skipped step."""
        return self.max_ppl is not None or self.keep_percentile is not None


@dataclass
class NearDedupConfig:
    ngram: int = 5
    """Shingle size: word n-grams of the normalised text (character n-grams with unit: char)."""
    unit: str = "word"
    """word, or char (for code and for languages written without spaces)."""
    num_perm: int = 128
    """MinHash permutations (the signature length)."""
    seed: int = 1
    """Seed of the hash family: the same seed gives the same signatures on every machine and runner."""
    threshold: float = 0.8
    """Jaccard similarity from which two documents count as near duplicates; sets bands x rows."""
    false_negative_weight: float = 0.95
    """Weight of missed pairs against false candidates when bands x rows are chosen (verification
    removes false candidates, so missing fewer pairs is worth more)."""
    bands: int | None = None
    """LSH bands; with rows, overrides the choice from threshold."""
    rows: int | None = None
    """Rows (hash values) per band."""
    verify: bool = True
    """Join only candidate pairs whose estimated Jaccard (share of equal hash values) reaches verify_threshold."""
    verify_threshold: float = 0.8
    """Lower catches more pairs near the threshold (the estimate's noise is about +-0.035 at 128 permutations),
    but chains clusters: members then point to a kept document they resemble less."""
    max_pairs_group: int = 32
    """Band groups up to this size give all pairs; larger ones a star to the group's smallest id."""

    def problems(self) -> list[str]:
        out = []
        if self.ngram < 1:
            out.append(f"near_dedup.ngram: must be >= 1, got {self.ngram}")
        if self.unit not in ("word", "char"):
            out.append(f"near_dedup.unit: word or char, got {self.unit!r}")
        if not 0.0 < self.threshold < 1.0:
            out.append(f"near_dedup.threshold: must be within (0, 1), got {self.threshold}")
        if not 0.0 < self.false_negative_weight < 1.0:
            out.append(f"near_dedup.false_negative_weight: must be within (0, 1), got {self.false_negative_weight}")
        if not 0.0 <= self.verify_threshold <= 1.0:
            out.append(f"near_dedup.verify_threshold: must be within [0, 1], got {self.verify_threshold}")
        if (self.bands is None) != (self.rows is None):
            out.append("near_dedup.bands/rows: give both or neither (then they follow from threshold)")
        elif self.bands is not None and (self.bands < 1 or self.rows < 1 or self.bands * self.rows > self.num_perm):
            got = f"{self.bands}x{self.rows}"
            out.append(f"near_dedup.bands/rows: need bands x rows <= num_perm ({self.num_perm}), got {got}")
        if self.num_perm < 2:
            out.append(f"near_dedup.num_perm: must be >= 2, got {self.num_perm}")
        if self.max_pairs_group < 2:
            out.append(f"near_dedup.max_pairs_group: must be >= 2, got {self.max_pairs_group}")
        return out

    def lsh_params(self) -> tuple[int, int]:
        """(bands, rows): as configured, or chosen for the threshold (datasketch's optimiser)."""
        if self.bands is not None and self.rows is not None:
            return self.bands, self.rows
        from cpt.pipelines.near_dedup import lsh_params

        return lsh_params(self.num_perm, self.threshold, self.false_negative_weight)


@dataclass
class DecontaminateConfig:
    datasets: list[str] = field(default_factory=list)
    """Prepared datasets (the eval sets, --decontaminate DIR ...); without any the step is skipped."""
    ngram: int = 13
    """Word n-gram length of an overlap (13: the GPT-3 / datatrove convention)."""
    min_overlap: int = 1
    """A training document sharing at least this many distinct n-grams with the eval sets is contaminated."""
    max_train_docs: int = 10
    """An n-gram in more than this many training documents is template text and matches nothing (GPT-3's
    rule); 0 = every shared n-gram counts. Dedup runs first, so copies of one document count once."""

    def problems(self) -> list[str]:
        out = []
        if self.ngram < 1:
            out.append(f"decontaminate.ngram: must be >= 1, got {self.ngram}")
        if self.min_overlap < 1:
            out.append(f"decontaminate.min_overlap: must be >= 1, got {self.min_overlap}")
        if self.max_train_docs < 0:
            out.append(f"decontaminate.max_train_docs: must be >= 0 (0 = no limit), got {self.max_train_docs}")
        return out


SHUFFLE_MODES = ("auto", "files", "beam")


@dataclass
class PrepareConfig:
    inputs: list[str] = field(default_factory=list)
    """Input paths, globs or URLs (--input, repeatable)."""
    output: str = ""
    """Output folder or URL (--output)."""
    preset: str = "text"
    """web, text or code: the steps and default thresholds."""
    steps: list[str] = field(default_factory=list)
    """The steps to run, in order (from the preset unless the config lists them)."""
    skip: list[str] = field(default_factory=list)
    """Steps to leave out (--skip)."""
    domain: str = "general"
    """Written to every row's `domain` column."""
    format: str | None = None
    """jsonl, parquet, arrow, text, html or code; inferred from each file's extension when absent."""
    text_field: str = "text"
    """The text column of JSONL / Parquet / Arrow records."""
    id_field: str | None = "id"
    """The id column; records without it get an id from their source file and line."""
    records_are_html: bool = False
    """JSONL / Parquet / Arrow records hold HTML (a crawl dump): the html step cleans them too."""
    html_field: str | None = None
    """The records' HTML column (--html-field): read instead of text_field, and always cleaned as HTML."""
    tokenizer: str | None = None
    """Tokenizer folder: adds input_ids / n_tokens and records the tokenizer's sha256."""
    num_shards: int = 4
    """Shards per output folder (kept and rejected alike)."""
    max_bytes: int = 10_000_000
    """Size guard: larger records go to dead_letter before any parser sees them."""
    dead_letter_max_bytes: int = 4096
    """The raw record kept in a dead letter is truncated to this many bytes."""
    pii: PIIConfig = field(default_factory=PIIConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    html: HtmlConfig = field(default_factory=HtmlConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    code: CodeConfig = field(default_factory=CodeConfig)
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    decontaminate: DecontaminateConfig = field(default_factory=DecontaminateConfig)
    shuffle: str = "auto"
    """How the shuffles (dedup, near dedup, the shard writer) run: "files" spills them under the output's
    `_shuffle/` so memory stays flat whatever the corpus size; "beam" is the runner's GroupByKey (in the
    launcher's memory on DirectRunner); "auto" is files on DirectRunner and beam on every other runner."""

    def problems(self) -> list[str]:
        out = []
        if self.shuffle not in SHUFFLE_MODES:
            out.append(f"shuffle: unknown mode {self.shuffle!r}; choose one of {', '.join(SHUFFLE_MODES)}")
        if not self.inputs:
            out.append("inputs: give at least one --input PATTERN")
        if not self.output:
            out.append("output: give --output DIR")
        for step in list(self.steps) + list(self.skip):
            if step not in STEPS:
                out.append(f"steps: unknown step {step!r}; known steps: {', '.join(STEPS)}")
        if self.format is not None and self.format not in FORMATS:
            out.append(f"format: unknown format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.num_shards < 1:
            out.append(f"num_shards: must be >= 1, got {self.num_shards}")
        if self.max_bytes < 1:
            out.append(f"max_bytes: must be >= 1, got {self.max_bytes}")
        active = self.active_steps()
        if "pii" in active:
            # Rejects are written as they are when rejected, so a step that rejects before pii would
            # put unmasked text in rejected/ (html only cleans, so it may come first).
            early = [s for s in active[: active.index("pii")] if s in REJECTING_STEPS]
            if early:
                out.append(
                    f"steps: {', '.join(early)} comes before pii, so its rejects would be written unmasked; "
                    "put pii first (html may precede it)"
                )
        return out

    def record_text_field(self) -> str:
        """The column records are read from: the HTML column when --html-field is given."""
        return self.html_field or self.text_field

    def active_steps(self) -> list[str]:
        """The steps that run: the configured ones minus --skip, minus perplexity without a model and decontaminate
        without eval datasets."""
        steps = [s for s in self.steps if s not in self.skip]
        if self.html_field and "html" not in steps and "html" not in self.skip:
            steps.insert(0, "html")  # the user said the column is HTML: it is cleaned whatever the preset
        if "perplexity" in steps and not self.perplexity.model:
            steps.remove("perplexity")
        if "decontaminate" in steps and not self.decontaminate.datasets:
            steps.remove("decontaminate")
        return steps


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def deep_merge(base: dict, override: dict) -> dict:
    """Recursively merge `override` into a copy of `base` (mappings merge, everything else replaces)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resolve_config(preset: str | None, config_path: str | None, flags: dict) -> PrepareConfig:
    """preset YAML < --config YAML < flags, validated into one PrepareConfig (one ConfigError lists all problems)."""
    user = read_yaml(config_path) if config_path else {}
    name = preset or user.get("preset") or "text"
    if name not in preset_names():
        raise ConfigError([f"preset: unknown preset {name!r}; choose one of {', '.join(preset_names())}"], "--preset")
    merged = deep_merge(deep_merge(read_yaml(PRESETS_DIR / f"{name}.yaml"), user), flags)
    merged["preset"] = name
    config = load_config(PrepareConfig, data=merged)
    # Asking for a perplexity cut (or listing the step in --config) without a model is a user error;
    # the preset's default perplexity step without a model is skipped with a note instead.
    steps_requested = "perplexity" in (user.get("steps") or []) and "perplexity" not in config.skip
    if (config.perplexity.requested() or steps_requested) and not config.perplexity.model:
        raise ConfigError(["perplexity: a perplexity cut was requested but no model given; add --ppl-model DIR"])
    return config
