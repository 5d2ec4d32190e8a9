"""Host memory of `cpt train` with FSDP: peak RSS per rank of 4 gloo ranks against 1 process, same config.

`python -m tests.bench memory`. A ~157M-parameter LLaMA (16 layers x 768, 8k BPE vocab), `train.fsdp:
true`, seq_len 128, 2 steps, a checkpoint and final/ at the end. Each figure is the peak resident memory
of a training process minus that of a process that only imports torch and transformers, so it counts
what the run itself holds. With FSDP every rank holds 1/4 of the weights, gradients and AdamW state
(16 bytes/param in all) and reads only its shards of the starting weights, so a rank's figure is
expected near a quarter of the single process's; the issue's bar is at most half.

`measure(root, size)` is also what tests/trainer/test_memory.py runs, with a smaller model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

SIZES = {
    # name: (hidden, layers, heads, vocab, seq_len)
    "150m": (768, 16, 12, 8192, 128),
    "small": (384, 8, 6, 4096, 64),
}
# Both runs alike: one intra-op thread, and glibc told to return large freed blocks to the OS at once. Without
# that, gloo's per-collective CPU buffers stay in the heap (+50-100 MB per rank after a few steps here),
# which is allocator retention, not what the trainer holds; on GPU these buffers are device memory.
ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
PEAK_RSS = "import torch, transformers; print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it does not count the parent's before exec)."""
    line = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def baseline_mb() -> float:
    """Peak RSS of a process that only imports torch and transformers."""
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS], capture_output=True, text=True, check=True, env=run_env()
    )
    return int(result.stdout.split()[1]) / 1024


def run_env() -> dict:
    import os

    return {**os.environ, **ENV}


def worker(config: str, result_dir: str) -> None:
    """Under torchrun: train, then write this rank's peak RSS."""
    import os

    from cpt.trainer.config import load_run_config
    from cpt.trainer.loop import train

    train(load_run_config(config))
    rank = int(os.environ.get("RANK", 0))
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def prepare(root: Path, size: str) -> tuple[Path, dict]:
    """Tokenizer, model and datasets for `size`, under root."""
    from cpt.trainer.bootstrap import init_llama, train_bpe_tokenizer
    from tests.conftest import stdlib_texts
    from tests.helpers import make_prepared_dataset

    hidden, layers, heads, vocab, _ = SIZES[size]
    tokenizer = root / "tokenizer"
    train_bpe_tokenizer(stdlib_texts(200), tokenizer, vocab_size=vocab)
    model = root / "model"
    built = init_llama(tokenizer, model, hidden_size=hidden, num_layers=layers, num_heads=heads)
    params = sum(p.numel() for p in built.parameters())
    del built
    texts = stdlib_texts(60, max_chars=4000)
    data = {
        "code": make_prepared_dataset(root / "code", texts[:50], tokenizer_dir=tokenizer),
        "general": make_prepared_dataset(root / "general", texts[50:], tokenizer_dir=tokenizer),
    }
    return model, {"params": params, "data": data}


def run(root: Path, model: Path, data: dict, ranks: int, seq_len: int) -> list[float]:
    """Peak RSS (MB) of each rank of a torchrun of `ranks` processes with train.fsdp: true."""

    name = f"ranks{ranks}"
    out, results = root / name, root / f"{name}-rss"
    results.mkdir()
    config = {
        "model": str(model),
        "output_dir": str(out),
        "data": {"seq_len": seq_len, "sources": [{"name": "code", "path": data["code"]}]},
        "train": {"max_steps": 2, "micro_batch_size": 1, "grad_accum": 1, "lr": 1e-4, "fsdp": True},
        "eval": {"every_steps": 100, "max_sequences": 1, "sets": {"general": data["general"]}},
        "checkpoint": {"every_steps": 100, "keep_last": 1, "best_metric": None, "max_general_ppl_increase": None},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    command += ["-m", "tests.bench.bench_memory", "--worker", str(path), str(results)]
    result = subprocess.run(command, capture_output=True, text=True, env=run_env(), cwd=Path(__file__).parents[2])
    if result.returncode != 0:
        first = max(0, result.stderr.find("Traceback"))
        raise RuntimeError(f"torchrun --nproc_per_node {ranks} failed:\n{result.stderr[first : first + 4000]}")
    return [json.loads((results / f"rank{r}.json").read_text())["peak_rss_mb"] for r in range(ranks)]


def measure(root: Path, size: str = "150m", ranks: int = 4) -> dict:
    """{"params", "baseline_mb", "single_mb", "ranks_mb": [...]}: peak RSS minus the import-only baseline."""
    model, made = prepare(root, size)
    seq_len = SIZES[size][4]
    base = baseline_mb()
    single = run(root, model, made["data"], 1, seq_len)[0] - base
    sharded = [rss - base for rss in run(root, model, made["data"], ranks, seq_len)]
    return {"params": made["params"], "baseline_mb": base, "single_mb": single, "ranks_mb": sharded}


def main(size: str = "150m") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        figures = measure(Path(tmp), size)
    single = figures["single_mb"]
    print(f"LLaMA {figures['params'] / 1e6:.0f} M params, train.fsdp: true, gloo on CPU; peak RSS minus an")
    print(f"import-only process ({figures['baseline_mb']:.0f} MB):")
    print(f"  1 process            {single:8.0f} MB  ({single * 2**20 / figures['params']:.1f} bytes/param)")
    for rank, mb in enumerate(figures["ranks_mb"]):
        print(f"  4 ranks: rank {rank}       {mb:8.0f} MB  = {mb / single:.2f} x the single process")
    print(f"  worst rank / single: {max(figures['ranks_mb']) / single:.2f} (bar: <= 0.50)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main(*sys.argv[1:2])
