"""Trainer figures, each a ratio measured in this run: `cpt train`'s tokens/s against a bare PyTorch loop
(same model, same sequences, same batch, fp32 on CPU), and the step-time overhead of KL and of EWC.

`python -m tests.bench train`. A 4-layer, 128-wide LLaMA (1k BPE vocab), seq_len 128, 4 x 2 sequences a
step, on one intra-op thread (the 2 shared cores here make multi-threaded timings noise).
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cpt.shared.config import load_config
from cpt.trainer.bootstrap import init_llama, train_bpe_tokenizer
from cpt.trainer.config import RunConfig
from cpt.trainer.loop import train
from tests.conftest import stdlib_texts
from tests.helpers import make_prepared_dataset

SEQ, MICRO, ACCUM, STEPS, WARM = 128, 4, 2, 14, 3  # the first WARM steps are not timed
ROUNDS = 3  # the variants run in turn, ROUNDS times, so they share the machine's load alike


def summary(rates: list[float]) -> tuple[float, float]:
    """(best, median) tokens/s over the timed steps: the best step is the one the other tenants disturbed least."""
    return max(rates), statistics.median(rates)


def run_trainer(root: Path, model: Path, data: dict, name: str, regularization: dict) -> list[float]:
    """tokens/s of `cpt train` per timed step, as it logs them (eval and checkpoints only at the end)."""
    out = root / name
    config = {
        "model": str(model),
        "output_dir": str(out),
        "data": {"seq_len": SEQ, "sources": [{"name": "code", "path": data["code"]}]},
        "train": {"max_steps": STEPS, "micro_batch_size": MICRO, "grad_accum": ACCUM, "lr": 1e-3},
        "regularization": regularization,
        "eval": {"every_steps": STEPS, "max_sequences": 2, "sets": {"general": data["general"]}},
        "checkpoint": {"every_steps": STEPS, "keep_last": 1, "best_metric": None},
    }
    train(load_config(RunConfig, data=config))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out)
    return [r["tokens_per_s"] for r in records if r["step"] > WARM and "tokens_per_s" in r]


def bare_loop(model_dir: Path, batches: list[list[dict]]) -> list[float]:
    """tokens/s of the textbook loop: HF loss, AdamW, clip, step, on the trainer's own sequences."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    rates = []
    for step, micro in enumerate(batches):
        start = time.perf_counter()
        for batch in micro:
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"])
            (out.loss / len(micro)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= WARM:
            rates.append(sum(b["input_ids"].numel() for b in micro) / (time.perf_counter() - start))
    return rates


def trainer_batches(data: dict, tokenizer_dir: Path) -> list[list[dict]]:
    """The exact micro-batches the trainer sees, from the same MixtureLoader."""
    from transformers import AutoTokenizer

    from cpt.trainer.data import DataConfig, MixtureLoader, SourceConfig

    cfg = DataConfig(seq_len=SEQ, sources=[SourceConfig("code", data["code"])])
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    loader = iter(MixtureLoader(cfg, tokenizer, seed=0, micro_batch_size=MICRO))
    return [[next(loader) for _ in range(ACCUM)] for _ in range(STEPS)]


def main() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            tokenizer = root / "tokenizer"
            train_bpe_tokenizer(stdlib_texts(80), tokenizer, vocab_size=1024)
            model = root / "model"
            init_llama(tokenizer, model, hidden_size=128, num_layers=4, num_heads=4, max_position_embeddings=512)
            texts = stdlib_texts(120, max_chars=8000)
            data = {
                "code": make_prepared_dataset(root / "code", texts[:100], tokenizer_dir=tokenizer),
                "general": make_prepared_dataset(root / "general", texts[100:], tokenizer_dir=tokenizer),
            }
            batches = trainer_batches(data, tokenizer)
            variants = {
                "bare": lambda: bare_loop(model, batches),
                "plain": lambda: run_trainer(root, model, data, "plain", {}),
                "kl": lambda: run_trainer(root, model, data, "kl", {"kl": {"weight": 0.1, "on": "all"}}),
                "ewc": lambda: run_trainer(root, model, data, "ewc", {"ewc": {"weight": 1.0, "fisher_samples": 8}}),
            }
            rates = {name: [] for name in variants}
            for _ in range(ROUNDS):
                for name, measure in variants.items():
                    rates[name] += measure()
            bare, plain, kl, ewc = (summary(rates[name]) for name in variants)
    finally:
        torch.set_num_threads(threads)
    print("tokens/s per step, best / median of the timed steps (ratios of the best; median ratios in brackets)")
    print(f"bare PyTorch loop      {bare[0]:8.0f} / {bare[1]:8.0f}")
    print(f"cpt train (CLM)        {plain[0]:8.0f} / {plain[1]:8.0f}   vs bare loop: {ratio(plain, bare)}")
    print(f"cpt train + KL (all)   {kl[0]:8.0f} / {kl[1]:8.0f}   step-time overhead vs CLM: {ratio(plain, kl)}x")
    print(f"cpt train + EWC        {ewc[0]:8.0f} / {ewc[1]:8.0f}   step-time overhead vs CLM: {ratio(plain, ewc)}x")


def ratio(a: tuple[float, float], b: tuple[float, float]) -> str:
    return f"{a[0] / b[0]:.2f} ({a[1] / b[1]:.2f})"


if __name__ == "__main__":
    main()
