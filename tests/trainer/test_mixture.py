"""The streaming mixture: token-exact shares, packing, exact resume, rank/worker partition, clear errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from cpt.shared.config import ConfigError, load_config
from cpt.shared.dataset import DatasetError, shard_urls
from cpt.trainer.bootstrap import train_bpe_tokenizer
from cpt.trainer.data import (
    DataConfig,
    MixtureLoader,
    ScheduleConfig,
    SourceConfig,
    check_sources,
    eval_sequences,
    trace_lines,
)
from cpt.trainer.data.schedule import pick_source, target_shares
from tests.conftest import stdlib_texts
from tests.helpers import make_prepared_dataset

# Documents capped at 6,000 characters (about 2,000 tokens): the 1%-per-1M-token bound needs documents
# much shorter than the window (the deviation is at most about 2 x the longest document / window).
TEXTS = stdlib_texts(60, max_chars=6000)
DOMAIN_TEXTS, GENERAL_TEXTS = TEXTS[:30], TEXTS[30:]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tokenizer_dir) -> dict:
    """A domain set with token shards (3 shards) and a general set with text-only shards (2 shards)."""
    root = tmp_path_factory.mktemp("mixture")
    domain = make_prepared_dataset(
        root / "domain", DOMAIN_TEXTS, domain="code", tokenizer_dir=tokenizer_dir, num_shards=3, id_prefix="dom"
    )
    general = make_prepared_dataset(root / "general", GENERAL_TEXTS, num_shards=2, id_prefix="gen")
    return {"domain": domain, "general": general}


def data_config(sources, **overrides) -> DataConfig:
    data = {
        "seq_len": 256,
        "sources": [
            {"name": "domain", "path": sources["domain"], "weight": 3.0},
            {"name": "general", "path": sources["general"], "weight": 1.0},
        ],
        **overrides,
    }
    return load_config(DataConfig, data=data)


def take(loader, n: int) -> list[dict]:
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            break
    return batches


def expected_tokens(tokenizer) -> dict[str, list[int]]:
    """doc id -> token ids + EOS, as the loader must emit them."""
    docs = {}
    for prefix, texts in (("dom", DOMAIN_TEXTS), ("gen", GENERAL_TEXTS)):
        for i, text in enumerate(texts):
            docs[f"{prefix}-{i:06d}"] = tokenizer(text, add_special_tokens=False)["input_ids"] + [
                tokenizer.eos_token_id
            ]
    return docs


# --- config and schedule ------------------------------------------------------------------------------------


def test_config_lists_every_problem_at_once(tmp_path, sources):
    data = {
        "seq_len": 256,
        "sources": [
            {"name": "domain", "path": sources["domain"], "weight": 0},
            {"name": "general", "path": str(tmp_path / "nowhere")},
        ],
        "schedule": {"type": "linear", "source": "domian", "start": 0.5},
    }
    with pytest.raises(ConfigError) as err:
        load_config(DataConfig, data=data)
    assert err.value.problems == [
        "schedule.end: a linear schedule needs a share in [0, 1], got None",
        "sources[0].weight: must be > 0, got 0.0 (drop the source instead)",
        f"sources[1].path: {tmp_path / 'nowhere'} has no manifest.json; give a folder written by `cpt prepare` "
        "(a run that did not finish writes no manifest)",
        "schedule.source: 'domian' is not a source name (sources: ['domain', 'general'])",
    ]


def test_target_shares_for_constant_linear_and_steps_schedules():
    names, weights = ["domain", "general", "code"], [2.0, 1.0, 1.0]
    assert target_shares(names, weights, None, 0, None) == [0.5, 0.25, 0.25]
    linear = ScheduleConfig(type="linear", source="domain", start=0.5, end=0.9)
    assert target_shares(names, weights, linear, 0, 1000) == [0.5, 0.25, 0.25]  # others split 0.5 by weight
    assert target_shares(names, weights, linear, 500, 1000) == pytest.approx([0.7, 0.15, 0.15])  # halfway
    assert target_shares(names, weights, linear, 1000, 1000) == pytest.approx([0.9, 0.05, 0.05])  # the end
    assert target_shares(names, weights, linear, 5000, 1000) == pytest.approx([0.9, 0.05, 0.05])  # held after
    steps = ScheduleConfig(type="steps", source="general", steps=[[0.0, 0.2], [0.5, 0.6]])
    assert target_shares(names, weights, steps, 499, 1000) == pytest.approx([0.8 * 2 / 3, 0.2, 0.8 / 3])
    assert target_shares(names, weights, steps, 500, 1000) == pytest.approx([0.4 * 2 / 3, 0.6, 0.4 / 3])


def test_pick_source_takes_the_largest_lag_then_the_larger_target_then_the_lower_index():
    assert pick_source([0.75, 0.25], [0.0, 0.0], [0, 0]) == 0  # nothing drawn yet: the larger target
    assert pick_source([0.75, 0.25], [750.0, 250.0], [800, 200]) == 1  # general lags by 50 tokens
    assert pick_source([0.5, 0.5], [500.0, 500.0], [500, 500]) == 0  # a full tie: the lower index
    assert pick_source([0.0, 1.0], [0.0, 10.0], [0, 0]) == 1  # a zero target is never picked


def test_linear_schedule_without_total_tokens_is_refused(sources, tokenizer):
    cfg = data_config(sources, schedule={"type": "linear", "source": "domain", "start": 0.5, "end": 0.9})
    with pytest.raises(ValueError, match="linear schedule is defined over the run's length: pass total_tokens"):
        MixtureLoader(cfg, tokenizer, seed=0, micro_batch_size=1)


# --- token-exact shares -----------------------------------------------------------------------------------


def window_deviation(cfg, tokenizer, total_tokens: int, target_at) -> float:
    """Largest |realised - target| domain share over every 1M-token window (sliding by one sequence)."""
    loader = MixtureLoader(cfg, tokenizer, seed=0, micro_batch_size=8, total_tokens=total_tokens)
    per_sequence = []
    for batch in loader:
        per_sequence += (batch["source_ids"] == 0).sum(dim=1).tolist()
        if len(per_sequence) * cfg.seq_len >= total_tokens:
            break
    cumulative = np.concatenate([[0], np.cumsum(per_sequence)])
    window = 1_000_000 // cfg.seq_len
    realised = (cumulative[window:] - cumulative[:-window]) / (window * cfg.seq_len)
    middles = (np.arange(len(realised)) + window / 2) * cfg.seq_len
    return float(np.abs(realised - target_at(middles / total_tokens)).max())


def test_constant_shares_stay_within_one_percent_over_every_million_tokens(sources, tokenizer):
    cfg = data_config(sources, seq_len=1024)
    assert window_deviation(cfg, tokenizer, 2_500_000, lambda progress: 0.75) < 0.01


def test_linear_ramp_shares_stay_within_one_percent_over_every_million_tokens(sources, tokenizer):
    cfg = data_config(sources, seq_len=1024, schedule={"type": "linear", "source": "domain", "start": 0.5, "end": 0.9})
    assert window_deviation(cfg, tokenizer, 3_000_000, lambda progress: 0.5 + 0.4 * progress) < 0.01


# --- packing ----------------------------------------------------------------------------------------------


def test_packing_concatenates_documents_with_eos_and_restarts_positions(sources, tokenizer):
    loader = MixtureLoader(data_config(sources), tokenizer, seed=3, micro_batch_size=4)
    batches = take(loader, 25)
    docs = expected_tokens(tokenizer)
    emitted = {}  # doc id -> tokens emitted so far in its current pass
    for batch in batches:
        assert batch["input_ids"].shape == (4, 256)
        assert batch["labels"].tolist() == batch["input_ids"].tolist()
        for row, segments in enumerate(batch["segments"]):
            ids, positions = batch["input_ids"][row].tolist(), batch["position_ids"][row].tolist()
            sources_row = batch["source_ids"][row].tolist()
            at = 0
            for name, doc_id, n in segments:
                assert positions[at : at + n] == list(range(n))  # positions restart at every segment
                assert sources_row[at : at + n] == [loader.source_names.index(name)] * n
                done = emitted.get(doc_id, 0) % len(docs[doc_id])  # a document may come back next epoch
                assert ids[at : at + n] == docs[doc_id][done : done + n]  # no token lost, none repeated
                emitted[doc_id] = emitted.get(doc_id, 0) + n
                at += n
            assert at == 256
    # Every document was emitted whole before the next one started, except the one still open at the end.
    partial = [doc_id for doc_id, n in emitted.items() if n % len(docs[doc_id])]
    assert len(partial) <= 1


# --- exact resume ------------------------------------------------------------------------------------------


def run_with_states(loader, n: int) -> tuple[list[dict], list[dict]]:
    batches, states = [], []
    for batch in loader:
        batches.append(batch)
        states.append(loader.state_dict())
        if len(batches) == n:
            break
    return batches, states


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return [trace_lines(x, 0) for x in a] == [trace_lines(x, 0) for x in b] and all(
        x["input_ids"].equal(y["input_ids"]) and x["position_ids"].equal(y["position_ids"]) for x, y in zip(a, b)
    )


@pytest.mark.parametrize("shuffle_buffer", [0, 7])
def test_resume_continues_exactly_mid_document_and_across_epoch_boundaries(sources, tokenizer, shuffle_buffer):
    cfg = data_config(sources, shuffle_buffer=shuffle_buffer)
    total = 240  # 2 x 256 tokens per batch: ~120k tokens, several epochs of both sources
    batches, states = run_with_states(MixtureLoader(cfg, tokenizer, seed=7, micro_batch_size=2), total)
    mid_document = next(k for k, s in enumerate(states) if s["open"] is not None and s["cursors"][s["open"]][2])
    new_epoch = next(k for k, s in enumerate(states) if s["cursors"][0][0] == 1)  # domain just started epoch 1
    assert states[new_epoch - 1]["cursors"][0][0] == 0
    for k in (mid_document, new_epoch - 1, new_epoch, 150):
        state = json.loads(json.dumps(states[k]))
        resumed = MixtureLoader(cfg, tokenizer, seed=7, micro_batch_size=2)
        resumed.load_state_dict(state)
        rest = take(resumed, total - k - 1)
        assert same_batches(rest, batches[k + 1 :]), f"resume after batch {k} diverged"


def test_a_new_iter_continues_instead_of_rereading_the_first_batch(sources, tokenizer):
    cfg = data_config(sources)
    reference = take(MixtureLoader(cfg, tokenizer, seed=1, micro_batch_size=2), 6)
    loader = MixtureLoader(cfg, tokenizer, seed=1, micro_batch_size=2)
    pieces = [batch for _ in range(3) for batch in take(loader, 2)]  # three separate iter(loader) calls
    assert same_batches(pieces, reference)


def test_loader_workers_leave_the_global_torch_rng_alone(sources, tokenizer):
    # A resumed run restores the global RNG before building the loader; if starting the workers drew from it,
    # every later dropout mask would differ from the uninterrupted run's.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    take(MixtureLoader(data_config(sources, num_workers=1), tokenizer, seed=1, micro_batch_size=2), 1)
    assert torch.equal(torch.rand(3), expected)


def test_state_is_a_small_json_document(sources, tokenizer):
    loader = MixtureLoader(data_config(sources, shuffle_buffer=64), tokenizer, seed=0, micro_batch_size=4)
    take(loader, 30)
    state = loader.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert len(json.dumps(state)) < 1024
    assert state["sequence"] == 120


def test_a_state_from_another_mixture_is_refused(sources, tokenizer):
    loader = MixtureLoader(data_config(sources), tokenizer, seed=0, micro_batch_size=1)
    state = loader.state_dict()
    other = MixtureLoader(data_config(sources, seq_len=128), tokenizer, seed=0, micro_batch_size=1)
    with pytest.raises(ValueError, match="seq_len: state has 256, config has 128"):
        other.load_state_dict(state)


def test_a_remote_fsspec_source_streams_the_same_batches_as_the_local_copy(sources, tokenizer):
    import fsspec

    memory = fsspec.filesystem("memory")
    memory.put(sources["domain"], "/mixture-test/domain", recursive=True)
    memory.put(sources["general"], "/mixture-test/general", recursive=True)
    remote = data_config({"domain": "memory://mixture-test/domain", "general": "memory://mixture-test/general"})
    try:
        streamed = take(MixtureLoader(remote, tokenizer, seed=4, micro_batch_size=2), 20)
    finally:
        memory.rm("/mixture-test", recursive=True)
    assert same_batches(streamed, take(MixtureLoader(data_config(sources), tokenizer, seed=4, micro_batch_size=2), 20))


# --- distribution -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_with_two_workers_each_partition_the_global_stream_exactly(sources, tokenizer):
    cfg = data_config(sources)
    single = MixtureLoader(cfg, tokenizer, seed=5, micro_batch_size=2)
    reference = take(single, 24)
    by_index = {i: (b, row) for b in reference for row, i in enumerate(b["index"])}
    assert sorted(by_index) == list(range(48))
    cfg_workers = data_config(sources, num_workers=2)
    seen = []
    for rank in (0, 1):
        loader = MixtureLoader(cfg_workers, tokenizer, seed=5, micro_batch_size=2, rank=rank, world_size=2)
        batches = take(loader, 12)
        assert loader.state_dict() == single.state_dict()  # the global state after the same 48 sequences
        for step, batch in enumerate(batches):
            assert batch["index"] == [step * 4 + rank * 2, step * 4 + rank * 2 + 1]
            for row, i in enumerate(batch["index"]):
                ref, ref_row = by_index[i]
                assert batch["input_ids"][row].equal(ref["input_ids"][ref_row])
                assert batch["segments"][row] == ref["segments"][ref_row]
            seen += batch["index"]
    assert sorted(seen) == list(range(48))  # no duplicates, no gaps


def test_a_finite_source_ends_the_run_at_the_same_step_on_every_rank(sources, tokenizer):
    cfg = data_config(sources)
    cfg.sources[0].finite = True
    counts, domain_docs = [], []
    for rank in (0, 1):
        loader = MixtureLoader(cfg, tokenizer, seed=2, micro_batch_size=2, rank=rank, world_size=2)
        batches = list(loader)
        counts.append(len(batches))
        domain_docs += [d for b in batches for seq in b["segments"] for name, d, _ in seq if name == "domain"]
    assert counts[0] == counts[1] > 0
    # One pass over the domain set and no more; every document but the last few appears.
    assert set(domain_docs) <= {f"dom-{i:06d}" for i in range(30)}
    assert len(set(domain_docs)) >= 28


# --- refusals and errors -----------------------------------------------------------------------------------


def test_token_shards_from_another_tokenizer_are_refused(tmp_path, sources, tokenizer_dir):
    other_dir = tmp_path / "other_tokenizer"
    train_bpe_tokenizer(stdlib_texts(5), other_dir, vocab_size=300)
    cfg = data_config(sources)
    problems = check_sources(cfg, str(other_dir))
    assert len(problems) == 1  # the text-only general set is tokenized on the fly: it always matches
    assert problems[0].startswith(f"source 'domain' ({sources['domain']}): its token shards were made with")
    assert f"re-run `cpt prepare --tokenizer {other_dir}`" in problems[0]
    assert "or prepare it without --tokenizer so text is tokenized on the fly" in problems[0]
    assert check_sources(cfg, str(tokenizer_dir)) == []
    with pytest.raises(DatasetError, match="its token shards were made with tokenizer sha256"):
        MixtureLoader(cfg, AutoTokenizer.from_pretrained(str(other_dir)), seed=0, micro_batch_size=1)
    # `cpt eval` and the trainer's eval sets read through eval_sequences: refused there too.
    with pytest.raises(DatasetError, match="its token shards were made with tokenizer sha256"):
        eval_sequences(sources["domain"], AutoTokenizer.from_pretrained(str(other_dir)), 64, 2)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_corrupt_shard_is_named_in_the_error(tmp_path, sources, tokenizer, damage):
    copy = shutil.copytree(sources["domain"], tmp_path / "domain")
    shard = shard_urls(str(copy))[1]
    data = open(shard, "rb").read()
    broken = data[: len(data) // 2] if damage == "truncate" else data[:8] + bytes(range(256)) * (len(data) // 256)
    open(shard, "wb").write(broken)
    cfg = DataConfig(seq_len=256, sources=[SourceConfig(name="domain", path=str(copy))])
    assert check_sources(cfg, tokenizer.name_or_path) == [
        f"source 'domain': shard {shard} has {len(broken)} bytes, the manifest says {len(data)} "
        "(truncated or replaced); re-run `cpt prepare`"
    ]
    with pytest.raises(DatasetError, match="data-00001-of-00003.arrow: corrupt or truncated Arrow shard"):
        for _ in MixtureLoader(cfg, tokenizer, seed=0, micro_batch_size=4):
            pass


# --- evaluation sequences ------------------------------------------------------------------------------------


def test_eval_sequences_pack_documents_in_id_order_the_same_from_token_and_text_shards(tmp_path, sources, tokenizer):
    text_copy = make_prepared_dataset(tmp_path / "domain_text", DOMAIN_TEXTS, num_shards=2, id_prefix="dom")
    from_tokens = eval_sequences(sources["domain"], tokenizer, 128, 24)
    from_text = eval_sequences(text_copy, tokenizer, 128, 24)
    assert from_tokens["input_ids"].shape == (24, 128)
    assert from_tokens["input_ids"].equal(from_text["input_ids"])
    assert from_tokens["position_ids"].equal(from_text["position_ids"])
    eos = tokenizer.eos_token_id
    stream = [t for text in DOMAIN_TEXTS for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]]
    assert from_tokens["input_ids"].flatten().tolist() == stream[: 24 * 128]  # dom-000000, dom-000001, ...
    positions, at = [], 0
    for i, token in enumerate(stream[: 24 * 128]):
        at = 0 if i % 128 == 0 else at  # a document crossing into the next sequence restarts there
        positions.append(at)
        at = 0 if token == eos else at + 1
    assert from_tokens["position_ids"].flatten().tolist() == positions
    assert stream.index(eos) < 24 * 128  # the check above covers at least one document start


def test_eval_sequences_refuse_a_set_smaller_than_one_sequence(tmp_path, tokenizer_dir, tokenizer):
    small = make_prepared_dataset(tmp_path / "small", ["def f():\n    return 1\n"], tokenizer_dir=tokenizer_dir)
    with pytest.raises(DatasetError, match="fewer than one sequence of seq_len=1024"):
        eval_sequences(small, tokenizer, 1024, 4)
