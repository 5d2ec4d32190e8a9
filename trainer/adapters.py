"""LoRA continued pre-training through `peft`: adapters on chosen modules, optionally full embeddings + LM head.

`train.peft: {method: lora, r, alpha, dropout, target_modules, train_embeddings, embedding_lr_ratio}`.
The frozen base is KL's reference at no memory cost (the same model with its adapters disabled), EWC
works on the trainable parameters (adapters, plus embeddings/head when trained), checkpoints hold only
the trainable tensors and their optimizer state, `final/` and `best/` are the merged HF model and
`final-adapter/` the peft adapter (`PeftModel.from_pretrained(base, "final-adapter")`).
Runs on one process or under DDP; not under FSDP (the config refuses `train.fsdp` with `train.peft`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

ADAPTER = "final-adapter"
#: The linear layers of LLaMA-style blocks (attention and MLP): LoRA on all of them, as QLoRA recommends.
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class PeftConfig:
    """Parameter-efficient CPT: LoRA adapters instead of updating every weight."""

    method: Literal["lora"] = "lora"
    """lora (through the peft library)."""
    r: int = 16
    """LoRA rank."""
    alpha: float = 32.0
    """LoRA scaling numerator: the update is (alpha / r) * B A."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Module names (suffixes) that get adapters; the default covers LLaMA/Mistral/Qwen attention and MLP."""
    train_embeddings: bool = False
    """Also train the input embeddings and the LM head in full (peft modules_to_save), as CPT recipes for new
    domains/languages do; tied embeddings stay tied."""
    embedding_lr_ratio: float = 0.1
    """The embeddings' and head's learning rate as a fraction of train.lr (they move fastest otherwise)."""

    def problems(self) -> list[str]:
        found = []
        if not isinstance(self.r, int) or self.r < 1:
            found.append(f"r: must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            found.append(f"alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            found.append(f"dropout: must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            found.append("target_modules: name at least one module (e.g. q_proj, v_proj)")
        if not 0.0 < self.embedding_lr_ratio <= 1.0:
            found.append(f"embedding_lr_ratio: must be in (0, 1], got {self.embedding_lr_ratio}")
        return found


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def embedding_module_names(model: nn.Module) -> list[str]:
    """The attribute names of the input embeddings and the LM head (e.g. embed_tokens, lm_head)."""
    names = []
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        for name, candidate in model.named_modules():
            if candidate is module:
                names.append(name.rsplit(".", 1)[-1])
                break
    return list(dict.fromkeys(names))


def wrap(model: nn.Module, cfg: PeftConfig) -> nn.Module:
    """`model` with LoRA adapters (a peft PeftModel); only the adapters (and embeddings when asked) train."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in cfg.target_modules if t not in present]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"train.peft.target_modules: {missing} are not modules of {type(model).__name__}; "
            f"its linear layers are {linear}"
        )
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        modules_to_save=embedding_module_names(model) if cfg.train_embeddings else None,
        ensure_weight_tying=tied and cfg.train_embeddings,
    )
    return get_peft_model(model, config)


def param_groups(model: nn.Module, train) -> list[dict]:
    """AdamW groups: adapters (decayed matrices / undecayed vectors) at train.lr, embeddings at the lower lr."""
    groups = {key: [] for key in ("decay", "no_decay", "embed_decay", "embed_no_decay")}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))  # tied embeddings: one parameter, one group
        embed = "modules_to_save" in name
        groups[("embed_" if embed else "") + ("decay" if p.ndim >= 2 else "no_decay")].append(p)
    ratio = train.peft.embedding_lr_ratio
    specs = {
        "decay": (train.weight_decay, 1.0),
        "no_decay": (0.0, 1.0),
        "embed_decay": (train.weight_decay, ratio),
        "embed_no_decay": (0.0, ratio),
    }
    return [
        {"params": params, "weight_decay": specs[key][0], "lr": train.lr * specs[key][1]}
        for key, params in groups.items()
        if params
    ]


def trainable_fraction(model: nn.Module) -> float:
    """Trainable parameters / all parameters (each tied tensor counted once)."""
    unique = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in unique)
    return sum(p.numel() for p in unique if p.requires_grad) / max(1, total)


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with every LoRA update added in (W + scale * B A), under the plain HF names.

    Computed out of place: the training model is never merged and unmerged, which would round its weights
    and break an exact resume after a best/ save.
    """
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    adapter = model.active_adapter
    deltas = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            deltas[f"{name}.weight"] = module.get_delta_weight(adapter)
    state = {}
    for key, value in base.state_dict().items():
        if "lora_" in key or ".original_module." in key:
            continue  # adapter factors are merged below; original_module is the frozen copy a trained module replaces
        plain = key.replace(".base_layer.", ".").replace(f".modules_to_save.{adapter}.", ".")
        state[plain] = value + deltas[plain].to(value.dtype) if plain in deltas else value
    return state


def save_adapter(folder, model: nn.Module) -> None:
    """The peft adapter folder (adapter_config.json + adapter_model.safetensors)."""
    model.save_pretrained(str(folder), safe_serialization=True)
