"""GroupByKey through files: the shuffles of `cpt prepare` with memory that does not grow with the corpus.

DirectRunner (FnApiRunner) keeps every GroupByKey in the launcher's memory and sends each worker its whole
part of a stage's input at once, so a 0.5 GB corpus took 3.7 GB in the launcher and 2.6 GB in a worker.
`FileGroupByKey` keeps the GroupByKey contract (every value of a key together, in no particular order)
with the data on disk, the way datatrove's stages hand over files:

    (key, value) -> Spill: each worker encodes its elements, buffers up to `flush_bytes`, and writes one
                   Arrow IPC file per flush, one record batch per partition (crc32 of the key, or
                   `partition_of(key)`); only (partition, (file, batch)) goes on
                 -> GroupByKey of those references (a few bytes per flush: what the runner holds)
                 -> ReadPartition: a worker reads one partition's batches, sorts them by key, and yields
                   (key, [values]) group by group.

A worker holds at most one flush buffer and one partition; the launcher chooses enough partitions for the
input's size (`ShuffleSpec.for_input`). Files go under the run's output (`_shuffle/`, removed by the
launcher), so the same code works on gs:// or s3:// for a runner whose workers share no disk.

Elements are encoded with Beam's FastPrimitivesCoder (the coder Beam itself uses for these records); the
files are written and read by this run only. A retried bundle writes new files under new names, and only
references a committed bundle emitted are read, so a retry never doubles a record. DaskRunner drops what
a DoFn emits in finish_bundle (runners/dask/transform_evaluator.py takes the outputs before calling it),
and it has a shuffle of its own, so there `ShuffleSpec.temp_dir` is None and this is Beam's GroupByKey.
"""

from __future__ import annotations

import math
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from cpt.shared.dataset import filesystem, join

SHUFFLE_DIR = "_shuffle"
# A partition is read whole by one worker: about this much encoded data each, for the largest shuffle
# (one of every record). Smaller shuffles (keys, signatures) then have far smaller partitions.
PARTITION_BYTES = 64 << 20
_SCHEMA = pa.schema([("key", pa.binary()), ("value", pa.binary())])
_WRITE_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")  # text compresses ~3x here, at >1 GB/s


@dataclass(frozen=True)
class ShuffleSpec:
    """How the pipeline's GroupByKeys run: through files under `temp_dir`, or Beam's own when it is None."""

    temp_dir: str | None = None
    partitions: int = 8
    flush_bytes: int = 32 << 20

    @classmethod
    def for_input(cls, temp_dir: str | None, input_bytes: int, workers: int) -> ShuffleSpec:
        """Enough partitions that one holds about PARTITION_BYTES of the input, and at least 2 per worker."""
        return cls(temp_dir, max(2 * workers, math.ceil(input_bytes / PARTITION_BYTES), 1))


def _counter(folder: str, what: str):
    """`shuffle.<name>.<what>`: elements spilled or read per shuffle (their totals must agree)."""
    return Metrics.counter("shuffle", f"{folder.rstrip('/').rsplit('/', 1)[-1]}.{what}")


def _coder():
    from apache_beam.coders import FastPrimitivesCoder

    return FastPrimitivesCoder()


class SpillDoFn(beam.DoFn):
    """(key, value) -> buffered, written to one IPC file per flush; yields (partition, (file, batch index))."""

    def __init__(self, folder: str, partitions: int, flush_bytes: int, partition_of: Callable | None):
        self.folder, self.partitions, self.flush_bytes = folder, partitions, flush_bytes
        self.partition_of = partition_of
        self._spilled = Metrics.counter("shuffle", "spilled_bytes")
        self._elements = _counter(folder, "spilled")

    def setup(self):
        self._encode = _coder().encode
        self._fs, path = filesystem(self.folder)
        self._fs.makedirs(path, exist_ok=True)
        self._path = path

    def start_bundle(self):
        self._keys: dict[int, list[bytes]] = {}
        self._values: dict[int, list[bytes]] = {}
        self._size = 0

    def process(self, item):
        key, value = item
        kb, vb = self._encode(key), self._encode(value)
        part = self.partition_of(key) if self.partition_of else zlib.crc32(kb) % self.partitions
        self._keys.setdefault(part, []).append(kb)
        self._values.setdefault(part, []).append(vb)
        self._size += len(kb) + len(vb)
        self._elements.inc()
        if self._size >= self.flush_bytes:
            yield from self._flush()

    def finish_bundle(self):
        for ref in self._flush():
            yield GlobalWindows.windowed_value(ref)

    def _flush(self):
        if not self._keys:
            return []
        name = f"{uuid.uuid4().hex}.arrow"
        refs = []
        path = f"{self._path}/{name}"
        with self._fs.open(path, "wb") as f, pa.ipc.new_file(f, _SCHEMA, options=_WRITE_OPTIONS) as w:
            for index, part in enumerate(sorted(self._keys)):
                keys, values = self._keys[part], self._values[part]
                w.write_batch(pa.record_batch([pa.array(keys, pa.binary()), pa.array(values, pa.binary())], _SCHEMA))
                refs.append((part, (name, index)))
        self._spilled.inc(self._size)
        self.start_bundle()
        return refs


class ReadPartitionDoFn(beam.DoFn):
    """(partition, [(file, batch index)]) -> (key, [values]) for every key of that partition."""

    def __init__(self, folder: str):
        self.folder = folder
        self._elements = _counter(folder, "read")

    def setup(self):
        self._decode = _coder().decode
        self._fs, self._path = filesystem(self.folder)

    def _table(self, refs) -> pa.Table:
        by_file: dict[str, list[int]] = {}
        for name, index in refs:
            by_file.setdefault(name, []).append(index)
        batches = []
        for name in sorted(by_file):
            with self._fs.open(f"{self._path}/{name}", "rb") as f:
                reader = pa.ipc.open_file(f)
                batches += [reader.get_batch(i) for i in sorted(by_file[name])]
        return pa.Table.from_batches(batches, _SCHEMA)

    def process(self, item):
        _, refs = item
        table = self._table(refs)
        if pc.count_distinct(table.column("key")).as_py() > 1:
            # One key per partition (the writer's shards) needs no sort, nor the copy that `take` makes.
            table = table.take(pc.sort_indices(table, [("key", "ascending")]))
        keys = table.column("key").to_pylist()
        values = table.column("value")
        start = 0
        for end in range(1, len(keys) + 1):
            if end == len(keys) or keys[end] != keys[start]:
                group = self._decoded(values.slice(start, end - start))
                self._elements.inc(len(group))
                yield self._decode(keys[start]), group
                start = end

    def _decoded(self, values) -> list:
        # Chunk by chunk (a chunk is one spilled batch): at most one chunk's bytes exist beside the decoded values.
        return [self._decode(v) for chunk in values.chunks for v in chunk.to_pylist()]


class FileGroupByKey(beam.PTransform):
    """GroupByKey through files under `spec.temp_dir/name` (Beam's GroupByKey when spec has no temp_dir).

    `partitions` and `partition_of` override the spec's crc32 partitioning (the writer: one per shard).
    """

    def __init__(
        self, spec: ShuffleSpec | None, name: str, partitions: int | None = None, partition_of: Callable | None = None
    ):
        super().__init__()
        self.spec, self.name = spec, name
        self.partitions, self.partition_of = partitions, partition_of

    def expand(self, pcolls):
        # A tuple of PCollections is grouped together (Flatten + GroupByKey). Through files, each is spilled
        # where it is made and only the references are flattened: FnApiRunner materialises a Flatten in the
        # runner (every record held there) and, fed by several stages, it lost records here (0.5 GB, 2 workers).
        inputs = channels(pcolls)
        spec = self.spec
        if spec is None or spec.temp_dir is None:
            flat = tuple(inputs) | "Flatten" >> beam.Flatten() if len(inputs) > 1 else inputs[0]
            return flat | "GroupByKey" >> beam.GroupByKey()
        folder = join(spec.temp_dir, self.name)
        partitions = self.partitions or spec.partitions
        refs = [
            pc | f"Spill{i}" >> beam.ParDo(SpillDoFn(folder, partitions, spec.flush_bytes, self.partition_of))
            for i, pc in enumerate(inputs)
        ]
        refs = tuple(refs) | "References" >> beam.Flatten() if len(refs) > 1 else refs[0]
        return refs | "ByPartition" >> beam.GroupByKey() | "ReadPartition" >> beam.ParDo(ReadPartitionDoFn(folder))


def channels(docs) -> list:
    """The PCollections of a record stream: one, or a tuple of several (the perplexity step's three outcomes).

    Records stay in separate PCollections up to the next shuffle, which takes them all, instead of being
    flattened into one: FnApiRunner holds a Flatten's records in the runner (see FileGroupByKey.expand).
    """
    return list(docs) if isinstance(docs, (tuple, list)) else [docs]


def each(docs, label: str, make: Callable):
    """`make()` applied to every channel of `docs`; the same shape comes back (one PCollection or a tuple)."""
    parts = channels(docs)
    if len(parts) == 1:
        return parts[0] | label >> make()
    return tuple(part | f"{label}/{i}" >> make() for i, part in enumerate(parts))


def _spread_key(record: dict) -> tuple:
    return (record.get("source") or "", record.get("offset") or 0), record


class FileReshuffle(beam.PTransform):
    """Records -> the same records, spread over the workers by (source, offset) through files (Reshuffle's role)."""

    def __init__(self, spec: ShuffleSpec | None, name: str):
        super().__init__()
        self.spec, self.name = spec, name

    def expand(self, records):
        if self.spec is None or self.spec.temp_dir is None:
            return records | "Reshuffle" >> beam.Reshuffle()
        return (
            records
            | "Key" >> beam.Map(_spread_key)
            | "Group" >> FileGroupByKey(self.spec, self.name)
            | "Values" >> beam.FlatMap(lambda kv: kv[1])
        )
