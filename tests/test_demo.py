"""The demo: corpus collection, held-out splitting, stage reuse, tables, and a smoke run of every stage."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

from cpt.shared import report
from cpt.shared.corpus import (
    CorpusConfig,
    code_files,
    collect,
    content_key,
    input_patterns,
    split_key,
    split_of,
    stdlib_root,
)
from cpt.shared.demo import Stages
from cpt.shared.experiment import (
    VARIANTS,
    bpb_table,
    comparison,
    result_row,
    variant_regularization,
    variant_sources,
)
from tests.helpers import make_prepared_dataset

TINY = CorpusConfig(code_files=12, html_pages=6, readmes=3, topics=3, val_fraction=0.25)


def test_split_is_a_stable_hash_of_the_name():
    assert split_of("code/json.decoder.py", 0.1) == split_of("code/json.decoder.py", 0.1)
    names = [f"doc-{i}" for i in range(2000)]
    held_out = sum(split_of(n, 0.1) == "val" for n in names)
    assert 150 < held_out < 250  # ~10%, not an exact count: it is a hash, not a shuffle
    # A larger fraction only moves documents from train to val, never the other way round.
    assert all(split_of(n, 0.3) == "val" for n in names if split_of(n, 0.1) == "val")


def test_a_module_source_and_its_pydoc_page_fall_on_the_same_side():
    # The page quotes the module's docstrings: splitting them apart would leak held-out text.
    assert split_key("code", "json.decoder.py") == split_key("general", "json") == "module/json"
    assert split_key("code", "abc.py") == split_key("general", "abc")
    assert split_key("general", "topic/assert") == "general/topic/assert"


def test_content_key_ignores_whitespace_only_differences():
    assert content_key("def f():\n    return 1\n") == content_key("def f():  return 1")
    assert content_key("return 1") != content_key("return 2")


def test_code_files_skip_tests_and_generated_config():
    names = [name for name, _ in code_files(stdlib_root(), CorpusConfig(code_files=10_000))]
    assert "json.decoder.py" in names
    assert not [n for n in names if n.startswith(("test.", "idlelib.", "_sysconfigdata"))]
    assert not [n for n in names if ".tests." in n or ".test." in n]


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("raw")
    return out, collect(out, TINY)


def test_collect_writes_each_document_to_exactly_one_split(tiny_corpus):
    out, counts = tiny_corpus
    code = {split: sorted(p.name for p in (out / "code" / split).glob("*.py")) for split in ("train", "val")}
    assert len(code["train"]) + len(code["val"]) == TINY.code_files
    assert not set(code["train"]) & set(code["val"])
    assert counts["code"]["train"]["docs"] == len(code["train"])
    for split, names in code.items():
        assert all(split_of(split_key("code", n), TINY.val_fraction) == split for n in names)
    keys = [content_key(p.read_text()) for p in (out / "code").rglob("*.py")]
    assert len(keys) == len(set(keys))


def test_collect_writes_pydoc_html_and_docs_jsonl(tiny_corpus):
    out, counts = tiny_corpus
    pages = sorted((out / "general").rglob("*.html"))
    assert len(pages) == TINY.html_pages
    assert pages[0].read_text().lstrip().lower().startswith("<!doctype html>")
    records = [json.loads(line) for p in (out / "general").rglob("docs.jsonl") for line in p.read_text().splitlines()]
    ids = sorted(r["id"] for r in records)
    assert len([i for i in ids if i.startswith("topic/")]) == TINY.topics
    assert len([i for i in ids if i.startswith("readme/")]) == TINY.readmes
    assert all(len(r["text"]) >= TINY.min_chars for r in records)
    general_docs = counts["general"]["train"]["docs"] + counts["general"]["val"]["docs"]
    assert general_docs == TINY.html_pages + TINY.topics + TINY.readmes


def test_input_patterns_name_one_glob_per_format(tmp_path):
    assert input_patterns(tmp_path, "code", "val") == [str(tmp_path / "code" / "val" / "*.py")]
    assert input_patterns(tmp_path, "general", "train") == [
        str(tmp_path / "general" / "train" / "*.html"),
        str(tmp_path / "general" / "train" / "*.jsonl"),
    ]


def test_corpus_config_lists_every_problem():
    cfg = CorpusConfig(val_fraction=1.5, code_files=-1, min_chars=10, max_chars=5)
    assert cfg.problems() == [
        "corpus.val_fraction must be in (0, 1), got 1.5",
        "corpus.code_files must be >= 0, got -1",
        "corpus.min_chars (10) must be below corpus.max_chars (5)",
    ]


def test_stages_are_reused_until_forced_or_changed(tmp_path, capsys):
    calls = []

    def run(force=False, setting=1):
        stages = Stages(tmp_path, force)
        stages.run("first", {"a": setting}, lambda: calls.append("first"))
        stages.run("second", {"b": 2}, lambda: calls.append("second"))

    run()
    run()
    assert calls == ["first", "second"]
    run(force=True)
    assert calls == ["first", "second"] * 2
    run(setting=2)  # a changed early stage redoes everything after it
    assert calls == ["first", "second"] * 3
    assert "first: done before, reused" in capsys.readouterr().out


def test_a_stage_whose_output_is_gone_is_redone(tmp_path):
    out = tmp_path / "out.txt"
    calls = []

    def work():
        calls.append("run")
        out.write_text("x")

    for _ in range(2):
        Stages(tmp_path, force=False).run("make-out", {}, work, (out,))
    assert calls == ["run"]
    out.unlink()
    Stages(tmp_path, force=False).run("make-out", {}, work, (out,))
    assert calls == ["run", "run"]


def test_a_stage_that_fails_leaves_no_marker(tmp_path):
    stages = Stages(tmp_path, force=False)
    with pytest.raises(ZeroDivisionError):
        stages.run("broken", {}, lambda: 1 / 0)
    assert not stages.marker("broken").exists()


def test_stage_command_streams_output_to_a_log(tmp_path, capsys):
    from cpt.shared.demo import StageError

    stages = Stages(tmp_path, force=False)
    stages.command("hello", [sys.executable, "-c", "print('from the child')"])
    assert "from the child" in capsys.readouterr().out
    assert (tmp_path / "logs" / "hello.log").read_text() == "from the child\n"
    with pytest.raises(StageError, match=r"(?s)stage .bad. failed \(exit 3\).*logs/bad.log"):
        stages.command("bad", [sys.executable, "-c", "raise SystemExit(3)"])


def test_before_after_table_is_exact():
    table = report.before_after_table(
        {"domain": 400.0, "general": 50.0}, {"domain": 100.0, "general": 55.0}, {"domain": "code", "general": "web"}
    )
    assert table.splitlines() == [
        "| held-out set | ppl before |   | ppl after | change |",
        "|--------------|-----------:|--:|----------:|-------:|",
        "| code         |     400.00 | → |    100.00 | -75.0% |",
        "| web          |      50.00 | → |     55.00 | +10.0% |",
    ]


def test_read_eval_takes_the_ppl_keys_of_cpt_eval_output(tmp_path):
    path = tmp_path / "eval.json"
    payload = {"model": "m", "seq_len": 64, "sets": {}, "domain_ppl": 12.5, "general_ppl": 3.0, "domain_bpb": 1.25}
    path.write_text(json.dumps({**payload, "general_bpb": None}))
    assert report.read_eval(path) == {"domain": 12.5, "general": 3.0}
    bpb = report.read_eval(path, "bpb")
    assert bpb["domain"] == 1.25 and math.isnan(bpb["general"])  # null: bytes unknown


def test_before_after_table_of_bits_per_byte():
    table = report.before_after_table({"domain": 2.0}, {"domain": 1.5}, {"domain": "code"}, "bpb")
    assert table.splitlines()[0] == "| held-out set | bpb before |   | bpb after | change |"
    assert table.splitlines()[2] == "| code         |      2.000 | → |     1.500 | -25.0% |"


def test_variants_share_one_token_budget_and_differ_in_mix():
    paths = {"code-train": "C", "general-train": "G"}
    mixes = {v.name: variant_sources(v, paths) for v in VARIANTS}
    assert mixes["domain-only"] == ([{"name": "code", "path": "C", "weight": 1.0}], None)
    assert mixes["replay-5"][0] == [
        {"name": "code", "path": "C", "weight": 0.95},
        {"name": "general", "path": "G", "weight": 0.05},
    ]
    assert mixes["curriculum"][1] == {"type": "linear", "source": "code", "start": 0.5, "end": 0.9}
    regs = {v.name: variant_regularization(v) for v in VARIANTS}
    assert regs["kl"] == {"kl": {"weight": 1.0, "on": "all"}}
    assert regs["ewc"] == {"ewc": {"weight": 10.0, "source": "general_train"}}
    assert regs["domain-only"] is None


def test_result_row_and_comparison_follow_the_numbers():
    base = {"domain": 200.0, "general": 40.0}
    rows = [
        result_row("domain-only", base, {"domain": 50.0, "general": 60.0}),
        result_row("replay-5", base, {"domain": 55.0, "general": 44.0}),
    ]
    assert rows[0] == {
        "variant": "domain-only",
        "domain_ppl": 50.0,
        "general_ppl": 60.0,
        "forgetting_pct": 50.0,
        "domain_gain_pct": 75.0,
    }
    text = "\n".join(comparison(rows))
    assert "Gururangan et al. 2020** (adaptive pre-training lowers the domain's held-out loss): agrees" in text
    assert "replay-5 removed 80% of that increase (most of it)" in text
    assert "On the small-replay claim this run agrees." in text
    rows[1] = result_row("replay-5", base, {"domain": 55.0, "general": 58.0})
    assert "On the small-replay claim this run disagrees." in "\n".join(comparison(rows))


def test_bootstrap_reads_files_jsonl_and_prepared_datasets(tmp_path):
    from cpt.trainer.bootstrap import read_texts

    (tmp_path / "a.txt").write_text("alpha beta")
    (tmp_path / "b.jsonl").write_text('{"text": "gamma"}\n\n{"text": "delta"}\n')
    ds = make_prepared_dataset(tmp_path / "ds", ["epsilon zeta", "eta theta"], num_shards=1)
    texts = list(read_texts([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), ds]))
    assert texts == ["alpha beta", "gamma", "delta", "epsilon zeta", "eta theta"]
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no string `text` field"):
        list(read_texts([str(tmp_path / "bad.jsonl")]))


def test_bootstrap_cli_makes_a_tokenizer_and_a_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.trainer.bootstrap import main

    source = stdlib_root() / "json" / "decoder.py"
    assert main(["tokenizer", "--input", str(source), "--out", str(tmp_path / "tok"), "--vocab-size", "300"]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(tok) == 300
    args = ["model", "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "m"), "--hidden", "32"]
    assert main([*args, "--layers", "1", "--heads", "2"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size) == (32, 1, 300)
    assert main([*args, "--heads", "3"]) == 2  # 32 is not divisible by 3


@pytest.mark.slow
def test_small_demo_runs_every_stage_and_lowers_domain_perplexity(tmp_path):
    from cpt.shared.demo import main

    workdir = tmp_path / "demo"
    assert main(["--workdir", str(workdir), "--small"]) == 0
    stages = sorted(p.stem for p in (workdir / "stages").glob("*.done"))
    assert stages == sorted(
        [
            "collect",
            "prepare-code-train",
            "prepare-code-val",
            "prepare-general-train",
            "prepare-general-val",
            "tokenizer",
            "init",
            "pretrain-base",
            "eval-before",
            "cpt",
            "eval-after",
        ]
    )
    for name in ("code-train", "code-val", "general-train", "general-val"):
        manifest = json.loads((workdir / "data" / name / "manifest.json").read_text())
        assert manifest["counts"]["kept"] > 0
        held_out = [str(workdir / "data" / name.replace("train", "val"))] if name.endswith("train") else []
        assert manifest["config"]["decontaminate"]["datasets"] == held_out
    for run in ("base", "cpt"):
        assert (workdir / "runs" / run / "final" / "config.json").is_file()
        assert (workdir / "runs" / run / "metrics.jsonl").stat().st_size > 0
    state = json.loads((workdir / "demo.json").read_text())
    assert state["after"]["domain"] < state["before"]["domain"]
    assert (workdir / "report.png").stat().st_size > 10_000
    assert "| domain (stdlib code)" in (workdir / "REPORT.md").read_text()
    assert state["after_bpb"]["domain"] < state["before_bpb"]["domain"]
    assert "Bits per byte (comparable across tokenizers):" in (workdir / "REPORT.md").read_text()


def test_contamination_lines_count_the_rejects_of_each_decontaminated_set(tmp_path):
    from cpt.shared.demo import contamination_lines

    def manifest(name: str, held_out: list[str], rejected: dict) -> str:
        (tmp_path / name).mkdir()
        payload = {"config": {"decontaminate": {"datasets": held_out}}, "counts": {"kept": 7, "rejected": rejected}}
        (tmp_path / name / "manifest.json").write_text(json.dumps(payload))
        return str(tmp_path / name)

    paths = {
        "code-train": manifest("code-train", [str(tmp_path / "code-val")], {"contaminated": 3, "duplicate": 1}),
        "code-val": manifest("code-val", [], {}),
        "general-train": manifest("general-train", [str(tmp_path / "general-val")], {}),
    }
    assert contamination_lines(paths) == [
        "  held-out check: code-train: 3 documents overlapped code-val and were removed; 7 kept",
        "  held-out check: general-train: 0 documents overlapped general-val and were removed; 7 kept",
    ]


def test_sigterm_stops_the_running_stage(tmp_path):
    import signal
    import subprocess

    script = (
        "import sys\nfrom pathlib import Path\nfrom cpt.shared.demo import exit_on_sigterm, stream\n"
        "exit_on_sigterm()\n"
        "stream([sys.executable, '-c', 'import os, time; print(os.getpid(), flush=True); time.sleep(60)'],"
        f" Path({str(tmp_path / 'stage.log')!r}))\n"
    )
    demo = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert demo.stdout.readline().startswith("$ ")
    stage_pid = int(demo.stdout.readline())
    demo.send_signal(signal.SIGTERM)
    assert demo.wait(timeout=20) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):
        os.kill(stage_pid, 0)  # killed and reaped, not orphaned


def test_lora_anneal_and_merge_variants_configure_runs_and_are_compared_with_the_papers():
    from cpt.shared.experiment import MERGE_ALPHAS, merge_command, variant_overrides

    by = {v.name: v for v in VARIANTS}
    paths = {"code-train": "C", "general-train": "G"}

    def config():
        return {"train": {"lr": 1e-3, "lr_schedule": "cosine"}, "data": {"sources": [{"name": "code", "path": "C"}]}}

    lora = variant_overrides(by["lora"], config(), paths)
    assert lora["train"]["peft"]["method"] == "lora" and lora["train"]["lr"] == pytest.approx(1e-2)
    anneal = variant_overrides(by["anneal"], config(), paths)
    assert anneal["train"]["lr_schedule"] == "wsd"
    assert anneal["data"]["anneal"]["start"] == "decay"
    assert {s["name"] for s in anneal["data"]["anneal"]["sources"]} == {"code", "general"}
    cmd = merge_command("BASE", Path("RUN/final"), Path("OUT"))
    assert cmd[3:] == ["merge", "--base", "BASE", "--model", "RUN/final", "--output", "OUT"] + [
        x for a in MERGE_ALPHAS for x in ("--alpha", str(a))
    ]

    base = {"domain": 200.0, "general": 40.0}
    rows = [
        result_row("domain-only", base, {"domain": 50.0, "general": 60.0}),  # gain 75%, forgetting 50%
        result_row("lora", base, {"domain": 100.0, "general": 44.0}),  # gain 50%, forgetting 10%
        result_row("merge-0.50", base, {"domain": 80.0, "general": 44.0}),  # gain 60%, forgetting 10%
        result_row("ties-0.20", base, {"domain": 80.0, "general": 44.0}),
    ]
    text = "\n".join(comparison(rows))
    assert "ties-0.20 (TIES' trim" in text and "removed 80% of the forgetting and kept 80% of the domain gain" in text
    ties = merge_command("BASE", Path("RUN/final"), Path("OUT"), ties=True)
    assert ties[-6:] == ["--method", "ties", "--density", "0.2", "--alpha", "1.0"]
    assert "Biderman et al. 2024** (LoRA learns less and forgets less than full CPT): agrees" in text
    assert "Alexandrov et al. 2024** (merging" in text
    assert "): agrees. merge-0.50 removed 80% of the forgetting" in text
    rows[1] = result_row("lora", base, {"domain": 40.0, "general": 44.0})  # learns more: disagrees
    assert "than full CPT): disagrees" in "\n".join(comparison(rows))


def test_experiment_bpb_table_lists_the_base_and_every_variant():
    table = bpb_table({"domain": 2.5, "general": 1.25}, {"replay-5": {"domain": 2.0, "general": 1.3}})
    assert table.splitlines() == [
        "| variant           | domain bpb | general bpb |",
        "|-------------------|-----------:|------------:|",
        "| base (before CPT) |      2.500 |       1.250 |",
        "| replay-5          |      2.000 |       1.300 |",
    ]
    assert bpb_table({}, {"replay-5": {"domain": 2.0, "general": 1.3}}) is None  # a demo run before bpb existed
