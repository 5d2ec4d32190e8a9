"""Document-quality heuristics of the field (Gopher, C4, FineWeb) as pure functions that return a reason.

Thresholds default to the published ones, as datatrove implements them (Rae et al. 2021 for Gopher, Raffel et
al. 2020 for C4, Penedo et al. 2024 for FineWeb). Own implementation rather than datatrove's filters: those
need a Document object and spaCy's tokenizer per call; these take a string and split words with one regex
(spaCy's rules for English prose, close enough that the decisions agree, see tests/pipelines/test_text_quality.py).

Every function returns None to keep the document, or a reason string that names the rule, e.g.
"gopher_short_words" or "c4_sentences"; `c4_lines` also returns the text with C4's bad lines removed.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

# A word, as spaCy's English tokenizer splits prose: leading and trailing punctuation are tokens of their own
# (a run such as "..." is one), clitics ('s, n't, 're, ...) are split off, everything else stays whole.
_CHUNK = re.compile(r"\S+")
_LEAD = re.compile(r"^([^\w\s]|(.)\2+)")
_TRAIL = re.compile(r"(\.\.\.|…|[^\w\s])$")
_CLITIC = re.compile(r"(?i)(n't|'s|'re|'ve|'ll|'d|'m|’s|’re|’ve|’ll|’d|’m|n’t)$")
#: datatrove's punctuation set: a word made only of these is a symbol, not a word.
PUNCTUATION = set(
    "!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»"
    + "".join(chr(x) for a, b in ((0, 9), (11, 13), (13, 32), (127, 160)) for x in range(a, b))
)
#: Gopher's stop words (a document needs at least two of them).
STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
#: Line endings FineWeb counts as terminal punctuation (datatrove's list, the common part).
TERMINAL_PUNCTUATION = tuple(".!?。！？．…\"'”’)»」")


def split_words(text: str) -> list[str]:
    """Words and punctuation tokens of `text` (see _CHUNK); whitespace is never a token."""
    out: list[str] = []
    for chunk in _CHUNK.findall(text):
        lead = []
        while len(chunk) > 1 and (m := _LEAD.match(chunk)) and m.end() < len(chunk):
            lead.append(chunk[: m.end()])
            chunk = chunk[m.end() :]
        trail = []
        while len(chunk) > 1 and (m := _TRAIL.search(chunk)) and m.start() > 0:
            trail.append(chunk[m.start() :])
            chunk = chunk[: m.start()]
        if len(chunk) > 2 and (m := _CLITIC.search(chunk)) and m.start() > 0:
            trail.append(chunk[m.start() :])
            chunk = chunk[: m.start()]
        out += lead + [chunk] + trail[::-1]
    return out


# ---- Gopher quality ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GopherQuality:
    """Gopher's document rules (datatrove's GopherQualityFilter defaults)."""

    min_doc_words: int = 50
    max_doc_words: int = 100_000
    min_avg_word_length: float = 3
    max_avg_word_length: float = 10
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2
    alpha_ratio_of_tokens: bool = True
    """True: the alphabetic-word ratio counts punctuation tokens as words (datatrove); False: whitespace-separated
    words, as the Gopher paper states the rule (markdown and API prose have a punctuation token every few words)."""


def check_gopher_quality(text: str, params: GopherQuality = GopherQuality()) -> str | None:
    """None, or the first failing Gopher quality rule.

    Reasons: gopher_few_words / gopher_many_words (non-symbol words), gopher_short_words / gopher_long_words
    (mean word length), gopher_hashes / gopher_ellipses (per word), gopher_bullet_lines (lines starting with
    a bullet), gopher_ellipsis_lines (lines ending with one), gopher_non_alpha_words (words without a letter),
    gopher_stop_words (fewer than min_stop_words of STOP_WORDS).
    """
    words = split_words(text)
    real = [w for w in words if any(ch not in PUNCTUATION for ch in w)]
    if len(real) < params.min_doc_words:
        return "gopher_few_words"
    if len(real) > params.max_doc_words:
        return "gopher_many_words"
    mean = sum(map(len, real)) / len(real)
    if mean < params.min_avg_word_length:
        return "gopher_short_words"
    if mean > params.max_avg_word_length:
        return "gopher_long_words"
    if text.count("#") / len(words) > params.max_symbol_word_ratio:
        return "gopher_hashes"
    if (text.count("...") + text.count("…")) / len(words) > params.max_symbol_word_ratio:
        return "gopher_ellipses"
    lines = text.splitlines() or [""]
    if sum(line.lstrip().startswith(("•", "-")) for line in lines) / len(lines) > params.max_bullet_lines_ratio:
        return "gopher_bullet_lines"
    if sum(line.rstrip().endswith(("...", "…")) for line in lines) / len(lines) > params.max_ellipsis_lines_ratio:
        return "gopher_ellipsis_lines"
    counted = words if params.alpha_ratio_of_tokens else text.split()
    if sum(any(c.isalpha() for c in w) for w in counted) / len(counted) < params.min_alpha_words_ratio:
        return "gopher_non_alpha_words"
    if len(STOP_WORDS.intersection(words)) < params.min_stop_words:
        return "gopher_stop_words"
    return None


# ---- Gopher repetition -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GopherRepetition:
    """Gopher's repetition rules (datatrove's GopherRepetitionFilter defaults)."""

    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2
    top_n_grams: tuple[tuple[int, float], ...] = ((2, 0.2), (3, 0.18), (4, 0.16))
    dup_n_grams: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))


_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(elements seen before, their characters): the second and later copies count."""
    seen: set[str] = set()
    n = chars = 0
    for item in items:
        if item in seen:
            n += 1
            chars += len(item)
        else:
            seen.add(item)
    return n, chars


def _top_ngram_chars(words: list[str], n: int) -> int:
    """Characters covered by the most frequent n-gram (its length times its count, spaces included)."""
    counts = Counter(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    gram, count = counts.most_common(1)[0]
    return len(gram) * count


def _duplicated_ngram_chars(words: list[str], n: int) -> int:
    """Characters of words inside n-grams seen before (non-overlapping, as Gopher counts them)."""
    seen: set[tuple[str, ...]] = set()
    chars = i = 0
    while i < len(words) - n + 1:
        gram = tuple(words[i : i + n])
        if gram in seen:
            chars += sum(map(len, gram))
            i += n
        else:
            seen.add(gram)
            i += 1
    return chars


def check_gopher_repetition(text: str, params: GopherRepetition = GopherRepetition()) -> str | None:
    """None, or the first failing Gopher repetition rule.

    Reasons: gopher_repetition_paragraphs / _paragraph_chars (duplicate paragraphs by count / characters),
    gopher_repetition_lines / _line_chars, gopher_repetition_top_{2,3,4}gram (the most frequent n-gram
    covers too many characters), gopher_repetition_dup_{5..10}gram (characters in repeated n-grams).
    """
    if not text:
        return "gopher_repetition_empty"
    paragraphs = _PARAGRAPHS.split(text.strip())
    n, chars = _duplicates(paragraphs)
    if n / len(paragraphs) > params.dup_para_frac:
        return "gopher_repetition_paragraphs"
    if chars / len(text) > params.dup_para_char_frac:
        return "gopher_repetition_paragraph_chars"
    lines = _LINES.split(text)
    n, chars = _duplicates(lines)
    if n / len(lines) > params.dup_line_frac:
        return "gopher_repetition_lines"
    if chars / len(text) > params.dup_line_char_frac:
        return "gopher_repetition_line_chars"
    words = split_words(text)
    for n, frac in params.top_n_grams:
        if len(words) >= n and _top_ngram_chars(words, n) / len(text) > frac:
            return f"gopher_repetition_top_{n}gram"
    for n, frac in params.dup_n_grams:
        if _duplicated_ngram_chars(words, n) / len(text) > frac:
            return f"gopher_repetition_dup_{n}gram"
    return None


# ---- C4 line rules -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class C4Lines:
    """C4's rules (datatrove's C4QualityFilter) with the FineWeb choice: no terminal-punctuation rule."""

    filter_no_terminal_punct: bool = False
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_curly_bracket: bool = True
    """Reject a document with a "{" in a prose line (datatrove's filter_curly_bracket): C4's test for code pages."""
    keep_code: bool = True
    """Code lines (indented, or dense in code symbols) are kept as they are and exempt from the line rules."""


_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_END_PUNCTUATION = (".", "?", "!", '"', "'")
# A sentence ends at terminal punctuation (closing quotes and brackets included) followed by a space.
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")
_CODE_SYMBOLS = re.compile(r"[{}()\[\];=<>]")


def _is_code_line(line: str) -> bool:
    """Indented (a code block as html_to_text writes `pre`), or a line whose non-space characters are
    mostly code syntax (braces, semicolons, assignments)."""
    if line[:1] in (" ", "\t") and line.strip():
        return True
    stripped = line.strip()
    return len(stripped) > 1 and len(_CODE_SYMBOLS.findall(stripped)) >= max(2, 0.1 * len(stripped.replace(" ", "")))


def _sentences(line: str) -> int:
    return max(1, len(_SENTENCE_END.findall(line))) if line else 0


def c4_lines(text: str, params: C4Lines = C4Lines()) -> tuple[str, str | None]:
    """(text with C4's bad lines removed, None) to keep, or (text, reason) to reject the document.

    Lines go when they hold a word over max_word_length characters, fewer than min_words_per_line words,
    "javascript", or a cookie/terms-of-use phrase (and, if switched on, when they lack terminal punctuation).
    Wikipedia-style citations are removed. Documents go as c4_lorem_ipsum, c4_curly_bracket (a "{" in a prose
    line) or c4_sentences (fewer than min_num_sentences sentences left). Code lines are kept verbatim when
    keep_code is on: documentation pages are a main CPT domain, and C4's rules would delete their code.
    """
    kept: list[str] = []
    sentences = 0
    for raw in text.splitlines():
        if params.keep_code and _is_code_line(raw):
            kept.append(raw.rstrip())
            continue
        line = raw.strip()
        words = line.split()
        if any(len(w) > params.max_word_length for w in words):
            continue
        line = _CITATION.sub("", line)
        if params.filter_no_terminal_punct and (not line.endswith(_END_PUNCTUATION) or line.endswith("...")):
            continue
        if len(words) < params.min_words_per_line:
            continue
        lower = line.lower()
        if "lorem ipsum" in lower:
            return text, "c4_lorem_ipsum"
        if "javascript" in lower:
            continue
        if params.filter_curly_bracket and "{" in line:
            return text, "c4_curly_bracket"
        if any(p in lower for p in _POLICY):
            continue
        sentences += _sentences(line)
        kept.append(line)
    if sentences < params.min_num_sentences:
        return text, "c4_sentences"
    return "\n".join(kept).strip("\n"), None


# ---- FineWeb line rules ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FineWebLines:
    """FineWeb's own rules (datatrove's FineWebQualityFilter defaults)."""

    line_punct_thr: float = 0.12
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3


def check_fineweb_lines(text: str, params: FineWebLines = FineWebLines()) -> str | None:
    """None, or fineweb_punctuation_lines (too few lines end in terminal punctuation), fineweb_short_lines
    (too many lines of short_line_length characters or fewer), fineweb_duplicate_line_chars (characters in
    repeated lines), fineweb_list_lines (a newline every few words: a list, not prose)."""
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return "fineweb_punctuation_lines"
    if sum(line.endswith(TERMINAL_PUNCTUATION) for line in lines) / len(lines) < params.line_punct_thr:
        return "fineweb_punctuation_lines"
    if sum(len(line) <= params.short_line_length for line in lines) / len(lines) > params.short_line_thr:
        return "fineweb_short_lines"
    if _duplicates(lines)[1] / max(1, len(text.replace("\n", ""))) > params.char_duplicates_ratio:
        return "fineweb_duplicate_line_chars"
    if text.count("\n") / max(1, len(split_words(text))) > params.new_line_ratio:
        return "fineweb_list_lines"
    return None


# ---- Prose of a documentation page -------------------------------------------------------------------------

_FENCE = re.compile(r"^\s*(```|~~~)")
# A line that is one identifier, dotted name, call or signature: `__dict__`, `builtins.object`, `f(a, b=1)`.
_NAME_LINE = re.compile(r"^\s*[\w.]+\s*(=\s*[\w.]+\s*)?(\(.*\))?\s*(->.*)?:?\s*$")


def is_code_line(line: str) -> bool:
    """Indented, mostly code syntax (see c4_lines), a name or signature (not a one-word heading such as
    "Notes"), or without any alphabetic word."""
    if _is_code_line(line) or (_NAME_LINE.match(line) and not line.strip().rstrip(":").isalpha()):
        return True
    words = line.split()
    return bool(words) and not any(w.isalpha() for w in words)


def prose_text(text: str, collapse_repeats: bool = True) -> str:
    """`text` without its code: fenced blocks (``` or ~~~) and every line is_code_line calls code; with
    collapse_repeats, a paragraph or line of 30+ characters seen before is left out too (API pages repeat
    inherited docstrings and parameter notes word for word: structure, not spam; repeats of short lines,
    menus and boilerplate still count).

    What the document rules should measure on documentation pages: their code blocks, signatures and symbol
    lists are not prose, and Gopher's statistics (alphabetic words, repeated lines) were fitted to prose.
    """
    out, fenced = [], False
    for line in text.split("\n"):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if fenced or is_code_line(line):
            continue
        out.append(line)
    if not collapse_repeats:
        return "\n".join(out)
    seen: set[str] = set()
    kept = []
    for paragraph in _PARAGRAPHS.split("\n".join(out)):
        lines = []
        for line in paragraph.split("\n"):
            key = line.strip()
            if len(key) >= 30 and key in seen:
                continue
            seen.add(key)
            lines.append(line)
        if lines:
            kept.append("\n".join(lines))
    return "\n\n".join(kept)
