"""The continued-pre-training loop: lr -> micro-steps -> clip -> step -> log -> eval/save.

`train(cfg, resume)` reads top to bottom; everything it needs is built first by `build()`
(trainer/build.py: model, reference, EWC state, sharding, optimizer, loader, eval sets, checkpointer,
resumed state). Everything that must survive a restart (model, optimizer, scheduler, mixture, RNG,
counters) goes into every checkpoint, and `model:` always names the starting weights: resume loads
the checkpoint's weights on top of it (litgpt#1729), so KL's reference and EWC's anchor stay the
initial model across restarts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
import warnings

import torch

from cpt.shared.config import config_hash, to_dict
from cpt.trainer import adapters, anneal, distributed, weights
from cpt.trainer import checkpoint as ckpt
from cpt.trainer.build import (  # noqa: F401 (re-exported: the loop's public names)
    FISHER,
    Parts,
    TrainError,
    TrainerState,
    autocast_for,
    build,
    tokens_per_step,
    total_steps_for,
)
from cpt.trainer.config import RunConfig
from cpt.trainer.evaluate import evaluate
from cpt.trainer.objectives import IGNORE_INDEX, add_ewc_gradient, per_source_sums
from cpt.trainer.report import REPORT, JsonlFile, RunLog, plot_report, read_metrics

TRACE = "data_trace.jsonl"


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
    world = distributed.setup(cfg.train.device, cfg.train.dist_timeout_s)
    try:
        return _train(cfg, resume, world, from_checkpoint)
    finally:
        distributed.teardown()


def _train(cfg: RunConfig, resume: bool, world: distributed.Dist, from_checkpoint: str | None = None) -> TrainerState:
    """build(), then the loop, then final/."""
    from tqdm.auto import tqdm

    from cpt.trainer.data import trace_lines

    parts = build(cfg, world, resume, from_checkpoint)
    cfg, state, loader, optimizer, scheduler = parts.cfg, parts.state, parts.loader, parts.optimizer, parts.scheduler
    module, params, fisher, anchor = parts.module, parts.params, parts.fisher, parts.anchor
    names, domain_index, total_steps, eval_sets, out = (
        parts.names, parts.domain_index, parts.total_steps, parts.eval_sets, parts.out
    )  # fmt: skip
    main = world.is_main
    kl_cfg, ewc_cfg = cfg.regularization.kl, cfg.regularization.ewc
    log = RunLog(out, main, state.metrics_bytes, state.step if parts.start is not None else None)
    trace = JsonlFile(out / TRACE, main and cfg.data.trace, state.trace_bytes)
    run = Run(parts, log, trace)
    eval_world = world  # each rank evaluates its share of the sequences; the sums are all-reduced

    if state.step == 0:
        run.evaluate_and_log({"step": 0}, eval_sets, eval_world)
    batches = iter(loader)  # created once: a fresh iter() per step would re-read the first batch (seed bug)
    bar = tqdm(total=total_steps, initial=state.step, disable=not main or None, desc="cpt train", unit="step")
    with_kl = parts.objective.has_reference
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
    parts.checkpointer.wait()
    log.close()
    trace.close()
    return state


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
    autocast = autocast_for(cfg.train.precision, device, cfg.train.fsdp)
    every = cfg.train.fsdp_reduce_every_micro_batch
    for i, batch in enumerate(micro):
        mask, kl_mask = targets[i].to(device), kl_masks[i].to(device)
        with distributed.grad_sync(module, i == len(micro) - 1, every), autocast():
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


class Run:
    """The eval / checkpoint helpers over build()'s parts; the loop above owns the order they are called in."""

    def __init__(self, parts: Parts, log: RunLog, trace: JsonlFile):
        self.parts, self.cfg, self.world, self.out = parts, parts.cfg, parts.world, parts.out
        self.state, self.log, self.trace = parts.state, log, trace

    def evaluate_and_log(self, record: dict, eval_sets: dict, eval_world) -> None:
        """Perplexity on every set; step 0 becomes the baseline; a new best (within the constraint) is saved."""
        micro = self.cfg.eval.micro_batch_size or self.cfg.train.micro_batch_size
        results = evaluate(self.parts.objective, eval_sets, micro, self.parts.autocast, eval_world)
        if hasattr(self.parts.objective, "reshard"):
            # FSDP2 keeps the root's parameters (embeddings, head) gathered after a forward with no backward;
            # shard them again, or every rank keeps full copies and the optimizer no longer sees its shards.
            self.parts.objective.reshard()
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

    def save_model_folder(self, name: str, info: dict) -> None:
        """output_dir/NAME/: the model in HF format + tokenizer + NAME.json, streamed and published atomically."""
        main, model = self.world.is_main, self.parts.model
        tmp = ckpt.temp_dir(self.out, name)
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        distributed.barrier(self.world)
        dtype = self.cfg.checkpoint.export_dtype
        state = model.state_dict()
        if adapters.is_peft(model):  # LoRA: the merged model, loadable without peft
            model, state = model.get_base_model(), adapters.merged_state_dict(model)
        weights.save_hf_folder(tmp, model, self.parts.tokenizer, state, dtype, main)
        if main:
            (tmp / f"{name}.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
            ckpt.publish(tmp, self.out / name)
        distributed.barrier(self.world)

    def save_checkpoint(self, name: str | None = None) -> None:
        """output_dir/checkpoint-STEP/ (or NAME/, never pruned) as DCP + small files, published when complete."""
        world = self.world

        def payload() -> dict:
            self.state.metrics_bytes = self.log.offset()
            self.state.trace_bytes = self.trace.offset()
            t = self.cfg.train
            return {
                "step": self.state.step,
                "tokens": self.state.tokens,
                "world_size": world.world_size,
                "global_batch": t.micro_batch_size * t.grad_accum * world.world_size,
                "config_hash": config_hash(to_dict(self.cfg)),
                "state": dataclasses.asdict(self.state),
            }

        self.parts.checkpointer.save(self.state.step, self.parts.loader.state_dict(), payload, name)
        if world.is_main:
            plot_report(read_metrics(self.out), self.out / REPORT)

    def save_final(self) -> None:
        if self.state.best is None and self.cfg.checkpoint.best_metric and self.world.is_main:
            warnings.warn("no evaluated step met the best-checkpoint constraint; there is no best/", stacklevel=2)
        self.save_model_folder(
            "final", {"step": self.state.step, "tokens": self.state.tokens, "evals": self.state.evals}
        )
        if adapters.is_peft(self.parts.model) and self.world.is_main:
            tmp = ckpt.temp_dir(self.out, adapters.ADAPTER)
            shutil.rmtree(tmp, ignore_errors=True)
            adapters.save_adapter(tmp, self.parts.model)
            ckpt.publish(tmp, self.out / adapters.ADAPTER)
        self.log.offset()  # flush: the picture is drawn from metrics.jsonl on disk
        if self.world.is_main:
            plot_report(read_metrics(self.out), self.out / REPORT)
