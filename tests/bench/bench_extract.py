"""Main-content extraction: token-shingle precision/recall/F1 and MB/s of `html_to_text` modes and trafilatura.

Data: scrapinghub's article-extraction-benchmark (MIT licence; 181 pages with ground-truth article bodies),
not shipped with the project. Get it once and point the benchmark at it:

    git clone https://github.com/scrapinghub/article-extraction-benchmark /tmp/aeb
    make bench ARGS=extract AEB_DIR=/tmp/aeb       # or: CPT_AEB_DIR=/tmp/aeb python -m tests.bench extract

Without it the benchmark runs on the few pages committed under tests/pipelines/data/aeb (same format).
The scoring is the benchmark's own (evaluate.py): 4-gram shingles of `\\w+` tokens, per-page TP/FP/FN
normalised by their sum, precision and recall averaged over pages, F1 from the averages.
Speed is MB of HTML per CPU second of this process, every extractor in turn, repeated CPT_AEB_ROUNDS (2) times.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import resource
import statistics
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from cpt.pipelines.text import html_to_text

FIXTURE_DIR = Path(__file__).resolve().parents[1] / "pipelines" / "data" / "aeb"
_TOKEN = re.compile(r"\w+", re.UNICODE)


def load_pages(root: Path) -> list[tuple[str, str, str]]:
    """(key, html, ground-truth article body) for every page of a benchmark folder (html/*.html.gz + json)."""
    truth = json.loads((root / "ground-truth.json").read_text(encoding="utf-8"))
    pages = []
    for key in sorted(truth):
        raw = gzip.decompress((root / "html" / f"{key}.html.gz").read_bytes())
        pages.append((key, raw.decode("utf-8", "replace"), truth[key].get("articleBody", "")))
    return pages


def _shingles(text: str, n: int = 4) -> Counter:
    tokens = _TOKEN.findall(text or "")
    return Counter(tuple(tokens[i : i + n]) for i in range(max(1, len(tokens) - n + 1)) if tokens[i : i + n])


def tp_fp_fn(true: str, pred: str) -> tuple[float, float, float]:
    """The benchmark's per-page shingle counts, normalised so that long pages weigh no more than short ones."""
    t, p = _shingles(true), _shingles(pred)
    tp = sum(min(t[k], p[k]) for k in t.keys() | p.keys())
    fp = sum(max(0, p[k] - t[k]) for k in p)
    fn = sum(max(0, t[k] - p[k]) for k in t)
    total = tp + fp + fn
    return (tp / total, fp / total, fn / total) if total else (0.0, 0.0, 0.0)


def _precision(tp: float, fp: float, fn: float) -> float:
    return 1.0 if fp == fn == 0 else 0.0 if tp == fp == 0 else tp / (tp + fp)


def _recall(tp: float, fp: float, fn: float) -> float:
    return 1.0 if fp == fn == 0 else 0.0 if tp == fn == 0 else tp / (tp + fn)


def score(pages: list[tuple[str, str, str]], predictions: list[str]) -> dict[str, float]:
    """precision, recall, f1 as the benchmark defines them."""
    counts = [tp_fp_fn(true, pred) for (_, _, true), pred in zip(pages, predictions, strict=True)]
    precision = statistics.mean(_precision(*c) for c in counts if c[0] + c[1] > 0)
    recall = statistics.mean(_recall(*c) for c in counts if c[0] + c[2] > 0)
    return {"precision": precision, "recall": recall, "f1": 2 * precision * recall / (precision + recall)}


def extractors() -> dict[str, Callable[[str], str]]:
    """cpt's modes, and trafilatura called directly (the peer) when it is installed."""
    out = {
        "cpt main (default, web)": lambda html: html_to_text(html, mode="main"),
        "cpt full": lambda html: html_to_text(html, mode="full"),
    }
    try:
        import trafilatura
    except ImportError:
        print("  trafilatura not installed: peer left out (pip install 'cpt[trafilatura]')")
        return out
    out[f"trafilatura {trafilatura.__version__}"] = lambda html: trafilatura.extract(html) or ""
    return out


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its children (less noisy than wall time on a shared machine)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(root: Path, rounds: int = 2) -> list[dict]:
    pages = load_pages(root)
    megabytes = sum(len(html.encode("utf-8")) for _, html, _ in pages) / 1e6
    print(f"  {len(pages)} pages, {megabytes:.1f} MB of HTML, from {root}; one process (one core), MB per CPU second")
    rows = []
    for round_ in range(1, rounds + 1):
        for name, extract in extractors().items():
            started = _cpu_seconds()
            predictions = [extract(html) for _, html, _ in pages]
            seconds = _cpu_seconds() - started
            rows.append({"round": round_, "name": name, **score(pages, predictions), "mb_s": megabytes / seconds})
    print(f"  {'round':<5} {'extractor':<26} {'F1':>6} {'prec':>6} {'recall':>6} {'MB/s':>7} {'x trafilatura':>14}")
    for r in rows:
        peer = (b["mb_s"] for b in rows if b["round"] == r["round"] and b["name"].startswith("trafilatura"))
        base = next(peer, None)
        ratio = f"{r['mb_s'] / base:.1f}x" if base else "-"
        figures = f"{r['f1']:6.3f} {r['precision']:6.3f} {r['recall']:6.3f} {r['mb_s']:7.2f}"
        print(f"  {r['round']:<5} {r['name']:<26} {figures} {ratio:>14}")
    return rows


def main() -> None:
    root = Path(os.environ.get("CPT_AEB_DIR") or FIXTURE_DIR)
    if not (root / "ground-truth.json").exists():
        raise SystemExit(f"bench_extract: no ground-truth.json under {root}; set CPT_AEB_DIR (see this module's doc)")
    run(root, rounds=int(os.environ.get("CPT_AEB_ROUNDS", "2")))


if __name__ == "__main__":
    main()
