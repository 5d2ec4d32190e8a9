"""`cpt data-check`: the mixture as the trainer streams it, without a model: shares, tokens/s, trace, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from cpt.trainer.data.check import main
from tests.conftest import stdlib_texts
from tests.helpers import make_prepared_dataset


@pytest.fixture(scope="module")
def run_yaml(tmp_path_factory, tokenizer_dir):
    """A trainer RUN.yaml whose data: mixes a token-shard domain set with a text-shard general set."""
    root = tmp_path_factory.mktemp("data_check")
    texts = stdlib_texts(24, max_chars=3000)
    domain = make_prepared_dataset(
        root / "domain", texts[:12], tokenizer_dir=tokenizer_dir, num_shards=2, id_prefix="d"
    )
    general = make_prepared_dataset(root / "general", texts[12:], num_shards=2, id_prefix="g")
    run = {
        "model": "unused-by-data-check",
        "tokenizer": str(tokenizer_dir),
        "seed": 11,
        "train": {"micro_batch_size": 2, "max_steps": 40, "grad_accum": 1},
        "data": {
            "seq_len": 128,
            "sources": [{"name": "domain", "path": domain, "weight": 1}, {"name": "general", "path": general}],
            "schedule": {"type": "linear", "source": "domain", "start": 0.5, "end": 0.9},
        },
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    return path


def read_trace(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_data_check_prints_rate_and_shares_and_writes_one_trace_line_per_sequence(run_yaml, tmp_path, capsys):
    assert main(["--config", str(run_yaml), "--sequences", "40", "--trace", str(tmp_path / "t.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "40 sequences, 5120 tokens in" in out and "tokens/s" in out
    assert "  domain " in out and "  general " in out
    trace = read_trace(tmp_path / "t.jsonl")
    assert [line["index"] for line in trace] == list(range(40))
    assert all(line["rank"] == 0 and sum(n for _, _, n in line["segments"]) == 128 for line in trace)
    assert {name for line in trace for name, _, _ in line["segments"]} == {"domain", "general"}


@pytest.mark.parametrize("resume_at", [2, 14, 30])
def test_data_check_trace_is_identical_with_and_without_a_resume(run_yaml, tmp_path, capsys, resume_at):
    assert main(["--config", str(run_yaml), "--sequences", "40", "--trace", str(tmp_path / "a.jsonl")]) == 0
    args = ["--config", str(run_yaml), "--sequences", "40", "--trace", str(tmp_path / "b.jsonl")]
    assert main([*args, "--resume-at", str(resume_at)]) == 0
    assert f"resumed at sequence {resume_at} from a" in capsys.readouterr().out
    assert read_trace(tmp_path / "b.jsonl") == read_trace(tmp_path / "a.jsonl")


def test_data_check_respects_rank_and_world_size(run_yaml, tmp_path, monkeypatch):
    # One run length for both: max_steps x world size would give the linear schedule twice the tokens on 2 ranks.
    length = ["--total-tokens", str(40 * 2 * 128)]
    assert main(["--config", str(run_yaml), "--sequences", "40", "--trace", str(tmp_path / "w1.jsonl"), *length]) == 0
    merged = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        trace = str(tmp_path / f"r{rank}.jsonl")
        assert main(["--config", str(run_yaml), "--sequences", "20", "--trace", trace, *length]) == 0
        lines = read_trace(tmp_path / f"r{rank}.jsonl")
        assert {line["rank"] for line in lines} == {rank}
        merged += lines
    single = {line["index"]: line["segments"] for line in read_trace(tmp_path / "w1.jsonl")}
    assert {line["index"]: line["segments"] for line in merged} == single


def test_data_check_lists_every_config_problem(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": {"seq_len": 1, "sourcs": []}}))
    assert main(["--config", str(bad), "--sequences", "4"]) == 2
    err = capsys.readouterr().err
    assert "sourcs: unknown key (did you mean 'sources'?)" in err
    assert "seq_len: must be an integer >= 2, got 1" in err
    assert "sources: give at least one {name, path, weight}" in err


@pytest.mark.slow
def test_data_check_runs_as_a_cpt_subcommand(run_yaml):
    cpt = os.path.join(os.path.dirname(sys.executable), "cpt")
    result = subprocess.run(
        [cpt, "data-check", "--config", str(run_yaml), "--sequences", "8"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "8 sequences, 1024 tokens in" in result.stdout
