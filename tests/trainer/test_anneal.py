"""The anneal phase: a second mixture from the LR decay (or a fraction of the run) on, and cooldown branches."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from cpt.shared.config import ConfigError, load_config
from cpt.trainer import run as train_cli
from cpt.trainer.config import RunConfig
from cpt.trainer.data import DataConfig
from cpt.trainer.data.mixture import MixtureStream
from cpt.trainer.loop import train
from tests.trainer.trainutil import (
    make_datasets,
    one_torch_thread,  # noqa: F401 (autouse fixture)
    run_config,
    write_config,
)

SEQ, PER_STEP, STEPS = 64, 4, 6  # 256 tokens per step; wsd with decay_ratio 0.5 decays from step 3 on


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer_dir):
    # Documents well under the 768 tokens of the stable phase, whatever the shuffled order puts first: one that
    # started before the switch must end before the run does, so the branch shows where documents begin.
    return make_datasets(tmp_path_factory.mktemp("data"), tokenizer_dir, max_chars=1000)


def document_starts(trace_lines: list[dict], seq_len: int) -> list[tuple[int, str]]:
    """(stream token where the document starts, source) of every document the trace shows starting."""
    starts, last = [], None
    for line in sorted(trace_lines, key=lambda x: x["index"]):
        offset = line["index"] * seq_len
        for source, doc_id, n in line["segments"]:
            if (source, doc_id) != last:  # a segment continuing the previous sequence's document is no start
                starts.append((offset, source))
            last = (source, doc_id)
            offset += n
    return starts


def test_the_stream_switches_to_the_anneal_mixture_at_the_first_document_from_the_start_token(data, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = load_config(
        DataConfig,
        data={
            "seq_len": SEQ,
            "sources": [{"name": "domain", "path": data["domain"]}, {"name": "general", "path": data["general"]}],
            "anneal": {"start": 0.5, "sources": [{"name": "general"}, {"name": "extra", "path": data["domain_val"]}]},
        },
    )
    count = 400  # documents of at most 1000 characters: 400 x 64 tokens hold dozens
    total = count * SEQ
    stream = MixtureStream(cfg, tokenizer, seed=0, total_tokens=total)
    lines = [{"index": s.index, "segments": s.segments} for s in (stream.next_sequence(False) for _ in range(count))]
    starts = document_starts(lines, SEQ)
    switch = total // 2
    before = {source for token, source in starts if token < switch}
    after = [source for token, source in starts if token >= switch]
    assert before == {"domain", "general"} and set(after) == {"general", "extra"}
    # An even split after the switch, as the anneal weights ask (the domain source gets nothing).
    assert 0.3 < after.count("extra") / len(after) < 0.7


def test_anneal_config_mistakes_are_listed_together(data, tiny_model_dir, tmp_path):
    config = run_config(
        tiny_model_dir,
        tmp_path / "out",
        data,
        data={
            "seq_len": SEQ,
            "sources": [{"name": "domain", "path": data["domain"]}, {"name": "general", "path": data["general"]}],
            "anneal": {"start": 1.5, "sources": [{"name": "new"}, {"name": "general", "path": data["domain"]}]},
        },
        checkpoint={"branch_before_decay": True},
    )
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, data=config)
    text = str(err.value)
    assert "data.anneal.start: give decay or a fraction of the run in (0, 1), got 1.5" in text
    assert "anneal.sources[0].path: 'new' is not in data.sources, so it needs a path" in text
    assert "anneal.sources[1].path: 'general' is a data source with path" in text
    assert "checkpoint.branch_before_decay: needs train.lr_schedule: wsd" in text


def branch_config(model_dir, out, data, anneal):
    return run_config(
        model_dir,
        out,
        data,
        data={
            "seq_len": SEQ,
            "trace": True,
            "sources": [
                {"name": "domain", "path": data["domain"], "weight": 3.0},
                {"name": "general", "path": data["general"], "weight": 1.0},
            ],
            **({"anneal": anneal} if anneal else {}),
        },
        train={"max_steps": STEPS, "lr_schedule": "wsd", "decay_ratio": 0.5, "warmup_ratio": 0.2},
        eval={"every_steps": 3, "max_sequences": 2},
        checkpoint={"every_steps": 3, "keep_last": 1, "branch_before_decay": True},
    )


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_cooldown_branches_from_the_stable_checkpoint(data, tiny_model_dir, tmp_path):
    # The stable run: one mixture all along, and the state at the end of its stable phase kept.
    stable = tmp_path / "stable"
    train(load_config(RunConfig, data=branch_config(tiny_model_dir, stable, data, None)))
    kept = stable / "stable-checkpoint-3"
    assert kept.is_dir() and (stable / "checkpoint-6").is_dir()  # keep_last=1 pruned checkpoint-3, not this

    # Branch 1: cool down on a new high-quality source only (the CLI, as a user runs it).
    extra = {"start": "decay", "sources": [{"name": "extra", "path": data["domain_val"]}]}
    config_path = write_config(tmp_path / "b1.yaml", branch_config(tiny_model_dir, tmp_path / "b1", data, extra))
    assert train_cli.main(["--config", str(config_path), "--from-checkpoint", str(kept)]) == 0
    trace = read_lines(tmp_path / "b1" / "data_trace.jsonl")
    assert len(trace) == STEPS * PER_STEP
    switch = 3 * PER_STEP * SEQ  # the first token of step 3, where the wsd decay begins
    starts = document_starts(trace, SEQ)
    assert {s for t, s in starts if t < switch} <= {"domain", "general"}  # 1000-character documents: a few
    assert {s for t, s in starts if t >= switch} == {"extra"}
    first_extra = min(t for t, s in starts if s == "extra")
    assert first_extra == min(t for t, _ in starts if t >= switch)  # the first document boundary after the switch
    # Up to the branch point the branch IS the stable run: the same trace lines and metrics.
    parent = read_lines(stable / "data_trace.jsonl")
    assert trace[: 3 * PER_STEP] == parent[: 3 * PER_STEP] and trace[3 * PER_STEP :] != parent[3 * PER_STEP :]
    metrics = read_lines(tmp_path / "b1" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(STEPS + 1))
    assert metrics[:4] == read_lines(stable / "metrics.jsonl")[:4]
    assert metrics[-1]["tokens_per_source"]["extra"] > 0

    # Branch 2 keeps the stable mixture: it continues exactly as the stable run did (model, optimizer, data).
    path2 = write_config(tmp_path / "b2.yaml", branch_config(tiny_model_dir, tmp_path / "b2", data, None))
    assert train_cli.main(["--config", str(path2), "--from-checkpoint", str(kept)]) == 0
    again, original = read_lines(tmp_path / "b2" / "metrics.jsonl"), read_lines(stable / "metrics.jsonl")
    for a, b in zip(original[4:], again[4:], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5) and b["tokens"] == a["tokens"]
    assert (tmp_path / "b2" / "data_trace.jsonl").read_bytes() == (stable / "data_trace.jsonl").read_bytes()
