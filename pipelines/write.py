"""Deterministic shard writing, the run summary, and the manifest (written last, by the launcher).

Every record is keyed by `shard_index(id)`; one GroupByKey brings a shard's kept documents, rejects
and dead letters together, and one DoFn writes `data-i` (kept), `rejected/data-i` and
`dead_letter/part-i.jsonl`, each sorted by id, through temp names. Empty shards are written too
(an explicit marker per index). The shard infos and an independent count of input records meet in
a final singleton step that writes `_run_summary.json`; the launcher checks the accounting against
it and only then writes `manifest.json`.
"""

from __future__ import annotations

import json
from collections import Counter

import apache_beam as beam

from cpt.pipelines.near_dedup import shard_stats as near_dedup_stats
from cpt.pipelines.shuffle import FileGroupByKey, channels, each
from cpt.pipelines.transforms import DEAD, KEPT, REJECTED, shard_index
from cpt.shared import dataset
from cpt.shared.dataset import join

RUN_SUMMARY = "_run_summary.json"


def row_sort_key(doc: dict) -> tuple:
    # Sorted by id (the contract); source and offset break ties between records given the same id.
    return doc["id"], doc.get("source") or "", doc.get("offset") or 0


def document_row(doc: dict, domain: str) -> dict:
    text = doc["text"]
    return {**doc, "domain": domain, "n_chars": len(text)}


def dead_letter_line(doc: dict, limit: int, mask) -> str:
    """One JSON line: raw record (PII-masked, then truncated), source, offset, error (masked and truncated too:
    a step's exception message may quote the text)."""
    raw, _ = mask(doc.get("raw") or "", secrets=True)
    error, _ = mask(doc.get("error") or "", secrets=True)
    payload = {"id": doc["id"], "source": doc["source"], "offset": doc.get("offset"), "error": error[:limit]}
    payload["raw"] = raw[:limit]
    payload["raw_truncated"] = len(raw) > limit
    return json.dumps(payload, sort_keys=True, ensure_ascii=False)


class WriteShardDoFn(beam.DoFn):
    """(shard index, records) -> writes the kept / rejected / dead-letter files of that shard, yields its info."""

    def __init__(self, output: str, num_shards: int, domain: str, tokenized: bool, dead_letter_limit: int):
        self.output = output
        self.num_shards = num_shards
        self.domain = domain
        self.tokenized = tokenized
        self.dead_letter_limit = dead_letter_limit

    def setup(self):
        from cpt.pipelines.text import mask_pii

        self._mask = mask_pii
        # Local folders must exist before fsspec writes into them (object stores need nothing).
        for sub in ("", dataset.REJECTED_DIR, dataset.DEAD_LETTER_DIR):
            fs, path = dataset.filesystem(join(self.output, sub) if sub else self.output)
            fs.makedirs(path, exist_ok=True)
        self._kept_schema = dataset.document_schema(tokenized=self.tokenized)
        self._rejected_schema = dataset.document_schema(rejected=True)

    def process(self, item):
        index, records = item
        records = sorted((r for r in records if r is not None), key=row_sort_key)
        by_status = {KEPT: [], REJECTED: [], DEAD: []}
        for record in records:
            by_status[record["status"]].append(record)
        name = dataset.shard_name(index, self.num_shards)
        kept = [document_row(d, self.domain) for d in by_status[KEPT]]
        rejected = [document_row(d, self.domain) for d in by_status[REJECTED]]
        kept_info = dataset.write_shard(join(self.output, name), dataset.rows_to_table(kept, self._kept_schema))
        rejected_info = dataset.write_shard(
            join(self.output, dataset.REJECTED_DIR, name), dataset.rows_to_table(rejected, self._rejected_schema)
        )
        dead = by_status[DEAD]
        if dead:
            lines = "".join(dead_letter_line(d, self.dead_letter_limit, self._mask) + "\n" for d in dead)
            _write_text_atomic(join(self.output, dataset.DEAD_LETTER_DIR, f"part-{index:05d}.jsonl"), lines)
        yield {
            "index": index,
            "kept": kept_info,
            "rejected": rejected_info,
            "reasons": dict(Counter(d["reason"] for d in by_status[REJECTED])),
            "dead_letter": len(dead),
            # Which step dead-lettered each record ("read": the reader's size/decoding/JSON guards).
            "dead_letter_steps": dict(Counter(d.get("dead_step") or "read" for d in dead)),
            "near_dedup": near_dedup_stats(records),
            "html": dict(Counter(r["html"] for r in records if r.get("html"))),
        }


def _write_text_atomic(url: str, text: str) -> None:
    import uuid

    fs, path = dataset.filesystem(url)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(text.encode("utf-8"))
    fs.mv(tmp, path)


class WriteDataset(beam.PTransform):
    """All records -> per-shard files; returns one info dict per shard."""

    def __init__(
        self, output: str, num_shards: int, domain: str, tokenized: bool, dead_letter_limit: int, shuffle=None
    ):
        super().__init__()
        self.args = (output, num_shards, domain, tokenized, dead_letter_limit)
        self.shuffle = shuffle

    def expand(self, records):
        output, num_shards, *_ = self.args
        keyed = each(records, "KeyByShard", lambda: beam.Map(lambda doc: (shard_index(doc["id"], num_shards), doc)))
        # One marker per shard, so a shard no record hashes to is still written (0 rows).
        pipeline = channels(records)[0].pipeline
        markers = pipeline | "EveryShard" >> beam.Create([(i, None) for i in range(num_shards)])
        return (
            (*channels(keyed), markers)
            # Through files, a partition is a shard: the shard's worker reads exactly its records.
            | "GroupByShard" >> FileGroupByKey(self.shuffle, "write", num_shards, _identity)
            | "WriteShards" >> beam.ParDo(WriteShardDoFn(*self.args))
        )


def _identity(shard: int) -> int:
    return shard


class WriteRunSummaryDoFn(beam.DoFn):
    def __init__(self, output: str):
        self.output = output

    def process(self, item):
        _, parts = item
        shards = sorted((p for kind, p in parts if kind == "shard"), key=lambda info: info["index"])
        inputs = sum(p for kind, p in parts if kind == "input")
        dataset.write_json_atomic(join(self.output, RUN_SUMMARY), {"input": inputs, "shards": shards})
        yield len(shards)


class WriteRunSummary(beam.PTransform):
    """Shard infos + input count -> `_run_summary.json`. The pipeline's last step (DaskRunner computes only that)."""

    def __init__(self, output: str, input_count):
        super().__init__()
        self.output = output
        self.input_count = input_count

    def expand(self, shard_infos):
        tagged_infos = shard_infos | "TagShards" >> beam.Map(lambda info: (None, ("shard", info)))
        tagged_count = self.input_count | "TagInput" >> beam.Map(lambda kv: (None, ("input", kv[1])))
        return (
            (tagged_infos, tagged_count)
            | "Together" >> beam.Flatten()
            | "One" >> beam.GroupByKey()
            | "WriteSummary" >> beam.ParDo(WriteRunSummaryDoFn(self.output))
        )


class CountInputs(beam.PTransform):
    """An independent count of the records read, checked against what the writer wrote."""

    def expand(self, records):
        return records | "One" >> beam.Map(lambda _: ("input", 1)) | "Sum" >> beam.CombinePerKey(sum)


# ---- launcher side: before the pipeline (clean) and after it (accounting, metadata, manifest) ----


class AccountingError(RuntimeError):
    """input != kept + rejected + dead_letter: the run failed, no manifest is written."""


def clean_output(output: str) -> None:
    """Remove a previous run: manifest FIRST (so a half-cleaned folder never looks complete), then the rest."""
    fs, path = dataset.filesystem(output)
    manifest = join(output, dataset.MANIFEST)
    mfs, mpath = dataset.filesystem(manifest)
    if mfs.exists(mpath):
        mfs.rm(mpath)
    if not fs.exists(path):
        fs.makedirs(path, exist_ok=True)
        return
    remove_shuffle_files(output)
    for sub in (dataset.REJECTED_DIR, dataset.DEAD_LETTER_DIR):
        sfs, spath = dataset.filesystem(join(output, sub))
        if sfs.exists(spath):
            sfs.rm(spath, recursive=True)
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("data-") or name in (dataset.STATE_JSON, dataset.DATASET_INFO_JSON, RUN_SUMMARY):
            fs.rm(entry)


def remove_shuffle_files(output: str) -> None:
    """The run's shuffle files (see cpt.pipelines.shuffle): needed only while the pipeline runs."""
    from cpt.pipelines.shuffle import SHUFFLE_DIR

    fs, path = dataset.filesystem(join(output, SHUFFLE_DIR))
    if fs.exists(path):
        fs.rm(path, recursive=True)


def read_run_summary(output: str) -> dict:
    fs, path = dataset.filesystem(join(output, RUN_SUMMARY))
    if not fs.exists(path):
        raise AccountingError(f"{output}: the pipeline finished without writing {RUN_SUMMARY}")
    with fs.open(path, "r") as f:
        return json.load(f)


def counts_from_summary(summary: dict, num_shards: int) -> dict:
    """counts = {input, kept, rejected: {reason: n}, dead_letter}; raises AccountingError if they do not add up."""
    shards = summary["shards"]
    if sorted(s["index"] for s in shards) != list(range(num_shards)):
        written = [s["index"] for s in shards]
        raise AccountingError(f"expected shards 0..{num_shards - 1}, the pipeline wrote {written}")
    reasons: Counter = Counter()
    for shard in shards:
        reasons.update(shard["reasons"])
    counts = {
        "input": summary["input"],
        "kept": sum(s["kept"]["rows"] for s in shards),
        "rejected": dict(sorted(reasons.items())),
        "dead_letter": sum(s["dead_letter"] for s in shards),
    }
    # Records treated as HTML, by why (file, field, doctype, html_root, markup_density), or "not_cleaned".
    html = sum((Counter(s.get("html", {})) for s in shards), Counter())
    if html:
        counts["html"] = dict(sorted(html.items()))
    accounted = counts["kept"] + sum(reasons.values()) + counts["dead_letter"]
    if accounted != counts["input"]:
        raise AccountingError(
            f"accounting failed: input {counts['input']} != kept {counts['kept']} + rejected "
            f"{sum(reasons.values())} + dead_letter {counts['dead_letter']}; no manifest written"
        )
    return counts


def dead_letters_by_step(summary: dict) -> dict[str, int]:
    """Dead letters per step that made them, over all shards (for the run summary a user reads)."""
    steps: Counter = Counter()
    for shard in summary["shards"]:
        steps.update(shard.get("dead_letter_steps") or {})
    return dict(sorted(steps.items()))


def finalize(output: str, manifest: dict, summary: dict, tokenized: bool) -> dict:
    """Write HF metadata for kept and rejected, then the manifest (last), and remove the run summary."""
    shards = summary["shards"]
    kept_files = [s["kept"]["file"] for s in shards]
    dataset.write_hf_metadata(output, dataset.document_schema(tokenized=tokenized), kept_files)
    dataset.write_hf_metadata(join(output, dataset.REJECTED_DIR), dataset.document_schema(rejected=True), kept_files)
    manifest = {
        **manifest,
        "shards": [s["kept"] for s in shards],
        "rejected_shards": [s["rejected"] for s in shards],
    }
    dataset.write_json_atomic(join(output, dataset.MANIFEST), manifest)
    fs, path = dataset.filesystem(join(output, RUN_SUMMARY))
    fs.rm(path)
    return manifest
