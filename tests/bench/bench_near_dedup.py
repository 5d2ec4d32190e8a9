"""Near dedup: throughput against exact dedup alone, and quality against datasketch's MinHashLSH, on real text.

The corpus is `tests.pipelines.near_dup_corpus` at bench size (about a thousand pieces of help topics
and package READMEs, plus edited copies and template-sharing hard negatives). `cpt prepare` (text
preset, language skipped, DirectRunner, 1 worker) runs twice: exact dedup alone, then with near_dedup;
the difference is the near-dedup step's cost. Quality uses the exact word-5-gram Jaccard: precision =
share of near_duplicate rejects with J >= 0.7 to the document they point to, recall = share of the
documents with J >= 0.8 to a kept document that are rejected. MinHashLSH gets the same shingles,
seed and permutations; its candidates are joined into components the same way (smallest id kept).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from cpt.pipelines.config import NearDedupConfig, resolve_config
from cpt.pipelines.near_dedup import _union, components, shingles
from cpt.pipelines.run import prepare
from cpt.shared import dataset
from tests.pipelines.near_dup_corpus import histogram, near_dup_docs, quality, similar_pairs

ONE = ["--direct_num_workers", "1"]


def run(pattern: str, out: Path, skip: list[str], near_dedup: dict | None = None) -> float:
    flags = {"inputs": [pattern], "output": str(out), "skip": skip, "near_dedup": near_dedup or {}}
    cfg = resolve_config("text", None, flags)
    start = time.perf_counter()
    prepare(cfg, ONE, quiet=True)
    return time.perf_counter() - start


def pipeline_rejects(out: Path) -> dict[str, str]:
    rows = [r for p in sorted((out / "rejected").glob("data-*.arrow")) for r in dataset.read_shard(str(p)).to_pylist()]
    return {r["id"]: r["duplicate_of"] for r in rows if r["reason"] == "near_duplicate"}


def datasketch_rejects(texts: dict[str, str], weights: tuple[float, float]) -> tuple[dict[str, str], float, tuple]:
    """MinHashLSH (threshold 0.8, 128 permutations, seed 1) candidates -> components -> smallest id kept."""
    from datasketch import MinHash, MinHashLSH

    start = time.perf_counter()
    lsh = MinHashLSH(threshold=0.8, num_perm=128, weights=weights)
    parent: dict = {}
    for doc_id in sorted(texts):
        grams = shingles(texts[doc_id], 5)
        if not grams:
            continue
        m = MinHash(num_perm=128, seed=1, scheme="affine32")
        m.update_batch(sorted(grams))
        for other in lsh.query(m):
            _union(parent, other, doc_id)
        lsh.insert(doc_id, m)
    rejected = {node: root for node, root, _ in components(parent) if node != root}
    return rejected, time.perf_counter() - start, (lsh.b, lsh.r)


def quality_line(name: str, q: dict) -> str:
    hist = " ".join(f"{edge}:{n}" for edge, n in histogram(q["pointed_jaccard"]))
    return (
        f"{name:<34} rejected {q['rejected']:>4}  precision {q['precision']:.3f}  "
        f"recall {q['recall']:.3f} (of {q['should_reject']})  J to kept: {hist}"
    )


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-near-dedup-") as tmp:
        base = Path(tmp)
        docs = near_dup_docs(1200, seed=0, hard_negatives=50)
        raw = base / "docs.jsonl"
        raw.write_text("".join(json.dumps({"id": d["id"], "text": d["text"]}) + "\n" for d in docs), encoding="utf-8")
        mb = raw.stat().st_size / 1e6
        texts = {d["id"]: d["text"] for d in docs}
        print(f"corpus: {len(docs)} documents, {mb:.2f} MB (bases + edited copies + template hard negatives)")
        run(str(raw), base / "warmup", ["language", "near_dedup"])  # imports and caches
        exact = run(str(raw), base / "exact", ["language", "near_dedup"])
        near = run(str(raw), base / "near", ["language"])
        step = near - exact
        print(f"{'pipeline':<34} {'s':>6} {'docs/s':>8} {'MB/s':>6}")
        print(f"{'exact dedup alone':<34} {exact:>6.1f} {len(docs) / exact:>8.1f} {mb / exact:>6.2f}")
        print(f"{'exact + near dedup':<34} {near:>6.1f} {len(docs) / near:>8.1f} {mb / near:>6.2f}")
        if step > 0:
            print(
                f"{'near-dedup step alone (difference)':<34} {step:>6.1f} {len(docs) / step:>8.1f} {mb / step:>6.2f}"
            )
        print(f"near dedup / exact alone: {near / exact:.2f}x the time")
        pairs = similar_pairs(texts)
        spread = " ".join(f"{edge}:{n}" for edge, n in histogram(list(pairs.values())))
        print(f"pairs of the set by exact word-5-gram Jaccard (>= 0.5): {spread}")
        bands, rows = NearDedupConfig().lsh_params()
        print(
            quality_line(
                f"cpt near_dedup ({bands}x{rows}, verify 0.8)", quality(texts, pipeline_rejects(base / "near"), pairs)
            )
        )
        run(str(raw), base / "unverified", ["language"], {"verify": False})
        unverified = quality(texts, pipeline_rejects(base / "unverified"), pairs)
        print(quality_line(f"cpt near_dedup ({bands}x{rows}, no verify)", unverified))
        for weights in ((0.5, 0.5), (0.05, 0.95)):
            rejected, seconds, (b, r) = datasketch_rejects(texts, weights)
            name = f"datasketch MinHashLSH ({b}x{r})"
            print(quality_line(name, quality(texts, rejected, pairs)) + f"  [{seconds:.1f} s in one process]")


if __name__ == "__main__":
    main()
