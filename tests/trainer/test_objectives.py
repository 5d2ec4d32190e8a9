"""CLM loss, KL to a frozen reference, and EWC: the values the trainer optimises."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt.trainer.objectives import (
    CausalLMObjective,
    add_ewc_gradient,
    estimate_fisher,
    ewc_penalty,
    load_fisher,
    save_fisher,
)
from tests.conftest import stdlib_texts
from tests.trainer.trainutil import one_torch_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)


@pytest.fixture(scope="module")
def batch(tokenizer_dir):
    """3 sequences of 40 real tokens (stdlib source), positions restarting nowhere."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tokenizer("".join(stdlib_texts(3)), add_special_tokens=False)["input_ids"][: 3 * 40]
    input_ids = torch.tensor(ids).view(3, 40)
    return {"input_ids": input_ids, "position_ids": torch.arange(40).expand(3, 40).clone(), "labels": input_ids}


def nudged(model, scale=0.05, seed=1):
    """A copy of `model` with every weight moved a little: a stand-in for a few training steps."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return other


def test_chunked_nll_equals_the_models_own_loss(model, batch):
    objective = CausalLMObjective(model, chunk_size=7)
    nll, kl = objective(batch["input_ids"], batch["position_ids"], batch["labels"])
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"]).loss
    assert nll.shape == (3, 39) and kl is None
    assert float(nll.detach().mean()) == pytest.approx(float(expected), abs=1e-6)


def test_chunking_changes_neither_the_loss_nor_the_gradient(model, batch):
    grads = []
    for chunk in (5, 1024):
        model.zero_grad()
        nll, _ = CausalLMObjective(model, chunk_size=chunk)(batch["input_ids"], batch["position_ids"], batch["labels"])
        nll.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_gives_the_same_gradient(tiny_model_dir, batch):
    grads = []
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        nll, _ = CausalLMObjective(model)(batch["input_ids"], batch["position_ids"], batch["labels"])
        nll.mean().backward()
        grads.append(model.model.layers[0].mlp.up_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_kl_to_an_identical_reference_is_exactly_zero(model, batch):
    objective = CausalLMObjective(model, copy.deepcopy(model), chunk_size=16)
    _, kl = objective(batch["input_ids"], batch["position_ids"], batch["labels"], with_kl=True)
    assert kl.shape == (3, 39)
    assert float(kl.detach().abs().max()) == 0.0


def test_kl_after_training_is_positive_finite_and_matches_full_logits(model, batch):
    reference = copy.deepcopy(model)
    trained = nudged(model)
    objective = CausalLMObjective(trained, reference, chunk_size=16)
    _, kl = objective(batch["input_ids"], batch["position_ids"], batch["labels"], with_kl=True)
    kl = kl.detach()
    assert torch.isfinite(kl).all() and float(kl.min()) >= 0.0 and float(kl.mean()) > 1e-4
    # The same KL(p_ref || p_model) from full logits, the memory-hungry way.
    args = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    log_p = torch.log_softmax(trained(**args).logits[:, :-1], -1)
    log_ref = torch.log_softmax(reference(**args).logits[:, :-1], -1)
    expected = F.kl_div(log_p, log_ref, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl, expected, atol=1e-5, rtol=1e-4)


def test_kl_gradient_reaches_the_model_but_not_the_reference(model, batch):
    reference = copy.deepcopy(model)
    trained = nudged(model)
    _, kl = CausalLMObjective(trained, reference, chunk_size=8)(
        batch["input_ids"], batch["position_ids"], batch["labels"], with_kl=True
    )
    kl.mean().backward()
    assert all(p.grad is None for p in reference.parameters())
    assert float(trained.model.embed_tokens.weight.grad.abs().sum()) > 0


def test_ewc_penalty_is_zero_at_the_anchor():
    theta = {"w": torch.tensor([1.0, 2.0])}
    assert float(ewc_penalty(theta, {"w": torch.tensor([0.5, 2.0])}, {"w": theta["w"].clone()})) == 0.0


def test_ewc_penalty_and_gradient_values():
    theta = {"w": torch.tensor([1.0, 2.0], requires_grad=True)}
    fisher, anchor = {"w": torch.tensor([0.5, 2.0])}, {"w": torch.tensor([0.0, 0.0])}
    assert float(ewc_penalty(theta, fisher, anchor).detach()) == 8.5  # 0.5 * 1^2 + 2 * 2^2
    value = add_ewc_gradient(theta, fisher, anchor, weight=2.0)
    assert value == 8.5  # (lambda / 2) * 8.5, Kirkpatrick et al.'s convention
    assert theta["w"].grad.tolist() == [1.0, 8.0]  # lambda * F * (theta - theta*)
    # The same gradient autograd finds for (lambda / 2) * penalty.
    theta2 = {"w": torch.tensor([1.0, 2.0], requires_grad=True)}
    (1.0 * ewc_penalty(theta2, fisher, anchor)).backward()
    assert theta2["w"].grad.tolist() == [1.0, 8.0]


def test_ewc_gradient_step_moves_weights_towards_the_anchor_most_where_fisher_is_large():
    theta = {"w": torch.tensor([1.0, 1.0], requires_grad=True)}
    fisher, anchor = {"w": torch.tensor([0.1, 1.0])}, {"w": torch.tensor([0.0, 0.0])}
    add_ewc_gradient(theta, fisher, anchor, weight=2.0)
    with torch.no_grad():
        after = theta["w"] - 0.1 * theta["w"].grad
    assert after.tolist() == pytest.approx([0.98, 0.8])  # both closer to 0; the important one much closer


def test_fisher_counts_the_sequences_actually_seen_and_round_trips_through_its_file(model, batch, tmp_path):
    objective = CausalLMObjective(model)
    fisher, seen = estimate_fisher(objective, batch, autocast=contextlib.nullcontext)
    assert seen == 3  # every sequence there is, whatever fisher_samples asked for
    assert set(fisher) == {n for n, _ in model.named_parameters()}
    path = tmp_path / "fisher.safetensors"
    save_fisher(str(path), fisher, seen, "general")
    loaded = load_fisher(str(path), dict(model.named_parameters()))
    torch.testing.assert_close(loaded["model.embed_tokens.weight"], fisher["model.embed_tokens.weight"])


def test_a_fisher_file_for_another_model_is_refused_with_the_fix(model, tmp_path):
    path = tmp_path / "fisher.safetensors"
    save_fisher(str(path), {"other.weight": torch.ones(2)}, 1, "general")
    with pytest.raises(
        ValueError, match=r"does not match the model .* set regularization\.ewc\.fisher_path: null to re-estimate"
    ):
        load_fisher(str(path), dict(model.named_parameters()))
