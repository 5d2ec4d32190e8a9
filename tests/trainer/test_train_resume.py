"""kill -9 in the middle of `cpt train`, then --resume: the same data, steps and losses as a run never stopped."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cpt.shared.config import load_config
from cpt.trainer.config import RunConfig, load_run_config
from cpt.trainer.loop import train
from tests.trainer.trainutil import (
    SUBPROCESS_ENV,
    make_datasets,
    one_torch_thread,  # noqa: F401 (autouse fixture)
    run_config,
    write_config,
)

pytestmark = pytest.mark.slow

STEPS = 16


def config_for(model_dir, out, datasets):
    return run_config(
        model_dir,
        out,
        datasets,
        data={"trace": True},
        train={"max_steps": STEPS, "lr": 2e-3, "warmup_ratio": 0.1},
        regularization={"kl": {"weight": 0.1}},
        eval={"every_steps": 10, "max_sequences": 2},
        checkpoint={"every_steps": 4, "keep_last": 2},
    )


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def kill_after_first_checkpoint(config_path, out) -> None:
    """Start `python -m cpt.trainer` and SIGKILL it as soon as its first checkpoint is published."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cpt.trainer", "--config", str(config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=SUBPROCESS_ENV,
    )
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint-4").exists():
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, tokenizer_dir):
    datasets = make_datasets(tmp_path / "data", tokenizer_dir)
    straight = tmp_path / "straight"
    train(load_config(RunConfig, data=config_for(tiny_model_dir, straight, datasets)))

    out = tmp_path / "killed"
    config_path = write_config(tmp_path / "killed.yaml", config_for(tiny_model_dir, out, datasets))
    kill_after_first_checkpoint(config_path, out)
    assert not (out / "final").exists()  # it really died mid-run
    killed_at = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert killed_at < STEPS

    # A kill while a checkpoint was being assembled leaves a .tmp-* folder: skipped with a warning.
    half_written = list(out.glob(".tmp-*"))
    with pytest.warns(UserWarning, match="half-written") if half_written else contextlib.nullcontext():
        state = train(load_run_config(config_path), resume=True)
    assert state.step == STEPS

    expected, got = records(straight), records(out)
    assert [r["step"] for r in got] == [r["step"] for r in expected] == list(range(STEPS + 1))
    for a, b in zip(expected, got):
        for key in ("loss", "kl", "grad_norm", "domain_ppl", "general_ppl"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
        assert (a.get("tokens"), a.get("tokens_per_source"), a.get("lr")) == (
            b.get("tokens"),
            b.get("tokens_per_source"),
            b.get("lr"),
        )
    # The data trace is cut back to the checkpoint and continued: byte for byte the uninterrupted file.
    assert (out / "data_trace.jsonl").read_bytes() == (straight / "data_trace.jsonl").read_bytes()
