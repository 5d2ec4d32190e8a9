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

    def __init__(self, model: nn.Module, reference: nn.Module | None = None, chunk_size: int = 256):
        super().__init__()
        self.model = model
        self.reference = reference
        self.chunk_size = chunk_size
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
            if self.reference is None:
                raise ValueError("with_kl=True needs a reference model")
            ref_decoder, ref_head = decoder_and_head(self.reference)
            with torch.no_grad():
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
            with torch.no_grad():
                ref_logp = torch.log_softmax(head_logits(self.reference, ref_head, rh), dim=-1)
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
    """lambda-free EWC penalty sum_i F_i (theta_i - theta*_i)^2 (differentiable; this rank's shards under FSDP)."""
    total = None
    for name, p in params.items():
        term = (_local(fisher[name]) * (_local(p) - _local(anchor[name])) ** 2).sum()
        total = term if total is None else total + term
    return total


@torch.no_grad()
def add_ewc_gradient(
    params: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], weight: float
) -> float:
    """Add d/dtheta of weight * sum F (theta - theta*)^2 to each .grad in place; return this rank's penalty value.

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
        _local(p.grad).add_(2.0 * weight * f * diff)
    return weight * float(value) if value is not None else 0.0


def estimate_fisher(
    objective: CausalLMObjective, sequences: dict[str, torch.Tensor], autocast, rank: int = 0, world_size: int = 1
) -> tuple[dict[str, torch.Tensor], int]:
    """Diagonal empirical Fisher: the mean over sequences of the squared gradient of each one's mean token NLL.

    One sequence per backward, so F does not depend on the batch size or the number of ranks (the
    sequences are split over ranks and the sums all-reduced). Divided by the number of sequences
    actually seen, not by a requested count: the seed divided by `num_samples` even when the data ran
    out first, shrinking the penalty.
    """
    import torch.distributed as dist

    params = trainable_parameters(objective.model)
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    input_ids, position_ids = sequences["input_ids"], sequences["position_ids"]
    labels = sequences.get("labels", input_ids)
    device = next(iter(params.values())).device
    seen = 0
    for i in range(rank, input_ids.shape[0], world_size):
        part = slice(i, i + 1)
        objective.zero_grad(set_to_none=True)
        with autocast():
            nll, _ = objective(input_ids[part].to(device), position_ids[part].to(device), labels[part].to(device))
        count = (labels[part][:, 1:] != IGNORE_INDEX).sum().clamp_min(1)
        (nll.sum() / count.to(device)).backward()
        for name, p in params.items():
            if p.grad is not None:
                fisher[name] += p.grad.detach() ** 2
        seen += 1
    objective.zero_grad(set_to_none=True)
    seen_t = torch.tensor(float(seen), device=device)
    if world_size > 1:
        for tensor in fisher.values():
            dist.all_reduce(tensor)
        dist.all_reduce(seen_t)
    seen = int(seen_t.item())
    if seen == 0:
        raise ValueError("EWC: no sequences to estimate the Fisher information from; check regularization.ewc.source")
    return {name: f / seen for name, f in fisher.items()}, seen


def save_fisher(path: str, fisher: dict[str, torch.Tensor], sequences: int, source: str, world=None) -> None:
    """Write the Fisher diagonal as safetensors (sharded past 5 GB), with how it was made in the metadata.

    Under FSDP every rank holds a shard: they are gathered one tensor at a time and written by rank 0
    (every rank must call this). Written under temporary names, then renamed.
    """
    from cpt.trainer import weights

    main = world is None or world.is_main
    folder, prefix = os.path.dirname(path) or ".", os.path.basename(path).removesuffix(".safetensors")
    metadata = {"sequences": str(sequences), "source": source, "format": "cpt-ewc-fisher-v1"}
    weights.write_safetensors(weights.entries_of(fisher, torch.float32), folder, prefix, main=main, metadata=metadata)


def load_fisher(path: str, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read a Fisher file (or index) into tensors laid out like `params` (each rank its shard under FSDP).

    Checks first that it covers exactly these parameters with the same shapes.
    """
    from safetensors import safe_open

    from cpt.trainer import weights

    files = weights.safetensors_files(path)
    shapes = {}
    for file in set(files.values()):
        with safe_open(str(file), framework="pt") as f:
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
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
