"""`cpt train` at scale on the GPUs this machine has: `python -m tests.bench gpu` (or `make bench-gpu`).

A ~1.1B LLaMA config (random init, no download; 22 layers x 2048, 8k BPE vocab), bf16 (FSDP2
MixedPrecisionPolicy), `train.fsdp: true` on every visible GPU, 20 steps at seq_len 4096, one sequence
per GPU per micro-batch. Prints tokens/s per GPU (median of the steps after the first 5), MFU (model
FLOPs 6 x params x tokens + attention 12 x layers x hidden x seq_len per token, against the GPU's
dense bf16 peak), peak memory per GPU (torch.cuda.max_memory_allocated), and the time one checkpoint
blocks the loop, written synchronously and with checkpoint.async_save. Without a GPU it runs a tiny
config on CPU (1 gloo process, fp32) so that the code path stays tested (tests/trainer/test_bench_gpu.py);
those figures say nothing about GPUs.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

# name: hidden, layers, heads, intermediate, vocab, seq_len, steps, texts (files, chars each)
SIZES = {
    "1b": (2048, 22, 16, 5632, 8192, 4096, 20, (400, 40_000)),
    "tiny": (64, 2, 4, 256, 512, 64, 4, (30, 3000)),
}
WARM = 5
# Dense bf16 peak FLOP/s by device name (vendor data sheets, SXM parts); unknown devices print no MFU.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def worker(config: str, result_dir: str) -> None:
    """Under torchrun: train, timing the checkpoint calls; write this rank's figures."""
    import torch

    from cpt.trainer import checkpoint as ckpt
    from cpt.trainer.config import load_run_config
    from cpt.trainer.loop import train

    times = {"save": []}

    def timed(name, method):
        @functools.wraps(method)
        def call(*args, **kwargs):
            start = time.perf_counter()
            result = method(*args, **kwargs)
            times[name].append(time.perf_counter() - start)
            return result

        return call

    ckpt.Checkpointer.save = timed("save", ckpt.Checkpointer.save)  # how long each checkpoint blocks the loop
    train(load_run_config(config))
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM")) / 2**20
    rank = int(os.environ.get("RANK", 0))
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps({"peak_gib": peak, **times}))


def prepare(root: Path, size: str) -> tuple[Path, dict, int]:
    from cpt.trainer.bootstrap import init_llama, train_bpe_tokenizer
    from tests.conftest import stdlib_texts
    from tests.helpers import make_prepared_dataset

    hidden, layers, heads, inter, vocab, seq_len, _, (files, chars) = SIZES[size]
    texts = stdlib_texts(files, max_chars=chars)
    tokenizer = root / "tokenizer"
    train_bpe_tokenizer(texts, tokenizer, vocab_size=vocab)
    model = root / "model"
    built = init_llama(
        tokenizer, model, hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=inter,
        max_position_embeddings=max(seq_len, 1024),
    )  # fmt: skip
    params = sum(p.numel() for p in built.parameters())
    del built
    cut = max(1, len(texts) // 10)
    data = {
        "code": make_prepared_dataset(root / "code", texts[cut:], tokenizer_dir=tokenizer),
        "general": make_prepared_dataset(root / "general", texts[:cut], tokenizer_dir=tokenizer),
    }
    return model, data, params


def run(root: Path, model: Path, data: dict, size: str, ranks: int, async_save: bool) -> tuple[list[dict], list]:
    """(per-rank figures, metrics.jsonl records) of one torchrun of `cpt train`."""
    _, _, _, _, _, seq_len, steps, _ = SIZES[size]
    name = f"{'async' if async_save else 'sync'}"
    out, results = root / name, root / f"{name}-figures"
    results.mkdir()
    config = {
        "model": str(model),
        "output_dir": str(out),
        "data": {"seq_len": seq_len, "sources": [{"name": "code", "path": data["code"]}]},
        "train": {
            "max_steps": steps, "micro_batch_size": 1, "grad_accum": 1, "lr": 1e-4, "fsdp": True,
            "precision": "auto", "warmup_ratio": 0.1,
        },
        "eval": {"every_steps": 10_000, "max_sequences": 1, "sets": {"general": data["general"]}},
        "checkpoint": {
            "every_steps": steps // 2, "keep_last": 1, "best_metric": None, "max_general_ppl_increase": None,
            "async_save": async_save,
        },
    }  # fmt: skip
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    command += ["-m", "tests.bench.bench_gpu", "--worker", str(path), str(results)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[2])
    if result.returncode != 0:
        first = max(0, result.stderr.find("Traceback"))
        raise RuntimeError(f"torchrun --nproc_per_node {ranks} failed:\n{result.stderr[first : first + 4000]}")
    figures = [json.loads((results / f"rank{r}.json").read_text()) for r in range(ranks)]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return figures, records


def measure(root: Path, size: str, ranks: int) -> dict:
    """The benchmark's figures for `size` on `ranks` processes."""
    model, data, params = prepare(root, size)
    hidden, layers, _, _, _, seq_len, _, _ = SIZES[size]
    sync, records = run(root, model, data, size, ranks, async_save=False)
    asynchronous, _ = run(root, model, data, size, ranks, async_save=True)
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    timed = rates[WARM:] or rates[-1:]
    per_gpu = statistics.median(timed) / ranks
    flops_per_token = 6 * params + 12 * layers * hidden * seq_len
    return {
        "params": params,
        "ranks": ranks,
        "seq_len": seq_len,
        "tokens_per_s_per_gpu": per_gpu,
        "model_flops_per_s_per_gpu": per_gpu * flops_per_token,
        "peak_gib": [f["peak_gib"] for f in sync],
        # A checkpoint every steps // 2, and the last one at the end: the first is the steady-state one.
        "sync_save_s": max(f["save"][0] for f in sync),
        "async_save_blocking_s": max(f["save"][0] for f in asynchronous),
        # The second async checkpoint first waits for the first to be published, then stages its own.
        "async_next_save_s": max(f["save"][1] for f in asynchronous),
    }


def main(size: str | None = None) -> None:
    import torch

    gpus = torch.cuda.device_count()
    size = size or ("1b" if gpus else "tiny")
    ranks = max(1, gpus)
    with tempfile.TemporaryDirectory() as tmp:
        figures = measure(Path(tmp), size, ranks)
    name = torch.cuda.get_device_name() if gpus else "CPU (gloo)"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    precision = "bf16" if gpus else "fp32"
    size_text = f"LLaMA {figures['params'] / 1e6:.2f} M params, FSDP2 {precision}, seq_len {figures['seq_len']}"
    print(f"{name} x {ranks}: {size_text}")
    print(f"  tokens/s per GPU     {figures['tokens_per_s_per_gpu']:10.0f}")
    mfu = f"{100 * figures['model_flops_per_s_per_gpu'] / peak:.1f} %" if peak else "n/a (no known peak)"
    print(f"  MFU                  {mfu}")
    print(f"  peak memory per rank {', '.join(f'{g:.2f}' for g in figures['peak_gib'])} GiB")
    print(f"  checkpoint, sync     {figures['sync_save_s']:8.2f} s (loop blocked)")
    print(
        f"  checkpoint, async    {figures['async_save_blocking_s']:8.2f} s (loop blocked; the next checkpoint, "
        f"which first waits for this one to be published, blocked {figures['async_next_save_s']:.2f} s)"
    )
    if not gpus:
        print("  (no GPU here: the tiny CPU config keeps the code path working; its figures say nothing about GPUs)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main(*sys.argv[1:2])
