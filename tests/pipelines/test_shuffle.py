"""FileGroupByKey keeps GroupByKey's contract with the data on disk; `cpt prepare` writes the same bytes either way."""

from __future__ import annotations

import json
import random

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from cpt.pipelines.config import resolve_config
from cpt.pipelines.run import main, pipeline_options, shuffle_spec
from cpt.pipelines.shuffle import SHUFFLE_DIR, FileGroupByKey, FileReshuffle, ShuffleSpec
from cpt.shared import dataset
from tests.pipelines.near_dup_corpus import near_dup_docs
from tests.pipelines.test_prepare_e2e import file_digests


def keyed_items(n: int, seed: int = 0) -> list[tuple]:
    """Keys of several types (str, int, tuple) with repeats; values of several shapes, None and text among them."""
    rng = random.Random(seed)
    keys = [f"k{i}" for i in range(40)] + list(range(30)) + [("doc", i, "src.jsonl") for i in range(30)]
    out = []
    for i in range(n):
        value = rng.choice([None, i, f"text {i} " * rng.randint(0, 30), {"id": f"d{i}", "n": [i, i + 1]}])
        out.append((rng.choice(keys), (i, value)))
    return out


def grouped(items) -> list[tuple]:
    groups: dict = {}
    for key, value in items:
        groups.setdefault(key, []).append(value)
    return sorted(((k, sorted(vs, key=lambda v: v[0])) for k, vs in groups.items()), key=repr)


def run_grouping(items, transform, options=None) -> list:
    out = []
    with beam.Pipeline(options=options or PipelineOptions()) as p:
        groups = p | beam.Create(items, reshuffle=False) | transform
        sorted_groups = groups | beam.MapTuple(lambda k, vs: (k, sorted(vs, key=lambda v: v[0])))
        assert_that(sorted_groups, equal_to(grouped(items)))
        out.append(sorted_groups)
    return out


def spill_files(folder) -> list:
    return sorted(folder.rglob("*.arrow"))


def test_file_group_by_key_groups_like_group_by_key_across_many_flushes_and_partitions(tmp_path):
    items = keyed_items(3000)
    spec = ShuffleSpec(str(tmp_path / "shuffle"), partitions=7, flush_bytes=4096)
    run_grouping(items, FileGroupByKey(spec, "g"))
    files = spill_files(tmp_path / "shuffle" / "g")
    # Many flushes, each one IPC file of one record batch per partition it held.
    assert len(files) > 20
    readers = [pa.ipc.open_file(pa.memory_map(str(f))) for f in files]
    assert max(r.num_record_batches for r in readers) <= 7
    assert sum(r.read_all().num_rows for r in readers) == 3000


def test_without_a_temp_dir_it_is_beams_group_by_key_and_nothing_is_written(tmp_path):
    items = keyed_items(200, seed=1)
    run_grouping(items, FileGroupByKey(ShuffleSpec(None), "g"))
    run_grouping(items, FileGroupByKey(None, "g"))
    assert not list(tmp_path.iterdir())


def test_a_partition_function_sends_each_key_to_its_own_partition(tmp_path):
    items = [(i % 5, (n, "x" * n)) for n, i in enumerate(range(500))]
    spec = ShuffleSpec(str(tmp_path / "s"), partitions=99, flush_bytes=1 << 20)
    run_grouping(items, FileGroupByKey(spec, "w", partitions=5, partition_of=lambda k: k))
    (only,) = spill_files(tmp_path / "s" / "w")  # one flush at the end of the one bundle
    reader = pa.ipc.open_file(pa.memory_map(str(only)))
    assert reader.num_record_batches == 5
    assert all(len(set(reader.get_batch(i).column("key").to_pylist())) == 1 for i in range(5))


def test_empty_input_gives_no_groups_and_no_files(tmp_path):
    spec = ShuffleSpec(str(tmp_path / "s"), partitions=3)
    with beam.Pipeline() as p:
        out = p | beam.Create([]) | FileGroupByKey(spec, "g")
        assert_that(out, equal_to([]))
    assert not spill_files(tmp_path)


def test_file_reshuffle_returns_every_record_once(tmp_path):
    records = [{"id": f"d{i}", "source": f"f{i % 3}.jsonl", "offset": i, "text": "t" * i} for i in range(300)]
    spec = ShuffleSpec(str(tmp_path / "s"), partitions=4, flush_bytes=2048)
    with beam.Pipeline() as p:
        out = p | beam.Create(records) | FileReshuffle(spec, "read") | beam.Map(lambda r: r["id"])
        assert_that(out, equal_to([r["id"] for r in records]))
    assert len(spill_files(tmp_path)) > 1


@pytest.mark.slow
def test_file_group_by_key_with_two_worker_processes(tmp_path):
    items = keyed_items(2000, seed=3)
    spec = ShuffleSpec(str(tmp_path / "shuffle"), partitions=4, flush_bytes=8192)
    options = PipelineOptions(["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"])
    run_grouping(items, FileGroupByKey(spec, "g"), options)
    assert len(spill_files(tmp_path / "shuffle" / "g")) > 4


def test_auto_shuffles_through_files_on_direct_runner_only(tmp_path):  # perplexity on or off
    cfg = resolve_config("text", None, {"inputs": ["x"], "output": str(tmp_path / "out")})
    spec = shuffle_spec(cfg, pipeline_options(["--direct_num_workers", "2"]), 300 << 20)
    assert spec.temp_dir == dataset.join(str(tmp_path / "out"), SHUFFLE_DIR)
    assert spec.partitions == 5  # 300 MB at 64 MB a partition (and at least 2 per worker)
    assert shuffle_spec(cfg, pipeline_options([]), 0).partitions == 2
    dask = pipeline_options(["--runner", "apache_beam.runners.dask.dask_runner.DaskRunner"])
    assert shuffle_spec(cfg, dask, 1 << 30) is None
    assert shuffle_spec(cfg, pipeline_options(["--runner", "DataflowRunner"]), 1 << 30) is None
    files = resolve_config("text", None, {"inputs": ["x"], "output": "gs://b/out", "shuffle": "files"})
    assert shuffle_spec(files, dask, 1 << 30).temp_dir == f"gs://b/out/{SHUFFLE_DIR}"
    ppl = resolve_config("text", None, {"inputs": ["x"], "output": "o", "perplexity": {"model": "m"}})
    assert shuffle_spec(ppl, pipeline_options([]), 1 << 30).temp_dir == f"o/{SHUFFLE_DIR}"
    beam_cfg = resolve_config("text", None, {"inputs": ["x"], "output": "o", "shuffle": "beam"})
    assert shuffle_spec(beam_cfg, pipeline_options([]), 1 << 30) is None


def test_an_unknown_shuffle_mode_is_a_config_error():
    from cpt.shared.config import ConfigError

    with pytest.raises(ConfigError, match="shuffle: unknown mode 'disk'; choose one of auto, files, beam"):
        resolve_config("text", None, {"inputs": ["x"], "output": "o", "shuffle": "disk"})


@pytest.mark.slow
def test_prepare_writes_the_same_bytes_whether_shuffles_go_through_files_or_beam(tmp_path, capsys, monkeypatch):
    docs = near_dup_docs(20, seed=5, hard_negatives=3)
    docs += [{**docs[i], "id": f"{docs[i]['id']}-copy"} for i in range(0, len(docs), 4)]  # exact duplicates
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(d) + "\n" for d in docs) + "{broken json\n")
    common = ["--input", str(raw), "--preset", "text", "--skip", "language", "--num-shards", "3"]
    outputs = {}
    for mode in ("files", "beam"):
        (tmp_path / mode).mkdir()
        monkeypatch.chdir(tmp_path / mode)  # the same --output string: the config hashes compare
        assert main([*common, "--output", "out", "--shuffle", mode]) == 0
        outputs[mode] = capsys.readouterr().out
    assert file_digests(tmp_path / "files" / "out") == file_digests(tmp_path / "beam" / "out")
    assert "shuffle.spilled_bytes" in outputs["files"] and "shuffle.spilled_bytes" not in outputs["beam"]
    one, two = (dataset.read_manifest(str(tmp_path / m / "out")) for m in ("files", "beam"))
    assert one["config"]["shuffle"] == "files" and two["config"]["shuffle"] == "beam"
    # How the shuffles ran is not part of the data's identity.
    assert one["counts"] == two["counts"] and one["config_hash"] == two["config_hash"]
    rejected = one["counts"]["rejected"]
    assert rejected["duplicate"] >= 5 and rejected["near_duplicate"] > 5 and one["counts"]["dead_letter"] == 1
    assert not (tmp_path / "files" / "out" / SHUFFLE_DIR).exists()
