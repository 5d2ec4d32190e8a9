"""Dead processes: a Dask worker killed mid-job (retried: nothing lost, nothing twice), a DirectRunner worker
process killed (the job fails, no manifest), the launcher killed, and a write failing at the end (disk full).

Each kill is a real `os._exit` of the process running a step, fired once through the `CPT_INJECT_FAULTS` hook
(cpt/pipelines/faults.py); the clean run it is compared with runs the same corpus without it.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cpt.pipelines.faults import ENV_VAR
from cpt.shared import dataset
from tests.pipelines.prepare_corpus import jsonl_corpus
from tests.pipelines.test_prepare_e2e import file_digests, prepare

REPO = Path(__file__).resolve().parents[2]
DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"
VICTIM = "topic/async"  # a document every run keeps, seen by the `length` step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port}") from None
            time.sleep(0.2)


@pytest.fixture
def dask_cluster(tmp_path):
    """A scheduler and two single-threaded workers (each under a nanny, which restarts a dead worker process)."""
    from distributed import Client

    port = free_port()
    address = f"127.0.0.1:{port}"
    logs = [tmp_path / f"dask-{i}.log" for i in range(3)]
    # `python -m distributed.cli...` rather than the `dask` script: a layered venv may lack the script.
    cli = [sys.executable, "-m"]
    flags = ["--no-dashboard"]
    procs = []
    try:
        with open(logs[0], "w") as log:
            scheduler = [*cli, "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port), *flags]
            procs.append(subprocess.Popen(scheduler, stderr=log))
        wait_for_port("127.0.0.1", port)
        for i in (1, 2):
            with open(logs[i], "w") as log:
                worker = [*cli, "distributed.cli.dask_worker", f"tcp://{address}", "--nthreads", "1", *flags]
                procs.append(subprocess.Popen(worker, stderr=log))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
        yield {"address": address, "logs": logs}
    finally:
        for proc in procs[::-1]:
            proc.terminate()
        for proc in procs[::-1]:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def kill_once(marker_dir: Path, step: str = "length", doc_id: str = VICTIM) -> dict:
    """Environment for a launcher whose pipeline ends its worker process once, at `step`, on `doc_id`."""
    spec = {"exit": {step: [doc_id]}, "exit_marker_dir": str(marker_dir)}
    return {**os.environ, ENV_VAR: json.dumps(spec)}


def launch(args: list, env: dict, **kwargs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cpt.pipelines.run", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env, **kwargs)


def corpus_args(tmp_path: Path, tokenizer_dir: Path) -> list:
    jsonl_corpus(tmp_path / "raw")
    return ["--input", tmp_path / "raw" / "*", "--max-bytes", 100_000, "--tokenizer", tokenizer_dir]


@pytest.mark.slow
def test_a_dask_worker_killed_mid_job_is_retried_and_nothing_is_lost_or_written_twice(
    dask_cluster, tmp_path, tokenizer_dir
):
    common = corpus_args(tmp_path, tokenizer_dir)
    clean = prepare(*common, "--output", tmp_path / "clean")
    markers = tmp_path / "markers"
    out = tmp_path / "killed"
    runner = ["--runner", DASK_RUNNER, "--dask_client_address", dask_cluster["address"]]
    done = launch([*common, "--output", out, *runner], kill_once(markers))
    assert done.returncode == 0, done.stderr[-3000:]
    # The kill happened: the marker is there and a nanny saw its worker process exit with the fault's status.
    assert len(list(markers.iterdir())) == 1
    logs = "".join(log.read_text() for log in dask_cluster["logs"][1:])
    assert "exited with status 70" in logs, logs[-2000:]
    manifest = dataset.read_manifest(str(out))
    assert manifest["counts"] == clean["counts"]
    digests = file_digests(tmp_path / "clean")
    assert len(digests) >= 8 and file_digests(out) == digests


@pytest.mark.slow
def test_a_direct_runner_worker_process_killed_fails_the_job_and_leaves_no_manifest(tmp_path, tokenizer_dir):
    # DirectRunner's multi_processing mode does not retry a bundle whose worker died ("Channel closed
    # prematurely"): the job fails. The user sees a failed command and an output folder without manifest.json,
    # which `cpt train` refuses; rerunning the same command replaces it.
    common = corpus_args(tmp_path, tokenizer_dir)
    out = tmp_path / "out"
    two = ["--direct_num_workers", 2, "--direct_running_mode", "multi_processing"]
    done = launch([*common, "--output", out, *two], kill_once(tmp_path / "markers"))
    assert done.returncode != 0
    assert "Channel closed prematurely" in done.stderr
    assert not (out / dataset.MANIFEST).exists()
    with pytest.raises(dataset.DatasetError):
        dataset.read_manifest(str(out))


@pytest.mark.slow
def test_a_killed_launcher_leaves_no_manifest_and_a_rerun_gives_the_clean_output(tmp_path, tokenizer_dir):
    common = corpus_args(tmp_path, tokenizer_dir)
    clean = tmp_path / "clean"
    prepare(*common, "--output", clean)
    out = tmp_path / "out"
    prepare(*common, "--output", out)  # a complete previous run in the folder
    # In-process DirectRunner: the step runs in the launcher, so the fault kills the launcher itself mid-job.
    done = launch([*common, "--output", out], kill_once(tmp_path / "markers"))
    assert done.returncode == 70, done.stderr[-2000:]
    assert not (out / dataset.MANIFEST).exists()  # removed first by the run; written last, never reached
    with pytest.raises(dataset.DatasetError):
        dataset.read_manifest(str(out))
    prepare(*common, "--output", out)
    assert file_digests(out) == file_digests(clean)


def file_size_limit(limit: int):
    """preexec_fn: writes beyond `limit` bytes fail with EFBIG, as on a full disk (SIGXFSZ ignored to get an error)."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_a_write_that_fails_at_the_end_fails_the_job_and_leaves_no_manifest(tmp_path, tokenizer_dir):
    common = corpus_args(tmp_path, tokenizer_dir)
    out = tmp_path / "out"
    done = launch([*common, "--output", out], dict(os.environ), preexec_fn=file_size_limit(20_000))
    assert done.returncode != 0
    assert "File too large" in done.stderr, done.stderr[-2000:]
    assert not (out / dataset.MANIFEST).exists()
    with pytest.raises(dataset.DatasetError):
        dataset.read_manifest(str(out))
