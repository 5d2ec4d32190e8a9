"""Readers at scale: JSONL read as byte ranges gives the same records as one pass, table inputs stream in
bounded batches and dead-letter an oversized text from its byte length."""

from __future__ import annotations

import json

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from cpt.pipelines import io
from cpt.pipelines.io import ReaderConfig, ReadInputs, expand_inputs
from tests.pipelines.prepare_corpus import topic_texts


def reader(max_bytes: int = 20_000, split_bytes: int = io.SPLIT_BYTES) -> ReaderConfig:
    return ReaderConfig("text", "id", max_bytes=max_bytes, dead_letter_max_bytes=64, split_bytes=split_bytes)


def mixed_jsonl(path) -> bytes:
    """Good lines of many lengths, blank lines, broken JSON, a line over the guard and no trailing newline."""
    topics = topic_texts(12)
    lines = []
    for i, (name, text) in enumerate(topics):
        record = {"text": text[: 40 + 97 * i]} if i % 3 == 0 else {"id": f"topic/{name}", "text": text}
        lines.append(json.dumps(record))
        if i == 4:
            lines += ["", '{"id": "broken", "text": ', json.dumps({"id": "giant", "text": "w " * 15_000})]
    data = ("\n".join(lines)).encode()
    path.write_bytes(data)
    return data


def read_all(path, cfg: ReaderConfig) -> list[dict]:
    """Every range of the file, numbered as the pipeline numbers them, read one after the other."""
    [file] = expand_inputs([str(path)])
    ranges = io.split_ranges(file, cfg.split_bytes)
    counted = [(rng, io.lines_starting_in(rng)) for rng in ranges]
    return [record for rng in io.number_ranges((file.path, counted)) for record in io.read_jsonl(rng, cfg)]


def test_jsonl_read_in_byte_ranges_gives_the_same_records_as_one_pass(tmp_path):
    data = mixed_jsonl(tmp_path / "docs.jsonl")
    whole = read_all(tmp_path / "docs.jsonl", reader())
    assert len(whole) == 14 and [r["status"] for r in whole].count("dead") == 2
    assert whole[0]["id"] == "docs.jsonl:1" and whole[-1]["offset"] == data.rindex(b"\n") + 1
    # Range edges land before, on and after newlines, and many inside the giant line.
    for split in (13, 100, 1000, 4099, 30_000, len(data) - 1):
        ranges = io.split_ranges(expand_inputs([str(tmp_path / "docs.jsonl")])[0], split)
        assert len(ranges) == -(-len(data) // split)
        assert read_all(tmp_path / "docs.jsonl", reader(split_bytes=split)) == whole, split


def test_gzip_and_small_files_are_read_whole(tmp_path):
    import gzip

    mixed_jsonl(tmp_path / "docs.jsonl")
    (tmp_path / "docs.jsonl.gz").write_bytes(gzip.compress((tmp_path / "docs.jsonl").read_bytes()))
    plain, gz = expand_inputs([str(tmp_path / "docs.jsonl*")])
    assert gz.path.endswith(".gz") and gz.size > 10
    assert io.split_ranges(gz, 10) == [io.ReadRange(gz, 0, gz.size)]
    assert io.split_ranges(plain, plain.size) == [io.ReadRange(plain, 0, plain.size)]
    ids = [r["id"].replace(".jsonl.gz:", ".jsonl:") for r in io.read_jsonl(gz, reader())]
    assert ids == [r["id"] for r in read_all(plain.path, reader())]


def test_read_inputs_splits_a_large_file_and_fans_its_records_out(tmp_path):
    mixed_jsonl(tmp_path / "docs.jsonl")
    expected = [(r["id"], r["status"], r["offset"]) for r in read_all(tmp_path / "docs.jsonl", reader())]
    files = expand_inputs([str(tmp_path / "docs.jsonl")])
    # ~100 ranges fan out by themselves; one range (the whole file) takes the records reshuffle: same records.
    for split, fans_out in ((333, True), (1 << 30, False)):
        assert io.ranges_fan_out(io.split_ranges(files[0], split)) is fans_out
        with BeamTestPipeline() as p:
            read = p | ReadInputs(files, reader(split_bytes=split))
            out = read | beam.Map(lambda r: (r["id"], r["status"], r["offset"]))
            assert_that(out, equal_to(expected))


def test_a_large_file_is_cut_into_enough_ranges_to_fan_out_and_a_gzip_file_is_not():
    def file(size: int, name: str = "big.jsonl") -> io.InputFile:
        return io.InputFile(f"/data/{name}", name, "jsonl", size)

    for size, step in ((40 << 20, 40 << 15), (10 << 20, io.MIN_SPLIT_BYTES), (4 << 30, io.SPLIT_BYTES)):
        ranges = io.split_ranges(file(size), io.SPLIT_BYTES)
        assert [r.start for r in ranges] == list(range(0, size, step)), size
        assert ranges[-1].end == size and all(a.end == b.start for a, b in zip(ranges, ranges[1:]))
        assert len(ranges) >= min(io.RANGES_PER_FILE, size // io.MIN_SPLIT_BYTES)
        assert io.ranges_fan_out(ranges) is (len(ranges) >= io.RANGES_PER_FILE)
    assert io.split_ranges(file(io.MIN_SPLIT_BYTES), io.SPLIT_BYTES) == [
        io.ReadRange(file(io.MIN_SPLIT_BYTES), 0, 1 << 20)
    ]
    # One big .gz beside many small files: the .gz is one range holding most of the input, so records reshuffle.
    small = [r for i in range(40) for r in io.split_ranges(file(1000, f"s{i}.jsonl"), io.SPLIT_BYTES)]
    gz = io.split_ranges(io.InputFile("/data/big.jsonl.gz", "big.jsonl.gz", "jsonl", 1 << 30), io.SPLIT_BYTES)
    assert len(gz) == 1 and io.ranges_fan_out(small) and not io.ranges_fan_out(small + gz)


def texts_table(n: int, giant_rows: tuple[int, ...], max_bytes: int) -> pa.Table:
    topics = [text for _, text in topic_texts(8)]
    texts = ["é" * (max_bytes // 2 + 1) if i in giant_rows else topics[i % len(topics)] for i in range(n)]
    return pa.table({"id": [f"r{i}" for i in range(n)], "text": texts})


def test_table_rows_over_the_guard_dead_letter_from_their_byte_length(tmp_path):
    # 2 * (max_bytes // 2 + 1) bytes of "é": over the guard by 1-2 bytes, though it has fewer characters.
    max_bytes = 5000
    table = texts_table(600, giant_rows=(3, 257, 599), max_bytes=max_bytes)
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=600)
    with pa.OSFile(str(tmp_path / "stream.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table, max_chunksize=600)
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table, max_chunksize=600)
    cfg = reader(max_bytes=max_bytes)
    size = len(("é" * (max_bytes // 2 + 1)).encode())
    for name in ("rows.parquet", "stream.arrow", "file.arrow"):
        [file] = expand_inputs([str(tmp_path / name)])
        batches = list(io._table_batches(file))
        assert max(b.num_rows for b in batches) == io.TABLE_BATCH_ROWS and sum(b.num_rows for b in batches) == 600
        records = list(io.read_table(file, cfg))
        assert [r["id"] for r in records] == [f"r{i}" for i in range(600)], name
        assert [r["offset"] for r in records] == list(range(600))
        dead = [(r["id"], r["error"], r["raw"][:3]) for r in records if r["status"] == "dead"]
        error = f"text of {size} bytes over the size guard ({max_bytes} bytes)"
        assert dead == [(f"r{i}", error, "ééé") for i in (3, 257, 599)], name
        assert all(len(r["raw"]) <= 128 for r in records if r["status"] == "dead")
        kept = [r["text"] for r in records if r["status"] == "ok"]
        assert kept == [t for i, t in enumerate(table.column("text").to_pylist()) if i not in (3, 257, 599)]
