"""Run every benchmark: `python -m tests.bench [NAME ...]` calls `main()` of each `tests/bench/bench_*.py`.

With names, only the modules whose name contains one of them run (`python -m tests.bench text`).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from pathlib import Path


def bench_modules(filters: list[str]) -> list[str]:
    """The `bench_*` module names in this folder, sorted, kept when they contain any filter (all if none)."""
    names = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name.startswith("bench_"))
    return [name for name in names if not filters or any(f in name for f in filters)]


def main(argv: list[str]) -> int:
    names = bench_modules(argv)
    if not names:
        print(f"no benchmark matches {argv}; available: {bench_modules([])}", file=sys.stderr)
        return 2
    for name in names:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        importlib.import_module(f"{__package__}.{name}").main()
        print(f"== {name} done in {time.perf_counter() - start:.1f} s\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
