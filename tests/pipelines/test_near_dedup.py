"""Near dedup (MinHash LSH) and decontamination: the pure parts, the Beam composite's quality, and `cpt prepare`."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.util import assert_that

from cpt.pipelines.config import NearDedupConfig, resolve_config
from cpt.pipelines.inspect import main as inspect_main
from cpt.pipelines.near_dedup import (
    ComponentsFn,
    NearDedup,
    Signer,
    _matches,
    band_edges,
    band_keys,
    components,
    shingles,
    word_ngram_hashes,
)
from cpt.pipelines.run import main
from cpt.shared import dataset
from cpt.shared.config import ConfigError
from tests.helpers import make_prepared_dataset
from tests.pipelines.near_dup_corpus import base_texts, near_dup_docs, quality, similar_pairs
from tests.pipelines.test_dask_runner import CPT, REPO, dask_cluster  # noqa: F401  (dask_cluster: a fixture)
from tests.pipelines.test_prepare_e2e import file_digests


def test_word_shingles_are_normalised_word_ngrams():
    assert shingles("The cat, the CAT sat.", 3) == {b"the cat the", b"cat the cat", b"the cat sat"}
    assert shingles("Too short", 5) == {b"too short"}  # one shingle: short texts still match each other
    assert shingles("  ...  ", 5) == set()  # no words: never a near duplicate


def test_char_shingles_join_the_normalised_words():
    assert shingles("A-b  c", 3, unit="char") == {b"a b", b" b ", b"b c"}


def test_signatures_are_the_same_in_another_process_with_another_hash_seed():
    text = base_texts(1)[0]
    here = Signer(128, 1)(shingles(text, 5))
    code = (
        "import sys; from cpt.pipelines.near_dedup import Signer, shingles; "
        "sys.stdout.write(Signer(128, 1)(shingles(sys.stdin.read(), 5)).tobytes().hex())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run(
        [sys.executable, "-c", code], input=text, capture_output=True, text=True, env=env, check=True
    )
    assert done.stdout == here.tobytes().hex()
    assert here.dtype == np.dtype("<u4") and len(here) == 128
    assert not np.array_equal(Signer(128, 2)(shingles(text, 5)), here)  # the seed picks the hash family


def test_band_keys_name_the_band_and_differ_only_where_the_band_differs():
    sig = np.arange(16, dtype="<u4")
    other = sig.copy()
    other[5] = 99  # inside band 1 of 4 bands x 4 rows
    keys, other_keys = band_keys(sig, 4, 4), band_keys(other, 4, 4)
    assert [k.split(":")[0] for k in keys] == ["0", "1", "2", "3"]
    assert [a == b for a, b in zip(keys, other_keys)] == [True, False, True, True]


def sig(values: list[int]) -> bytes:
    return np.asarray(values, dtype="<u4").tobytes()


def test_small_band_groups_give_every_verified_pair():
    members = [(("c",), sig([1, 2, 3, 4])), (("a",), sig([1, 2, 3, 4])), (("b",), sig([1, 2, 3, 9]))]
    assert band_edges(members, 32, None) == [(("a",), ("b",)), (("a",), ("c",)), (("b",), ("c",))]
    # estimated Jaccard: a~c 1.0, a~b and b~c 0.75
    assert band_edges(members, 32, 0.8) == [(("a",), ("c",))]
    assert band_edges(members, 32, 0.75) == [(("a",), ("b",)), (("a",), ("c",)), (("b",), ("c",))]


def test_a_huge_band_group_gives_a_star_to_its_smallest_member_not_all_pairs():
    members = [((f"doc-{i:04d}",), sig([7, 7, 7, 7])) for i in range(3000, 0, -1)]
    edges = band_edges(members, 32, 0.8)
    assert len(edges) == 2999  # not 3000 * 2999 / 2
    assert {a for a, _ in edges} == {("doc-0001",)}


def test_components_root_at_the_smallest_member_whatever_the_merge_order():
    edges = [("d", "e"), ("b", "c"), ("c", "a"), ("x", "y"), ("e", "f"), ("f", "d")]
    expected = [
        ("a", "a", 3), ("b", "a", 3), ("c", "a", 3), ("d", "d", 3), ("e", "d", 3), ("f", "d", 3),
        ("x", "x", 2), ("y", "x", 2),
    ]  # fmt: skip
    fn = ComponentsFn()
    for seed in range(5):
        shuffled = random.Random(seed).sample(edges, len(edges))
        parts = [fn.create_accumulator() for _ in range(3)]
        for i, edge in enumerate(shuffled):
            fn.add_input(parts[i % 3], edge)
        assert fn.extract_output(fn.merge_accumulators(parts)) == expected
    assert components({}) == []


def test_decontamination_ngrams_ignore_case_and_punctuation():
    a = word_ngram_hashes("One two three, four five SIX.", 3)
    assert a == word_ngram_hashes("one two three four five six", 3) and len(a) == 4
    assert word_ngram_hashes("one two", 3) == set()


def test_bad_near_dedup_settings_are_reported_together():
    with pytest.raises(ConfigError) as err:
        flags = {"inputs": ["x"], "output": "y", "near_dedup": {"unit": "byte", "threshold": 1.5, "bands": 20}}
        resolve_config("text", None, flags)
    text = "\n".join(err.value.problems)
    assert "near_dedup.unit" in text and "near_dedup.threshold" in text and "near_dedup.bands/rows" in text


def test_bands_and_rows_follow_the_threshold():
    assert NearDedupConfig().lsh_params() == (16, 8)
    assert NearDedupConfig(threshold=0.9).lsh_params() != (16, 8)
    assert NearDedupConfig(bands=20, rows=5).lsh_params() == (20, 5)


def run_near_dedup(docs: list[dict], cfg: NearDedupConfig, tmp_path: Path) -> dict[str, str]:
    """NearDedup in a DirectRunner pipeline; returns {rejected id: duplicate_of} (and checks nothing is lost)."""
    records = [
        {"id": d["id"], "text": d["text"], "source": "s", "offset": i, "status": "ok"} for i, d in enumerate(docs)
    ]
    ids = sorted(d["id"] for d in docs)
    result = tmp_path / "rejected.json"

    def collect(outputs):  # runs in the runner (a copy of this closure): the result goes through a file
        assert sorted(d["id"] for d in outputs) == ids
        assert all(d["reason"] == "near_duplicate" for d in outputs if d["status"] == "rejected")
        rejected = {d["id"]: d["duplicate_of"] for d in outputs if d["status"] == "rejected"}
        result.write_text(json.dumps(rejected), encoding="utf-8")

    with beam.Pipeline(runner="DirectRunner") as p:
        assert_that(p | beam.Create(records) | NearDedup(cfg), collect)
    return json.loads(result.read_text(encoding="utf-8"))


@pytest.mark.slow
def test_near_duplicates_of_real_text_are_found_and_template_siblings_are_not(tmp_path):
    docs = near_dup_docs(100, seed=1, hard_negatives=15)
    texts = {d["id"]: d["text"] for d in docs}
    rejected = run_near_dedup(docs, NearDedupConfig(), tmp_path)
    q = quality(texts, rejected, similar_pairs(texts))
    assert q["should_reject"] > 60 and q["precision"] >= 0.95 and q["recall"] >= 0.9, q
    # Same header and footer, other content: no hard negative is taken for a copy of another one.
    family = {d["id"]: d["family"] for d in docs}
    negatives = {doc for doc, name in family.items() if name.startswith("negative")}
    assert not [(doc, kept) for doc, kept in rejected.items() if doc in negatives and kept in negatives]


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": d["id"], "text": d["text"]}) + "\n" for d in docs), encoding="utf-8")
    return path


def read_rows(shard: Path) -> list[dict]:
    return dataset.read_shard(str(shard)).to_pylist()


def rejected_rows(out: Path) -> list[dict]:
    return [row for p in sorted((out / "rejected").glob("data-*.arrow")) for row in read_rows(p)]


@pytest.mark.slow
def test_near_dedup_writes_the_same_bytes_with_one_or_two_workers_and_on_dask(dask_cluster, tmp_path, capsys):  # noqa: F811
    docs = near_dup_docs(30, seed=2, hard_negatives=4)
    raw = write_jsonl(tmp_path / "raw" / "docs.jsonl", docs)
    common = ["--input", str(raw), "--preset", "text", "--skip", "language", "--num-shards", "3"]
    assert main([*common, "--output", str(tmp_path / "one"), "--direct_num_workers", "1"]) == 0
    two = ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]
    assert main([*common, "--output", str(tmp_path / "two"), *two]) == 0
    cmd = [CPT, "prepare", *common, "--output", str(tmp_path / "dask")]
    cmd += ["--runner", "apache_beam.runners.dask.dask_runner.DaskRunner", "--dask_client_address", dask_cluster]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    digests = file_digests(tmp_path / "one")
    assert file_digests(tmp_path / "two") == digests and file_digests(tmp_path / "dask") == digests

    manifest = dataset.read_manifest(str(tmp_path / "one"))
    rejected = [r for r in rejected_rows(tmp_path / "one") if r["reason"] == "near_duplicate"]
    near = manifest["near_dedup"]
    assert manifest["counts"]["rejected"]["near_duplicate"] == len(rejected) > 10
    assert near["params"]["bands"] == 16 and near["params"]["rows"] == 8 and near["params"]["ngram"] == 5
    kept_ids = {r["id"] for p in (tmp_path / "one").glob("data-*.arrow") for r in read_rows(p)}
    assert all(r["duplicate_of"] in kept_ids for r in rejected)
    sizes: dict[str, int] = {}
    for r in rejected:
        sizes[r["duplicate_of"]] = sizes.get(r["duplicate_of"], 0) + 1
    assert near["clusters"] == len(sizes) and near["largest_cluster"] == max(sizes.values()) + 1
    assert near["sample_pairs"] == sorted([r["duplicate_of"], r["id"]] for r in rejected)[:5]
    assert f"near_dedup: {near['clusters']} clusters, largest {near['largest_cluster']} documents" in done.stdout
    kept, dup = near["sample_pairs"][0]
    assert f"    kept {kept} <- rejected {dup}" in done.stdout
    capsys.readouterr()
    assert inspect_main([str(tmp_path / "one"), "--rejected", "--n", "1"]) == 0
    shown = capsys.readouterr().out
    assert f"near_dedup: {near['clusters']} clusters" in shown
    assert f"duplicate_of={rejected[0]['duplicate_of']}" in shown
    assert f"near-duplicate pair: kept [{kept}] <- rejected [{dup}]" in shown
    by_id = {r["id"]: r["text"] for p in (tmp_path / "one").glob("data-*.arrow") for r in read_rows(p)}
    assert f"    kept:     {by_id[kept][:40]}" in shown.replace(" ⏎ ", "\n")


COMMON_PHRASES = (
    "For more information, see the documentation.",
    "This is done for backward compatibility.",
    "See also the section below.",
)


# Generated text every pydoc page of a class carries: in more than max_train_docs (10) training documents, so its
# 13-grams are template, not a leaked eval passage (GPT-3's rule).
TEMPLATE = (
    "Data descriptors defined here: __dict__ dictionary for instance variables (if defined) __weakref__ list of "
    "weak references to the object (if defined)"
)


def test_an_ngram_of_more_than_max_train_docs_training_documents_matches_nothing():
    group = [("eval", "eval-1")] + [("train", ("t", i)) for i in range(11)]
    assert _matches(("h", group), max_train_docs=10) == []
    assert len(_matches(("h", group), max_train_docs=0)) == 11 == len(_matches(("h", group[:12]), 11))
    assert _matches(("h", group[:4]), 10) == [(("t", i), (1, "eval-1")) for i in range(3)]


@pytest.mark.slow
def test_decontaminate_rejects_documents_carrying_an_eval_passage_and_keeps_common_phrases(tmp_path):
    texts = base_texts(40)
    evals = [f"{TEMPLATE} (eval page {i})\n\n{t}\n\n{COMMON_PHRASES[i % 3]}" for i, t in enumerate(texts[:6])]
    eval_dir = make_prepared_dataset(tmp_path / "eval", evals, id_prefix="eval")
    rng = random.Random(0)
    train = []
    for i, body in enumerate(texts[6:26]):
        source = rng.randrange(6)
        words = texts[source].split()
        length = rng.randint(30, 80)
        start = rng.randrange(len(words) - length)
        passage = " ".join(words[start : start + length])
        text = f"{TEMPLATE} (training page {i})\n\n" + (
            f"{body[:1200]}\n\n{passage}\n\n{body[1200:2400]}" if i % 2 == 0 else f"{body}\n\n{COMMON_PHRASES[i % 3]}"
        )
        train.append({"id": f"train-{i:03d}", "text": text, "carries": f"eval-{source:06d}" if i % 2 == 0 else None})
    raw = write_jsonl(tmp_path / "raw" / "train.jsonl", train)
    out = tmp_path / "out"
    args = ["--input", str(raw), "--output", str(out), "--preset", "text", "--skip", "language", "near_dedup"]
    assert main([*args, "--decontaminate", eval_dir]) == 0
    contaminated = {r["id"]: r["duplicate_of"] for r in rejected_rows(out) if r["reason"] == "contaminated"}
    assert contaminated == {d["id"]: d["carries"] for d in train if d["carries"]}
    manifest = dataset.read_manifest(str(out))
    assert manifest["counts"]["kept"] == 10 and manifest["config"]["decontaminate"]["datasets"] == [eval_dir]
    # --skip near_dedup leaves the step out: no near_duplicate rejects, no near_dedup report
    assert "near_dedup" not in manifest["steps"] and "near_dedup" not in manifest
    assert manifest["steps"][-1] == "decontaminate"
    assert main([*args, "--decontaminate", str(tmp_path / "missing")]) == 2
