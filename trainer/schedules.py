"""Learning-rate schedules as pure functions of the optimizer step (0-based: the step about to be taken).

All three share a linear warmup over the first `warmup_steps` steps, reaching the peak `lr` at step
`warmup_steps - 1`. Cosine and wsd then decay so that the LAST step (`total_steps - 1`) runs at exactly
`min_lr_ratio * lr`: the seed's scheduler took a `min_lr_ratio` and ignored it, decaying to 0.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd", "constant")


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    """Warmup length in steps; round() rather than ceil() so 0.03 * 1000 gives 30, not 31."""
    return int(round(warmup_ratio * total_steps))


def decay_start_step(total_steps: int, decay_ratio: float) -> int:
    """wsd: the first (0-based) step of the linear decay; the steps before it are warmup + stable."""
    return total_steps - max(1, int(round(decay_ratio * total_steps)))


def lr_at(
    step: int,
    *,
    lr: float,
    total_steps: int,
    warmup_steps: int,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
    decay_ratio: float = 0.1,
) -> float:
    """The learning rate of optimizer step `step` (0-based)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        # (step + 1) so the first step already learns; step 0 at lr 0 would be a wasted step.
        return lr * (step + 1) / warmup_steps
    min_lr = lr * min_lr_ratio
    last = total_steps - 1
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, last - warmup_steps))
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # wsd: warmup, stable at the peak, then a linear decay over the last `decay_ratio` of the run.
    decay_start = decay_start_step(total_steps, decay_ratio)
    decay_steps = total_steps - decay_start
    if step < decay_start:
        return lr
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return lr + (min_lr - lr) * progress
