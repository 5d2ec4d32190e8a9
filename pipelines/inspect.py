"""`cpt inspect DIR [--rejected] [--n N]`: a prepared dataset's manifest, shards and sample rows, readable."""

from __future__ import annotations

import argparse
import json
import sys

import pyarrow.compute

from cpt.shared import dataset


def _shorten(text: str | None, width: int = 160) -> str:
    text = (text or "").replace("\n", " ⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"


def manifest_lines(manifest: dict) -> list[str]:
    counts = manifest["counts"]
    lines = [
        f"format_version {manifest['format_version']}, cpt {manifest['cpt_version']}, "
        f"git {manifest.get('git_revision') or 'unknown'}, config {manifest.get('config_hash', '')[:12]}",
        f"steps: {' -> '.join(manifest.get('steps', [])) or '(none)'}",
        f"inputs: {', '.join(manifest['inputs']['patterns'])} ({len(manifest['inputs']['files'])} files)",
    ]
    tokenizer = manifest.get("tokenizer")
    described = f"{tokenizer['name']} sha256 {tokenizer['sha256'][:16]}" if tokenizer else "none"
    lines.append(f"tokenizer: {described}")
    lines.append(
        f"counts: input {counts['input']}, kept {counts['kept']}, "
        f"rejected {sum(counts['rejected'].values())}, dead_letter {counts['dead_letter']}"
    )
    lines += [f"  rejected {reason}: {n}" for reason, n in counts["rejected"].items()]
    if manifest.get("html"):
        lines.append("html: " + ", ".join(f"{why} {n}" for why, n in manifest["html"].items()))
    lines += [f"note: {note}" for note in manifest.get("notes", [])]
    if "near_dedup" in manifest:
        lines += [line[2:] for line in near_dedup_lines(manifest["near_dedup"])]
    lines.append("shards:")
    for shard in manifest["shards"]:
        tokens = "" if shard["tokens"] is None else f", {shard['tokens']} tokens"
        size = f"{shard['rows']} rows, {shard['bytes']} bytes{tokens}"
        lines.append(f"  {shard['file']}: {size}, sha256 {shard['sha256'][:12]}")
    return lines


def near_dedup_lines(report: dict) -> list[str]:
    """`cpt inspect`'s (and the end-of-run summary's) lines for a manifest's `near_dedup` entry."""
    p = report["params"]
    lines = [
        f"  near_dedup: {report['clusters']} clusters, largest {report['largest_cluster']} documents "
        f"({p['unit']} {p['ngram']}-grams, {p['num_perm']} permutations = {p['bands']} bands x {p['rows']} rows, "
        f"threshold {p['threshold']}, verify {p['verify_threshold'] if p['verify'] else 'off'})"
    ]
    lines += [f"    kept {kept} <- rejected {rejected}" for kept, rejected in report["sample_pairs"]]
    return lines


def sample_rows(directory: str, shards: list[dict], n: int) -> list[dict]:
    rows: list[dict] = []
    for shard in shards:
        if len(rows) >= n:
            break
        if shard["rows"]:
            rows += dataset.read_shard(dataset.join(directory, shard["file"])).slice(0, n - len(rows)).to_pylist()
    return rows


def row_line(row: dict) -> str:
    extra = f" reason={row['reason']}" if "reason" in row else ""
    extra += f" duplicate_of={row['duplicate_of']}" if row.get("duplicate_of") else ""
    pii = {k[4:]: v for k, v in row.items() if k.startswith("pii_") and v}
    return (
        f"  [{row['id']}]{extra} lang={row['lang']} ppl={row['ppl']} chars={row['n_chars']}"
        f"{' pii=' + json.dumps(pii) if pii else ''}\n    {_shorten(row['text'])}"
    )


def rejected_lines(dataset_dir: str, manifest: dict, n: int) -> list[str]:
    """Up to n sample rejects per reason."""
    rejected_dir = dataset.join(dataset_dir, dataset.REJECTED_DIR)
    by_reason: dict[str, list[dict]] = {}
    for shard in manifest.get("rejected_shards", []):
        if shard["rows"]:
            for row in dataset.read_shard(dataset.join(rejected_dir, shard["file"])).to_pylist():
                bucket = by_reason.setdefault(row["reason"], [])
                if len(bucket) < n:
                    bucket.append(row)
    lines = []
    for reason in sorted(by_reason):
        lines.append(f"rejected as {reason} ({manifest['counts']['rejected'].get(reason, 0)}):")
        lines += [row_line(row) for row in by_reason[reason]]
    return lines or ["no rejected documents"]


def find_row(directory: str, shards: list[dict], doc_id: str) -> dict | None:
    """The row with this id, read from the one shard its id hashes to (the writer's rule)."""
    shard = shards[dataset.shard_index(doc_id, len(shards))]
    if not shard["rows"]:
        return None
    table = dataset.read_shard(dataset.join(directory, shard["file"]))
    rows = table.filter(pyarrow.compute.equal(table["id"], doc_id)).slice(0, 1).to_pylist()
    return rows[0] if rows else None


def pair_lines(dataset_dir: str, manifest: dict) -> list[str]:
    """The sample (kept, rejected) near-duplicate pairs of the manifest, both texts shortened."""
    rejected_dir = dataset.join(dataset_dir, dataset.REJECTED_DIR)
    lines = []
    for kept_id, rejected_id in manifest.get("near_dedup", {}).get("sample_pairs", []):
        kept = find_row(dataset_dir, manifest["shards"], kept_id)
        rejected = find_row(rejected_dir, manifest["rejected_shards"], rejected_id)
        lines.append(f"near-duplicate pair: kept [{kept_id}] <- rejected [{rejected_id}]")
        lines += [f"    kept:     {_shorten(kept and kept['text'], 140)}"]
        lines += [f"    rejected: {_shorten(rejected and rejected['text'], 140)}"]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cpt inspect", description=__doc__)
    p.add_argument("dataset", help="a prepared dataset folder or URL")
    p.add_argument("--rejected", action="store_true", help="sample rejected documents, by reason")
    p.add_argument("--n", type=int, default=3, help="sample rows (per reason with --rejected)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        manifest = dataset.read_manifest(args.dataset)
        lines = manifest_lines(manifest)
        if args.rejected:
            lines += rejected_lines(args.dataset, manifest, args.n)
            lines += pair_lines(args.dataset, manifest)
        else:
            lines.append(f"sample rows ({args.n}):")
            lines += [row_line(row) for row in sample_rows(args.dataset, manifest["shards"], args.n)]
    except dataset.DatasetError as err:
        print(f"cpt inspect: error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0
