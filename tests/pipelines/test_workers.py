"""`cpt prepare --workers N`: the Beam flags it maps to, and the flags a user gave that take precedence."""

from __future__ import annotations

import os

from cpt.pipelines.run import BYTES_PER_WORKER, MAX_SHARD_BYTES, MAX_WORKERS, local_worker_args, main, shards_for

MULTI = ["--direct_running_mode", "multi_processing"]


def test_workers_map_to_direct_runner_worker_processes():
    assert local_worker_args([], 3, input_bytes=0) == ["--direct_num_workers", "3", *MULTI]
    direct = ["--runner", "DirectRunner"]
    assert local_worker_args(direct, 1, input_bytes=0) == [*direct, "--direct_num_workers", "1"]


def test_default_workers_follow_the_cores_and_the_input_size():
    cores = min(os.cpu_count() or 1, MAX_WORKERS)
    # A small corpus stays in one process: starting worker processes costs more than they would save.
    assert local_worker_args([], None, input_bytes=BYTES_PER_WORKER - 1) == ["--direct_num_workers", "1"]
    many = local_worker_args([], None, input_bytes=100 * BYTES_PER_WORKER)
    assert many == (["--direct_num_workers", str(cores), *MULTI] if cores > 1 else ["--direct_num_workers", "1"])


def test_flags_given_to_beam_take_precedence_over_workers():
    given = ["--direct_num_workers=2", "--direct_running_mode", "multi_threading"]
    assert local_worker_args(given, 4, input_bytes=0) == given
    dask = ["--runner", "apache_beam.runners.dask.dask_runner.DaskRunner", "--dask_client_address", "h:8786"]
    assert local_worker_args(dask, 4, input_bytes=1 << 40) == dask


def test_workers_below_one_is_a_user_error(tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "x"}\n')
    assert main(["--input", str(data), "--output", str(tmp_path / "out"), "--workers", "0"]) == 2
    assert capsys.readouterr().err.strip() == "cpt prepare: error: --workers 0: give 1 or more worker processes"
    assert not (tmp_path / "out").exists()


def test_large_inputs_get_more_shards_so_a_shard_stays_bounded():
    assert shards_for(4, 0) == 4 and shards_for(4, 4 * MAX_SHARD_BYTES) == 4  # the given count up to the bound
    assert shards_for(4, 4 * MAX_SHARD_BYTES + 1) == 5
    assert shards_for(4, 2_000_000_000) == -(-2_000_000_000 // MAX_SHARD_BYTES) == 15
    assert shards_for(64, 2_000_000_000) == 64  # never fewer than asked for
