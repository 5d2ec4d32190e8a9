"""The anneal (cooldown) phase of a WSD run: when it starts, and the stable checkpoint a branch starts from.

`data.anneal.start: decay` means the first token of the LR decay: step decay_start_step() x tokens per
step. It is resolved here into a fraction of the run, the form the data stream understands, so the
stream (a function of the data config alone) switches on exactly that token. With
`checkpoint.branch_before_decay: true` the run also saves output_dir/stable-checkpoint-STEP/ after the
last stable step; `cpt train --from-checkpoint DIR` starts a cooldown branch from it with another anneal.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cpt.trainer.schedules import decay_start_step

STABLE_PREFIX = "stable-checkpoint-"


def resolve_anneal(data, train, total_steps: int):
    """`data` with anneal.start as a fraction of the run (`decay` -> the wsd decay's first step / total_steps)."""
    if data.anneal is None or data.anneal.start != "decay":
        return data
    fraction = decay_start_step(total_steps, train.decay_ratio) / total_steps
    return dataclasses.replace(data, anneal=dataclasses.replace(data.anneal, start=fraction))


def branch_step(cfg, total_steps: int) -> int | None:
    """The step after which the stable checkpoint is saved (the last stable step), or None when not asked for."""
    if not cfg.checkpoint.branch_before_decay:
        return None
    step = decay_start_step(total_steps, cfg.train.decay_ratio)
    return step if 0 < step < total_steps else None


def branch_name(step: int) -> str:
    return f"{STABLE_PREFIX}{step}"


def branch_start(folder: Path, out: Path, main: bool) -> Path:
    """Check `folder` is a complete checkpoint and give the branch its parent's metrics and trace up to it.

    The branch then continues exactly like a resume of that checkpoint (model, optimizer, scheduler,
    RNG, mixture state and counters), in its own output_dir and with its own (anneal) config.
    """
    from cpt.trainer import checkpoint as ckpt
    from cpt.trainer.report import METRICS

    if not ckpt.is_complete(folder):
        raise ValueError(
            f"--from-checkpoint {folder}: not a complete checkpoint (needs {', '.join(ckpt.REQUIRED)} and weights); "
            "give a checkpoint-STEP/ or stable-checkpoint-STEP/ folder of a run"
        )
    if main:
        state = ckpt.read_trainer_state(folder)["state"]
        out.mkdir(parents=True, exist_ok=True)
        logs = ((METRICS, state.get("metrics_bytes", 0)), ("data_trace.jsonl", state.get("trace_bytes", 0)))
        for name, size in logs:
            source = folder.parent / name
            if size and source.is_file():
                with source.open("rb") as f:
                    (out / name).write_bytes(f.read(size))
    return folder
