"""Training objectives: causal-LM NLL per token, KL to a frozen reference per token, and EWC.

The model runs to its last hidden state once; the LM head is then applied chunk by chunk over the
sequence. With a reference model, each chunk's reference logits are made, used and dropped inside the
same (activation-checkpointed) function, so two B x T x V logit tensors never exist at once: peak
logit memory is B x chunk x V for each model, recomputed in the backward pass instead of stored.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
FISHER_FORMAT = "cpt-ewc-fisher-v2"


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The HF causal LM's trunk (input ids -> last hidden state) and its LM head (hidden -> logits)."""
    head = model.get_output_embeddings()
    decoder = model.get_decoder()
    if head is None or decoder is model:
        raise ValueError(
            f"{type(model).__name__}: cannot split into decoder + LM head (get_decoder/get_output_embeddings); "
            "cpt needs a standard Hugging Face *ForCausalLM model"
        )
    return decoder, head


def head_logits(model: nn.Module, head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits for `hidden`, with the output transforms some HF models apply after lm_head (fp32 for the softmax)."""
    logits = head(hidden).float()
    config = model.config
    # Granite divides, Cohere multiplies, Gemma 2/3 soft-cap: the same steps their forward() takes.
    if getattr(config, "logits_scaling", None):
        logits = logits / config.logits_scaling
    if getattr(config, "logit_scale", None):
        logits = logits * config.logit_scale
    if getattr(config, "final_logit_softcapping", None):
        cap = config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits


class CausalLMObjective(nn.Module):
    """The trained model (and an optional frozen reference) behind ONE forward returning per-token NLL and KL.

    Both models live in this module so that DDP and FSDP2 see every parameter use inside forward():
    FSDP2 unshards the LM heads and embeddings on this module's forward, DDP hooks its gradients.
    """

    def __init__(
        self, model: nn.Module, reference: nn.Module | None = None, chunk_size: int = 256, base_reference=False
    ):
        """`base_reference`: KL's reference is `model` itself with its (peft) adapters disabled: no second copy."""
        super().__init__()
        self.model = model
        self.reference = reference
        self.chunk_size = chunk_size
        self.base_reference = base_reference and reference is None
        if reference is not None:
            reference.eval()
            reference.requires_grad_(False)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor, with_kl: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-target-token NLL [B, T-1] (0 where labels are ignored) and KL(p_ref || p_model) [B, T-1] or None."""
        decoder, head = decoder_and_head(self.model)
        hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        ref_hidden = ref_head = None
        if with_kl:
            if not self.has_reference:
                raise ValueError("with_kl=True needs a reference model")
            ref_decoder, ref_head = decoder_and_head(self.reference_model)
            with torch.no_grad(), self.reference_mode():
                ref_hidden = ref_decoder(
                    input_ids=input_ids, position_ids=position_ids, use_cache=False
                ).last_hidden_state[:, :-1]
        # Position t predicts token t + 1.
        hidden, targets = hidden[:, :-1], labels[:, 1:]

        def chunk_terms(h, y, rh):
            logits = head_logits(self.model, head, h)
            if rh is None:
                nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
                return nll.view_as(y), None
            logp = torch.log_softmax(logits, dim=-1)
            nll = -logp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (y != IGNORE_INDEX)
            with torch.no_grad(), self.reference_mode():
                ref_logp = torch.log_softmax(head_logits(self.reference_model, ref_head, rh), dim=-1)
            kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
            return nll, kl

        length = hidden.shape[1]
        chunks = range(0, length, self.chunk_size)
        # Recompute each chunk's logits in backward instead of keeping them all: this is what bounds memory.
        recompute = torch.is_grad_enabled() and (len(chunks) > 1 or with_kl)
        nlls, kls = [], []
        for start in chunks:
            part = slice(start, start + self.chunk_size)
            args = (hidden[:, part], targets[:, part], ref_hidden[:, part] if with_kl else None)
            nll, kl = checkpoint(chunk_terms, *args, use_reentrant=False) if recompute else chunk_terms(*args)
            nlls.append(nll)
            kls.append(kl)
        return torch.cat(nlls, dim=1), (torch.cat(kls, dim=1) if with_kl else None)

    @property
    def has_reference(self) -> bool:
        return self.reference is not None or self.base_reference

    @property
    def reference_model(self) -> nn.Module:
        return self.reference if self.reference is not None else self.model

    def reference_mode(self):
        """The context the reference runs in: the adapters switched off for a base reference, else nothing."""
        return self.model.disable_adapter() if self.base_reference else _no_context()


def _no_context():
    import contextlib

    return contextlib.nullcontext()


def per_source_sums(values: torch.Tensor, source_ids: torch.Tensor, mask: torch.Tensor, num_sources: int):
    """Sum of `values` and count of tokens under `mask`, per source id: two float tensors [num_sources]."""
    ids = source_ids[mask]
    sums = torch.zeros(num_sources, dtype=torch.float64, device=values.device)
    counts = torch.zeros(num_sources, dtype=torch.float64, device=values.device)
    sums.index_add_(0, ids, values[mask].detach().double())
    counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))
    return sums, counts


# ---------------------------------------------------------------- EWC


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    # Under FSDP2 parameters are DTensors; EWC is elementwise, so each rank works on its own shard.
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def ewc_penalty(params: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor]):
    """lambda-free sum_i F_i (theta_i - theta*_i)^2 (differentiable; this rank's shards under FSDP).

    The training objective adds (lambda / 2) times this, as in Kirkpatrick et al. 2017.
    """
    total = None
    for name, p in params.items():
        term = (_local(fisher[name]) * (_local(p) - _local(anchor[name])) ** 2).sum()
        total = term if total is None else total + term
    return total


@torch.no_grad()
def add_ewc_gradient(
    params: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], weight: float
) -> float:
    """Add d/dtheta of (weight / 2) * sum F (theta - theta*)^2 to each .grad in place; return this rank's penalty.

    Added after the backward pass (and after DDP/FSDP gradient sync) rather than through autograd, so the
    penalty is counted exactly once per step whatever the world size and gradient accumulation.
    """
    value = None
    for name, p in params.items():
        f, a, local = _local(fisher[name]), _local(anchor[name]), _local(p)
        diff = local - a
        term = (f * diff * diff).sum()
        value = term if value is None else value + term  # a tensor: one host sync per step, not one per parameter
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        _local(p.grad).add_(weight * f * diff)
    return 0.5 * weight * float(value) if value is not None else 0.0


FISHER_KINDS = ("empirical", "true")


@torch.no_grad()
def sample_labels(objective: CausalLMObjective, input_ids, position_ids, generator: torch.Generator) -> torch.Tensor:
    """Labels drawn from the model's own next-token distribution (for the true Fisher); position 0 is ignored.

    Chunked over positions like the loss, so B x T x V logits never exist at once.
    """
    decoder, head = decoder_and_head(objective.model)
    hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state[:, :-1]
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for start in range(0, hidden.shape[1], objective.chunk_size):
        part = slice(start, start + objective.chunk_size)
        probs = torch.softmax(head_logits(objective.model, head, hidden[:, part]), dim=-1)
        draws = torch.multinomial(probs.flatten(0, 1).cpu(), 1, generator=generator).view(probs.shape[:2])
        labels[:, 1:][:, part] = draws.to(labels.device)
    return labels


def estimate_fisher(
    objective: CausalLMObjective,
    sequences: dict[str, torch.Tensor],
    autocast,
    rank: int = 0,
    world_size: int = 1,
    kind: str = "empirical",
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], int]:
    """Diagonal Fisher per TOKEN: F = mean over target tokens t of (d NLL_t / d theta)^2; (F, sequences seen).

    A per-token mean, so F (and the lambda that suits it) depends neither on seq_len nor on the number of
    sequences. kind="empirical" uses the data's own next tokens as labels; kind="true" draws each label
    from the model's predictive distribution (the Fisher information proper, Kirkpatrick et al. 2017).

    Exact per-token gradients would need one backward per token. Instead each sequence gets ONE backward
    of sum_t eps_t * NLL_t with independent random signs eps_t = +-1 (seeded): the square of that gradient
    is sum_t g_t^2 + sum_{t != s} eps_t eps_s g_t g_s, and the cross terms have expectation 0 because
    E[eps_t eps_s] = 0, so (grad)^2 / tokens is an unbiased estimate of the per-token Fisher (a Hutchinson-
    style trace trick; the plain sum without signs would add T * mean-gradient^2 and grow with seq_len).
    The sequences are split over ranks and the sums all-reduced, so F does not depend on the world size.
    """
    import torch.distributed as dist

    if kind not in FISHER_KINDS:
        raise ValueError(f"regularization.ewc.fisher: {kind!r} is not one of {', '.join(FISHER_KINDS)}")
    params = trainable_parameters(objective.model)
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    input_ids, position_ids = sequences["input_ids"], sequences["position_ids"]
    data_labels = sequences.get("labels", input_ids)
    device = next(iter(params.values())).device
    seen, tokens = 0, 0
    for i in range(rank, input_ids.shape[0], world_size):
        # One generator per sequence: the same signs and labels for a sequence whatever the world size.
        generator = torch.Generator().manual_seed(seed * 1_000_003 + i)
        part = slice(i, i + 1)
        ids, positions = input_ids[part].to(device), position_ids[part].to(device)
        with autocast():
            labels = data_labels[part].to(device)
            if kind == "true":
                labels = sample_labels(objective, ids, positions, generator)
            objective.zero_grad(set_to_none=True)
            nll, _ = objective(ids, positions, labels)
        mask = labels[:, 1:] != IGNORE_INDEX
        signs = torch.randint(0, 2, nll.shape, generator=generator).to(device=device, dtype=nll.dtype) * 2 - 1
        (nll * signs * mask).sum().backward()
        for name, p in params.items():
            if p.grad is not None:
                fisher[name] += p.grad.detach() ** 2
        seen += 1
        tokens += int(mask.sum())
    objective.zero_grad(set_to_none=True)
    counts = torch.tensor([float(seen), float(tokens)], device=device)
    if world_size > 1:
        for tensor in fisher.values():
            dist.all_reduce(tensor)
        dist.all_reduce(counts)
    seen, tokens = int(counts[0].item()), int(counts[1].item())
    if tokens == 0:
        raise ValueError("EWC: no tokens to estimate the Fisher information from; check regularization.ewc.source")
    return {name: f / tokens for name, f in fisher.items()}, seen


def save_fisher(path: str, fisher: dict[str, torch.Tensor], sequences: int, source: str, world=None) -> None:
    """Write the Fisher diagonal as safetensors (sharded past 5 GB), with how it was made in the metadata.

    Under FSDP every rank holds a shard: they are gathered one tensor at a time and written by rank 0
    (every rank must call this). Written under temporary names, then renamed.
    """
    from cpt.trainer import weights

    main = world is None or world.is_main
    folder, prefix = os.path.dirname(path) or ".", os.path.basename(path).removesuffix(".safetensors")
    # v2: the Fisher is a per-token mean (v1 was per sequence of mean token NLL, seq_len-dependent).
    metadata = {"sequences": str(sequences), "source": source, "format": FISHER_FORMAT}
    weights.write_safetensors(weights.entries_of(fisher, torch.float32), folder, prefix, main=main, metadata=metadata)


def load_fisher(path: str, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read a Fisher file (or index) into tensors laid out like `params` (each rank its shard under FSDP).

    Checks first that it is a per-token Fisher covering exactly these parameters with the same shapes.
    """
    from safetensors import safe_open

    from cpt.trainer import weights

    files = weights.safetensors_files(path)
    shapes, formats = {}, set()
    for file in set(files.values()):
        with safe_open(str(file), framework="pt") as f:
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
            formats.add((f.metadata() or {}).get("format"))
    if formats != {FISHER_FORMAT}:
        raise ValueError(
            f"{path}: Fisher format {sorted(map(str, formats))}, not {FISHER_FORMAT!r} (older files are per "
            "sequence and scale with seq_len); set regularization.ewc.fisher_path: null to re-estimate it"
        )
    problems = []
    missing = sorted(set(params) - set(shapes))
    extra = sorted(set(shapes) - set(params))
    if missing:
        problems.append(f"missing {len(missing)} parameter(s), e.g. {missing[:3]}")
    if extra:
        problems.append(f"{len(extra)} unknown parameter(s), e.g. {extra[:3]}")
    for name in sorted(set(params) & set(shapes)):
        if shapes[name] != tuple(params[name].shape):
            problems.append(f"{name}: shape {shapes[name]} != model {tuple(params[name].shape)}")
    if problems:
        raise ValueError(
            f"{path}: this Fisher file does not match the model ({'; '.join(problems[:5])}); "
            "set regularization.ewc.fisher_path: null to re-estimate it"
        )
    fisher = {name: torch.zeros_like(p.detach()) for name, p in params.items()}
    weights.fill_from_files(fisher, files, path)
    return fisher
