"""torchrun with 2 CPU processes (DDP over gloo, or FSDP2) gives the losses of 1 process with the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cpt.shared.config import load_config
from cpt.trainer.config import RunConfig
from cpt.trainer.loop import train
from tests.trainer.trainutil import (
    SUBPROCESS_ENV,
    make_datasets,
    one_torch_thread,  # noqa: F401 (autouse fixture)
    run_config,
    write_config,
)

pytestmark = pytest.mark.slow

# KL on every token and EWC on, so their distributed paths are compared too.
COMMON = {
    "data": {"trace": True},
    "regularization": {"kl": {"weight": 0.1, "on": "all"}, "ewc": {"weight": 1.0, "fisher_samples": 4}},
    "eval": {"every_steps": 3, "max_sequences": 3},
    "checkpoint": {"every_steps": 3, "keep_last": 1},
}


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, tokenizer_dir):
    return make_datasets(tmp_path_factory.mktemp("data"), tokenizer_dir)


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model_dir, datasets):
    """One process, 2 sequences per micro-batch, 2 accumulation steps: a global batch of 4."""
    out = tmp_path_factory.mktemp("single")
    train(load_config(RunConfig, data=run_config(tiny_model_dir, out, datasets, train={"max_steps": 6}, **COMMON)))
    return records(out)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir, datasets, single, fsdp):
    out = tmp_path / "out"
    train_cfg = {"max_steps": 6, "micro_batch_size": 1, "fsdp": fsdp}  # 2 ranks x 1 sequence x 2 accumulation
    config = write_config(tmp_path / "run.yaml", run_config(tiny_model_dir, out, datasets, train=train_cfg, **COMMON))
    torchrun = [sys.executable, "-m", "torch.distributed.run"]  # torchrun, also where the venv has no script
    command = [*torchrun, "--standalone", "--nproc_per_node", "2", "-m", "cpt.trainer", "--config", str(config)]
    result = subprocess.run(command, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    got = records(out)
    assert [r["step"] for r in got] == [r["step"] for r in single] == list(range(7))
    for a, b in zip(single, got):
        for key in ("loss", "kl", "ewc", "grad_norm", "domain_ppl", "general_ppl"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-4, rel=1e-4), (a["step"], key)
        assert b.get("tokens_per_source") == a.get("tokens_per_source")
    assert single[-1]["kl"] > 0 and single[-1]["ewc"] > 0
    # Both ranks' sequences are in the one trace file, in global order.
    trace = [json.loads(line) for line in (out / "data_trace.jsonl").read_text().splitlines()]
    assert [line["index"] for line in trace] == list(range(24))
    assert [line["rank"] for line in trace[:4]] == [0, 1, 0, 1]
    checkpoint = out / "checkpoint-6"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in checkpoint.glob("data_state_rank*.json")) == [
        "data_state_rank0.json",
        "data_state_rank1.json",
    ]
