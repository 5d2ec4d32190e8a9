"""Faults `cpt prepare` survives: scoring failures, a step raising on chosen documents at every step of every preset.

Faults are injected through the documented `CPT_INJECT_FAULTS` hook (cpt/pipelines/faults.py), read when the
pipeline is built and pickled into the steps, so real runners run the real steps; nothing of Beam is mocked.
The worker-kill tests are in test_faults_workers.py.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from cpt.pipelines import faults, perplexity
from cpt.pipelines import transforms as t
from cpt.pipelines.io import new_document
from cpt.pipelines.run import main
from cpt.pipelines.text import dedup_key
from cpt.shared import dataset
from cpt.shared.corpus import pydoc_page
from tests.pipelines.prepare_corpus import STDLIB, code_corpus, html_corpus, jsonl_corpus, topic_texts
from tests.pipelines.test_prepare_e2e import file_digests, prepare

# More pydoc pages for the web preset: it needs a kept, non-duplicated page for each of its 7 steps.
EXTRA_HTML_MODULES = ("fnmatch", "glob", "stat", "copy", "string", "sched")  # one kept page per step, quality too


def doc(doc_id: str, text: str) -> dict:
    return new_document(doc_id, text, "src.jsonl", "jsonl", 0)


def scoring_docs() -> list[dict]:
    """Real texts of many token lengths: help topics whole (truncated at max_tokens) and cut at several lengths."""
    topics = topic_texts(10)
    docs = [doc(f"whole/{name}", text) for name, text in topics]
    for k, (name, text) in enumerate(topics):
        docs.append(doc(f"cut/{name}", text[: 30 + 45 * k]))
    docs.append(doc("code", "def add(a, b):\n    return a + b\n"))
    docs.append(doc("one-token", "x"))
    return docs


def test_perplexity_scores_are_the_same_alone_and_in_batches_of_any_size(tiny_model_dir):
    docs = scoring_docs()
    lm = perplexity.load_lm(str(tiny_model_dir))
    alone = {d["id"]: perplexity.score_documents(lm, [d], 64, 1)[0] for d in docs}
    widths = {perplexity.bucket_length(len(perplexity.tokenize(lm, d["text"], 64)), 64) for d in docs}
    assert len(widths) >= 3  # the batches below really mix length buckets
    assert alone["one-token"] != alone["one-token"]  # NaN: nothing to predict, the cut rejects it
    assert all(1.0 < s < 1e6 for k, s in alone.items() if k != "one-token")
    for batch_size in (2, 3, 5, 8):
        handler = perplexity.CausalLMPerplexityHandler(str(tiny_model_dir), 64, batch_size, faults=faults.NO_FAULTS)
        shuffled = random.Random(batch_size).sample(docs, len(docs))
        got = {}
        start = 0
        while start < len(shuffled):  # RunInference calls of uneven sizes, as BatchElements makes them
            size = random.Random(start).randint(1, handler.batch_elements_kwargs()["max_batch_size"])
            for result in handler.run_inference(shuffled[start : start + size], lm):
                got[result.example["id"]] = result.inference
            start += size
        assert {k: v for k, v in got.items() if k != "one-token"} == {
            k: v for k, v in alone.items() if k != "one-token"
        }, batch_size


def test_tokenizing_a_head_of_the_text_gives_the_same_first_tokens_as_the_whole_text(tiny_model_dir):
    lm = perplexity.load_lm(str(tiny_model_dir))
    texts = [text for _, text in topic_texts(40)]
    texts += [p.read_text(encoding="utf-8") for p in sorted(STDLIB.glob("*.py"))[:40]]
    # A long run that BPE merges into long tokens: its head holds too few tokens, so the whole text is read.
    texts.append("=" * 20_000 + " and then the text goes on.")
    assert any(len(text) > 256 * perplexity.PREFIX_CHARS_PER_TOKEN for text in texts)  # the head path runs
    for max_tokens in (16, 64, 256):
        for text in texts:
            whole = list(lm.tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens])
            assert perplexity.tokenize(lm, text, max_tokens) == whole, (max_tokens, text[:80])


def nan_model(tiny_model_dir: Path, out: Path, token_id: int) -> Path:
    """The tiny model with one embedding row set to NaN: any document holding that token scores non-finite."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        # Untied first: a NaN in a tied output row would reach every document's softmax.
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.get_input_embeddings().weight[token_id] = float("nan")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_a_document_that_cannot_be_scored_is_a_dead_letter_and_its_batch_mates_are_scored(tiny_model_dir, tmp_path):
    docs = [d for d in scoring_docs() if d["id"] != "one-token"]
    lm = perplexity.load_lm(str(tiny_model_dir))
    clean = {d["id"]: perplexity.score_documents(lm, [d], 64, 1)[0] for d in docs}
    # A token only the poisoned document holds: its score comes out NaN from a real forward pass.
    others = {i for d in docs for i in perplexity.tokenize(lm, d["text"], 64)}
    poison_text = "Zebra quagga: xylophone jukebox."
    token = next(i for i in perplexity.tokenize(lm, poison_text, 64) if i not in others)
    poisoned = doc("poisoned", poison_text * 3)
    handler = perplexity.CausalLMPerplexityHandler(
        str(nan_model(tiny_model_dir, tmp_path / "nan_model", token)),
        max_tokens=64,
        batch_size=4,
        faults=faults.Faults(raise_at={"perplexity": frozenset({"whole/async"})}),  # a model error on this one
    )
    with BeamTestPipeline() as p:
        out = (
            p
            | beam.Create([*docs, poisoned])
            | t.ScorePerplexity(handler, max_ppl=1e9, keep_percentile=None)
            | beam.Map(lambda d: (d["id"], d["status"], d.get("ppl"), (d.get("error") or "")[:60]))
        )
        injected = "perplexity: model: InjectedFault: injected fault at step perplexity for document whole/async"
        expected = [(k, "ok", s, "") for k, s in clean.items() if k != "whole/async"]
        expected += [("whole/async", "dead", None, injected[:60])]
        expected += [("poisoned", "dead", None, "perplexity: non-finite score (mean NLL nan)")]
        assert_that(out, equal_to(expected))


def test_a_model_that_cannot_load_fails_the_job_at_start_with_one_line(tiny_model_dir, tmp_path, capsys):
    broken = tmp_path / "broken_model"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # a truncated download
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"id": "a", "text": topic_texts(1)[0][1]}) + "\n")
    out = tmp_path / "out"
    assert main(["--input", str(data), "--output", str(out), "--ppl-model", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"cpt prepare: error: --ppl-model: perplexity model {broken} cannot be loaded on cpu: ")
    assert not out.exists()


def test_fault_spec_errors_name_the_variable():
    with pytest.raises(ValueError, match="CPT_INJECT_FAULTS: not JSON"):
        faults.Faults.parse("pii=doc-1")
    with pytest.raises(ValueError, match="need `exit_marker_dir`"):
        faults.Faults.parse('{"exit": {"pii": ["a"]}}')
    spec = faults.Faults.parse('{"raise": {"pii": ["a"]}}')
    spec.check("pii", "b")
    spec.check("length", "a")
    with pytest.raises(faults.InjectedFault, match="step pii for document a"):
        spec.check("pii", "a")


# ---- a step raising on chosen documents, at every step of every preset, on DirectRunner ----


EXTRA_CODE_MODULES = ("graphlib.py", "queue.py")


def preset_run(preset: str, base: Path, tokenizer_dir: Path, tiny_model_dir: Path) -> list[str]:
    """The `cpt prepare` arguments (less --output) of a run of `preset` with every one of its steps on."""
    common = ["--preset", preset, "--tokenizer", str(tokenizer_dir), "--num-shards", "3"]
    ppl = ["--ppl-model", str(tiny_model_dir), "--ppl-max-tokens", "64", "--max-ppl", "1e9"]
    if preset == "web":
        html_corpus(base)
        for name in EXTRA_HTML_MODULES:
            (base / f"{name}.html").write_text(pydoc_page(name), encoding="utf-8")
        return ["--input", str(base / "*.html"), *common, *ppl]
    if preset == "text":
        jsonl_corpus(base)
        return ["--input", str(base / "*"), "--max-bytes", "100000", *common, *ppl]
    code_corpus(base)
    for name in EXTRA_CODE_MODULES:  # one kept document per step: near_dedup made the code preset one step longer
        shutil.copyfile(STDLIB / name, base / name)
    return ["--input", str(base / "*.py"), "--max-bytes", "60000", *common]


def read_rows(out: Path) -> dict[str, dict]:
    return {row["id"]: row for p in sorted(out.glob("data-*.arrow")) for row in dataset.read_shard(str(p)).to_pylist()}


def dead_letters(out: Path) -> dict[str, dict]:
    lines = [line for p in sorted(out.glob("dead_letter/*.jsonl")) for line in p.read_text().splitlines()]
    return {d["id"]: d for d in map(json.loads, lines)}


def summary_dead_letters(stdout: str) -> dict[str, int]:
    """The per-step lines under `dead_letter:` in the printed run summary."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  dead_letter:"))
    steps = {}
    for line in lines[start + 1 :]:
        if not line.startswith("    "):
            break
        step, n = line.strip().split(": ")
        steps[step] = int(n)
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["web", "text", "code"])
def test_a_step_raising_on_chosen_documents_dead_letters_them_at_every_step(
    preset, tmp_path, tokenizer_dir, tiny_model_dir, monkeypatch, capsys
):
    args = preset_run(preset, tmp_path / "raw", tokenizer_dir, tiny_model_dir)
    clean_out = tmp_path / "clean"
    clean = prepare(*args, "--output", clean_out)
    clean_stdout = capsys.readouterr().out
    steps = clean["steps"]
    assert steps[-1] == "tokenize" and ("perplexity" in steps) == (preset != "code")
    # One kept document per step; none whose exact duplicate was rejected (dead, it would let that one in).
    kept = read_rows(clean_out)
    rejected = dataset.read_shard(str(clean_out / "rejected" / dataset.shard_name(0, 3))).to_pylist()
    rejected += [r for i in (1, 2) for r in dataset.read_shard(str(clean_out / "rejected" / dataset.shard_name(i, 3)))
                 .to_pylist()]  # fmt: skip
    duplicated = {dedup_key(r["text"]) for r in rejected if r["reason"] == "duplicate"}
    candidates = sorted(k for k, row in kept.items() if dedup_key(row["text"]) not in duplicated)
    assert len(candidates) >= len(steps), candidates
    chosen = dict(zip(steps, candidates))
    monkeypatch.setenv(faults.ENV_VAR, json.dumps({"raise": {step: [i] for step, i in chosen.items()}}))

    out = tmp_path / "faulted"
    manifest = prepare(*args, "--output", out)
    counts, before = manifest["counts"], clean["counts"]
    assert (
        counts["input"] == before["input"] == counts["kept"] + sum(counts["rejected"].values()) + counts["dead_letter"]
    )
    assert counts["kept"] == before["kept"] - len(steps)
    assert counts["rejected"] == before["rejected"]
    assert counts["dead_letter"] == before["dead_letter"] + len(steps)
    # The summary a user reads: the reader's dead letters as before, and one per step.
    read = summary_dead_letters(clean_stdout).get("read", 0)
    assert summary_dead_letters(capsys.readouterr().out) == dict(
        sorted({**({"read": read} if read else {}), **dict.fromkeys(steps, 1)}.items())
    )
    # Each chosen document is a dead letter naming its step; every other record is as in the clean run.
    dead, clean_dead = dead_letters(out), dead_letters(clean_out)
    assert {k: v for k, v in dead.items() if k not in chosen.values()} == clean_dead
    for step, doc_id in chosen.items():
        assert dead[doc_id]["error"].startswith(f"{step}: "), dead[doc_id]
        assert f"injected fault at step {step} for document {doc_id}" in dead[doc_id]["error"]
    assert read_rows(out) == {k: v for k, v in kept.items() if k not in chosen.values()}
    clean_digests, digests = file_digests(clean_out), file_digests(out)
    touched = {dataset.shard_name(t.shard_index(i, 3), 3) for i in chosen.values()}
    for name, digest in clean_digests.items():
        if name.startswith("rejected/") or Path(name).name not in touched and not name.startswith("dead_letter/"):
            assert digests[name] == digest, name  # byte-identical where no chosen document lives
    # Shards that held a chosen document: the same Arrow table without it.
    for name in touched:
        ids = set(chosen.values())
        table = dataset.read_shard(str(clean_out / name))
        without = table.filter(pa.compute.invert(pa.compute.is_in(table["id"], pa.array(sorted(ids)))))
        assert dataset.read_shard(str(out / name)).equals(without), name
