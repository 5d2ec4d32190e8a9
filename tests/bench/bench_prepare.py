"""`cpt prepare` throughput per preset on real local files: DirectRunner with 1 worker vs 2 worker processes.

Corpora: web = pydoc HTML pages of stdlib modules; text = the pydoc_data help topics as JSONL;
code = stdlib `.py` files. Figures are docs/s and MB/s of input, and the 2-vs-1 worker ratio
measured in the same run. At this size pipeline start-up weighs a lot (2 worker processes start
their own SDK harnesses), so each mode's start-up, the same pipeline on one document, is printed too.
"""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

from cpt.pipelines.config import resolve_config
from cpt.pipelines.run import prepare
from cpt.shared.corpus import pydoc_page, stdlib_module_names

ONE = ["--direct_num_workers", "1"]
TWO = ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]


def build_corpora(base: Path, pages: int = 30, code_files: int = 60) -> dict[str, str]:
    """Write the three corpora; returns preset -> input pattern."""
    from pydoc_data.topics import topics

    html = base / "web"
    html.mkdir()
    written = 0
    for name in stdlib_module_names():
        page = pydoc_page(name)
        if page:
            (html / f"{name}.html").write_text(page, encoding="utf-8")
            written += 1
        if written >= pages:
            break
    text = base / "text"
    text.mkdir()
    lines = [json.dumps({"id": f"topic/{k}", "text": v}) for k, v in sorted(topics.items())]
    (text / "topics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    code = base / "code"
    code.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py"))[:code_files]:
        shutil.copyfile(path, code / path.name)
    one = base / "one"
    one.mkdir()
    (one / "one.jsonl").write_text(lines[0] + "\n", encoding="utf-8")
    return {
        "startup": str(one / "*.jsonl"),
        "web": str(html / "*.html"),
        "text": str(text / "*.jsonl"),
        "code": str(code / "*.py"),
    }


def measure(preset: str, pattern: str, out: Path, beam_args: list[str]) -> tuple[int, float, float]:
    cfg = resolve_config(preset, None, {"inputs": [pattern], "output": str(out)})
    size = sum(p.stat().st_size for p in Path(pattern).parent.glob(Path(pattern).name))
    start = time.perf_counter()
    manifest = prepare(cfg, beam_args, quiet=True)
    seconds = time.perf_counter() - start
    return manifest["counts"]["input"], seconds, size / 1e6


def main() -> None:
    # CPT_BENCH_LARGE=1: ~7x the documents, where per-document work, not start-up, dominates.
    large = os.environ.get("CPT_BENCH_LARGE") == "1"
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        base = Path(tmp)
        corpora = build_corpora(base, pages=200, code_files=400) if large else build_corpora(base)
        startup = corpora.pop("startup")
        measure("text", startup, base / "out-warmup", ONE)  # first run pays the imports (langdetect, pyarrow, ...)
        _, s1, _ = measure("text", startup, base / "out-startup-1", ONE)
        _, s2, _ = measure("text", startup, base / "out-startup-2", TWO)
        print(f"start-up (1 document): 1 worker {s1:.1f} s, 2 workers {s2:.1f} s")
        columns = f"{'docs/s':>7} {'MB/s':>5}"
        head = f"{'preset':<6} {'docs':>5} {'MB':>5}"
        print(f"{head} | {'1 worker: s':>11} {columns} | {'2 workers: s':>12} {columns} | 2-vs-1")
        for preset, pattern in corpora.items():
            docs, t1, mb = measure(preset, pattern, base / f"out-{preset}-1", ONE)
            _, t2, _ = measure(preset, pattern, base / f"out-{preset}-2", TWO)
            print(
                f"{preset:<6} {docs:>5} {mb:>5.2f} | {t1:>11.1f} {docs / t1:>7.1f} {mb / t1:>5.2f} | "
                f"{t2:>12.1f} {docs / t2:>7.1f} {mb / t2:>5.2f} | {t1 / t2:.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
