"""Perplexity on named held-out sets: exp(token-mean NLL) over fixed packed sequences.

`evaluate()` is what the trainer calls at step 0 and every `eval.every_steps`; `cpt eval` is the same
function on a saved model:

    cpt eval --model DIR --data NAME=DIR [--data NAME=DIR ...] [--seq-len N] [--max-sequences N] [--output F.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys

import torch

from cpt.trainer.distributed import Dist, all_reduce_sum
from cpt.trainer.objectives import IGNORE_INDEX, CausalLMObjective


@torch.no_grad()
def set_nll(objective, sequences: dict, micro_batch_size: int, autocast=contextlib.nullcontext, world=None):
    """(sum of NLL, number of target tokens) over `sequences`, split across ranks and summed."""
    world = world or Dist()
    device = next(objective.parameters()).device
    input_ids, position_ids = sequences["input_ids"], sequences["position_ids"]
    labels = sequences.get("labels", input_ids)
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    starts = list(range(0, input_ids.shape[0], micro_batch_size))
    for start in starts[world.rank :: world.world_size]:
        part = slice(start, start + micro_batch_size)
        with autocast():
            nll, _ = objective(input_ids[part].to(device), position_ids[part].to(device), labels[part].to(device))
        totals[0] += nll.double().sum()
        totals[1] += (labels[part][:, 1:] != IGNORE_INDEX).sum()
    all_reduce_sum(totals, world)
    return float(totals[0]), int(totals[1])


def evaluate(
    model, sets: dict[str, dict], micro_batch_size: int = 8, autocast=contextlib.nullcontext, world=None
) -> dict[str, float]:
    """{"<name>_ppl": perplexity} for every named set of fixed sequences (from `eval_sequences`)."""
    objective = model if isinstance(model, CausalLMObjective) else CausalLMObjective(model)
    was_training = objective.training
    objective.eval()
    try:
        results = {}
        for name, sequences in sets.items():
            total, count = set_nll(objective, sequences, micro_batch_size, autocast, world)
            results[f"{name}_ppl"] = math.exp(total / count) if count else float("nan")
        return results
    finally:
        objective.train(was_training)


def parse_sets(items: list[str]) -> dict[str, str]:
    sets = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--data {item!r}: expected NAME=DIR, e.g. --data domain=data/code_val")
        if name in sets:
            raise ValueError(f"--data: set name {name!r} given twice")
        sets[name] = path
    return sets


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cpt eval", description="Perplexity of a model on prepared datasets.")
    parser.add_argument("--model", required=True, help="HF model folder (e.g. a run's final/ or best/)")
    parser.add_argument("--data", action="append", required=True, metavar="NAME=DIR", help="a named prepared set")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per packed sequence (default 1024)")
    parser.add_argument("--max-sequences", type=int, default=64, help="sequences per set (default 64)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder")
    parser.add_argument("--output", default=None, help="write the results as JSON here (default: stdout only)")
    args = parser.parse_args(argv)

    from pathlib import Path

    from cpt.shared.dataset import DatasetError

    try:
        sets = parse_sets(args.data)
    except ValueError as err:
        print(f"cpt eval: {err}", file=sys.stderr)
        return 2
    if not (Path(args.model) / "config.json").is_file():
        print(f"cpt eval: --model {args.model} is not a Hugging Face model folder (no config.json)", file=sys.stderr)
        return 2

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.trainer.data import eval_sequences
    from cpt.trainer.loop import autocast_for

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model, trust_remote_code=args.trust_remote_code)
    try:
        data = {name: eval_sequences(path, tokenizer, args.seq_len, args.max_sequences) for name, path in sets.items()}
    except DatasetError as err:
        print(f"cpt eval: {err}", file=sys.stderr)
        return 2
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=args.trust_remote_code).to(device)
    results = evaluate(model, data, args.batch_size, autocast_for(args.precision, device))
    payload = {
        "model": args.model,
        "seq_len": args.seq_len,
        "sets": {name: {"path": sets[name], "sequences": int(data[name]["input_ids"].shape[0])} for name in sets},
        **results,
    }
    for name in sets:
        print(f"{name:<16} ppl {results[f'{name}_ppl']:.4f}  ({payload['sets'][name]['sequences']} sequences)")
    text = json.dumps(payload, indent=2, sort_keys=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    else:
        print(text)
    return 0
