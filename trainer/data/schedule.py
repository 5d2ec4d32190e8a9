"""Target token shares as pure functions of the tokens consumed, and the deficit rule that meets them."""

from __future__ import annotations

from collections.abc import Sequence

from cpt.trainer.data.config import ScheduleConfig


def needs_total_tokens(schedule: ScheduleConfig | None) -> bool:
    """linear and steps schedules are defined over the run's length, so they need total_tokens."""
    return schedule is not None and schedule.type in ("linear", "steps")


def driven_share(schedule: ScheduleConfig, progress: float) -> float:
    """The driven source's target share at `progress` (tokens consumed / total_tokens, clipped to [0, 1])."""
    progress = min(max(progress, 0.0), 1.0)
    if schedule.type == "constant":
        return schedule.start
    if schedule.type == "linear":
        return schedule.start + (schedule.end - schedule.start) * progress
    share = schedule.steps[0][1]
    for fraction, value in schedule.steps:
        if fraction <= progress:
            share = value
    return share


def target_shares(
    names: Sequence[str],
    weights: Sequence[float],
    schedule: ScheduleConfig | None,
    consumed: int,
    total_tokens: int | None,
) -> list[float]:
    """Every source's target token share after `consumed` tokens; the undriven sources split the rest by weight."""
    total_weight = sum(weights)
    if schedule is None or schedule.source is None:
        return [w / total_weight for w in weights]
    progress = consumed / total_tokens if total_tokens else 0.0
    driven = names.index(schedule.source)
    share = driven_share(schedule, progress)
    rest = (total_weight - weights[driven]) or 1.0  # only the driven source has weight: the others get 0
    return [share if i == driven else (1.0 - share) * w / rest for i, w in enumerate(weights)]


def pick_source(targets: Sequence[float], owed: Sequence[float], consumed: Sequence[int]) -> int:
    """The source whose realised tokens lag what it is owed the most (Megatron's BlendedDataset rule, in tokens).

    `owed[i]` integrates source i's target share over the tokens drawn so far, so a schedule that moves
    is followed locally; comparing with target * total instead would chase the cumulative share and
    starve the other sources late in a ramp. Sources with a zero target are never picked. Ties go to
    the larger target, then the lower index, so the choice is deterministic.
    """
    best, best_key = -1, None
    for i, (target, due, used) in enumerate(zip(targets, owed, consumed)):
        if target <= 0.0:
            continue
        key = (due - used, target)
        if best_key is None or key > best_key:
            best, best_key = i, key
    return best
