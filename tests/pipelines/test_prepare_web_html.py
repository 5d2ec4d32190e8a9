"""`cpt prepare --preset web` on crawl dumps: HTML in a JSONL field is found, cleaned and language-filtered."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pytest

from cpt.pipelines.run import main
from cpt.shared import dataset
from tests.pipelines import multilingual_pages

pytestmark = pytest.mark.skipif(
    not multilingual_pages.available(), reason="needs Debian's message catalogues under /usr/share/locale"
)
MARKUP = re.compile(r"</?[a-zA-Z][^>]*>|&[a-z]+;|&#\d+;")
CJK = ("ja", "zh")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def prepare(*args) -> dict:
    argv = [str(a) for a in args]
    assert main(argv) == 0
    return dataset.read_manifest(argv[argv.index("--output") + 1])


@pytest.fixture(scope="module")
def crawl(tmp_path_factory) -> tuple[Path, list[dict]]:
    pages = multilingual_pages.pages()
    folder = tmp_path_factory.mktemp("crawl")
    return write_jsonl(folder / "crawl.jsonl", [{"id": p["id"], "text": p["html"]} for p in pages]), pages


@pytest.mark.slow
def test_web_preset_sniffs_html_in_the_text_field_keeps_english_and_rejects_other_languages(crawl, tmp_path):
    path, pages = crawl
    out = tmp_path / "out"

    # near_dedup off: the English pages share their catalogue's msgids, so they are near-duplicates by construction.
    manifest = prepare("--input", path, "--output", out, "--preset", "web", "--num-shards", 2, "--skip", "near_dedup")

    english = {p["id"] for p in pages if p["lang"] == "en"}
    assert manifest["html"] == {"doctype": len(pages)}
    kept = datasets.load_from_disk(str(out))
    assert set(kept["id"]) == english
    for text in kept["text"]:
        assert MARKUP.search(text) is None
        # main content only: the chrome around the article is gone
        assert "cookies" not in text and "Getting started" not in text and "All rights reserved" not in text
    rejected = datasets.load_from_disk(str(out / "rejected"))
    lang_of = {p["id"]: p["lang"] for p in pages}
    for row in rejected:
        # CJK has no spaces between words: the web preset's min_words rejects it first
        expected = {"language", "too_few_words"} if lang_of[row["id"]] in CJK else {"language"}
        assert row["reason"] in expected, (row["id"], row["reason"], row["lang"])
        assert MARKUP.search(row["text"]) is None
    assert len(kept) + len(rejected) == len(pages)


@pytest.mark.slow
def test_html_field_reads_that_column_and_the_text_preset_reports_html_it_does_not_clean(crawl, tmp_path):
    path, pages = crawl
    english = [p for p in pages if p["lang"] == "en"][:4]
    records = [{"id": p["id"], "body": p["html"], "text": "unused"} for p in english]
    dump = write_jsonl(tmp_path / "dump.jsonl", records)

    by_field = prepare("--input", dump, "--output", tmp_path / "a", "--preset", "text", "--html-field", "body")
    as_text = prepare("--input", path, "--output", tmp_path / "b", "--preset", "text", "--skip", "language")

    assert by_field["html"] == {"field": 4}
    assert by_field["counts"]["kept"] == 4
    assert all(MARKUP.search(t) is None for t in datasets.load_from_disk(str(tmp_path / "a"))["text"])
    assert as_text["html"] == {"not_cleaned": len(pages)}
    assert any("look like HTML but were not cleaned" in note for note in as_text["notes"])


@pytest.mark.slow
def test_quality_reasons_are_listed_with_samples_by_cpt_inspect(tmp_path, capsys):
    from cpt.pipelines.inspect import main as inspect_main
    from tests.pipelines.quality_corpus import documents

    docs = documents()
    records = [{"id": f"{kind}-{i}", "text": text} for i, (kind, text) in enumerate(docs)]
    out = tmp_path / "out"
    config = tmp_path / "quality.yaml"
    config.write_text("steps: [html, pii, length, quality, dedup]\n")
    manifest = prepare(
        "--input", write_jsonl(tmp_path / "q.jsonl", records), "--output", out, "--preset", "web",
        "--config", config, "--min-chars", 50,
    )  # fmt: skip
    capsys.readouterr()

    assert inspect_main([str(out), "--rejected", "--n", "1"]) == 0
    shown = capsys.readouterr().out
    reasons = [r for r in manifest["counts"]["rejected"] if r.startswith(("gopher_", "c4_", "fineweb_"))]
    assert len(reasons) >= 5 and manifest["counts"]["kept"] > 0
    for reason in reasons:
        assert f"rejected as {reason} ({manifest['counts']['rejected'][reason]}):" in shown
        assert f"reason={reason} " in shown
