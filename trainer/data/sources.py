"""One source's documents: the manifest index, the per-epoch shuffled order, and lazy row-block reads.

Nothing here opens a shard until a document in it is needed, and at most a few row blocks are held
at a time, so memory does not grow with the number of shards (streaming#652). Row counts come from
the manifest, not from opening every shard.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cpt.shared.dataset import DatasetError, filesystem, read_manifest, shard_urls, tokenizer_fingerprint
from cpt.trainer.conventions import with_bos

#: Rows per (shard, row-block) unit; `write_shard` writes record batches of this size.
BLOCK_ROWS = 1000
#: Row permutations kept per source (at most 8 KB each): enough for a shuffle window spanning many units.
ROW_ORDERS_CACHED = 64


@dataclass
class Block:
    """The documents of one unit, tokenized: doc i is tokens[offsets[i]:offsets[i + 1]]."""

    ids: list[str]
    offsets: np.ndarray
    tokens: np.ndarray

    def doc(self, row: int) -> tuple[str, np.ndarray]:
        return self.ids[row], self.tokens[self.offsets[row] : self.offsets[row + 1]]


class SourceIndex:
    """A prepared dataset as the manifest describes it: shard URLs, (shard, row range) units, tokenized or not."""

    def __init__(self, name: str, path: str):
        self.name, self.path = name, path
        self.manifest = read_manifest(path)
        shards = self.manifest.get("shards") or []
        self.urls = shard_urls(path, self.manifest)
        self.tokenized = any(s.get("tokens") is not None for s in shards)
        unit_shard, unit_start, unit_rows = [], [], []
        for index, shard in enumerate(shards):
            for start in range(0, int(shard["rows"]), BLOCK_ROWS):
                unit_shard.append(index)
                unit_start.append(start)
                unit_rows.append(min(BLOCK_ROWS, int(shard["rows"]) - start))
        if not unit_rows:
            raise DatasetError(f"{path}: the manifest lists no documents; source {name!r} cannot be streamed")
        self.unit_shard = np.asarray(unit_shard, dtype=np.int64)
        self.unit_start = np.asarray(unit_start, dtype=np.int64)
        self.unit_rows = np.asarray(unit_rows, dtype=np.int64)
        self.num_docs = int(self.unit_rows.sum())
        # Stable across processes and Python runs (unlike hash(str)), so every worker shuffles alike.
        self.key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def read_rows(url: str, start: int, stop: int, columns: list[str]) -> pa.Table:
    """Rows [start, stop) of an Arrow IPC stream shard: memory-mapped when local, streamed through fsspec if not.

    A stream file has no footer, so we walk its record batches (zero-copy under a memory map) and stop
    at `stop`. Any failure names the file.
    """
    fs, path = filesystem(url)
    pieces, seen = [], 0
    try:
        source = pa.memory_map(path, "r") if is_local(url) else fs.open(path, "rb")
        try:
            reader = pa.ipc.open_stream(source)
            missing = [c for c in columns if c not in reader.schema.names]
            if missing:
                raise DatasetError(f"{url}: no column(s) {missing}; columns are {reader.schema.names}")
            for batch in reader:
                n = batch.num_rows
                if seen + n > start:
                    lo, hi = max(start - seen, 0), min(stop - seen, n)
                    pieces.append(batch.slice(lo, hi - lo).select(columns))
                seen += n
                if seen >= stop:
                    break
            # Buffers keep the mapped region alive after close (Arrow refcounts it), so slices stay valid.
            schema = pa.schema([reader.schema.field(c) for c in columns])
            table = pa.Table.from_batches(pieces, schema=schema).combine_chunks()
        finally:
            source.close()
    except FileNotFoundError as err:
        raise DatasetError(f"{url}: shard listed in the manifest is missing; re-run `cpt prepare`") from err
    except (pa.ArrowInvalid, OSError) as err:
        raise DatasetError(f"{url}: corrupt or truncated Arrow shard ({err}); re-run `cpt prepare`") from err
    if seen < stop:
        raise DatasetError(
            f"{url}: has {seen} rows but the manifest says at least {stop}; the shard is truncated or was "
            "replaced after the manifest was written; re-run `cpt prepare`"
        )
    return table


def tokenized_block(table: pa.Table) -> Block:
    """A Block from a token shard's `id` and `input_ids` columns (one copy, to int64 for torch)."""
    column = table.column("input_ids")
    ids_array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    lengths = pc.list_value_length(ids_array).to_numpy(zero_copy_only=False).astype(np.int64)
    tokens = pc.list_flatten(ids_array).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return Block(table.column("id").to_pylist(), offsets, tokens)


def text_block(table: pa.Table, tokenizer) -> Block:
    """A Block from a text-only shard, tokenized here (in the loader worker) with the run's tokenizer."""
    texts = [text or "" for text in table.column("text").to_pylist()]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
    tokens = np.fromiter((t for ids in encoded for t in ids), dtype=np.int64, count=int(lengths.sum()))
    return Block(table.column("id").to_pylist(), np.concatenate([[0], np.cumsum(lengths)]), tokens)


class SourceDocs:
    """A source's documents in epoch order: epoch e is a shuffle of its units keyed by (seed, source, epoch).

    The rows inside each unit are shuffled too, keyed by (seed, source, epoch, unit): shards are sorted by
    id, so reading a block in row order would feed a code corpus file after file in name order. With
    `shuffle_buffer` B > 1, each run of B consecutive documents of that order is permuted as well. Every
    permutation is a function of those keys, so a cursor (epoch, position) is the whole state: nothing
    from a buffer needs saving to resume.
    """

    def __init__(self, index: SourceIndex, tokenizer, seed: int, shuffle_buffer: int = 0, bos: int | None = None):
        self.index, self.tokenizer, self.seed, self.bos = index, tokenizer, seed, bos
        self.window = max(int(shuffle_buffer), 1)
        self._epoch = None
        self._window_key = None
        self._blocks: OrderedDict[int, Block] = OrderedDict()
        self._row_orders: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        # Enough cached rows for one shuffle window plus a block at its edge.
        self._max_rows = self.window + BLOCK_ROWS

    @property
    def num_docs(self) -> int:
        return self.index.num_docs

    def _rng(self, *parts: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.index.key, *parts])

    def _set_epoch(self, epoch: int) -> None:
        if self._epoch != epoch:
            order = self._rng(epoch).permutation(len(self.index.unit_rows))
            self._order = order
            self._ends = np.cumsum(self.index.unit_rows[order])
            self._epoch = epoch

    def locate(self, epoch: int, position: int) -> tuple[int, int]:
        """(unit, row within unit) of the document at `position` of `epoch`."""
        self._set_epoch(epoch)
        if self.window > 1:
            base = position - position % self.window
            if self._window_key != (epoch, base):
                size = min(self.window, self.num_docs - base)
                self._window_perm = self._rng(epoch, base // self.window, 1).permutation(size)
                self._window_key = (epoch, base)
            position = base + int(self._window_perm[position - base])
        k = int(np.searchsorted(self._ends, position, side="right"))
        before = int(self._ends[k - 1]) if k else 0
        unit = int(self._order[k])
        return unit, int(self._row_order(epoch, unit)[position - before])

    def _row_order(self, epoch: int, unit: int) -> np.ndarray:
        """The shuffled order of the rows of `unit` in `epoch` (a few recent ones cached: a window spans units)."""
        key = (epoch, unit)
        order = self._row_orders.get(key)
        if order is None:
            order = self._rng(epoch, unit, 2).permutation(int(self.index.unit_rows[unit]))
            self._row_orders[key] = order
            if len(self._row_orders) > ROW_ORDERS_CACHED:
                self._row_orders.popitem(last=False)
        else:
            self._row_orders.move_to_end(key)
        return order

    def doc(self, epoch: int, position: int) -> tuple[str, np.ndarray]:
        """(doc id, token ids without EOS, with BOS in front when `bos` is set) of the document at `position`."""
        unit, row = self.locate(epoch, position)
        return self._block(unit).doc(row)

    def _block(self, unit: int) -> Block:
        block = self._blocks.get(unit)
        if block is not None:
            self._blocks.move_to_end(unit)
            return block
        index = self.index
        shard, start = int(index.unit_shard[unit]), int(index.unit_start[unit])
        stop = start + int(index.unit_rows[unit])
        url = index.urls[shard]
        if index.tokenized:
            block = tokenized_block(read_rows(url, start, stop, ["id", "input_ids"]))
        else:
            block = text_block(read_rows(url, start, stop, ["id", "text"]), self.tokenizer)
        if len(block.ids) != stop - start:
            raise DatasetError(f"{url}: rows {start}..{stop} could not be read; re-run `cpt prepare`")
        if self.bos is not None:
            block = Block(block.ids, *with_bos(block.offsets, block.tokens, self.bos))
        self._blocks[unit] = block
        while len(self._blocks) > 1 and sum(len(b.ids) for b in self._blocks.values()) > self._max_rows:
            self._blocks.popitem(last=False)
        return block


def tokenizer_problem(index: SourceIndex, fingerprint: str, tokenizer_dir: str) -> str | None:
    """A message when a source's token shards were made with another tokenizer than the run's."""
    if not index.tokenized:
        return None
    if (index.manifest.get("tokenizer") or {}).get("add_special_tokens"):
        # The trainer puts BOS/EOS around every document itself; shards that hold them would get two of each.
        return (
            f"source {index.name!r} ({index.path}): its token shards hold the tokenizer's special tokens "
            "(manifest tokenizer.add_special_tokens: true), but the trainer adds BOS and EOS itself; re-run "
            f"`cpt prepare --tokenizer {tokenizer_dir}`, which stores bare tokens"
        )
    made_with = (index.manifest.get("tokenizer") or {}).get("sha256")
    if made_with == fingerprint:
        return None
    return (
        f"source {index.name!r} ({index.path}): its token shards were made with tokenizer sha256 {made_with}, "
        f"but this run's tokenizer {tokenizer_dir} has sha256 {fingerprint}; re-run `cpt prepare --tokenizer "
        f"{tokenizer_dir}` for this dataset, or prepare it without --tokenizer so text is tokenized on the fly"
    )


def check_sources(cfg, tokenizer_dir: str) -> list[str]:
    """Every problem with the configured datasets at once: missing/incomplete ones and tokenizer mismatches."""
    found = []
    fingerprint = None
    try:
        fingerprint = tokenizer_fingerprint(str(tokenizer_dir))
    except DatasetError as err:
        found.append(str(err))
    for source in cfg.sources:
        try:
            index = SourceIndex(source.name, source.path)
        except DatasetError as err:
            found.append(f"source {source.name!r}: {err}")
            continue
        for url, shard in zip(index.urls, index.manifest["shards"]):
            fs, path = filesystem(url)
            if not fs.exists(path):
                found.append(f"source {source.name!r}: shard {url} listed in the manifest is missing")
            elif shard.get("bytes") is not None and fs.size(path) != shard["bytes"]:
                found.append(
                    f"source {source.name!r}: shard {url} has {fs.size(path)} bytes, the manifest says "
                    f"{shard['bytes']} (truncated or replaced); re-run `cpt prepare`"
                )
        if fingerprint is not None:
            problem = tokenizer_problem(index, fingerprint, str(tokenizer_dir))
            if problem:
                found.append(problem)
    return found


def local_tokenizer_dir(tokenizer) -> str | None:
    """The folder a HF tokenizer was loaded from, when it is a local folder (to fingerprint it)."""
    path = getattr(tokenizer, "name_or_path", None)
    return path if path and os.path.isdir(path) else None
