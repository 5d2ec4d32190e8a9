"""Everything `cpt train` needs before its first step, built in one place: `build(cfg, world, resume) -> Parts`.

The order matters and is the same for every run: find the checkpoint to resume from, load the tokenizer,
build the model from `model:` (sharded from the start under FSDP), the KL reference and EWC's anchor and
Fisher (all from the starting weights, before any resume), wrap/shard, then the optimizer, schedule,
mixture loader, eval sets, and finally the checkpoint's state on top. The loop (trainer/loop.py) only
consumes the parts.
"""

from __future__ import annotations

import dataclasses
import math
import random
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from cpt.trainer import adapters, anneal, distributed, weights
from cpt.trainer import checkpoint as ckpt
from cpt.trainer.config import RunConfig
from cpt.trainer.data.sample import sampled_sequences
from cpt.trainer.objectives import CausalLMObjective, estimate_fisher, load_fisher, save_fisher, trainable_parameters
from cpt.trainer.schedules import lr_at, warmup_steps_for

FISHER = "ewc_fisher.safetensors"


class TrainError(RuntimeError):
    """The run cannot go on; the message says why and what to change."""


@dataclass
class TrainerState:
    """Counters and history that a checkpoint stores in trainer_state.json."""

    step: int = 0
    tokens: int = 0
    tokens_per_source: dict[str, int] = field(default_factory=dict)
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    baseline: dict[str, float] = field(default_factory=dict)
    best: dict | None = None
    evals: list[dict] = field(default_factory=list)
    metrics_bytes: int = 0
    trace_bytes: int = 0


@dataclass
class Parts:
    """What build() returns and the loop consumes."""

    cfg: RunConfig
    world: distributed.Dist
    out: Path
    start: Path | None
    tokenizer: object
    model: torch.nn.Module
    reference: torch.nn.Module | None
    objective: CausalLMObjective
    module: torch.nn.Module
    params: dict[str, torch.Tensor]
    fisher: dict[str, torch.Tensor] | None
    anchor: dict[str, torch.Tensor] | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    loader: object
    eval_sets: dict
    state: TrainerState
    total_steps: int
    names: list[str]
    domain_index: int
    autocast: object
    checkpointer: ckpt.Checkpointer


def uses_bf16(precision: str, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast_for(precision: str, device: torch.device, fsdp: bool = False):
    """A context factory: bf16 autocast (on GPU for `auto`), or nothing (fp32, or FSDP's own mixed precision)."""
    if fsdp or not uses_bf16(precision, device):
        # Under FSDP2 the MixedPrecisionPolicy casts the gathered parameters to bf16; autocast on top would only
        # add casts.
        return _nullcontext
    return partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def total_steps_for(cfg: RunConfig, world_size: int) -> int:
    """max_steps, or max_tokens rounded up to whole optimizer steps."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return math.ceil(cfg.train.max_tokens / tokens_per_step(cfg, world_size))


def tokens_per_step(cfg: RunConfig, world_size: int) -> int:
    """Tokens in one optimizer step over all ranks (packed sequences are always full)."""
    return cfg.data.seq_len * cfg.train.micro_batch_size * cfg.train.grad_accum * world_size


def build_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: norms and biases (1-D) are not decayed. Fused on CUDA."""
    params = trainable_parameters(model)
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=device.type == "cuda" or None
    )


def build_scheduler(cfg: RunConfig, optimizer, total_steps: int):
    schedule = partial(
        lr_at,
        lr=cfg.train.lr,
        total_steps=total_steps,
        warmup_steps=warmup_steps_for(total_steps, cfg.train.warmup_ratio),
        schedule=cfg.train.lr_schedule,
        min_lr_ratio=cfg.train.min_lr_ratio,
        decay_ratio=cfg.train.decay_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s) / cfg.train.lr)


def find_start(out: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None; refuses to start over a run's checkpoints without --resume."""
    if resume:
        found = ckpt.latest_checkpoint(out)
        if found is None:
            warnings.warn(f"--resume: no complete checkpoint in {out}; starting from `model:`", stacklevel=2)
        return found
    if ckpt.checkpoint_dirs(out):
        raise TrainError(
            f"{out} already holds checkpoints of a run; pass --resume to continue it, or choose a new output_dir"
        )
    return None


def grad_accum_for(saved: dict, cfg: RunConfig, world: distributed.Dist) -> int:
    """grad_accum that keeps the checkpoint's global batch (sequences per optimizer step) on this world size."""
    global_batch = saved.get("global_batch") or (
        saved["world_size"] * cfg.train.micro_batch_size * cfg.train.grad_accum
    )
    per_micro = cfg.train.micro_batch_size * world.world_size
    if global_batch % per_micro:
        raise TrainError(
            f"the checkpoint's global batch is {global_batch} sequences per step ({saved['world_size']} rank(s)); "
            f"{world.world_size} rank(s) x train.micro_batch_size={cfg.train.micro_batch_size} does not divide it. "
            f"Resume with a number of ranks and a micro_batch_size whose product divides {global_batch}"
        )
    return global_batch // per_micro


def build(cfg: RunConfig, world: distributed.Dist, resume: bool = False, from_checkpoint: str | None = None) -> Parts:
    """Model, reference, EWC state, sharding, optimizer, schedule, loader, eval sets, checkpointer; resumed.

    `from_checkpoint`: a new run (a cooldown branch) in output_dir, started from another run's checkpoint.
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from cpt.trainer.data import MixtureLoader, eval_sequences

    hf_logging.disable_progress_bar()  # one bar per save_pretrained would drown the training bar
    out = Path(cfg.output_dir)
    start = find_start(out, resume)
    if from_checkpoint and start is None:
        try:
            start = anneal.branch_start(Path(from_checkpoint), out, world.is_main)
        except ValueError as err:
            raise TrainError(str(err)) from None
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.remove_leftovers(out)
    distributed.barrier(world)
    if start is not None:
        saved = ckpt.read_trainer_state(start)
        if saved["world_size"] != world.world_size:
            accum = grad_accum_for(saved, cfg, world)
            if world.is_main:
                warnings.warn(
                    f"{start} was written by {saved['world_size']} rank(s), this run has {world.world_size}: "
                    f"train.grad_accum {cfg.train.grad_accum} -> {accum} keeps the global batch",
                    stacklevel=2,
                )
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=accum))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    fsdp = cfg.train.fsdp
    autocast = autocast_for(cfg.train.precision, world.device, fsdp)
    total_steps = total_steps_for(cfg, world.world_size)
    names = [s.name for s in cfg.data.stream_sources()]
    domain_index = names.index(cfg.domain_source)

    # ---- model, reference, EWC anchor: all from `model:` (the starting weights), before any resume
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
    mixed = uses_bf16(cfg.train.precision, world.device)
    load = partial(weights.load_model, world=world, fsdp=fsdp, bf16=mixed, trust_remote_code=cfg.trust_remote_code)
    model = load(cfg.model)
    kl_cfg, ewc_cfg = cfg.regularization.kl, cfg.regularization.ewc
    # LoRA: the base is the model with its adapters off, so KL against it needs no second copy.
    base_reference = cfg.train.peft is not None and kl_cfg.weight > 0 and kl_cfg.reference is None
    if cfg.train.peft is not None:
        try:
            model = adapters.wrap(model, cfg.train.peft)
        except ValueError as err:
            raise TrainError(str(err)) from None
    wanted = kl_cfg.weight > 0 and not base_reference
    reference = load(kl_cfg.reference or cfg.model, frozen=True) if wanted else None
    if cfg.train.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    objective = CausalLMObjective(model, reference, cfg.train.loss_chunk_size, base_reference=base_reference)
    module = distributed.wrap(objective, world, fsdp, mp_policy=weights.mixed_precision(mixed) if fsdp else None)
    if fsdp:  # sharded on meta above; now each rank allocates and reads only its own shards
        sources = {"model": cfg.model}
        if reference is not None:
            sources["reference"] = kl_cfg.reference or cfg.model
        weights.materialize(objective, sources, world.device)
    model.train()
    params = trainable_parameters(model)
    fisher = anchor = None
    if ewc_cfg.weight > 0:
        fisher, anchor = ewc_setup(cfg, objective, tokenizer, autocast, world, eval_sequences, resume)
    if cfg.train.compile:
        module = torch.compile(module)
    torch.manual_seed(cfg.seed + world.rank)

    # ---- optimizer, schedule, data
    if cfg.train.peft is not None:
        t = cfg.train
        groups = adapters.param_groups(model, t)
        fused = world.device.type == "cuda" or None
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps, fused=fused)
    else:
        optimizer = build_optimizer(model, cfg.train, world.device)
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    loader = MixtureLoader(
        anneal.resolve_anneal(cfg.data, cfg.train, total_steps),
        tokenizer,
        seed=cfg.seed,
        micro_batch_size=cfg.train.micro_batch_size,
        rank=world.rank,
        world_size=world.world_size,
        total_tokens=total_steps * tokens_per_step(cfg, world.world_size),
    )
    eval_sets = {
        name: eval_sequences(path, tokenizer, cfg.data.seq_len, cfg.eval.max_sequences, cfg.data.add_bos)
        for name, path in cfg.eval.sets.items()
    }
    checkpointer = ckpt.Checkpointer(out, world, model, optimizer, scheduler, tokenizer, cfg.checkpoint)
    state = TrainerState(tokens_per_source={n: 0 for n in names})
    if start is not None:
        state = restore(start, cfg, world, checkpointer, loader)
        # A cooldown branch may add anneal-only sources that its checkpoint never counted.
        state.tokens_per_source = {n: state.tokens_per_source.get(n, 0) for n in names}
    return Parts(
        cfg, world, out, start, tokenizer, model, reference, objective, module, params, fisher, anchor,
        optimizer, scheduler, loader, eval_sets, state, total_steps, names, domain_index, autocast, checkpointer,
    )  # fmt: skip


def ewc_setup(cfg: RunConfig, objective, tokenizer, autocast, world, eval_sequences, resume: bool = False):
    """(Fisher, anchor theta*) for EWC, laid out like the parameters (this rank's shards under FSDP).

    The Fisher is loaded from fisher_path / the run being resumed, or estimated on the (already sharded)
    starting model and saved, streamed one tensor at a time.
    """
    ewc_cfg = cfg.regularization.ewc
    params = trainable_parameters(objective.model)
    anchor = {name: p.detach().clone() for name, p in params.items()}
    saved = Path(cfg.output_dir) / FISHER
    # The run's own saved Fisher is reused only on --resume: a fresh start into the same output_dir may
    # have changed `model:`, the Fisher source or its sample count.
    path = Path(ewc_cfg.fisher_path) if ewc_cfg.fisher_path else saved
    if weights.safetensors_exists(path) and (ewc_cfg.fisher_path or resume):
        return load_fisher(str(path), params), anchor
    names = [s.name for s in cfg.data.sources]
    source = ewc_cfg.source or next((n for n in names if n != cfg.domain_source), "general")
    folder = {s.name: s.path for s in cfg.data.sources}.get(source) or cfg.eval.sets[source]
    sequences = sampled_sequences(
        folder, tokenizer, cfg.data.seq_len, ewc_cfg.fisher_samples, cfg.seed, cfg.data.add_bos
    )
    fisher_args = {"kind": ewc_cfg.fisher, "seed": cfg.seed}
    if cfg.train.fsdp:
        # Every rank runs every sequence through the sharded objective: the reduce-scatter then hands each rank
        # its shard of that one sequence's gradient, squared locally; splitting sequences would square a mean.
        fisher, seen = estimate_fisher(objective, sequences, autocast, 0, 1, **fisher_args)
    else:
        fisher_objective = CausalLMObjective(objective.model, chunk_size=cfg.train.loss_chunk_size)
        fisher, seen = estimate_fisher(
            fisher_objective, sequences, autocast, world.rank, world.world_size, **fisher_args
        )
    save_fisher(str(saved), fisher, seen, source, world)
    return fisher, anchor


def restore(folder: Path, cfg: RunConfig, world, checkpointer, loader) -> TrainerState:
    """Model, optimizer, scheduler, RNG, mixture and counters from a checkpoint (resharded to this world size)."""
    from cpt.shared.config import config_hash, to_dict

    saved = ckpt.read_trainer_state(folder)
    if saved["config_hash"] != config_hash(to_dict(cfg)) and saved["world_size"] == world.world_size:
        warnings.warn(f"{folder}: the config changed since this checkpoint was written", stacklevel=2)
    checkpointer.load(folder)
    same_world = saved["world_size"] == world.world_size
    # The mixture state is global (the same on every rank); RNG states are per rank and only restored when the
    # rank still exists in the same layout.
    rng, data_state = ckpt.read_rank_files(folder, world.rank if same_world else 0)
    try:
        loader.load_state_dict(data_state)
    except ValueError as err:  # another mixture, seq_len, seed or BOS rule: a one-line refusal, not a traceback
        raise TrainError(f"cannot resume from {folder}: {err}") from None
    if same_world:
        ckpt.set_rng_state(rng)
    return TrainerState(**saved["state"])
