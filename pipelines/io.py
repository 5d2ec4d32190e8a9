"""Readers: input patterns -> files (in the launcher) -> document records or dead letters (in a DoFn).

Every record that leaves a reader is a plain dict (picklable, cheap to shuffle) with a `status`:
"ok" for a document, "dead" for a dead letter that carries the raw bytes and the error. Nothing
is dropped: a record that cannot be read becomes a dead letter, so the run's accounting holds.
All file access goes through Beam's FileSystems, so gs:// and s3:// inputs read the same way.
"""

from __future__ import annotations

import gzip
import json
import posixpath
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from cpt.pipelines.config import InputError
from cpt.shared.dataset import PII_TYPES, pii_column

# Extension -> format, for inputs given without --format (longest suffix wins: .jsonl.gz before .gz).
EXTENSIONS = {
    ".jsonl.gz": "jsonl",
    ".json.gz": "jsonl",
    ".ndjson.gz": "jsonl",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".html": "html",
    ".htm": "html",
    ".py": "code",
    ".txt": "text",
    ".md": "text",
    ".rst": "text",
}
ONE_DOC_PER_FILE = ("text", "html", "code")
GLOB_CHARS = "*?["
# Errors a damaged file raises while it is read; each becomes one dead letter, never a crashed job.
READ_ERRORS = (OSError, EOFError, zlib.error, pa.ArrowException, ValueError)


@dataclass(frozen=True)
class InputFile:
    path: str
    """Full path or URL, as FileSystems reads it."""
    rel: str
    """Path relative to the pattern's fixed prefix (with several --input, to the common parent of all the
    patterns' prefixes): unique per file across the run, the stable part of derived ids and `source`."""
    format: str
    size: int


def infer_format(path: str) -> str | None:
    lower = path.lower()
    for ext in sorted(EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext):
            return EXTENSIONS[ext]
    return None


def _static_prefix_dir(pattern: str) -> str:
    """The folder above the first glob character (or above the file), which relative ids start from."""
    cut = min((pattern.find(c) for c in GLOB_CHARS if c in pattern), default=len(pattern))
    return posixpath.dirname(pattern[:cut].rstrip("/")) if cut == len(pattern) else pattern[:cut].rsplit("/", 1)[0]


def _is_dataset_folder(pattern: str) -> bool:
    base = pattern.rstrip("/")
    return not any(c in base for c in GLOB_CHARS) and (
        FileSystems.exists(f"{base}/dataset_info.json") or FileSystems.exists(f"{base}/state.json")
    )


def _relative(path: str, prefix: str) -> str | None:
    """`path` below the folder `prefix`, compared by whole path components; None when it is not below it."""
    parts, base = path.split("/"), prefix.rstrip("/").split("/")
    if prefix and parts[: len(base)] == base and len(parts) > len(base):
        return "/".join(parts[len(base) :]).lstrip("/")
    return None


def _common_prefix(prefixes: list[str]) -> str:
    """The longest common folder (by whole path components) of the patterns' fixed prefixes."""
    split = [p.rstrip("/").split("/") if p else [] for p in prefixes]
    common: list[str] = []
    for parts in zip(*split):
        if any(part != parts[0] for part in parts):
            break
        common.append(parts[0])
    return "/".join(common)


def expand_inputs(patterns: list[str], fmt: str | None = None) -> list[InputFile]:
    """Resolve patterns to files, sorted and de-duplicated; raise InputError for anything a user must fix.

    A file's `rel` (ids, `source`) is relative to its pattern's fixed prefix; with several patterns, to
    the common parent of all their prefixes, so `a/*.jsonl` and `b/*.jsonl` holding the same file names
    still give every file its own ids and source.
    """
    found: dict[str, tuple[str, str]] = {}  # path -> (format, size)
    prefixes: list[str] = []
    for pattern in patterns:
        if _is_dataset_folder(pattern):
            base = pattern.rstrip("/")
            glob, prefix, folder_fmt = f"{base}/*.arrow", posixpath.dirname(base), "arrow"
        else:
            glob, prefix, folder_fmt = pattern, _static_prefix_dir(pattern), None
        prefixes.append(prefix)
        matched = FileSystems.match([glob])[0].metadata_list
        if not matched:
            if not any(c in pattern for c in GLOB_CHARS) and not FileSystems.exists(pattern):
                raise InputError(f"--input {pattern}: no such file or folder")
            raise InputError(f"--input {pattern}: the pattern matches no files")
        for meta in matched:
            path = meta.path
            kind = fmt or folder_fmt or infer_format(path)
            if kind is None:
                raise InputError(
                    f"--input {pattern}: cannot infer the format of {path} from its extension; "
                    "pass --format {jsonl,parquet,arrow,text,html,code}"
                )
            found[path] = (kind, meta.size_in_bytes)
    several = len(set(prefixes)) > 1
    prefix = _common_prefix(prefixes) if several else prefixes[0]
    outside = (lambda p: p.lstrip("/")) if several and not prefix else posixpath.basename
    rels = {path: _relative(path, prefix) or outside(path) for path in found}
    if len(set(rels.values())) < len(rels):  # e.g. a path outside its prefix fell back to its basename
        rels = {path: path for path in found}
    return [InputFile(path=p, rel=rels[p], format=found[p][0], size=found[p][1]) for p in sorted(found)]


def new_document(doc_id: str, text: str, source: str, fmt: str, offset: int) -> dict:
    """A document record with every contract column at its neutral value."""
    return {
        "status": "ok",
        "id": doc_id,
        "text": text,
        "source": source,
        "format": fmt,
        "offset": offset,
        "lang": None,
        "lang_prob": None,
        "ppl": None,
        "reason": None,
        **{pii_column(kind): 0 for kind in PII_TYPES},
    }


def dead_letter(doc_id: str, source: str, offset: int, raw: bytes | str, error: str, limit: int) -> dict:
    """A dead-letter record: the raw input (truncated here, PII-masked when written), where it was, and why."""
    if isinstance(raw, bytes):
        raw = raw[: limit * 2].decode("utf-8", errors="backslashreplace")
    raw = raw[: limit * 2]
    return {"status": "dead", "id": doc_id, "source": source, "offset": offset, "raw": raw, "error": error}


@dataclass(frozen=True)
class ReaderConfig:
    text_field: str
    id_field: str | None
    max_bytes: int
    dead_letter_max_bytes: int


def _lone_surrogate(value: str) -> str | None:
    """None when `value` encodes to UTF-8, else where it cannot (JSON's \\ud800 escapes decode to lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"lone surrogate at character {err.start}"
    return None


def _record_from_fields(fields: dict, rel: str, fmt: str, offset: int, index: int, cfg: ReaderConfig, raw) -> dict:
    """One parsed row/object -> document, or dead letter for a missing / non-string / oversized / non-UTF-8 field.

    Error messages never quote the record: a dead letter's `raw` is PII-masked when written, its `error` says
    only what and where.
    """
    derived = f"{rel}:{index}"
    given = fields.get(cfg.id_field) if cfg.id_field else None
    doc_id = str(given) if given is not None else derived
    text = fields.get(cfg.text_field)
    limit = cfg.dead_letter_max_bytes
    if (where := _lone_surrogate(doc_id)) is not None:
        return dead_letter(derived, rel, offset, raw, f"id field {cfg.id_field!r} is not valid UTF-8 ({where})", limit)
    if text is None:
        return dead_letter(doc_id, rel, offset, raw, f"missing text field {cfg.text_field!r}", limit)
    if not isinstance(text, str):
        error = f"text field {cfg.text_field!r} is {type(text).__name__}, expected a string"
        return dead_letter(doc_id, rel, offset, raw, error, limit)
    if (where := _lone_surrogate(text)) is not None:
        error = f"text field {cfg.text_field!r} is not valid UTF-8 ({where})"
        return dead_letter(doc_id, rel, offset, raw, error, limit)
    if len(text.encode("utf-8")) > cfg.max_bytes:
        error = f"text over the size guard ({cfg.max_bytes} bytes)"
        return dead_letter(doc_id, rel, offset, text[:limit], error, limit)
    return new_document(doc_id, text, rel, fmt, offset)


def _guarded_lines(f, max_bytes: int) -> Iterator[tuple[int, int, bytes, int]]:
    """(line number, byte offset, line or its head, full length); never holds more than max_bytes of a line."""
    lineno, offset = 0, 0
    while True:
        line = f.readline(max_bytes + 1)
        if not line:
            return
        lineno += 1
        length = len(line)
        if length > max_bytes and not line.endswith(b"\n"):
            # A giant line: skip its remainder in bounded chunks instead of reading it into memory.
            while chunk := f.readline(1 << 20):
                length += len(chunk)
                if chunk.endswith(b"\n"):
                    break
        yield lineno, offset, line, length
        offset += length


def _until_unreadable(items: Iterator, errors: list) -> Iterator:
    """`items` until reading them fails: the error goes into `errors`, so only the reading is guarded."""
    try:
        yield from items
    except READ_ERRORS as err:
        errors.append(err)


def _read_error(err: BaseException) -> str:
    # Only the type and the library's message for I/O-level errors, which quote no record content.
    return f"{type(err).__name__}: {str(err)[:200]}"


def read_jsonl(file: InputFile, cfg: ReaderConfig) -> Iterator[dict]:
    limit = cfg.dead_letter_max_bytes
    lineno, offset = 0, 0
    errors: list[BaseException] = []
    try:
        raw_file = FileSystems.open(file.path, compression_type=CompressionTypes.UNCOMPRESSED)
    except READ_ERRORS as err:
        yield dead_letter(f"{file.rel}:after-line-0", file.rel, 0, b"", f"unreadable file: {_read_error(err)}", limit)
        return
    f = gzip.GzipFile(fileobj=raw_file) if file.path.endswith(".gz") else raw_file
    try:
        for lineno, offset, line, length in _until_unreadable(_guarded_lines(f, cfg.max_bytes), errors):
            if not line.strip():
                continue
            derived = f"{file.rel}:{lineno}"
            if length > cfg.max_bytes:
                error = f"line of {length} bytes over the size guard"
                yield dead_letter(derived, file.rel, offset, line, error, limit)
                continue
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as err:
                yield dead_letter(derived, file.rel, offset, line, f"undecodable bytes: {err}", limit)
                continue
            except json.JSONDecodeError as err:
                yield dead_letter(derived, file.rel, offset, line, f"broken JSON: {err}", limit)
                continue
            except RecursionError:
                yield dead_letter(derived, file.rel, offset, line, "broken JSON: nested too deeply", limit)
                continue
            if not isinstance(obj, dict):
                yield dead_letter(derived, file.rel, offset, line, f"JSON {type(obj).__name__}, not an object", limit)
                continue
            yield _record_from_fields(obj, file.rel, file.format, offset, lineno, cfg, line)
    finally:
        raw_file.close()
    if errors:
        # A truncated .gz or a failing read: the lines before it are kept, the rest is one dead letter.
        where = f"{file.rel}:after-line-{lineno}"
        error = f"unreadable after line {lineno}: {_read_error(errors[0])}"
        yield dead_letter(where, file.rel, offset, b"", error, limit)


def _table_batches(file: InputFile) -> Iterator[pa.RecordBatch]:
    with FileSystems.open(file.path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        if file.format == "parquet":
            yield from pq.ParquetFile(f).iter_batches(batch_size=1000)
            return
        data = pa.py_buffer(f.read())
    try:
        reader = pa.ipc.open_stream(data)
    except pa.ArrowInvalid:
        # datasets writes IPC streams; plain pyarrow users often write the IPC file format.
        reader = pa.ipc.open_file(data)
        yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
        return
    yield from reader


def read_table(file: InputFile, cfg: ReaderConfig) -> Iterator[dict]:
    """Parquet files and Arrow shards (an HF dataset folder): one record per row."""
    row = 0
    errors: list[BaseException] = []
    for batch in _until_unreadable(_table_batches(file), errors):
        try:
            rows = batch.to_pylist()
        except READ_ERRORS as err:
            errors.append(err)
            break
        for fields in rows:
            preview = json.dumps(fields, default=str)[: cfg.dead_letter_max_bytes]
            yield _record_from_fields(fields, file.rel, file.format, row, row, cfg, preview)
            row += 1
    if errors:
        error = f"unreadable table after row {row}: {_read_error(errors[0])}"
        yield dead_letter(f"{file.rel}:after-row-{row}", file.rel, row, b"", error, cfg.dead_letter_max_bytes)


def read_whole_file(file: InputFile, cfg: ReaderConfig) -> Iterator[dict]:
    """Text, HTML and code: one document per file, id = relative path; the size guard reads no more than a head."""
    limit = cfg.dead_letter_max_bytes
    try:
        with FileSystems.open(file.path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            if file.size > cfg.max_bytes:
                head = f.read(limit)
                yield dead_letter(file.rel, file.rel, 0, head, f"file of {file.size} bytes over the size guard", limit)
                return
            data = f.read(cfg.max_bytes + 1)
    except READ_ERRORS as err:
        yield dead_letter(file.rel, file.rel, 0, b"", f"unreadable file: {_read_error(err)}", limit)
        return
    if len(data) > cfg.max_bytes:  # the file grew after it was listed
        yield dead_letter(file.rel, file.rel, 0, data[:limit], "file over the size guard", limit)
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        yield dead_letter(file.rel, file.rel, 0, data, f"undecodable bytes: {err}", limit)
        return
    yield new_document(file.rel, text, file.rel, file.format, 0)


class ReadFileDoFn(beam.DoFn):
    """InputFile -> its records (documents or dead letters)."""

    def __init__(self, cfg: ReaderConfig):
        self.cfg = cfg
        self.counters = {status: Metrics.counter("read", status) for status in ("ok", "dead")}

    def process(self, file: InputFile):
        if file.format == "jsonl":
            records = read_jsonl(file, self.cfg)
        elif file.format in ("parquet", "arrow"):
            records = read_table(file, self.cfg)
        else:
            records = read_whole_file(file, self.cfg)
        for record in records:
            self.counters[record["status"]].inc()
            yield record


class ReadInputs(beam.PTransform):
    """The resolved input files -> records. Files are listed by the launcher, so user errors come before work."""

    def __init__(self, files: list[InputFile], cfg: ReaderConfig):
        super().__init__()
        self.files = files
        self.cfg = cfg

    def expand(self, pbegin):
        return (
            pbegin
            | "ListFiles" >> beam.Create(self.files)
            # Spread files over workers before the (possibly slow) parsing starts.
            | "Reshuffle" >> beam.Reshuffle()
            | "ReadFiles" >> beam.ParDo(ReadFileDoFn(self.cfg))
        )
