"""`cpt train` end to end in this process: a tiny LLaMA, real text, every output a run promises."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt.shared.config import load_config
from cpt.trainer import run as train_cli
from cpt.trainer.config import RunConfig, load_run_config
from cpt.trainer.data import eval_sequences
from cpt.trainer.evaluate import evaluate
from cpt.trainer.loop import TrainError, train
from cpt.trainer.schedules import lr_at
from tests.trainer.trainutil import (
    make_datasets,
    one_torch_thread,  # noqa: F401 (autouse fixture)
    run_config,
    write_config,
)

pytestmark = pytest.mark.slow

STEPS, SEQ, PER_STEP = 8, 64, 4  # 4 sequences of 64 tokens per optimizer step


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer_dir):
    return make_datasets(tmp_path_factory.mktemp("data"), tokenizer_dir)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir, data):
    """One run with everything on: KL on replay tokens, EWC, data trace, eval + checkpoint every 2 steps."""
    out = tmp_path_factory.mktemp("run")
    config = run_config(
        tiny_model_dir,
        out,
        data,
        data={"seq_len": SEQ, "trace": True},
        train={"max_steps": STEPS, "micro_batch_size": 2, "grad_accum": 2, "lr": 3.0e-3, "warmup_ratio": 0.25},
        regularization={"kl": {"weight": 0.1, "on": "replay"}, "ewc": {"weight": 1.0, "fisher_samples": 4}},
        eval={"every_steps": 2, "max_sequences": 4},
        checkpoint={"every_steps": 2, "keep_last": 2, "best_metric": "domain_ppl", "max_general_ppl_increase": 0.05},
    )
    cfg = load_config(RunConfig, data=config)
    state = train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, cfg, state, records


def test_keeps_the_last_two_checkpoints_each_complete(finished):
    out, *_ = finished
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    assert not list(out.glob(".tmp-*"))
    files = {p.name for p in (out / "checkpoint-8").iterdir()}
    assert {".metadata", "__0_0.distcp", "config.json", "tokenizer.json", "scheduler.pt"} <= files  # DCP
    assert {"rng_state_rank0.pt", "data_state_rank0.json", "trainer_state.json"} <= files
    state = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    assert (state["step"], state["tokens"], state["world_size"]) == (8, STEPS * PER_STEP * SEQ, 1)


def test_metrics_log_every_step_with_exact_token_counts_and_the_schedule(finished):
    _, cfg, _, records = finished
    assert [r["step"] for r in records] == list(range(STEPS + 1))
    assert set(records[0]) == {"step", "domain_ppl", "general_ppl", "domain_bpb", "general_bpb"}  # step-0 baseline
    assert all(0 < records[0][f"{name}_bpb"] < 20 for name in ("domain", "general"))
    for r in records[1:]:
        assert r["tokens"] == r["step"] * PER_STEP * SEQ
        assert sum(r["tokens_per_source"].values()) == r["tokens"]
        assert r["domain_share"] == r["tokens_per_source"]["domain"] / r["tokens"]
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, lr=3e-3, total_steps=8, warmup_steps=2))
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["tokens_per_s"] > 0
    assert [r["step"] for r in records if "domain_ppl" in r] == [0, 2, 4, 6, 8]


def test_kl_and_ewc_are_zero_before_the_first_update_and_positive_after(finished):
    _, _, _, records = finished
    assert records[1]["kl"] == 0.0 and records[1]["ewc"] == 0.0  # step 1 runs on the initial weights
    assert all(math.isfinite(r["kl"]) and r["ewc"] > 0 for r in records[2:])
    # on: replay -- KL counts only the general source's tokens: zero in a step that drew none of them.
    replay = [r for r in records[2:] if r["step_tokens_per_source"]["general"] > 0]
    domain_only = [r for r in records[2:] if r["step_tokens_per_source"]["general"] == 0]
    assert replay and all(0 < r["kl"] < 10 for r in replay)
    assert all(r["kl"] == 0.0 for r in domain_only)


def test_best_is_the_lowest_domain_ppl_among_evals_within_the_general_constraint(finished):
    out, _, _, records = finished
    baseline = records[0]["general_ppl"]
    allowed = [r for r in records[1:] if "domain_ppl" in r and r["general_ppl"] <= 1.05 * baseline]
    expected = min(allowed, key=lambda r: r["domain_ppl"])
    best = json.loads((out / "best" / "best.json").read_text())["best"]
    assert best["step"] == expected["step"] and best["domain_ppl"] == expected["domain_ppl"]


def test_final_loads_with_from_pretrained_and_reproduces_the_last_eval(finished, data):
    out, cfg, _, records = finished
    model = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    tokenizer = AutoTokenizer.from_pretrained(str(out / "final"))
    sets = {name: eval_sequences(data[f"{name}_val"], tokenizer, SEQ, 4) for name in ("domain", "general")}
    result = evaluate(model, sets, micro_batch_size=2)
    assert result["domain_ppl"] == pytest.approx(records[-1]["domain_ppl"], rel=1e-5)
    assert result["general_ppl"] == pytest.approx(records[-1]["general_ppl"], rel=1e-5)
    assert records[-1]["domain_ppl"] < records[0]["domain_ppl"]  # it learned something


def test_cpt_export_turns_the_last_checkpoint_into_the_final_model(finished, data, tmp_path):
    from cpt.shared.cli import main as cpt

    out, _, _, records = finished
    assert cpt(["export", "--checkpoint", str(out / "checkpoint-8"), "--output", str(tmp_path / "hf")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    final = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    for (name, a), (_, b) in zip(exported.state_dict().items(), final.state_dict().items()):
        assert torch.equal(a, b), name
    bf16 = ["--output", str(tmp_path / "bf16"), "--dtype", "bf16"]
    assert cpt(["export", "--checkpoint", str(out / "checkpoint-8"), *bf16]) == 0
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16")).dtype == torch.bfloat16
    assert cpt(["export", "--checkpoint", str(out), "--output", str(tmp_path / "x")]) == 2  # not a checkpoint


def test_data_trace_has_one_line_per_sequence_in_order(finished):
    out, *_ = finished
    lines = [json.loads(line) for line in (out / "data_trace.jsonl").read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(STEPS * PER_STEP))
    assert all(sum(seg[2] for seg in line["segments"]) == SEQ for line in lines)


def test_report_tensorboard_and_fisher_are_written(finished):
    out, *_ = finished
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "ewc_fisher.safetensors").is_file()


def test_a_second_start_without_resume_is_refused(finished):
    out, cfg, *_ = finished
    with pytest.raises(TrainError, match="already holds checkpoints .* pass --resume"):
        train(cfg)


def test_a_resume_with_another_data_config_is_a_one_line_refusal(finished, tmp_path):
    out, cfg, *_ = finished
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    changed = dataclasses.replace(cfg, output_dir=str(copy), data=dataclasses.replace(cfg.data, seq_len=SEQ // 2))
    with pytest.raises(
        TrainError, match=r"cannot resume from .*checkpoint-\d+: mixture state .*seq_len: state has 64"
    ):
        train(changed, resume=True)


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path, tiny_model_dir, data):
    # lr 1e30: the first update throws the weights to +-1e30, every later loss is NaN.
    config = run_config(
        tiny_model_dir, tmp_path / "out", data, train={"max_steps": 10, "lr": 1e30, "max_nonfinite_in_a_row": 2}
    )
    with pytest.raises(TrainError, match="stopped at step 3: 2 steps in a row had a non-finite loss"):
        train(load_config(RunConfig, data=config))
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped_steps") for r in records[1:]] == [0, 1, 2]


def test_a_config_with_several_mistakes_lists_all_of_them_before_loading_anything(
    tmp_path, tiny_model_dir, data, capsys
):
    from cpt.trainer.bootstrap import train_bpe_tokenizer
    from tests.conftest import stdlib_texts
    from tests.helpers import make_prepared_dataset

    other_tok = tmp_path / "other_tokenizer"
    train_bpe_tokenizer(stdlib_texts(5), other_tok, vocab_size=300)
    foreign = make_prepared_dataset(tmp_path / "foreign", stdlib_texts(4), tokenizer_dir=other_tok)
    config = run_config(
        tiny_model_dir,
        tmp_path / "out",
        data,
        train={"max_steps": 5, "lr_shedule": "cosine", "micro_batch_size": 0},
        eval={"sets": {"domain": str(tmp_path / "missing_val"), "general": data["general_val"]}},
        checkpoint={"best_metric": "code_ppl"},
    )
    config["data"]["sources"][1]["path"] = foreign
    rc = train_cli.main(["--config", str(write_config(tmp_path / "run.yaml", config))])
    err = capsys.readouterr().err
    assert rc == 2
    assert "train.lr_shedule: unknown key (did you mean 'lr_schedule'?)" in err
    assert "train.micro_batch_size: must be a positive integer, got 0" in err
    assert "checkpoint.best_metric: 'code_ppl' names no eval set" in err
    assert f"eval.sets.domain: {tmp_path / 'missing_val'} has no manifest.json" in err
    assert "tokenizer" in err and "foreign" in err  # the shard made with another tokenizer
    assert "problem(s)" in err and not (tmp_path / "out").exists()  # stopped before anything was loaded


def test_max_tokens_sets_the_step_count(tmp_path, tiny_model_dir, data):
    config = run_config(
        tiny_model_dir,
        tmp_path / "out",
        data,
        train={"max_steps": None, "max_tokens": 3 * PER_STEP * SEQ - 10, "lr": 1e-3},
        eval={"every_steps": 100, "max_sequences": 2, "sets": {"general": data["general_val"]}},
        checkpoint={"every_steps": 100, "best_metric": None},
    )
    state = train(load_config(RunConfig, data=config))
    assert (state.step, state.tokens) == (3, 3 * PER_STEP * SEQ)  # ceil: the budget is reached, not cut short
    assert torch.load(tmp_path / "out" / "checkpoint-3" / "scheduler.pt", weights_only=True)["last_epoch"] == 3


def test_the_example_config_uses_only_known_keys(tiny_model_dir, data, tmp_path):
    from pathlib import Path

    import cpt.trainer

    example = Path(cpt.trainer.__file__).parent / "configs" / "example.yaml"
    paths = [
        f"model={tiny_model_dir}",
        f"output_dir={tmp_path}",
        "data.seq_len=512",  # the tiny model's context (a longer seq_len is refused before weights load)
        f"data.sources=[{{name: code, path: {data['domain']}}}, {{name: general, path: {data['general']}}}]",
        f"eval.sets={{domain: {data['domain_val']}, general: {data['general_val']}}}",
    ]
    cfg = load_run_config(example, paths)
    assert (cfg.domain_source, cfg.train.lr_schedule, cfg.data.schedule.end) == ("code", "cosine", 0.9)
    assert cfg.regularization.kl.on == "replay"  # `on:` unquoted is YAML 1.1's True; read back as the key


def test_out_of_memory_is_recognised_and_the_message_names_the_knobs(tiny_model_dir, data, tmp_path):
    from cpt.trainer.loop import is_oom, oom_message

    with pytest.raises(RuntimeError) as caught:
        torch.empty(2**55)  # 128 PiB: the CPU allocator's real out-of-memory error
    assert is_oom(caught.value) and not is_oom(RuntimeError("shape mismatch"))
    cfg = load_config(RunConfig, data=run_config(tiny_model_dir, tmp_path, data))
    message = oom_message(cfg, 12)
    assert message.startswith("out of memory at step 12 (micro_batch_size=2, data.seq_len=64, grad_accum=2,")
    knobs = ("train.micro_batch_size", "train.grad_accum", "train.gradient_checkpointing: true", "train.fsdp: true")
    assert all(knob in message for knob in knobs)


def test_a_url_output_dir_is_refused_because_checkpoints_are_renamed_into_place(tiny_model_dir, data):
    from cpt.shared.config import ConfigError

    config = run_config(tiny_model_dir, "gs://bucket/run", data)
    with pytest.raises(ConfigError, match="output_dir: gs://bucket/run is a URL; checkpoints need a local"):
        load_config(RunConfig, data=config)


def test_a_fresh_run_estimates_its_own_fisher_instead_of_reusing_a_stale_file(tmp_path, tiny_model_dir, data):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "out"
    out.mkdir()
    # Left by an attempt that crashed before its first checkpoint, for other settings.
    stale = {
        name: torch.full_like(p, 123.0)
        for name, p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters()
    }
    save_file(stale, str(out / "ewc_fisher.safetensors"))
    config = run_config(
        tiny_model_dir, out, data, train={"max_steps": 1}, regularization={"ewc": {"weight": 1.0, "fisher_samples": 2}}
    )
    train(load_config(RunConfig, data=config))
    fisher = load_file(str(out / "ewc_fisher.safetensors"))
    assert all(not torch.all(t == 123.0) for t in fisher.values())
