"""Readers: input patterns -> files (in the launcher) -> document records or dead letters (in a DoFn).

Every record that leaves a reader is a plain dict (picklable, cheap to shuffle) with a `status`:
"ok" for a document, "dead" for a dead letter that carries the raw bytes and the error. Nothing
is dropped: a record that cannot be read becomes a dead letter, so the run's accounting holds.
All file access goes through Beam's FileSystems, so gs:// and s3:// inputs read the same way.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import posixpath
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
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
    """A dead-letter record: the raw input (truncated here, PII-masked when written), where it was, and why.

    `raw` may be a callable that builds it: table readers pass one, so a row's preview is built only for
    the rare row that dead-letters.
    """
    if callable(raw):
        raw = raw()
    if isinstance(raw, bytes):
        raw = raw[: limit * 2].decode("utf-8", errors="backslashreplace")
    raw = raw[: limit * 2]
    return {"status": "dead", "id": doc_id, "source": source, "offset": offset, "raw": raw, "error": error}


# Uncompressed JSONL is read as byte ranges of at most this size, in parallel (Beam's textio splits at about
# the same granularity); gzip, Parquet, Arrow and one-document files are read whole.
SPLIT_BYTES = 64 << 20
# A file over MIN_SPLIT_BYTES is cut into at least RANGES_PER_FILE ranges (of MIN_SPLIT_BYTES or more), so that
# a single file fans out over the workers at reading, and the records need no reshuffle after it.
MIN_SPLIT_BYTES = 1 << 20
RANGES_PER_FILE = 32
# Rows per Arrow/Parquet batch decoded into Python at once: a bound on a reader's memory, not a tuning knob.
TABLE_BATCH_ROWS = 256


@dataclass(frozen=True)
class ReaderConfig:
    text_field: str
    id_field: str | None
    max_bytes: int
    dead_letter_max_bytes: int
    split_bytes: int = SPLIT_BYTES
    """Uncompressed JSONL files larger than this are read as byte ranges of this size by several workers."""


@dataclass(frozen=True)
class ReadRange:
    """The part of a file one worker reads: bytes [start, end) of a JSONL file, or a whole file (0, size).

    A line belongs to the range its first byte falls in, as in Beam's textio. `first_line` is the number of
    lines that start before `start` (from a counting pass), so derived ids `rel:lineno` do not depend on
    how the file was split.
    """

    file: InputFile
    start: int
    end: int
    first_line: int = 0


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
    try:
        size = len(text.encode("utf-8"))  # one encode checks both UTF-8 validity and the size guard
    except UnicodeEncodeError as err:
        error = f"text field {cfg.text_field!r} is not valid UTF-8 (lone surrogate at character {err.start})"
        return dead_letter(doc_id, rel, offset, raw, error, limit)
    if size > cfg.max_bytes:
        error = f"text over the size guard ({cfg.max_bytes} bytes)"
        return dead_letter(doc_id, rel, offset, text[:limit], error, limit)
    return new_document(doc_id, text, rel, fmt, offset)


def _guarded_lines(f, max_bytes: int, lineno: int = 0, offset: int = 0, end: int | None = None):
    """(line number, byte offset, line or its head, full length) of the lines that start before `end`.

    Never holds more than max_bytes of a line. `lineno` and `offset` are those of the line before the first.
    """
    while end is None or offset < end:
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


def _skip_line_end(f) -> int:
    """Read to just past the next newline (or the end) in bounded chunks; returns the bytes skipped."""
    skipped = 0
    while chunk := f.readline(1 << 20):
        skipped += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return skipped


def _until_unreadable(items: Iterator, errors: list) -> Iterator:
    """`items` until reading them fails: the error goes into `errors`, so only the reading is guarded."""
    try:
        yield from items
    except READ_ERRORS as err:
        errors.append(err)


def _read_error(err: BaseException) -> str:
    # Only the type and the library's message for I/O-level errors, which quote no record content.
    return f"{type(err).__name__}: {str(err)[:200]}"


def is_splittable(file: InputFile) -> bool:
    return file.format == "jsonl" and not file.path.lower().endswith(".gz")


def split_ranges(file: InputFile, split_bytes: int) -> list[ReadRange]:
    """The ranges a file is read in: byte ranges of uncompressed JSONL, else the whole file.

    A range is at most `split_bytes`, and smaller where that gives a file over MIN_SPLIT_BYTES fewer than
    RANGES_PER_FILE ranges (never under MIN_SPLIT_BYTES).
    """
    step = min(split_bytes, max(MIN_SPLIT_BYTES, -(-file.size // RANGES_PER_FILE)))
    if not is_splittable(file) or file.size <= step:
        return [ReadRange(file, 0, file.size)]
    return [ReadRange(file, s, min(s + step, file.size)) for s in range(0, file.size, step)]


def ranges_fan_out(ranges: list[ReadRange]) -> bool:
    """Whether reading these ranges already spreads the records over the workers: at least RANGES_PER_FILE
    ranges, none over 2 / RANGES_PER_FILE of the input. Else (a few files, a big .gz or Parquet file) the
    records are reshuffled after reading."""
    total = sum(r.end - r.start for r in ranges)
    return len(ranges) >= RANGES_PER_FILE and max(r.end - r.start for r in ranges) * RANGES_PER_FILE <= 2 * total


def lines_starting_in(rng: ReadRange) -> int:
    """How many lines start in bytes [start, end): 1 for byte 0, plus the newlines in [start - 1, end - 1).

    Only the ranges that have a successor need it (for its `first_line`). Counting newlines in bytes runs
    at disk speed, so the extra pass costs little next to parsing.
    """
    if rng.end >= rng.file.size:
        return 0
    begin = max(rng.start - 1, 0)
    count = 1 if rng.start == 0 else 0
    try:
        with FileSystems.open(rng.file.path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.seek(begin)
            remaining = rng.end - 1 - begin
            while remaining > 0 and (chunk := f.read(min(remaining, 1 << 22))):
                count += chunk.count(b"\n")
                remaining -= len(chunk)
    except READ_ERRORS:
        # The reading pass meets the same error and dead-letters it; ids after it may then shift.
        return count
    return count


def number_ranges(item) -> Iterator[ReadRange]:
    """(path, [(range, lines starting in it)]) -> each range with the number of lines before it."""
    _, counted = item
    before = 0
    for rng, count in sorted(counted, key=lambda rc: rc[0].start):
        yield dataclasses.replace(rng, first_line=before)
        before += count


def _range_lines(raw_file, f, rng: ReadRange, max_bytes: int):
    """The guarded lines of one range: past the line that straddles `start`, up to the last line starting before
    `end` (the whole stream for a gzip file or the last range)."""
    offset = rng.start
    if rng.start > 0:
        raw_file.seek(rng.start - 1)
        offset = rng.start - 1 + _skip_line_end(raw_file)
    end = rng.end if rng.end < rng.file.size else None
    yield from _guarded_lines(f, max_bytes, rng.first_line, offset, end)


def read_jsonl(rng: ReadRange | InputFile, cfg: ReaderConfig) -> Iterator[dict]:
    """One JSON object per line -> documents or dead letters, for one range of a file (or the whole file)."""
    if isinstance(rng, InputFile):
        rng = ReadRange(rng, 0, rng.size)
    file = rng.file
    limit = cfg.dead_letter_max_bytes
    lineno, offset = rng.first_line, rng.start
    errors: list[BaseException] = []
    try:
        raw_file = FileSystems.open(file.path, compression_type=CompressionTypes.UNCOMPRESSED)
    except READ_ERRORS as err:
        where = f"{file.rel}:after-line-{lineno}"
        yield dead_letter(where, file.rel, offset, b"", f"unreadable file: {_read_error(err)}", limit)
        return
    f = gzip.GzipFile(fileobj=raw_file) if file.path.endswith(".gz") else raw_file
    try:
        for lineno, offset, line, length in _until_unreadable(_range_lines(raw_file, f, rng, cfg.max_bytes), errors):
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


def _slices(batch: pa.RecordBatch) -> Iterator[pa.RecordBatch]:
    # Zero-copy views: only TABLE_BATCH_ROWS rows are ever decoded into Python objects at once.
    for start in range(0, batch.num_rows, TABLE_BATCH_ROWS):
        yield batch.slice(start, TABLE_BATCH_ROWS)


def _table_batches(file: InputFile) -> Iterator[pa.RecordBatch]:
    """Record batches of at most TABLE_BATCH_ROWS rows, streamed from the file (never the whole file in memory)."""
    with FileSystems.open(file.path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        if file.format == "parquet":
            yield from pq.ParquetFile(f).iter_batches(batch_size=TABLE_BATCH_ROWS)
            return
        # datasets writes IPC streams; plain pyarrow users often write the IPC file format (magic "ARROW1").
        magic = f.read(6)
        f.seek(0)
        if magic == b"ARROW1":
            reader = pa.ipc.open_file(f)
            for i in range(reader.num_record_batches):
                yield from _slices(reader.get_batch(i))
            return
        for batch in pa.ipc.open_stream(f):
            yield from _slices(batch)


TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)


def _oversized_rows(batch: pa.RecordBatch, cfg: ReaderConfig) -> dict[int, int]:
    """Row -> byte length of its text, for rows over the size guard, read from the column's offsets (no decoding)."""
    index = batch.schema.get_field_index(cfg.text_field)
    if index < 0 or not any(is_type(batch.schema.field(index).type) for is_type in TEXT_TYPES):
        return {}
    lengths = pc.binary_length(batch.column(index))
    over = pc.greater(lengths, cfg.max_bytes)
    if not pc.any(over).as_py():
        return {}
    rows = pc.indices_nonzero(pc.fill_null(over, False)).to_pylist()
    return {row: lengths[row].as_py() for row in rows}


def _oversized_letter(batch: pa.RecordBatch, row: int, size: int, file: InputFile, index: int, cfg: ReaderConfig):
    """A dead letter for a row whose text is over the guard: only its id and a bounded head are decoded."""
    limit = cfg.dead_letter_max_bytes
    doc_id = f"{file.rel}:{index}"
    if cfg.id_field and batch.schema.get_field_index(cfg.id_field) >= 0:
        given = batch.column(batch.schema.get_field_index(cfg.id_field))[row].as_py()
        if given is not None and _lone_surrogate(str(given)) is None:
            doc_id = str(given)
    text = batch.column(batch.schema.get_field_index(cfg.text_field))[row]
    head = text.as_buffer()[: limit * 2].to_pybytes()
    error = f"text of {size} bytes over the size guard ({cfg.max_bytes} bytes)"
    return dead_letter(doc_id, file.rel, index, head, error, limit)


def read_table(file: InputFile, cfg: ReaderConfig) -> Iterator[dict]:
    """Parquet files and Arrow shards (an HF dataset folder): one record per row, in bounded batches."""
    row = 0
    errors: list[BaseException] = []
    for batch in _until_unreadable(_table_batches(file), errors):
        oversized = _oversized_rows(batch, cfg)
        try:
            small = batch.filter(pa.array([i not in oversized for i in range(batch.num_rows)])) if oversized else batch
            rows = iter(small.to_pylist())
        except READ_ERRORS as err:
            errors.append(err)
            break
        for i in range(batch.num_rows):
            if i in oversized:
                yield _oversized_letter(batch, i, oversized[i], file, row, cfg)
            else:
                fields = next(rows)
                preview = lambda fields=fields: json.dumps(fields, default=str)[: cfg.dead_letter_max_bytes]  # noqa: E731
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


class ReadRangeDoFn(beam.DoFn):
    """ReadRange -> its records (documents or dead letters)."""

    def __init__(self, cfg: ReaderConfig):
        self.cfg = cfg
        self.counters = {status: Metrics.counter("read", status) for status in ("ok", "dead")}

    def process(self, rng: ReadRange):
        file = rng.file
        if file.format == "jsonl":
            records = read_jsonl(rng, self.cfg)
        elif file.format in ("parquet", "arrow"):
            records = read_table(file, self.cfg)
        else:
            records = read_whole_file(file, self.cfg)
        for record in records:
            self.counters[record["status"]].inc()
            yield record


class ReadInputs(beam.PTransform):
    """The resolved input files -> records, spread over all workers.

    Files are listed and cut into ranges by the launcher, so user errors come before work. Large uncompressed
    JSONL is cut into byte ranges read in parallel; a counting pass gives each range the number of lines
    before it, so ids are the same however the file was cut. Every step after the read stays fused with it,
    so where the ranges are too few or too uneven to spread the work (see ranges_fan_out) the records are
    reshuffled after reading; elsewhere that shuffle of every record (encoded, held by the runner, decoded)
    is skipped, and the ranges are what fans out.
    """

    def __init__(self, files: list[InputFile], cfg: ReaderConfig, shuffle=None):
        super().__init__()
        self.files = files
        self.cfg = cfg
        self.shuffle = shuffle

    def expand(self, pbegin):
        ranges = [rng for file in self.files for rng in split_ranges(file, self.cfg.split_bytes)]
        records = (
            pbegin
            | "ListRanges" >> beam.Create(ranges)
            | "SpreadRanges" >> beam.Reshuffle()
            | "CountLines" >> beam.Map(lambda rng: (rng.file.path, (rng, lines_starting_in(rng))))
            | "ByFile" >> beam.GroupByKey()
            | "Number" >> beam.FlatMap(number_ranges)
            | "SpreadNumbered" >> beam.Reshuffle()
            | "ReadRanges" >> beam.ParDo(ReadRangeDoFn(self.cfg))
        )
        if ranges and ranges_fan_out(ranges):
            return records
        from cpt.pipelines.shuffle import FileReshuffle

        return records | "SpreadRecords" >> FileReshuffle(self.shuffle, "read")
