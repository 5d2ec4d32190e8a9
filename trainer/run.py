"""`cpt train --config RUN.yaml [--set section.key=value ...] [--resume] [--from-checkpoint DIR]`.

Also `torchrun -m cpt.trainer ...`.
"""

from __future__ import annotations

import argparse
import sys

from cpt.shared.config import ConfigError
from cpt.shared.dataset import DatasetError


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cpt train",
        description="Continued pre-training of a Hugging Face causal LM on a mixture of prepared datasets.",
        epilog="Multi-GPU: torchrun --nproc_per_node N -m cpt.trainer --config RUN.yaml",
    )
    parser.add_argument("--config", required=True, help="RUN.yaml (every key is documented in the README)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value (repeat)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from output_dir's newest complete checkpoint")
    parser.add_argument(
        "--from-checkpoint",
        default=None,
        metavar="DIR",
        help="start this run (e.g. a cooldown branch with another data.anneal) from another run's checkpoint DIR",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from cpt.trainer.config import load_run_config

    try:
        # Every config problem (keys, types, paths, shard tokenizer) is listed here, before any weights load.
        cfg = load_run_config(args.config, args.set)
    except ConfigError as err:
        print(f"cpt train: {err}", file=sys.stderr)
        return 2
    from cpt.trainer.loop import TrainError, train

    try:
        train(cfg, resume=args.resume, from_checkpoint=args.from_checkpoint)
    except (TrainError, DatasetError) as err:
        print(f"cpt train: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
