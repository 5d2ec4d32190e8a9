"""Prepared datasets on storage other than a local folder: `cpt prepare` writes them, the trainer reads them.

Two stand-ins for gs:// and s3://, both driven through the public commands:
- fsspec's `memory://`: no extra package. It takes the same non-local code path as a bucket (fsspec streams,
  no memory map). It only works in-process, which DirectRunner's default mode is.
- a real S3 protocol server (moto) on 127.0.0.1: s3fs writes and reads the shards as on AWS, and `cpt train`
  trains from them; Beam's S3 filesystem (boto3) reads raw input. Skipped unless `moto`, `s3fs` and `boto3`
  are installed (setup.py's `dev` and `remote` extras).
Each is compared with the same input prepared into a local folder: same shard bytes, batches, trace, losses.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
import yaml
from transformers import AutoTokenizer

from cpt.pipelines.run import main as prepare_main
from cpt.shared.config import load_config
from cpt.shared.dataset import file_sha256, filesystem, read_manifest, read_shard, shard_urls
from cpt.trainer.data import DataConfig, MixtureLoader
from cpt.trainer.run import main as train_main

pytestmark = pytest.mark.slow


def prose_topics(n: int = 24) -> list[tuple[str, str]]:
    """(name, text) of pydoc_data help topics: real English prose that the `text` preset keeps whole.

    Its quality step (Gopher's repetition rules on the prose) rejects a few topics; those are left out here.
    """
    from pydoc_data.topics import topics

    from cpt.pipelines.transforms import QualityStep

    repetition = QualityStep(gopher_repetition=True, gopher_quality=False, c4=False, fineweb=False, prose_only=True)
    repetition.setup()
    sized = [(name, text) for name, text in sorted(topics.items()) if 800 <= len(text) <= 6000]
    return [(name, text) for name, text in sized if repetition({"text": text}) is None][:n]


TOPICS = prose_topics()


@pytest.fixture(scope="module")
def raw_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("raw") / "topics.jsonl"
    path.write_text("".join(json.dumps({"id": name, "text": text}) + "\n" for name, text in TOPICS))
    return path


def prepare(inputs: str, output: str, tokenizer_dir: Path) -> int:
    """`cpt prepare` as a user types it (in-process, so memory:// and the test's S3 settings are shared)."""
    args = ["--input", inputs, "--output", output, "--preset", "text", "--tokenizer", str(tokenizer_dir)]
    return prepare_main([*args, "--num-shards", "2"])


def loader_batches(path: str, tokenizer, n: int = 4) -> list[dict]:
    cfg = load_config(DataConfig, data={"seq_len": 128, "sources": [{"name": "docs", "path": path}]})
    batches = []
    for batch in MixtureLoader(cfg, tokenizer, seed=0, micro_batch_size=2):
        batches.append(batch)
        if len(batches) == n:
            return batches
    raise AssertionError(f"{path}: the mixture ended after {len(batches)} batches")


def assert_same_batches(remote: list[dict], local: list[dict]) -> None:
    assert len(remote) == len(local)
    for got, want in zip(remote, local):
        for key in ("input_ids", "position_ids", "source_ids"):
            assert torch.equal(got[key], want[key]), key
        assert got["segments"] == want["segments"]


def assert_shards_match_manifest(url: str) -> dict:
    """Every shard the manifest lists reads back through fsspec with its recorded rows and sha256."""
    manifest = read_manifest(url)
    for entry, shard_url in zip(manifest["shards"], shard_urls(url, manifest)):
        assert file_sha256(shard_url) == entry["sha256"]
        assert read_shard(shard_url).num_rows == entry["rows"]
    return manifest


EXPECTED_COUNTS = {"input": len(TOPICS), "kept": len(TOPICS), "rejected": {}, "dead_letter": 0}


@pytest.fixture(scope="module")
def local_dataset(raw_jsonl, tokenizer_dir, tmp_path_factory) -> str:
    """The baseline: the same input prepared into a plain local folder."""
    out = str(tmp_path_factory.mktemp("local") / "prepared")
    assert prepare(str(raw_jsonl), out, tokenizer_dir) == 0
    return out


def shard_hashes(url: str) -> list[str]:
    return [shard["sha256"] for shard in read_manifest(url)["shards"]]


def test_prepare_writes_to_a_memory_url_and_the_mixture_streams_it_like_a_local_folder(
    raw_jsonl, tokenizer_dir, local_dataset
):
    bucket = f"memory://cpt-{uuid.uuid4().hex[:8]}"
    url = f"{bucket}/prepared"
    fs, path = filesystem(url)
    try:
        assert prepare(str(raw_jsonl), url, tokenizer_dir) == 0

        manifest = assert_shards_match_manifest(url)
        assert manifest["counts"] == EXPECTED_COUNTS
        assert sum(s["rows"] for s in manifest["shards"]) == len(TOPICS)
        names = sorted(entry.rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False))
        assert names == [
            "data-00000-of-00002.arrow",
            "data-00001-of-00002.arrow",
            "dataset_info.json",
            "dead_letter",
            "manifest.json",
            "rejected",
            "state.json",
        ]
        # The storage does not change the dataset: byte-identical shards, the same packed batches.
        assert shard_hashes(url) == shard_hashes(local_dataset)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        assert_same_batches(loader_batches(url, tokenizer), loader_batches(local_dataset, tokenizer))
    finally:
        fs.rm(filesystem(bucket)[1], recursive=True)


# ---- a local S3 server -------------------------------------------------------------------------------------

# A skipif mark (not importorskip in the fixture) so that a skipped test does not build the session fixtures.
S3_PACKAGES = ("moto", "s3fs", "boto3")
needs_s3 = pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in S3_PACKAGES),
    reason="needs moto[s3,server] (setup.py dev extra), s3fs and boto3 (setup.py remote extra)",
)


@pytest.fixture(scope="module")
def s3_bucket(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with one bucket; AWS_* point every client (boto3, s3fs) at it."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    home = tmp_path_factory.mktemp("aws")
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        # A developer's own ~/.aws must not leak into the test, nor the test's keys into a real account.
        "AWS_CONFIG_FILE": str(home / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"),
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("AWS_PROFILE", raising=False)
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        s3fs.S3FileSystem.clear_instance_cache()
        bucket = f"cpt-{uuid.uuid4().hex[:8]}"
        fsspec.filesystem("s3").mkdir(bucket)
        try:
            yield bucket
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


def metrics(run_dir: Path) -> list[float]:
    """step, loss, domain_ppl of each metrics.jsonl line, flattened; tokens/s is left out (a timing)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [value for m in lines for value in (m["step"], m.get("loss", 0.0), m.get("domain_ppl", 0.0))]


@needs_s3
def test_cpt_train_reads_shards_and_eval_sets_that_cpt_prepare_wrote_to_s3(
    s3_bucket, raw_jsonl, tokenizer_dir, tiny_model_dir, local_dataset, tmp_path
):
    url = f"s3://{s3_bucket}/prepared"
    assert prepare(str(raw_jsonl), url, tokenizer_dir) == 0
    manifest = assert_shards_match_manifest(url)
    assert manifest["counts"] == EXPECTED_COUNTS
    assert shard_hashes(url) == shard_hashes(local_dataset)

    def run(source: str, name: str) -> Path:
        config = {
            "model": str(tiny_model_dir),
            "output_dir": str(tmp_path / name),
            # One loader worker process: a forked process must open its own connection to the store.
            "data": {"seq_len": 128, "trace": True, "num_workers": 1, "sources": [{"name": "docs", "path": source}]},
            "train": {"max_steps": 2, "micro_batch_size": 2, "grad_accum": 1, "device": "cpu"},
            "eval": {"every_steps": 2, "max_sequences": 4, "sets": {"domain": source, "general": source}},
            "checkpoint": {"every_steps": 2, "keep_last": 1},
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        assert train_main(["--config", str(path)]) == 0
        return tmp_path / name

    remote_run, local_run = run(url, "from-s3"), run(local_dataset, "from-disk")
    remote_trace = (remote_run / "data_trace.jsonl").read_text().splitlines()
    assert len(remote_trace) == 2 * 2  # 2 steps x 2 sequences
    assert remote_trace == (local_run / "data_trace.jsonl").read_text().splitlines()
    assert (remote_run / "checkpoint-2" / "trainer_state.json").is_file()
    remote_metrics, local_metrics = metrics(remote_run), metrics(local_run)
    assert remote_metrics[::3] == [0, 1, 2]
    assert remote_metrics == pytest.approx(local_metrics, rel=1e-6)


@needs_s3
def test_prepare_reads_raw_input_from_s3(s3_bucket, raw_jsonl, tokenizer_dir, local_dataset):
    fsspec.filesystem("s3").put_file(str(raw_jsonl), f"{s3_bucket}/raw/topics.jsonl")
    url = f"s3://{s3_bucket}/from-s3-input"
    # A fresh process, as a user runs it: in this one an earlier beam.Pipeline has already set Beam's options.
    args = ["--input", f"s3://{s3_bucket}/raw/*.jsonl", "--output", url, "--preset", "text"]
    command = [sys.executable, "-m", "cpt.shared", "prepare", *args, "--tokenizer", str(tokenizer_dir)]
    done = subprocess.run([*command, "--num-shards", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = read_manifest(url)
    assert manifest["inputs"]["files"] == [f"s3://{s3_bucket}/raw/topics.jsonl"]
    assert manifest["counts"] == EXPECTED_COUNTS
    assert shard_hashes(url) == shard_hashes(local_dataset)
