"""`cpt prepare` end to end, one test per preset on real local files, plus determinism and user errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from cpt.pipelines.config import resolve_config
from cpt.pipelines.io import expand_inputs
from cpt.pipelines.run import main
from cpt.shared import dataset
from tests.pipelines.prepare_corpus import (
    CODE_MODULES,
    HTML_MODULES,
    code_corpus,
    html_corpus,
    jsonl_corpus,
    topic_texts,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("raw")
    info = jsonl_corpus(base / "jsonl")
    html_corpus(base / "html")
    code_corpus(base / "code")
    return {"base": base, **info}


def prepare(*args: str) -> dict:
    """Run `cpt prepare` in this process and return the manifest it wrote."""
    argv = [str(a) for a in args]
    assert main(argv) == 0
    return dataset.read_manifest(argv[argv.index("--output") + 1])


def all_output_bytes(out: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file())


def file_digests(out: Path) -> dict[str, str]:
    """sha256 of every shard and dead-letter file (the manifest differs only by paths and timings)."""
    files = [*out.glob("data-*.arrow"), *out.glob("rejected/data-*.arrow"), *out.glob("dead_letter/*.jsonl")]
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files)}


@pytest.mark.slow
def test_text_preset_accounts_for_every_record_and_masks_pii_everywhere(corpus, tmp_path):
    out = tmp_path / "text"
    raw = corpus["base"] / "jsonl"
    manifest = prepare(
        "--input", raw / "*.jsonl", "--input", raw / "*.jsonl.gz", "--output", out, "--preset", "text",
        "--max-bytes", 100_000,
    )  # fmt: skip
    kept_gz = len(corpus["gz_ids"])
    assert manifest["counts"] == {
        "input": 19 + kept_gz + 1,
        "kept": 11 + kept_gz,  # 10 topics + the record without an id + the complete .gz lines
        "rejected": {"duplicate": 1, "language": 1, "too_short": 1},
        "dead_letter": 6,  # broken JSON, int text, no text, Latin-1 bytes, giant line, truncated .gz
    }
    assert manifest["notes"] == ["perplexity skipped: no --ppl-model"]
    assert manifest["steps"] == ["pii", "length", "language", "quality", "dedup", "near_dedup"]
    assert sorted(Path(f).name for f in manifest["inputs"]["files"]) == ["docs.jsonl", "part.jsonl.gz"]

    kept = datasets.load_from_disk(str(out))
    assert kept.num_rows == 11 + kept_gz
    assert set(kept["domain"]) == {"general"} and set(kept["lang"]) == {"en"}
    by_id = {row["id"]: row for row in kept}
    assert "docs.jsonl:14" in by_id  # no id field: derived from the file and line
    first = by_id[f"topic/{corpus['topics'][0][0]}"]
    assert first["text"].endswith("Questions go to [EMAIL]; the clerk's SSN [SSN] must never be stored.")
    assert (first["pii_email"], first["pii_ssn"]) == (1, 1)
    rejected = datasets.load_from_disk(str(out / "rejected"))
    assert sorted(zip(rejected["id"], rejected["reason"])) == [
        ("german", "language"),
        ("short", "too_short"),
        ("zz-copy-of-first", "duplicate"),
    ]
    dead = [json.loads(line) for p in sorted(out.glob("dead_letter/*.jsonl")) for line in p.read_text().splitlines()]
    errors = {d["id"]: d["error"].split(":")[0] for d in dead}
    assert errors == {
        "docs.jsonl:15": "broken JSON",
        "number": "text field 'text' is int, expected a string",
        "no-text": "missing text field 'text'",
        "docs.jsonl:18": "undecodable bytes",
        "docs.jsonl:19": "line of 150028 bytes over the size guard",
        f"part.jsonl.gz:after-line-{kept_gz}": f"unreadable after line {kept_gz}",
    }
    assert all(len(d["raw"]) <= 4096 for d in dead)
    assert "[EMAIL]" in next(d["raw"] for d in dead if d["id"] == "docs.jsonl:15")
    everything = all_output_bytes(out)
    assert corpus["email"].encode() not in everything and corpus["ssn"].encode() not in everything


@pytest.mark.slow
def test_web_preset_cleans_pydoc_html_and_tokenizes_into_a_file_url(corpus, tmp_path, tokenizer_dir):
    out = tmp_path / "web"
    manifest = prepare(
        "--input", corpus["base"] / "html" / "*.html", "--output", f"file://{out}", "--preset", "web",
        "--tokenizer", tokenizer_dir, "--domain", "python-docs", "--num-shards", 3,
    )  # fmt: skip
    assert manifest["counts"] == {
        "input": len(HTML_MODULES) + 2,
        "kept": len(HTML_MODULES),
        "rejected": {"duplicate": 1, "too_short": 1},
        "dead_letter": 0,
    }
    fingerprint = dataset.tokenizer_fingerprint(tokenizer_dir)
    assert manifest["tokenizer"] == {"name": str(tokenizer_dir), "sha256": fingerprint, "add_special_tokens": False}
    assert [s["file"] for s in manifest["shards"]] == [dataset.shard_name(i, 3) for i in range(3)]
    kept = datasets.load_from_disk(str(out))
    assert sorted(kept["id"]) == sorted(f"{name}.html" for name in HTML_MODULES)
    assert sum(kept["n_tokens"]) == sum(s["tokens"] for s in manifest["shards"]) > 0
    bisect = next(row for row in kept if row["id"] == "bisect.html")
    assert "<" not in bisect["text"].split("\n")[0] and "insort" in bisect["text"]
    assert "</a>" not in bisect["text"] and "&nbsp;" not in bisect["text"]
    assert bisect["domain"] == "python-docs" and bisect["n_tokens"] == len(bisect["input_ids"])
    rejected = datasets.load_from_disk(str(out / "rejected"))
    expected = [("tiny.html", "too_short"), ("zz_copy.html", "duplicate")]
    assert sorted(zip(rejected["id"], rejected["reason"])) == expected


@pytest.mark.slow
def test_code_preset_checks_syntax_and_dead_letters_bad_files(corpus, tmp_path):
    out = tmp_path / "code"
    manifest = prepare(
        "--input", corpus["base"] / "code" / "*.py", "--output", out, "--preset", "code", "--max-bytes", 60_000
    )
    assert manifest["counts"] == {
        "input": len(CODE_MODULES) + 4,
        "kept": len(CODE_MODULES),
        "rejected": {"duplicate": 1, "syntax_error": 1},
        "dead_letter": 2,
    }
    kept = datasets.load_from_disk(str(out))
    assert sorted(kept["id"]) == sorted(CODE_MODULES)
    assert set(kept["lang"]) == {None}
    dead = [json.loads(line) for p in sorted(out.glob("dead_letter/*.jsonl")) for line in p.read_text().splitlines()]
    assert sorted((d["id"], d["error"].split(":")[0].split(" of ")[0]) for d in dead) == [
        ("giant.py", "file"),
        ("latin1.py", "undecodable bytes"),
    ]


@pytest.mark.slow
def test_shards_are_byte_identical_with_two_worker_processes_and_a_rerun_replaces_the_output(corpus, tmp_path):
    raw = corpus["base"] / "jsonl" / "*"
    one = tmp_path / "one"
    prepare("--input", raw, "--output", one, "--max-bytes", 100_000, "--num-shards", 3)
    two = tmp_path / "two"
    prepare("--input", raw, "--output", two, "--max-bytes", 100_000, "--num-shards", 8)  # replaced below
    # `python -m cpt.pipelines.run` (the __main__ guard) with 2 worker processes, into the same folder.
    cmd = [sys.executable, "-m", "cpt.pipelines.run", "--input", str(raw), "--output", str(two)]
    cmd += ["--max-bytes", "100000", "--num-shards", "3", "--direct_num_workers", "2"]
    cmd += ["--direct_running_mode", "multi_processing"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "kept:        13" in done.stdout
    assert file_digests(one) == file_digests(two)
    assert len(file_digests(one)) == 3 + 3 + len(list(one.glob("dead_letter/*.jsonl")))
    assert sorted(p.name for p in two.glob("data-*")) == [dataset.shard_name(i, 3) for i in range(3)]
    assert not list(two.glob("_run_summary*")) and not list(two.rglob("*.tmp-*"))


@pytest.mark.slow
def test_perplexity_keeps_a_percentile_band_with_a_tiny_llama(corpus, tmp_path, tiny_model_dir):
    out = tmp_path / "ppl"
    manifest = prepare(
        "--input", corpus["base"] / "jsonl" / "docs.jsonl", "--output", out, "--max-bytes", 100_000,
        "--ppl-model", tiny_model_dir, "--ppl-keep-percentile", 20, 80, "--ppl-max-tokens", 64, "--skip", "dedup",
    )  # fmt: skip
    # 12 English documents reach the perplexity step; the band keeps those within the 20th..80th percentile.
    counts = manifest["counts"]
    assert counts["rejected"]["perplexity"] + counts["kept"] == 12
    assert 6 <= counts["kept"] <= 8
    assert manifest["notes"] == [] and "perplexity" in manifest["steps"]
    kept = datasets.load_from_disk(str(out))
    rejected = datasets.load_from_disk(str(out / "rejected"))
    band = [p for p, r in zip(rejected["ppl"], rejected["reason"]) if r == "perplexity"]
    assert all(p is not None and p > 1.0 for p in kept["ppl"])
    assert all(p < min(kept["ppl"]) or p > max(kept["ppl"]) for p in band)


def run_error(*args) -> str:
    """Run `cpt prepare` expecting a user error: exit code 2 and one line on stderr."""
    cmd = [str(REPO / ".venv" / "bin" / "cpt"), "prepare", *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_user_errors_exit_before_any_work_with_one_line(tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "x"}\n')
    out = tmp_path / "out"
    cases = {
        ("--input", tmp_path / "missing.jsonl", "--output", out): "no such file or folder",
        ("--input", tmp_path / "*.parquet", "--output", out): "the pattern matches no files",
        ("--input", data, "--output", out, "--preset", "blog"): "unknown preset 'blog'; choose one of code, text, web",
        ("--input", data, "--output", out, "--skip", "spelling"): "unknown step 'spelling'",
        ("--input", data, "--output", data): "is a file; give a folder",
        ("--input", data, "--output", out, "--max-ppl", 100): "no model given; add --ppl-model DIR",
    }
    for args, message in cases.items():
        assert main([str(a) for a in args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    config = tmp_path / "ppl.yaml"
    config.write_text("steps: [pii, length, perplexity]\n")
    assert "no model given" in run_error("--input", data, "--output", out, "--config", config)
    assert not out.exists()


def test_same_file_names_under_two_patterns_and_a_lone_surrogate_keep_every_record_apart(tmp_path):
    # Two patterns with a data.jsonl each used to give both files the same ids / source, so their dead
    # letters met in one dedup group (a KeyError when written); a lone surrogate ended a file's reading.
    (_, first), (_, second), (_, third) = topic_texts(3)
    email = "alice.pii@example.com"
    for folder, text in (("a", first), ("b", second)):
        (tmp_path / folder).mkdir()
        lines = ['{"text": "broken', json.dumps({"text": text})]
        if folder == "b":
            lines += [f'{{"text": "write to {email} \\ud83d"}}', json.dumps({"text": third})]
        (tmp_path / folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    patterns = [str(tmp_path / "a" / "*.jsonl"), str(tmp_path / "b" / "*.jsonl")]
    assert [f.rel for f in expand_inputs(patterns)] == ["a/data.jsonl", "b/data.jsonl"]
    assert [f.rel for f in expand_inputs(patterns[:1])] == ["data.jsonl"]  # one pattern: ids as before
    out = tmp_path / "out"
    manifest = prepare(
        "--input", tmp_path / "a" / "*.jsonl", "--input", tmp_path / "b" / "*.jsonl", "--output", out,
        "--skip", "length", "language", "--num-shards", 1,
    )  # fmt: skip
    assert manifest["counts"] == {"input": 6, "kept": 3, "rejected": {}, "dead_letter": 3}
    kept = datasets.load_from_disk(str(out))
    assert sorted(zip(kept["id"], kept["source"])) == [
        ("a/data.jsonl:2", "a/data.jsonl"),
        ("b/data.jsonl:2", "b/data.jsonl"),
        ("b/data.jsonl:4", "b/data.jsonl"),
    ]
    dead = [json.loads(line) for line in (out / "dead_letter" / "part-00000.jsonl").read_text().splitlines()]
    assert sorted((d["id"], d["error"].split(":")[0]) for d in dead) == [
        ("a/data.jsonl:1", "broken JSON"),
        ("b/data.jsonl:1", "broken JSON"),
        ("b/data.jsonl:3", "text field 'text' is not valid UTF-8 (lone surrogate at character 31)"),
    ]
    assert email.encode() not in all_output_bytes(out)


def test_a_rejecting_step_before_pii_is_a_user_error(tmp_path, capsys):
    # Rejects are written as they are when rejected: `length` before `pii` put unmasked text in rejected/.
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "x"}\n')
    config = tmp_path / "order.yaml"
    config.write_text("steps: [html, length, pii, dedup]\n")
    assert main(["--input", str(data), "--output", str(tmp_path / "out"), "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "length comes before pii" in err, err
    assert not (tmp_path / "out").exists()
    config.write_text("steps: [html, pii, length, dedup]\n")
    assert resolve_config(None, str(config), {"inputs": [str(data)], "output": "o"}).problems() == []
    config.write_text("steps: [length, pii]\nskip: [pii]\n")  # pii skipped: nothing to mask, no problem
    assert resolve_config(None, str(config), {"inputs": [str(data)], "output": "o"}).problems() == []
