"""The `cpt` command: a thin dispatcher over the `cpt.commands` entry-point group.

Each subcommand is a `main(argv: list[str]) -> int` registered in setup.py. Only the chosen one is
imported, so `cpt train` never pays for Beam and `cpt prepare` never pays for torch's trainer code.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

from cpt.shared import __version__

# One line per command for `cpt --help`; kept here so that help needs no subcommand import.
SUMMARIES = {
    "prepare": "run the Beam pipeline: raw text/HTML/code -> clean, PII-masked, filtered Arrow shards",
    "inspect": "print a prepared dataset's manifest, shards and sample rows (or rejects)",
    "train": "continued pre-training on a weighted, scheduled mixture of prepared datasets",
    "eval": "perplexity of a model on one or more prepared datasets",
    "export": "turn a training checkpoint-STEP folder into a Hugging Face model folder (safetensors)",
    "data-check": "stream the training mixture without a model: shares, tokens/s, trace",
    "demo": "the whole CPT story on this machine's own text (make demo)",
    "experiment": "forgetting-mitigation variants at equal token budgets (make experiment)",
    "merge": "interpolate a trained model with its base at one or more alphas (HF folders)",
}


def _commands() -> dict:
    return {ep.name: ep for ep in entry_points(group="cpt.commands")}


def _usage(commands: dict) -> str:
    lines = ["usage: cpt [--version] [--help] COMMAND [ARGS...]", "", "commands:"]
    for name in sorted(commands):
        lines.append(f"  {name:<12} {SUMMARIES.get(name, '')}")
    lines += ["", "Run `cpt COMMAND --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(commands))
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"cpt {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"cpt: unknown command {name!r}; choose one of: {', '.join(sorted(commands))}", file=sys.stderr)
        return 2
    result = commands[name].load()(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
