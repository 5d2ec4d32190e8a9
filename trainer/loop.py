"""The continued-pre-training loop: setup, then lr -> micro-steps -> clip -> step -> log -> eval/save.

`train(cfg, resume)` reads top to bottom. Each helper below it does one thing: build the optimizer,
run one optimizer step's forward/backward, evaluate, save a checkpoint. Everything that must survive
a restart (model, optimizer, scheduler, mixture, RNG, counters) goes into every checkpoint, and
`model:` always names the starting weights: resume loads the checkpoint's weights on top of it
(litgpt#1729), so KL's reference and EWC's anchor stay the initial model across restarts.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from cpt.shared.config import config_hash, to_dict
from cpt.trainer import anneal, distributed
from cpt.trainer import checkpoint as ckpt
from cpt.trainer.config import RunConfig
from cpt.trainer.data.sample import sampled_sequences
from cpt.trainer.evaluate import evaluate
from cpt.trainer.objectives import (
    IGNORE_INDEX,
    CausalLMObjective,
    add_ewc_gradient,
    estimate_fisher,
    load_fisher,
    per_source_sums,
    save_fisher,
    trainable_parameters,
)
from cpt.trainer.report import REPORT, JsonlFile, RunLog, plot_report, read_metrics
from cpt.trainer.schedules import lr_at, warmup_steps_for

TRACE = "data_trace.jsonl"
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


def autocast_for(precision: str, device: torch.device):
    """A context factory: bf16 autocast (on GPU for `auto`), or nothing (fp32)."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)


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


def oom_message(cfg: RunConfig, step: int) -> str:
    """What to turn when a step runs out of memory, with the current values."""
    t = cfg.train
    return (
        f"out of memory at step {step} (micro_batch_size={t.micro_batch_size}, data.seq_len={cfg.data.seq_len}, "
        f"grad_accum={t.grad_accum}, gradient_checkpointing={t.gradient_checkpointing}, fsdp={t.fsdp}). To fit: "
        "lower train.micro_batch_size (raise train.grad_accum to keep the global batch), set "
        "train.gradient_checkpointing: true, lower train.loss_chunk_size or data.seq_len, or shard the model "
        "with train.fsdp: true under torchrun"
    )


def is_oom(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)


def train(cfg: RunConfig, resume: bool = False, from_checkpoint: str | None = None) -> TrainerState:
    """Run (or resume) a CPT run described by `cfg`; returns the final counters.

    `from_checkpoint`: start a new run (a cooldown branch) in output_dir from another run's checkpoint.
    """
    world = distributed.setup(cfg.train.device)
    try:
        return _train(cfg, resume, world, from_checkpoint)
    finally:
        distributed.teardown()


def _train(cfg: RunConfig, resume: bool, world: distributed.Dist, from_checkpoint: str | None = None) -> TrainerState:
    """Setup (model, reference, EWC, wrap, optimizer, data, resume), then the loop, then final/."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from cpt.trainer.data import MixtureLoader, eval_sequences, trace_lines

    hf_logging.disable_progress_bar()  # one bar per save_pretrained would drown the training bar
    out = Path(cfg.output_dir)
    main = world.is_main
    start = find_start(out, resume, world)
    if from_checkpoint and start is None:
        try:
            start = anneal.branch_start(Path(from_checkpoint), out, main)
        except ValueError as err:
            raise TrainError(str(err)) from None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.remove_leftovers(out)
    distributed.barrier(world)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    autocast = autocast_for(cfg.train.precision, world.device)
    total_steps = total_steps_for(cfg, world.world_size)
    names = [s.name for s in cfg.data.stream_sources()]
    domain_index = names.index(cfg.domain_source)

    # ---- model, reference, EWC anchor: all from `model:` (the starting weights), before any resume
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
    load = partial(AutoModelForCausalLM.from_pretrained, trust_remote_code=cfg.trust_remote_code, dtype=torch.float32)
    model = load(cfg.model).to(world.device)
    kl_cfg, ewc_cfg = cfg.regularization.kl, cfg.regularization.ewc
    reference = None
    if kl_cfg.weight > 0:
        reference = load(kl_cfg.reference).to(world.device) if kl_cfg.reference else copy.deepcopy(model)
    fisher = anchor = None
    if ewc_cfg.weight > 0:
        fisher, anchor = ewc_setup(cfg, model, tokenizer, autocast, world, eval_sequences, resume)
    if start is not None:
        ckpt.load_model_weights(model, start)
    model.train()
    if cfg.train.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    objective = CausalLMObjective(model, reference, cfg.train.loss_chunk_size)
    module = distributed.wrap(objective, world, cfg.train.fsdp, getattr(model, "_no_split_modules", None))
    params = trainable_parameters(model)
    if fisher is not None and cfg.train.fsdp:
        fisher = {n: distributed.shard_like(f, params[n]) for n, f in fisher.items()}
        anchor = {n: distributed.shard_like(a, params[n]) for n, a in anchor.items()}
    if cfg.train.compile:
        module = torch.compile(module)
    torch.manual_seed(cfg.seed + world.rank)

    # ---- optimizer, schedule, data
    optimizer = build_optimizer(model, cfg.train, world.device)
    schedule = partial(
        lr_at,
        lr=cfg.train.lr,
        total_steps=total_steps,
        warmup_steps=warmup_steps_for(total_steps, cfg.train.warmup_ratio),
        schedule=cfg.train.lr_schedule,
        min_lr_ratio=cfg.train.min_lr_ratio,
        decay_ratio=cfg.train.decay_ratio,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s) / cfg.train.lr)
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
        name: eval_sequences(path, tokenizer, cfg.data.seq_len, cfg.eval.max_sequences)
        for name, path in cfg.eval.sets.items()
    }
    state = TrainerState(tokens_per_source={n: 0 for n in names})
    if start is not None:
        state = restore(start, cfg, world, objective, optimizer, scheduler, loader)
        # A cooldown branch may add anneal-only sources that its checkpoint never counted.
        state.tokens_per_source = {n: state.tokens_per_source.get(n, 0) for n in names}
    log = RunLog(out, main, state.metrics_bytes, state.step if start is not None else None)
    trace = JsonlFile(out / TRACE, main and cfg.data.trace, state.trace_bytes)
    run = Run(cfg, world, out, model, objective, optimizer, scheduler, loader, tokenizer, state, log, trace, autocast)
    eval_world = distributed.Dist() if cfg.train.fsdp else world  # FSDP: every rank runs every eval batch

    if state.step == 0:
        run.evaluate_and_log({"step": 0}, eval_sets, eval_world)
    batches = iter(loader)  # created once: a fresh iter() per step would re-read the first batch (seed bug)
    bar = tqdm(total=total_steps, initial=state.step, disable=not main or None, desc="cpt train", unit="step")
    with_kl = reference is not None
    kl_sources = None if kl_cfg.on == "all" else [i for i in range(len(names)) if i != domain_index]
    branch = anneal.branch_step(cfg, total_steps)
    while state.step < total_steps:
        started = time.perf_counter()
        micro = []
        for _ in range(cfg.train.grad_accum):
            batch = next(batches, None)
            if batch is None:
                break
            micro.append(batch)
        if len(micro) < cfg.train.grad_accum:
            warnings.warn(f"a finite data source ran out at step {state.step}; ending the run early", stacklevel=1)
            break
        if cfg.data.trace:  # every rank's lines, written by rank 0 in global sequence order
            for batch in micro:
                gathered = distributed.gather_objects(trace_lines(batch, world.rank), world)
                trace.write([line for lines in gathered for line in lines])
        lr = scheduler.get_last_lr()[0]
        try:
            stats = forward_backward(module, micro, with_kl, kl_sources, cfg, world, len(names))
            ewc = 0.0
            if fisher is not None:
                ewc = add_ewc_gradient(params, fisher, anchor, ewc_cfg.weight)
                if cfg.train.fsdp:  # each rank holds a shard of the sum
                    ewc = float(distributed.all_reduce_sum(torch.tensor(ewc, device=world.device), world))
            grad_norm = clip_gradients(list(params.values()), cfg.train.max_grad_norm)
            objective_value = stats["loss"] + kl_cfg.weight * stats["kl"] + ewc
            finite = math.isfinite(objective_value) and math.isfinite(grad_norm)
            if finite:
                optimizer.step()
        except Exception as err:
            if is_oom(err):
                raise TrainError(oom_message(cfg, state.step)) from err
            raise
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state.step += 1
        state.nonfinite_in_a_row = 0 if finite else state.nonfinite_in_a_row + 1
        state.skipped_steps += 0 if finite else 1
        step_tokens = stats["tokens_per_source"]
        for name, count in zip(names, step_tokens):
            state.tokens_per_source[name] += count
        state.tokens += sum(step_tokens)
        elapsed = time.perf_counter() - started
        record = {
            "step": state.step,
            "lr": lr,
            "loss": stats["loss"],
            "loss_per_source": dict(zip(names, stats["loss_per_source"])),
            "tokens": state.tokens,
            "tokens_per_source": dict(state.tokens_per_source),
            "step_tokens_per_source": dict(zip(names, step_tokens)),
            "domain_share": state.tokens_per_source[names[domain_index]] / max(1, state.tokens),
            "grad_norm": grad_norm,
            "tokens_per_s": sum(step_tokens) / elapsed,
            "skipped_steps": state.skipped_steps,
        }
        if with_kl:
            record["kl"] = stats["kl"]
        if fisher is not None:
            record["ewc"] = ewc
        if state.nonfinite_in_a_row >= cfg.train.max_nonfinite_in_a_row:
            log.write(record)
            raise TrainError(
                f"stopped at step {state.step}: {state.nonfinite_in_a_row} steps in a row had a non-finite loss or "
                f"gradient norm (loss={stats['loss']}, grad_norm={grad_norm}); they were skipped. Lower train.lr, "
                "raise train.warmup_ratio, keep train.max_grad_norm > 0, or check the data; "
                "train.max_nonfinite_in_a_row sets the limit"
            )
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        last = state.step == total_steps
        if state.step % cfg.eval.every_steps == 0 or last:
            run.evaluate_and_log(record, eval_sets, eval_world)
        elif state.step % cfg.train.log_every_steps == 0:
            log.write(record)
        if state.step % cfg.checkpoint.every_steps == 0 or last:
            run.save_checkpoint()
        if state.step == branch:
            run.save_checkpoint(anneal.branch_name(state.step))
    bar.close()
    if state.step < total_steps:  # ended early (finite source): evaluate and checkpoint where it stopped
        if not state.evals or state.evals[-1]["step"] != state.step:
            run.evaluate_and_log({"step": state.step}, eval_sets, eval_world)
        if not (out / f"checkpoint-{state.step}").exists():
            run.save_checkpoint()
    run.save_final()
    log.close()
    trace.close()
    return state


def find_start(out: Path, resume: bool, world) -> Path | None:
    """The checkpoint to resume from, or None; refuses to start over a run's checkpoints without --resume."""
    if resume:
        # Not filtered by world size: a checkpoint from another world size must fail loudly in restore(),
        # not be skipped as "incomplete" and silently restarted from `model:`.
        found = ckpt.latest_checkpoint(out)
        if found is None:
            warnings.warn(f"--resume: no complete checkpoint in {out}; starting from `model:`", stacklevel=2)
        return found
    if ckpt.checkpoint_dirs(out):
        raise TrainError(
            f"{out} already holds checkpoints of a run; pass --resume to continue it, or choose a new output_dir"
        )
    return None


def ewc_setup(cfg: RunConfig, model, tokenizer, autocast, world, eval_sequences, resume: bool = False):
    """(Fisher, anchor theta*) for EWC: the Fisher loaded from fisher_path / the run being resumed, or estimated."""
    ewc_cfg = cfg.regularization.ewc
    params = trainable_parameters(model)
    anchor = {name: p.detach().clone() for name, p in params.items()}
    saved = Path(cfg.output_dir) / FISHER
    # The run's own saved Fisher is reused only on --resume: a fresh start into the same output_dir may
    # have changed `model:`, the Fisher source or its sample count.
    path = Path(ewc_cfg.fisher_path) if ewc_cfg.fisher_path else saved
    if path.is_file() and (ewc_cfg.fisher_path or resume):
        return load_fisher(str(path), params), anchor
    names = [s.name for s in cfg.data.sources]
    source = ewc_cfg.source or next((n for n in names if n != cfg.domain_source), "general")
    folder = {s.name: s.path for s in cfg.data.sources}.get(source) or cfg.eval.sets[source]
    sequences = sampled_sequences(folder, tokenizer, cfg.data.seq_len, ewc_cfg.fisher_samples, cfg.seed)
    objective = CausalLMObjective(model, chunk_size=cfg.train.loss_chunk_size)
    fisher, seen = estimate_fisher(
        objective, sequences, autocast, world.rank, world.world_size, kind=ewc_cfg.fisher, seed=cfg.seed
    )
    if world.is_main:
        save_fisher(str(saved), fisher, seen, source)
    return fisher, anchor


def forward_backward(module, micro: list[dict], with_kl: bool, kl_sources, cfg: RunConfig, world, num_sources: int):
    """Forward + backward over one optimizer step's micro-batches; the token-mean is over the GLOBAL batch.

    The normalisers (target tokens, KL tokens) are summed over all micro-batches and ranks before any
    backward, so every token weighs the same whatever the split into micro-batches and ranks: one
    process with batch 2B and two processes with batch B give the same gradient.
    """
    device = next(module.parameters()).device
    targets = [b["labels"][:, 1:] != IGNORE_INDEX for b in micro]
    sources = [b["source_ids"][:, 1:] for b in micro]
    if kl_sources is None:
        kl_masks = targets
    else:
        allowed = torch.tensor(kl_sources, dtype=torch.long)
        kl_masks = [t & torch.isin(s, allowed) for t, s in zip(targets, sources)]
    norms = torch.tensor([float(sum(t.sum() for t in targets)), float(sum(m.sum() for m in kl_masks))], device=device)
    distributed.all_reduce_sum(norms, world)
    n_targets, n_kl = norms[0].clamp_min(1), norms[1].clamp_min(1)
    # No token to apply KL to in this global batch (e.g. only domain data under on: replay): skip the reference.
    with_kl = with_kl and bool(norms[1] > 0)
    loss_sums = torch.zeros(num_sources, dtype=torch.float64, device=device)
    loss_counts = torch.zeros_like(loss_sums)
    input_tokens = torch.zeros_like(loss_sums)
    kl_total = torch.zeros(1, dtype=torch.float64, device=device)
    autocast = autocast_for(cfg.train.precision, device)
    for i, batch in enumerate(micro):
        mask, kl_mask = targets[i].to(device), kl_masks[i].to(device)
        with distributed.grad_sync(module, i == len(micro) - 1), autocast():
            nll, kl = module(
                batch["input_ids"].to(device), batch["position_ids"].to(device), batch["labels"].to(device), with_kl
            )
            loss = nll.sum() / n_targets
            if with_kl:
                kl_sum = (kl * kl_mask).sum()
                loss = loss + cfg.regularization.kl.weight * kl_sum / n_kl
                kl_total += kl_sum.detach().double()
            # DDP and FSDP average gradients over ranks; the normaliser is already global, so undo that.
            (loss * world.world_size).backward()
        sums, counts = per_source_sums(nll, sources[i].to(device), mask, num_sources)
        loss_sums += sums
        loss_counts += counts
        input_tokens += torch.bincount(batch["source_ids"].flatten(), minlength=num_sources).to(device)
    stats = distributed.all_reduce_sum(torch.cat([loss_sums, loss_counts, input_tokens, kl_total]), world)
    loss_sums, loss_counts, input_tokens, kl_total = stats.split([num_sources, num_sources, num_sources, 1])
    per_source = [float(s / c) if c > 0 else None for s, c in zip(loss_sums, loss_counts)]
    return {
        "loss": float(loss_sums.sum() / loss_counts.sum().clamp_min(1)),
        "loss_per_source": per_source,
        "tokens_per_source": [int(t) for t in input_tokens],
        "kl": float(kl_total[0] / n_kl.double()) if with_kl else 0.0,
    }


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip to `max_norm` (0 = no clipping) and return the pre-clip global norm (a plain float, also under FSDP)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def restore(folder: Path, cfg: RunConfig, world, objective, optimizer, scheduler, loader) -> TrainerState:
    """Optimizer, scheduler, RNG, mixture and counters from a checkpoint (model weights are already loaded)."""
    saved = ckpt.read_trainer_state(folder)
    if saved["world_size"] != world.world_size:
        raise TrainError(
            f"{folder} was written by {saved['world_size']} process(es), this run has {world.world_size}; "
            "the data order depends on the world size, so resume with the same --nproc_per_node"
        )
    if saved["config_hash"] != config_hash(to_dict(cfg)):
        warnings.warn(f"{folder}: the config changed since this checkpoint was written", stacklevel=2)
    optim_state = ckpt.torch_load(folder / "optimizer.pt")
    set_optimizer_state_dict(objective, optimizer, optim_state, options=state_dict_options(cfg))
    scheduler.load_state_dict(ckpt.torch_load(folder / "scheduler.pt"))
    rng, data_state = ckpt.read_rank_files(folder, world.rank)
    loader.load_state_dict(data_state)
    ckpt.set_rng_state(rng)
    return TrainerState(**saved["state"])


def state_dict_options(cfg: RunConfig) -> StateDictOptions:
    # Under FSDP the checkpoint holds full (unsharded) tensors, so it loads on any number of GPUs as HF weights.
    return StateDictOptions(full_state_dict=True, cpu_offload=True) if cfg.train.fsdp else StateDictOptions()


@dataclass
class Run:
    """What the eval / checkpoint helpers share; the loop above owns the order in which they are called."""

    cfg: RunConfig
    world: distributed.Dist
    out: Path
    model: torch.nn.Module
    objective: CausalLMObjective
    optimizer: torch.optim.Optimizer
    scheduler: object
    loader: object
    tokenizer: object
    state: TrainerState
    log: RunLog
    trace: JsonlFile
    autocast: object

    def evaluate_and_log(self, record: dict, eval_sets: dict, eval_world) -> None:
        """Perplexity on every set; step 0 becomes the baseline; a new best (within the constraint) is saved."""
        micro = self.cfg.eval.micro_batch_size or self.cfg.train.micro_batch_size
        results = evaluate(self.objective, eval_sets, micro, self.autocast, eval_world)
        step = record["step"]
        if step == 0:
            self.state.baseline = dict(results)
        self.state.evals.append({"step": step, **results})
        record.update(results)
        self.log.write(record)
        checkpoint = self.cfg.checkpoint
        if step > 0 and ckpt.is_better(
            results, self.state.best, self.state.baseline, checkpoint.best_metric, checkpoint.max_general_ppl_increase
        ):
            self.state.best = {"step": step, "metric": self.cfg.checkpoint.best_metric, **results}
            self.save_model_folder("best", {"best": self.state.best, "baseline": self.state.baseline})

    def model_state(self) -> dict:
        return get_model_state_dict(self.model, options=state_dict_options(self.cfg))

    def save_model_folder(self, name: str, info: dict) -> None:
        """output_dir/NAME/: the model in HF format + tokenizer + NAME.json, published atomically."""
        weights = self.model_state()
        if self.world.is_main:
            tmp = ckpt.temp_dir(self.out, name)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            ckpt.save_model(tmp, self.model, self.tokenizer, weights)
            (tmp / f"{name}.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
            ckpt.publish(tmp, self.out / name)
        distributed.barrier(self.world)

    def save_checkpoint(self, name: str | None = None) -> None:
        """output_dir/checkpoint-STEP/ (or NAME/, never pruned), assembled in .tmp-NAME and renamed when complete."""
        step, world = self.state.step, self.world
        pruned = name is None
        name = name or f"checkpoint-{step}"
        tmp = ckpt.temp_dir(self.out, name)
        weights = self.model_state()
        optim_state = get_optimizer_state_dict(self.objective, self.optimizer, options=state_dict_options(self.cfg))
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            ckpt.save_model(tmp, self.model, self.tokenizer, weights)
            torch.save(optim_state, tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        distributed.barrier(world)
        ckpt.write_rank_files(tmp, world.rank, self.loader.state_dict())
        distributed.barrier(world)
        if world.is_main:
            self.state.metrics_bytes = self.log.offset()
            self.state.trace_bytes = self.trace.offset()
            payload = {
                "step": step,
                "tokens": self.state.tokens,
                "world_size": world.world_size,
                "config_hash": config_hash(to_dict(self.cfg)),
                "state": dataclasses.asdict(self.state),
            }
            ckpt.write_trainer_state(tmp, payload)  # last: its presence marks the folder complete
            ckpt.publish(tmp, self.out / name)
            if pruned:
                ckpt.prune(self.out, self.cfg.checkpoint.keep_last)
            plot_report(read_metrics(self.out), self.out / REPORT)
        distributed.barrier(world)

    def save_final(self) -> None:
        if self.state.best is None and self.cfg.checkpoint.best_metric and self.world.is_main:
            warnings.warn("no evaluated step met the best-checkpoint constraint; there is no best/", stacklevel=2)
        self.save_model_folder(
            "final", {"step": self.state.step, "tokens": self.state.tokens, "evals": self.state.evals}
        )
        self.log.offset()  # flush: the picture is drawn from metrics.jsonl on disk
        if self.world.is_main:
            plot_report(read_metrics(self.out), self.out / REPORT)
