"""`cpt prepare` on Beam's DaskRunner against a real `dask scheduler` + 2 `dask worker` processes on loopback.

The shards, rejects and dead letters must be byte-identical to DirectRunner's.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.pipelines.prepare_corpus import jsonl_corpus
from tests.pipelines.test_prepare_e2e import file_digests, prepare

REPO = Path(__file__).resolve().parents[2]
DASK = str(Path(sys.executable).parent / "dask")
CPT = str(Path(sys.executable).parent / "cpt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(processes: list[subprocess.Popen]) -> None:
    for proc in processes:
        proc.terminate()
    for proc in processes:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def dask_cluster(tmp_path):
    """A scheduler and two single-threaded workers on 127.0.0.1; yields the scheduler address."""
    from distributed import Client

    address = f"127.0.0.1:{free_port()}"
    logs = [open(tmp_path / f"dask-{i}.log", "w") for i in range(3)]
    host, port = address.split(":")
    flags = ["--no-dashboard"]
    procs = [subprocess.Popen([DASK, "scheduler", "--host", host, "--port", port, *flags], stderr=logs[0])]
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection((host, int(port)), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"dask scheduler did not listen on {address}") from None
                time.sleep(0.2)
        for i in (1, 2):
            cmd = [DASK, "worker", f"tcp://{address}", "--nthreads", "1", "--nworkers", "1", *flags]
            procs.append(subprocess.Popen(cmd, stderr=logs[i]))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        stop(procs[::-1])
        for log in logs:
            log.close()


@pytest.mark.slow
def test_dask_runner_writes_the_same_bytes_as_the_direct_runner(dask_cluster, tmp_path, tokenizer_dir):
    jsonl_corpus(tmp_path / "raw")
    common = ["--input", str(tmp_path / "raw" / "*"), "--max-bytes", "100000", "--tokenizer", str(tokenizer_dir)]
    direct = tmp_path / "direct"
    manifest = prepare(*common, "--output", direct)
    on_dask = tmp_path / "dask"
    cmd = [CPT, "prepare", *common, "--output", str(on_dask)]
    cmd += ["--runner", "apache_beam.runners.dask.dask_runner.DaskRunner", "--dask_client_address", dask_cluster]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"kept:        {manifest['counts']['kept']}" in done.stdout
    digests = file_digests(direct)
    assert len(digests) >= 8 and file_digests(on_dask) == digests
