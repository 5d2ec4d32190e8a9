"""Checkpoint folders: keep-last pruning, finding the newest complete one, best/ selection, weights round trip."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt.trainer import checkpoint as ckpt
from cpt.trainer import weights


def fake_checkpoint(root, step, complete=True):
    """A checkpoint folder with the files resume needs (empty: only their presence is checked here)."""
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    names = ckpt.REQUIRED + ("model.safetensors", "data_state_rank0.json")
    for name in names if complete else names[1:]:  # incomplete: no trainer_state.json
        (folder / name).write_text("{}")
    return folder


def test_prune_keeps_the_newest_by_step_not_by_name(tmp_path):
    for step in (2, 4, 10, 12):
        fake_checkpoint(tmp_path, step)
    deleted = ckpt.prune(tmp_path, keep_last=2)
    assert [p.name for p in deleted] == ["checkpoint-2", "checkpoint-4"]  # "checkpoint-10" sorts before "-4" as text
    assert [p.name for _, p in ckpt.checkpoint_dirs(tmp_path)] == ["checkpoint-10", "checkpoint-12"]


def test_latest_checkpoint_skips_an_incomplete_one_with_a_warning(tmp_path):
    fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 8, complete=False)
    (tmp_path / ".tmp-checkpoint-12").mkdir()  # killed while writing
    with pytest.warns(UserWarning) as warned:
        found = ckpt.latest_checkpoint(tmp_path, world_size=1)
    assert found == tmp_path / "checkpoint-4"
    messages = [str(w.message) for w in warned]
    assert any(".tmp-checkpoint-12: half-written checkpoint" in m for m in messages)
    assert any("checkpoint-8: incomplete checkpoint" in m for m in messages)


def test_a_checkpoint_from_fewer_ranks_is_not_complete_for_more(tmp_path):
    fake_checkpoint(tmp_path, 4)
    with pytest.warns(UserWarning, match="incomplete"):
        assert ckpt.latest_checkpoint(tmp_path, world_size=2) is None


def test_publish_replaces_an_existing_folder_atomically(tmp_path):
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "old.txt").write_text("old")
    tmp = ckpt.temp_dir(tmp_path, "best")
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    ckpt.publish(tmp, tmp_path / "best")
    assert [p.name for p in (tmp_path / "best").iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


BASE = {"domain_ppl": 100.0, "general_ppl": 50.0}


def test_best_takes_a_lower_domain_ppl_within_the_general_constraint():
    assert ckpt.is_better({"domain_ppl": 90.0, "general_ppl": 52.5}, None, BASE, "domain_ppl", 0.05)  # +5%: allowed


def test_best_refuses_a_lower_domain_ppl_that_costs_too_much_general_ppl():
    assert not ckpt.is_better({"domain_ppl": 10.0, "general_ppl": 52.6}, None, BASE, "domain_ppl", 0.05)  # +5.2%


def test_best_needs_a_strict_improvement_and_ignores_nan():
    best = {"domain_ppl": 80.0}
    assert not ckpt.is_better({"domain_ppl": 80.0, "general_ppl": 50.0}, best, BASE, "domain_ppl", 0.05)
    assert ckpt.is_better({"domain_ppl": 79.9, "general_ppl": 50.0}, best, BASE, "domain_ppl", 0.05)
    assert not ckpt.is_better({"domain_ppl": float("nan"), "general_ppl": 50.0}, None, BASE, "domain_ppl", None)
    assert ckpt.is_better({"domain_ppl": 70.0, "general_ppl": 500.0}, best, BASE, "domain_ppl", None)  # no constraint


def test_streamed_hf_folder_shards_by_size_and_loads_back(tmp_path, tiny_model_dir):
    trained = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with torch.no_grad():
        trained.model.norm.weight.fill_(0.5)
        trained.model.embed_tokens.weight[0].fill_(0.25)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    # Files of at most ~100 KB: the 2-layer model is split over several, with an index, as HF writes 5 GB ones.
    entries = weights.entries_of(trained.state_dict(), torch.bfloat16, skip=weights.tied_names(trained))
    written = weights.write_safetensors(entries, tmp_path, "model", max_shard_bytes=100_000)
    trained.config.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    assert len(written) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    assert not list(tmp_path.glob(".*.tmp"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert loaded.model.norm.weight.tolist() == [0.5] * 64
    assert loaded.lm_head.weight[0].tolist() == [0.25] * 64  # the tied head follows the embeddings
    expected = trained.model.layers[0].mlp.up_proj.weight.to(torch.bfloat16).float()
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.weight, expected)
    # The trainer's own reader (used to fill FSDP shards) sees the same tensors through the index.
    fresh = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    weights.load_shards(fresh, str(tmp_path))
    assert torch.equal(fresh.model.layers[0].mlp.up_proj.weight, expected)


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    torch.manual_seed(3)
    ckpt.write_rank_files(tmp_path, 0, {"sequence": 7})
    expected = torch.rand(3)
    torch.manual_seed(99)
    rng, data_state = ckpt.read_rank_files(tmp_path, 0)
    ckpt.set_rng_state(rng)
    assert torch.equal(torch.rand(3), expected) and data_state == {"sequence": 7}
