"""`cpt data-check`: stream the training mixture without a model; print tokens/s and shares, write a trace."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from cpt.shared.config import ConfigError, load_config, read_yaml
from cpt.shared.dataset import DatasetError
from cpt.trainer.data.config import DataConfig
from cpt.trainer.data.loader import MixtureLoader
from cpt.trainer.data.sources import check_sources
from cpt.trainer.data.trace import trace_lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpt data-check", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the run's RUN.yaml (its data:, seed, tokenizer/model)")
    parser.add_argument("--sequences", type=int, required=True, help="packed sequences to stream on this rank")
    parser.add_argument("--trace", help="write one JSON line per sequence to this file")
    parser.add_argument("--resume-at", type=int, help="after K sequences, rebuild the loader from its JSON state")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the config's tokenizer, else its model)")
    parser.add_argument("--micro-batch-size", type=int, help="default: the config's train.micro_batch_size, or 8")
    parser.add_argument("--total-tokens", type=int, help="run length for linear/steps schedules (default: derived)")
    return parser


# The trainer's defaults for these keys (trainer/config.py), mirrored so data-check streams what train streams.
TRAIN_DEFAULTS = {"micro_batch_size": 8, "grad_accum": 4}


def _run_settings(raw: dict, args) -> tuple[str | None, int, int]:
    """Tokenizer folder, seed and micro-batch size from RUN.yaml (only the keys data-check needs)."""
    model = raw.get("model")
    model = model.get("path") if isinstance(model, dict) else model
    tokenizer = args.tokenizer or raw.get("tokenizer") or model
    train = raw.get("train") or {}
    micro = args.micro_batch_size or int(train.get("micro_batch_size", TRAIN_DEFAULTS["micro_batch_size"]))
    return tokenizer, int(raw.get("seed", 0)), micro


def _total_tokens(raw: dict, cfg: DataConfig, world: int, micro: int, sequences: int) -> int:
    """The run length in tokens as `cpt train` passes it: whole steps of the global batch."""
    train = raw.get("train") or {}
    per_step = cfg.seq_len * micro * int(train.get("grad_accum", TRAIN_DEFAULTS["grad_accum"])) * world
    if train.get("max_steps"):
        return int(train["max_steps"]) * per_step
    if train.get("max_tokens"):
        return math.ceil(int(train["max_tokens"]) / per_step) * per_step
    return sequences * world * cfg.seq_len  # no run length given: the sequences streamed here are the run


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        raw = read_yaml(args.config)
        if "data" not in raw:
            raise ConfigError(["data: missing; give data: {seq_len, sources: [{name, path, weight}]}"], args.config)
        cfg = load_config(DataConfig, data=raw["data"])
    except ConfigError as err:
        print(f"cpt data-check: {err}", file=sys.stderr)
        return 2
    tokenizer_dir, seed, micro = _run_settings(raw, args)
    if not tokenizer_dir:
        print("cpt data-check: no tokenizer; set tokenizer: (or model:) in RUN.yaml, or --tokenizer", file=sys.stderr)
        return 2
    problems = check_sources(cfg, tokenizer_dir)
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        print(f"cpt data-check: {len(problems)} problem(s) with the data sources:\n{listing}", file=sys.stderr)
        return 2
    for name, count in (("--sequences", args.sequences), ("--resume-at", args.resume_at or 0)):
        if count % micro:
            print(f"cpt data-check: {name} {count} is not a multiple of micro_batch_size {micro}", file=sys.stderr)
            return 2

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    total = args.total_tokens or _total_tokens(raw, cfg, world, micro, args.sequences)
    if cfg.anneal is not None and cfg.anneal.start == "decay":  # the anneal starts where cpt train's wsd decays
        from cpt.trainer.anneal import resolve_anneal
        from cpt.trainer.config import TrainConfig

        grad_accum = int((raw.get("train") or {}).get("grad_accum", TRAIN_DEFAULTS["grad_accum"]))
        steps = max(1, total // (cfg.seq_len * micro * grad_accum * world))
        ratio = float((raw.get("train") or {}).get("decay_ratio", TrainConfig.decay_ratio))
        cfg = resolve_anneal(cfg, TrainConfig(decay_ratio=ratio), steps)

    def new_loader() -> MixtureLoader:
        return MixtureLoader(
            cfg, tokenizer, seed=seed, micro_batch_size=micro, rank=rank, world_size=world, total_tokens=total
        )

    try:
        stats = stream(new_loader, args.sequences, args.resume_at, args.trace, rank)
    except DatasetError as err:
        print(f"cpt data-check: {err}", file=sys.stderr)
        return 2
    report(stats, new_loader().source_names)
    return 0


def stream(new_loader, sequences: int, resume_at: int | None, trace_path: str | None, rank: int) -> dict:
    """Stream `sequences` on this rank (rebuilding the loader from its JSON state at `resume_at`)."""
    loader = new_loader()
    counts = [0] * len(loader.source_names)
    done = 0
    start = time.perf_counter()
    trace = open(trace_path, "w", encoding="utf-8") if trace_path else None
    try:
        while done < sequences:
            stop = min(resume_at, sequences) if resume_at and done < resume_at else sequences
            for batch in loader:
                for source in range(len(counts)):
                    counts[source] += int((batch["source_ids"] == source).sum())
                if trace:
                    trace.writelines(json.dumps(line) + "\n" for line in trace_lines(batch, rank))
                done += len(batch["index"])
                if done >= stop:
                    break
            else:
                break  # a finite source ended the run
            if done == resume_at:
                state = json.loads(json.dumps(loader.state_dict()))
                loader = new_loader()
                loader.load_state_dict(state)
                print(f"resumed at sequence {done} from a {len(json.dumps(state))}-byte JSON state")
        state = loader.state_dict()
    finally:
        if trace:
            trace.close()
    seconds = time.perf_counter() - start
    return {"sequences": done, "counts": counts, "seconds": seconds, "state": state}


def report(stats: dict, names: list[str]) -> None:
    tokens = sum(stats["counts"])
    rate = tokens / stats["seconds"] if stats["seconds"] > 0 else float("inf")
    print(f"{stats['sequences']} sequences, {tokens} tokens in {stats['seconds']:.2f} s: {rate:,.0f} tokens/s")
    consumed = stats["state"]["consumed"]
    for name, count, drawn in zip(names, stats["counts"], consumed):
        share = count / tokens if tokens else 0.0
        print(f"  {name:<16} {share:7.2%} of this rank's tokens  ({count} tokens; {drawn} drawn by all ranks)")
