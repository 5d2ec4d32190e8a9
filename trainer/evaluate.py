"""Perplexity and bits per byte on named held-out sets, over fixed packed sequences.

perplexity = exp(token-mean NLL) depends on the tokenizer; bits per byte = sum of NLL / (ln 2 * UTF-8
bytes of the text the target tokens cover) does not, so it compares runs with different tokenizers.

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
def set_sums(objective, sequences: dict, micro_batch_size: int, autocast=contextlib.nullcontext, world=None):
    """(sum of NLL, target tokens, UTF-8 bytes of the targets) over `sequences`, split across ranks and summed.

    Rank r takes sequences r, r + W, ... and every rank runs the same number of forwards: under FSDP a
    forward is a collective (its all-gathers), so a rank with no sequences left runs one sequence and
    drops its result instead of leaving the others waiting.
    """
    world = world or Dist()
    device = next(objective.parameters()).device
    input_ids, position_ids = sequences["input_ids"], sequences["position_ids"]
    labels = sequences.get("labels")
    labels = input_ids if labels is None else labels
    sizes = sequences.get("bytes")
    count = input_ids.shape[0]
    mine = torch.arange(world.rank, max(count, world.rank), world.world_size)  # empty when rank >= count
    rounds = math.ceil(math.ceil(count / world.world_size) / micro_batch_size)
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for round_ in range(rounds):
        rows = mine[round_ * micro_batch_size : (round_ + 1) * micro_batch_size]
        padding = len(rows) == 0
        if padding:
            rows = torch.arange(1)
        with autocast():
            nll, _ = objective(input_ids[rows].to(device), position_ids[rows].to(device), labels[rows].to(device))
        if padding:
            continue
        targets = labels[rows][:, 1:] != IGNORE_INDEX
        totals[0] += nll.double().sum()
        totals[1] += targets.sum()
        if sizes is not None:
            totals[2] += (sizes[rows][:, 1:] * targets).sum()
    all_reduce_sum(totals, world)
    return float(totals[0]), int(totals[1]), int(totals[2]) if sizes is not None else None


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(token-mean NLL)."""
    return math.exp(nll_sum / tokens) if tokens else float("nan")


def bits_per_byte(nll_sum: float, num_bytes: int | None) -> float:
    """Sum of NLL (nats) / (ln 2 * UTF-8 bytes of the text): comparable across tokenizers (lm-eval's bits_per_byte)."""
    return nll_sum / (math.log(2) * num_bytes) if num_bytes else float("nan")


def evaluate(
    model, sets: dict[str, dict], micro_batch_size: int = 8, autocast=contextlib.nullcontext, world=None
) -> dict[str, float]:
    """{"<name>_ppl": perplexity, "<name>_bpb": bits per byte} for every named set (from `eval_sequences`)."""
    objective = model if isinstance(model, CausalLMObjective) else CausalLMObjective(model)
    was_training = objective.training
    objective.eval()
    try:
        results = {}
        for name, sequences in sets.items():
            total, count, num_bytes = set_sums(objective, sequences, micro_batch_size, autocast, world)
            results[f"{name}_ppl"] = perplexity(total, count)
            results[f"{name}_bpb"] = bits_per_byte(total, num_bytes)
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
    parser.add_argument(
        "--add-bos", choices=["auto", "true", "false"], default="auto",
        help="BOS before every document (default auto: the tokenizer's convention, as `cpt train` does)",
    )  # fmt: skip
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

    from cpt.trainer.conventions import document_bos
    from cpt.trainer.data import eval_sequences
    from cpt.trainer.loop import autocast_for
    from cpt.trainer.report import finite_or_null

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model, trust_remote_code=args.trust_remote_code)
    try:
        add_bos = {"auto": None, "true": True, "false": False}[args.add_bos]
        data = {
            name: eval_sequences(path, tokenizer, args.seq_len, args.max_sequences, add_bos)
            for name, path in sets.items()
        }
    except (DatasetError, ValueError) as err:
        print(f"cpt eval: {err}", file=sys.stderr)
        return 2
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=args.trust_remote_code).to(device)
    results = evaluate(model, data, args.batch_size, autocast_for(args.precision, device))
    payload = {
        "model": args.model,
        "seq_len": args.seq_len,
        "bos": document_bos(add_bos, tokenizer),  # the token put before every document, or null
        "sets": {name: {"path": sets[name], "sequences": int(data[name]["input_ids"].shape[0])} for name in sets},
        **results,
    }
    for name in sets:
        line = f"{name:<16} ppl {results[f'{name}_ppl']:.4f}  bpb {results[f'{name}_bpb']:.4f}"
        print(f"{line}  ({payload['sets'][name]['sequences']} sequences)")
    text = json.dumps(finite_or_null(payload), indent=2, sort_keys=True)  # NaN (unknown bytes) -> null
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    else:
        print(text)
    return 0
