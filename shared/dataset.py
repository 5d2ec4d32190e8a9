"""The prepared-dataset contract between `cpt prepare` (writer) and `cpt train` (reader).

A prepared dataset is a folder (local path or fsspec URL) laid out the way Hugging Face `datasets`
writes one with `save_to_disk`, so `datasets.load_from_disk(OUT)` opens it as it is:

    OUT/data-00000-of-00016.arrow ...   Arrow IPC *stream* files, rows sorted by id
    OUT/dataset_info.json, state.json   datasets' metadata
    OUT/manifest.json                   provenance, accounting, per-shard checksums (written last)
    OUT/rejected/                       same layout, plus a `reason` column
    OUT/dead_letter/*.jsonl             raw record (truncated, PII-masked), source, offset, error

This module depends only on pyarrow, fsspec and the standard library.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REJECTED_DIR = "rejected"
DEAD_LETTER_DIR = "dead_letter"
STATE_JSON = "state.json"
DATASET_INFO_JSON = "dataset_info.json"

#: PII types masked by the pipeline; each has a count column `pii_<type>`.
PII_TYPES = ("email", "phone", "ssn", "card", "ip", "secret")


class DatasetError(ValueError):
    """A prepared dataset is missing, incomplete or inconsistent; the message says which file and why."""


def shard_name(index: int, count: int) -> str:
    return f"data-{index:05d}-of-{count:05d}.arrow"


def pii_column(kind: str) -> str:
    return f"pii_{kind}"


def document_schema(tokenized: bool = False, rejected: bool = False) -> pa.Schema:
    """The Arrow schema of a shard. Column order is part of the contract (byte-identical shards)."""
    fields = [
        pa.field("id", pa.string()),
        pa.field("text", pa.string()),
        pa.field("domain", pa.string()),
        pa.field("source", pa.string()),
        pa.field("lang", pa.string()),
        pa.field("lang_prob", pa.float32()),
        pa.field("n_chars", pa.int64()),
        pa.field("ppl", pa.float64()),  # null where the document was not scored
    ]
    fields += [pa.field(pii_column(kind), pa.int32()) for kind in PII_TYPES]
    if tokenized:
        fields += [pa.field("input_ids", pa.list_(pa.uint32())), pa.field("n_tokens", pa.int64())]
    if rejected:
        fields.append(pa.field("reason", pa.string()))
        # The id of the document this one duplicates: the kept one (near_duplicate), or an eval one (contaminated).
        fields.append(pa.field("duplicate_of", pa.string()))
    return pa.schema(fields)


def hf_features(schema: pa.Schema) -> dict:
    """`datasets` Features JSON for a schema of the contract (written without importing datasets)."""

    def feature(arrow_type: pa.DataType) -> dict:
        if pa.types.is_list(arrow_type):
            return {"feature": feature(arrow_type.value_type), "_type": "List"}
        name = {pa.string(): "string", pa.float32(): "float32", pa.float64(): "float64"}.get(arrow_type)
        return {"dtype": name or str(arrow_type), "_type": "Value"}

    return {f.name: feature(f.type) for f in schema}


def shard_index(doc_id: str, num_shards: int) -> int:
    """A stable shard for an id (sha256, not Python's salted hash())."""
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") % num_shards


def join(base: str, *parts: str) -> str:
    """Join path parts for a local path or a URL (fsspec paths always use '/')."""
    if "://" in base:
        return posixpath.join(base.rstrip("/"), *parts)
    return str(Path(base, *parts))


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def hf_metadata(schema: pa.Schema, shard_files: list[str]) -> tuple[dict, dict]:
    """dataset_info.json and state.json contents for `datasets.load_from_disk`."""
    info = {"citation": "", "description": "", "features": hf_features(schema), "homepage": "", "license": ""}
    fingerprint = hashlib.sha256(json.dumps([info, shard_files], sort_keys=True).encode()).hexdigest()[:16]
    state = {
        "_data_files": [{"filename": name} for name in shard_files],
        "_fingerprint": fingerprint,
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    return info, state


def write_json_atomic(url: str, payload: Any) -> None:
    """Write JSON to a temporary name and move it into place, so readers never see half a file."""
    fs, path = filesystem(url)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
    fs.mv(tmp, path)


def read_manifest(dataset: str) -> dict:
    """The manifest of a prepared dataset; a clear error when it is missing (an incomplete run)."""
    url = join(dataset, MANIFEST)
    fs, path = filesystem(url)
    if not fs.exists(path):
        raise DatasetError(
            f"{dataset}: no {MANIFEST}; this is not a complete prepared dataset "
            "(the `cpt prepare` run that wrote it did not finish, or the path is wrong)"
        )
    try:
        with fs.open(path, "r") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{url}: unreadable manifest ({err}); re-run `cpt prepare` into this folder") from err
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DatasetError(f"{url}: format_version {version!r}, this cpt reads {FORMAT_VERSION}")
    return manifest


def shard_urls(dataset: str, manifest: dict | None = None) -> list[str]:
    manifest = manifest if manifest is not None else read_manifest(dataset)
    return [join(dataset, shard["file"]) for shard in manifest["shards"]]


def file_sha256(url: str, chunk: int = 1 << 20) -> str:
    fs, path = filesystem(url)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# Files that define a tokenizer's behaviour; weights and READMEs in the same folder do not count.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "vocab.txt",
)


def tokenizer_fingerprint(tokenizer_dir: str) -> str:
    """sha256 over the tokenizer's defining files, so shards can be matched to the tokenizer that made them.

    Only tokenizer.json (or the vocab/merges/sentencepiece model when there is none) counts: the
    config files carry version-dependent fields that do not change the token ids.
    """
    fs, path = filesystem(tokenizer_dir)
    names = ["tokenizer.json"] if fs.exists(posixpath.join(path, "tokenizer.json")) else list(TOKENIZER_FILES[3:])
    digest = hashlib.sha256()
    found = 0
    for name in names:
        full = posixpath.join(path, name)
        if fs.exists(full):
            digest.update(name.encode() + b"\0")
            with fs.open(full, "rb") as f:
                digest.update(f.read())
            found += 1
    if not found:
        raise DatasetError(f"{tokenizer_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) found")
    return digest.hexdigest()


def sort_rows(rows: list[dict]) -> list[dict]:
    """Rows inside a shard are sorted by id: part of what makes shards byte-identical across runners."""
    return sorted(rows, key=lambda row: row["id"])


def rows_to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    columns = {field.name: [row.get(field.name) for row in rows] for field in schema}
    return pa.Table.from_pydict(columns, schema=schema)


def write_shard(url: str, table: pa.Table) -> dict:
    """Write one Arrow IPC stream shard (temp name, then rename) and return its manifest entry."""
    fs, path = filesystem(url)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        # One batch per 1,000 rows: the trainer shuffles (shard, row-block) units of this size.
        writer.write_table(table, max_chunksize=1000)
    data = sink.getvalue().to_pybytes()
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)
    tokens = int(pa.compute.sum(table["n_tokens"]).as_py() or 0) if "n_tokens" in table.column_names else None
    return {
        "file": posixpath.basename(path),
        "rows": table.num_rows,
        "bytes": len(data),
        "tokens": tokens,
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def write_hf_metadata(dataset: str, schema: pa.Schema, shard_files: list[str]) -> None:
    info, state = hf_metadata(schema, shard_files)
    write_json_atomic(join(dataset, DATASET_INFO_JSON), info)
    write_json_atomic(join(dataset, STATE_JSON), state)


def read_shard(url: str) -> pa.Table:
    """Read a whole shard; a clear DatasetError names a missing, corrupt or truncated file."""
    fs, path = filesystem(url)
    try:
        if "://" not in url or url.startswith("file://"):
            with pa.memory_map(path, "r") as source:
                return pa.ipc.open_stream(source).read_all()
        with fs.open(path, "rb") as f:
            return pa.ipc.open_stream(f).read_all()
    except FileNotFoundError as err:
        raise DatasetError(f"{url}: shard listed in the manifest is missing") from err
    except (pa.ArrowInvalid, OSError) as err:
        raise DatasetError(f"{url}: corrupt or truncated Arrow shard ({err}); re-run `cpt prepare`") from err
