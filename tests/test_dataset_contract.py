"""The prepared-dataset contract: what `cpt prepare` writes, `datasets.load_from_disk` and the trainer read."""

import datasets
import pytest

from cpt.shared import dataset
from tests.conftest import stdlib_texts
from tests.helpers import make_prepared_dataset


def test_contract_folder_opens_with_datasets_load_from_disk(tmp_path, tokenizer_dir):
    texts = stdlib_texts(10)
    out = make_prepared_dataset(tmp_path / "ds", texts, tokenizer_dir=tokenizer_dir, num_shards=3)
    ds = datasets.load_from_disk(out)
    assert len(ds) == 10
    assert ds.features["input_ids"].feature.dtype == "uint32"
    assert sorted(ds["text"]) == sorted(texts)
    manifest = dataset.read_manifest(out)
    assert sum(s["rows"] for s in manifest["shards"]) == 10
    assert all(dataset.file_sha256(url) == s["sha256"] for url, s in zip(dataset.shard_urls(out), manifest["shards"]))


def test_missing_manifest_is_reported_as_incomplete_run(tmp_path):
    with pytest.raises(dataset.DatasetError, match="no manifest.json"):
        dataset.read_manifest(str(tmp_path))


def test_truncated_shard_is_named_in_the_error(tmp_path):
    out = make_prepared_dataset(tmp_path / "ds", stdlib_texts(4), num_shards=1)
    shard = dataset.shard_urls(out)[0]
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) // 2])
    with pytest.raises(dataset.DatasetError, match="data-00000-of-00001.arrow: corrupt or truncated"):
        dataset.read_shard(shard)
