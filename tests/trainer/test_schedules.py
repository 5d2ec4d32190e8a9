"""LR schedules, written out step by step (torchtitan style): one comment per value."""

from __future__ import annotations

import pytest

from cpt.trainer.schedules import lr_at, warmup_steps_for

# 10 steps, 2 of warmup, peak 1.0, floor 0.1: small enough to write every value down.
RUN = {"lr": 1.0, "total_steps": 10, "warmup_steps": 2, "min_lr_ratio": 0.1}


def test_cosine_warms_up_then_decays_to_exactly_min_lr_at_the_last_step():
    values = [lr_at(step, schedule="cosine", **RUN) for step in range(10)]
    assert values == pytest.approx(
        [
            0.5,  # warmup 1/2
            1.0,  # warmup 2/2: the peak
            1.0,  # cosine progress 0/7
            0.9554359905560885,  # 0.1 + 0.9 * (1 + cos(pi * 1/7)) / 2
            0.8305704108364301,  # 2/7
            0.6501344202803414,  # 3/7
            0.44986557971965857,  # 4/7
            0.26942958916356996,  # 5/7
            0.14456400944391146,  # 6/7
            0.1,  # 7/7: min_lr_ratio * lr, honoured (the seed decayed to 0)
        ],
        abs=1e-12,
    )


def test_cosine_stays_at_the_floor_after_the_last_step():
    assert lr_at(12, schedule="cosine", **RUN) == pytest.approx(0.1)


def test_wsd_holds_the_peak_then_decays_linearly_over_the_decay_fraction():
    values = [lr_at(step, schedule="wsd", decay_ratio=0.2, **RUN) for step in range(10)]
    assert values == pytest.approx(
        [
            0.5,  # warmup 1/2
            1.0,  # warmup 2/2
            1.0,  # stable ...
            1.0,
            1.0,
            1.0,
            1.0,
            1.0,  # ... until the last 20% (2 steps)
            0.55,  # decay 1/2: 1.0 + (0.1 - 1.0) / 2
            0.1,  # decay 2/2: the floor
        ],
        abs=1e-12,
    )


def test_constant_only_warms_up():
    values = [lr_at(step, schedule="constant", **RUN) for step in range(5)]
    assert values == [0.5, 1.0, 1.0, 1.0, 1.0]


def test_no_warmup_starts_at_the_peak():
    assert lr_at(0, schedule="cosine", lr=2e-5, total_steps=100, warmup_steps=0, min_lr_ratio=0.1) == 2e-5


def test_warmup_steps_round_instead_of_ceil():
    assert warmup_steps_for(1000, 0.03) == 30  # 0.03 * 1000 is 30.000000000000004 in floating point
    assert warmup_steps_for(10, 0.2) == 2


def test_an_unknown_schedule_is_refused_by_name():
    with pytest.raises(ValueError, match="lr_schedule 'linear': choose one of cosine, wsd, constant"):
        lr_at(0, schedule="linear", **RUN)
