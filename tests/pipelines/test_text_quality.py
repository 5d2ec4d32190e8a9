"""Gopher / C4 / FineWeb heuristics: each rule's reason on real text, code kept, and agreement with datatrove."""

from __future__ import annotations

import importlib.util
import pydoc
from pathlib import Path

import pytest

from cpt.pipelines.text.quality import (
    C4Lines,
    c4_lines,
    check_fineweb_lines,
    check_gopher_quality,
    check_gopher_repetition,
    prose_text,
    split_words,
)
from tests.pipelines.quality_corpus import documents

PROSE = pydoc.getdoc(__import__("argparse")) + "\n\n" + pydoc.getdoc(__import__("subprocess"))
GPL = Path("/usr/share/common-licenses/GPL-3")


def licence_prose() -> str:
    if not GPL.exists():
        pytest.skip("needs Debian's licence texts")
    return "\n\n".join(GPL.read_text().split("\n\n")[2:10])


def test_split_words_splits_punctuation_and_clitics_like_spacy():
    assert split_words("It's a test... (see this) don't.") == [
        "It", "'s", "a", "test", "...", "(", "see", "this", ")", "do", "n't", ".",
    ]  # fmt: skip


def test_real_prose_passes_every_rule():
    text = licence_prose()

    assert check_gopher_quality(text) is None
    assert check_gopher_repetition(text) is None
    assert c4_lines(text)[1] is None
    assert check_fineweb_lines(text) is None


@pytest.mark.parametrize(
    "text, reason",
    [
        ("just a few words here", "gopher_few_words"),
        (" ".join(["a an to of it is"] * 20), "gopher_short_words"),
        (" ".join(["internationalization characteristically"] * 30), "gopher_long_words"),
        ("the and with " * 20 + "#tag " * 20, "gopher_hashes"),
        ("the and with so... " * 20, "gopher_ellipses"),
        ("\n".join(f"- the item number {i} and more with it" for i in range(20)), "gopher_bullet_lines"),
        (
            "\n".join(f"the item number {i} and more with it as the list goes on and on..." for i in range(20)),
            "gopher_ellipsis_lines",
        ),
        ("the and " + " ".join(str(i) for i in range(1000, 1100)), "gopher_non_alpha_words"),
        (" ".join(f"word{i}x" for i in range(60)), "gopher_stop_words"),
    ],
)
def test_each_gopher_quality_rule_has_its_reason(text, reason):
    assert check_gopher_quality(text) == reason


def test_gopher_repetition_reasons():
    prose = licence_prose()
    paragraphs = prose.split("\n\n")

    assert check_gopher_repetition("\n\n".join(paragraphs[:2] * 4)) == "gopher_repetition_paragraphs"
    assert check_gopher_repetition("\n".join(["Home", "About us", "Home", "Contact", "Home"] * 3)) == (
        "gopher_repetition_lines"
    )
    assert check_gopher_repetition(prose + " buy now " * 200) == "gopher_repetition_top_2gram"
    assert check_gopher_repetition("") == "gopher_repetition_empty"


def test_c4_lines_drops_bad_lines_keeps_code_and_rejects_whole_documents():
    prose = licence_prose()
    page = (
        "Menu\nPlease enable JavaScript to view the comments.\nThis site uses cookies to improve it.\n"
        + prose
        + "\n    for (int i = 0; i < n; i++) {\n        total += x[i];\n    }\n"
    )

    text, reason = c4_lines(page)

    assert reason is None
    assert "Menu" not in text and "JavaScript" not in text and "cookies to improve" not in text
    assert "    for (int i = 0; i < n; i++) {\n        total += x[i];\n    }" in text
    assert c4_lines(page, C4Lines(keep_code=False))[1] == "c4_curly_bracket"
    assert c4_lines(prose + "\nLorem ipsum dolor sit amet, consectetur.")[1] == "c4_lorem_ipsum"
    assert c4_lines("One sentence here only. And two of them.")[1] == "c4_sentences"
    assert c4_lines(prose.replace("\n\n", "\n[edit] "))[0].count("[edit]") == 0


def test_fineweb_line_reasons():
    prose = licence_prose()

    assert check_fineweb_lines("\n".join(f"Item {i} of the menu bar" for i in range(20))) == (
        "fineweb_punctuation_lines"
    )
    assert check_fineweb_lines("\n".join(f"Short line {i}." for i in range(20))) == "fineweb_short_lines"
    assert check_fineweb_lines(prose + "\nShare this page on social media.\n" * 5) == "fineweb_duplicate_line_chars"


def _datatrove_decision(filters, text: str) -> bool:
    from datatrove.data import Document

    doc = Document(text=text, id="0")
    return all(f.filter(doc) is True for f in filters)


@pytest.mark.slow
def test_keep_reject_decisions_agree_with_datatrove_on_97_percent_of_a_varied_set():
    if importlib.util.find_spec("datatrove") is None or importlib.util.find_spec("spacy") is None:
        pytest.skip("datatrove and spacy are not installed (the peers extra: pip install 'cpt[peers]')")
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter

    # datatrove's FineWeb example: defaults, C4's terminal-punctuation rule off; in this order.
    peers = [GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(filter_no_terminal_punct=False)]
    docs = documents()
    ours = [
        (check_gopher_repetition(t) or check_gopher_quality(t) or c4_lines(t, C4Lines(keep_code=False))[1]) is None
        for _, t in docs
    ]
    theirs = [_datatrove_decision(peers, t) for _, t in docs]

    agree = sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(docs)
    kinds = {kind for kind, _ in docs}
    # Known disagreements (3 of 269 when written): two Markdown READMEs whose alphabetic-word ratio is just
    # above 0.8 with our tokens and just below with spaCy's (spaCy splits URLs and link syntax into more
    # symbol tokens), and one run-on summary text where spaCy's sentencizer finds a fifth sentence.
    assert agree >= 0.97, agree
    assert {"prose", "menu", "keywords", "repeated", "table"} <= kinds
    assert 0.15 < sum(theirs) / len(docs) < 0.85  # both decisions well represented


# ---- prose_only: documentation pages judged by their prose (the web and text presets) -----------------------

DOC_MODULES = ("heapq", "shlex", "string", "glob", "fnmatch", "secrets")


def _quality_step(prose_only: bool):
    from cpt.pipelines.transforms import QualityStep

    step = QualityStep(gopher_repetition=True, gopher_quality=True, c4=True, fineweb=False, prose_only=prose_only)
    step.setup()
    return step


def test_prose_text_leaves_out_code_signatures_and_repeats_of_long_lines():
    sentence = "Return the index where to insert item x in list a, assuming a is sorted."
    text = "\n".join([
        "Functions", "", "bisect_left(a, x, lo=0, hi=None, *, key=None)", sentence, "",
        "bisect_right(a, x, lo=0, hi=None)", sentence, "", "```python", "import bisect", "```",
        "    indented = code()", "__dict__", "x = {1: 2};", "Notes", "Notes",
    ])  # fmt: skip

    assert prose_text(text).split("\n") == ["Functions", "", sentence, "", "Notes", "Notes"]
    assert prose_text(text, collapse_repeats=False).count(sentence) == 2


def test_pydoc_pages_the_published_rules_reject_pass_on_their_prose():
    from cpt.pipelines.text import html_to_text

    pages = {name: html_to_text(pydoc.html.page(name, pydoc.html.document(__import__(name))), mode="main")
             for name in DOC_MODULES}  # fmt: skip
    published, prose = _quality_step(False), _quality_step(True)

    assert {name: published({"text": text}) for name, text in pages.items()} == dict.fromkeys(
        DOC_MODULES, "gopher_non_alpha_words"
    ) | {"glob": "gopher_repetition_dup_5gram"}
    assert {name: prose({"text": text}) for name, text in pages.items()} == dict.fromkeys(DOC_MODULES)


def test_prose_only_still_rejects_a_page_of_copies_and_poor_prose():
    prose = _quality_step(True)
    paragraph = pydoc.getdoc(__import__("bisect").bisect_left).replace("\n", " ")

    assert prose({"text": "\n\n".join([paragraph] * 20)}) == "gopher_repetition_repeated_prose"
    assert prose({"text": "\n".join(f"Buy now item {i} cheap cheap cheap" for i in range(60))}) is not None
    assert prose({"text": licence_prose()}) is None


def test_web_runs_quality_after_language_text_runs_the_repetition_rules_code_none():
    from cpt.pipelines.config import resolve_config

    flags = {"inputs": ["in/*.html"], "output": "out"}
    web, text, code = (resolve_config(name, None, flags) for name in ("web", "text", "code"))

    for cfg in (web, text):
        assert cfg.steps.index("language") + 1 == cfg.steps.index("quality") < cfg.steps.index("dedup")
        assert cfg.quality.prose_only
    assert (web.quality.gopher_repetition, web.quality.gopher_quality, web.quality.c4) == (True, True, True)
    q = text.quality
    assert (q.gopher_repetition, q.gopher_quality, q.c4, q.fineweb) == (True, False, False, False)
    assert "quality" not in code.steps
