"""EWC's Fisher per token: unbiased against exact per-token gradients, independent of seq_len, seeded sampling."""

from __future__ import annotations

import contextlib

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt.trainer.data.evalset import eval_sequences
from cpt.trainer.data.sample import sampled_sequences
from cpt.trainer.objectives import CausalLMObjective, estimate_fisher, load_fisher
from tests.conftest import stdlib_texts
from tests.helpers import make_prepared_dataset
from tests.trainer.trainutil import one_torch_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)


@pytest.fixture(scope="module")
def tokens(tokenizer_dir):
    """4096 tokens of real text the tokenizer was not trained on (stdlib sources 80 onwards)."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tokenizer("".join(stdlib_texts(130)[80:]), add_special_tokens=False)["input_ids"]
    assert len(ids) >= 4096
    return torch.tensor(ids[:4096])


def as_sequences(tokens: torch.Tensor, seq_len: int) -> dict:
    ids = tokens.view(-1, seq_len)
    return {"input_ids": ids, "position_ids": torch.arange(seq_len).expand_as(ids).clone()}


def fisher_sum(fisher: dict) -> float:
    return float(sum(f.sum() for f in fisher.values()))


def exact_per_token_fisher(model, sequences) -> dict:
    """The definition, the slow way: one backward per target token, squared, averaged over tokens."""
    objective = CausalLMObjective(model)
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for i in range(sequences["input_ids"].shape[0]):
        ids = sequences["input_ids"][i : i + 1]
        nll, _ = objective(ids, sequences["position_ids"][i : i + 1], ids)
        for t in range(nll.shape[1]):
            grads = torch.autograd.grad(nll[0, t], list(params.values()), retain_graph=True, allow_unused=True)
            for name, g in zip(params, grads):
                if g is not None:
                    total[name] += g**2
            count += 1
    return {n: t / count for n, t in total.items()}


def test_the_one_backward_estimate_is_unbiased_for_the_exact_per_token_fisher(model, tokens):
    sequences = as_sequences(tokens[:96], 32)  # 3 sequences, 93 target tokens
    exact = exact_per_token_fisher(model, sequences)
    objective = CausalLMObjective(model)
    draws = [estimate_fisher(objective, sequences, contextlib.nullcontext, seed=s)[0] for s in range(40)]
    mean = {n: sum(d[n] for d in draws) / len(draws) for n in exact}
    assert fisher_sum(mean) == pytest.approx(fisher_sum(exact), rel=0.1)
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        assert float(mean[name].sum()) == pytest.approx(float(exact[name].sum()), rel=0.25), name


@pytest.mark.parametrize("kind", ["empirical", "true"])
def test_fisher_sum_is_the_same_at_seq_len_64_and_256_on_the_same_tokens(model, tokens, kind):
    objective = CausalLMObjective(model)
    sums = {}
    for seq_len in (64, 256):
        fisher, seen = estimate_fisher(objective, as_sequences(tokens, seq_len), contextlib.nullcontext, kind=kind)
        assert seen == 4096 // seq_len
        sums[seq_len] = fisher_sum(fisher)
    # Exact per-token gradients differ by ~11% here (longer contexts); the old per-sequence mean was 3x apart.
    assert sums[64] == pytest.approx(sums[256], rel=0.25), sums
    if kind == "empirical":
        old = {}
        for seq_len in (64, 256):  # the per-sequence mean-NLL Fisher this replaces, for contrast
            x = as_sequences(tokens, seq_len)
            total = 0.0
            for i in range(x["input_ids"].shape[0]):
                model.zero_grad()
                ids = x["input_ids"][i : i + 1]
                objective(ids, x["position_ids"][i : i + 1], ids)[0].mean().backward()
                total += sum(float((p.grad**2).sum()) for p in model.parameters() if p.grad is not None)
            old[seq_len] = total / x["input_ids"].shape[0]
        model.zero_grad()
        assert old[64] > 2 * old[256], old


def test_true_fisher_is_seeded_and_differs_from_the_empirical_one(model, tokens):
    objective = CausalLMObjective(model)
    sequences = as_sequences(tokens[:256], 64)
    first, _ = estimate_fisher(objective, sequences, contextlib.nullcontext, kind="true", seed=3)
    again, _ = estimate_fisher(objective, sequences, contextlib.nullcontext, kind="true", seed=3)
    other, _ = estimate_fisher(objective, sequences, contextlib.nullcontext, kind="true", seed=4)
    empirical, _ = estimate_fisher(objective, sequences, contextlib.nullcontext, kind="empirical", seed=3)
    name = "model.embed_tokens.weight"
    torch.testing.assert_close(first[name], again[name], rtol=0, atol=0)
    assert not torch.equal(first[name], other[name]) and not torch.equal(first[name], empirical[name])
    with pytest.raises(ValueError, match="ewc.fisher: 'fisherish' is not one of empirical, true"):
        estimate_fisher(objective, sequences, contextlib.nullcontext, kind="fisherish")


def test_fisher_sequences_are_a_seeded_sample_of_the_whole_source(tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    path = make_prepared_dataset(tmp_path / "general", stdlib_texts(60), tokenizer_dir=tokenizer_dir)
    first_by_id = eval_sequences(path, tokenizer, 64, 8)["input_ids"]
    a = sampled_sequences(path, tokenizer, 64, 8, seed=0)
    b = sampled_sequences(path, tokenizer, 64, 8, seed=0)
    c = sampled_sequences(path, tokenizer, 64, 8, seed=1)
    assert a["input_ids"].shape == (8, 64)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["position_ids"], b["position_ids"])
    assert not torch.equal(a["input_ids"], c["input_ids"])
    assert not torch.equal(a["input_ids"], first_by_id)
    # BOS as in training (data.add_bos): in front of every document, never a target; none for this tokenizer.
    assert torch.equal(a["labels"], a["input_ids"])
    with_bos = sampled_sequences(path, tokenizer, 64, 8, seed=0, add_bos=True)
    ids, bos = with_bos["input_ids"], tokenizer.bos_token_id
    assert ids[0, 0] == bos and ids[0, 1:].tolist() == a["input_ids"][0, : 64 - 1].tolist()  # the same first document
    inserted = (ids == bos) & (with_bos["position_ids"] == 0)
    assert torch.equal(with_bos["labels"] == -100, inserted)
    assert torch.equal(with_bos["labels"][~inserted], ids[~inserted])


def test_a_fisher_file_of_the_old_per_sequence_format_is_refused(model, tmp_path):
    path = tmp_path / "old.safetensors"
    tensors = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    save_file(tensors, str(path), metadata={"format": "cpt-ewc-fisher-v1"})
    with pytest.raises(ValueError, match="scale with seq_len.*fisher_path: null"):
        load_fisher(str(path), dict(model.named_parameters()))
