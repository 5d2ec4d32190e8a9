"""4 FSDP ranks from load to checkpoint: sharded DCP files, resume on 2 ranks, final/ as a plain HF model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt.trainer import distributed
from cpt.trainer.build import TrainError, grad_accum_for
from cpt.trainer.config import RunConfig
from cpt.trainer.data import eval_sequences
from cpt.trainer.evaluate import evaluate
from tests.trainer.trainutil import (
    SUBPROCESS_ENV,
    make_datasets,
    one_torch_thread,  # noqa: F401 (autouse fixture)
    run_config,
    write_config,
)

STEPS = 4
# 4 ranks x 1 sequence x 2 micro-batches = 8 sequences per step; KL and EWC on, so their sharded state is resumed.
COMMON = {
    "data": {"trace": True},
    "regularization": {"kl": {"weight": 0.1, "on": "all"}, "ewc": {"weight": 1.0, "fisher_samples": 2}},
    "eval": {"every_steps": 100, "max_sequences": 2},
    "checkpoint": {"every_steps": 2, "keep_last": 2, "best_metric": None},
}


def torchrun(ranks: int, config: Path, *extra: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    command += ["-m", "cpt.trainer", "--config", str(config), *extra]
    result = subprocess.run(command, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=900)
    first = result.stderr.find("Traceback")
    assert result.returncode == 0, result.stderr[first : first + 4000] if first >= 0 else result.stderr[-4000:]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def trace(out: Path) -> list[dict]:
    # "rank" says which rank read a sequence, and that changes with the world size; the global order may not.
    return [{k: v for k, v in json.loads(line).items() if k != "rank"} for line in open(out / "data_trace.jsonl")]


def optimizer_bytes_per_file(folder: Path) -> tuple[dict[str, int], int]:
    """Bytes of AdamW state in each DCP data file, and in all of them (from the checkpoint's own metadata)."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    per_file: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        if index.fqn.startswith("optimizer."):
            per_file[info.relative_path] = per_file.get(info.relative_path, 0) + info.length
    return per_file, sum(per_file.values())


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, tokenizer_dir):
    return make_datasets(tmp_path_factory.mktemp("data"), tokenizer_dir)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory, tiny_model_dir, datasets):
    root = tmp_path_factory.mktemp("four")
    out = root / "out"
    train = {"max_steps": STEPS, "micro_batch_size": 1, "grad_accum": 2, "fsdp": True}
    config = write_config(root / "run.yaml", run_config(tiny_model_dir, out, datasets, train=train, **COMMON))
    torchrun(4, config)
    return root, out


@pytest.mark.slow
def test_no_checkpoint_file_holds_more_than_half_the_optimizer_state(four_ranks):
    _, out = four_ranks
    folder = out / "checkpoint-2"
    assert sorted(p.name for p in folder.glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]
    per_file, total = optimizer_bytes_per_file(folder)
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(out / "final")).parameters())
    assert total >= 8 * params  # exp_avg + exp_avg_sq in fp32 (+ step counters)
    assert len(per_file) == 4 and max(per_file.values()) <= 0.5 * total, per_file


@pytest.mark.slow
def test_final_of_four_fsdp_ranks_loads_with_from_pretrained_and_reproduces_the_last_ppl(four_ranks, datasets):
    _, out = four_ranks
    model = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    tokenizer = AutoTokenizer.from_pretrained(str(out / "final"))
    last = records(out)[-1]
    assert last["step"] == STEPS
    sets = {name: eval_sequences(datasets[f"{name}_val"], tokenizer, 64, 2) for name in ("domain", "general")}
    result = evaluate(model, sets, micro_batch_size=1)
    assert result["domain_ppl"] == pytest.approx(last["domain_ppl"], rel=1e-5)
    assert result["general_ppl"] == pytest.approx(last["general_ppl"], rel=1e-5)


@pytest.mark.slow
def test_a_four_rank_checkpoint_resumes_on_two_ranks_with_the_same_data_and_losses(four_ranks):
    root, straight = four_ranks
    out = root / "resumed"
    shutil.copytree(straight, out, ignore=shutil.ignore_patterns("checkpoint-4", "final", "best"))
    config = yaml.safe_load((root / "run.yaml").read_text())
    config["output_dir"] = str(out)
    path = write_config(root / "resumed.yaml", config)
    torchrun(2, path, "--resume")  # 2 ranks x 1 sequence: grad_accum becomes 4 to keep 8 sequences per step

    assert trace(out) == trace(straight)
    expected, got = records(straight), records(out)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(expected[3:], got[3:]):  # steps 3 and 4 ran on 2 ranks
        assert b["tokens_per_source"] == a["tokens_per_source"]
        for key in ("loss", "kl", "ewc"):
            assert b[key] == pytest.approx(a[key], rel=1e-3), (a["step"], key)
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert (state["world_size"], state["global_batch"]) == (2, 8)


def test_resuming_on_a_world_size_that_cannot_keep_the_global_batch_is_refused():
    cfg = RunConfig()
    cfg.train.micro_batch_size, cfg.train.grad_accum = 1, 2
    saved = {"world_size": 4, "global_batch": 8}
    assert grad_accum_for(saved, cfg, distributed.Dist(world_size=2)) == 4
    assert grad_accum_for(saved, cfg, distributed.Dist(world_size=8)) == 1
    with pytest.raises(TrainError, match="global batch is 8 sequences per step .* 3 rank"):
        grad_accum_for(saved, cfg, distributed.Dist(world_size=3))
    cfg.train.micro_batch_size = 16
    with pytest.raises(TrainError, match="micro_batch_size=16"):
        grad_accum_for(saved, cfg, distributed.Dist(world_size=1))
