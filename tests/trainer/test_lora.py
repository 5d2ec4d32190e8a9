"""LoRA CPT through peft: few trainable parameters, the base as KL reference, merged final/, exact resume."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from cpt.shared.config import ConfigError, load_config
from cpt.trainer import adapters
from cpt.trainer.config import RunConfig, load_run_config
from cpt.trainer.data import eval_sequences
from cpt.trainer.evaluate import evaluate
from cpt.trainer.loop import train
from cpt.trainer.objectives import CausalLMObjective
from tests.trainer.test_train_resume import kill_after_first_checkpoint
from tests.trainer.trainutil import (
    make_datasets,
    one_torch_thread,  # noqa: F401 (autouse fixture)
    run_config,
    write_config,
)

LORA = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def lora_model(model_dir, **overrides):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return adapters.wrap(model, adapters.PeftConfig(**{**LORA, **overrides}))


def nudge_trainable(model, scale=0.05, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def test_lora_trains_under_five_percent_and_the_merged_weights_match_peft_s_own_merge(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    assert 0 < adapters.trainable_fraction(model) < 0.05
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    nudge_trainable(model)
    merged = adapters.merged_state_dict(model)
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(merged) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value, rtol=0, atol=1e-6)


def test_train_embeddings_adds_full_embeddings_at_their_own_learning_rate(tiny_model_dir):
    from cpt.trainer.config import TrainConfig

    model = lora_model(tiny_model_dir, train_embeddings=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("embed_tokens.modules_to_save" in n for n in trainable)
    train_cfg = TrainConfig(max_steps=1, lr=1e-3, peft=adapters.PeftConfig(**LORA, train_embeddings=True))
    groups = adapters.param_groups(model, train_cfg)
    rates = sorted({g["lr"] for g in groups})
    assert rates == pytest.approx([1e-4, 1e-3])
    assert sum(len(g["params"]) for g in groups) == len({id(p) for p in model.parameters() if p.requires_grad})


def test_the_base_reference_is_the_model_with_adapters_off(tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model = lora_model(tiny_model_dir)
    nudge_trainable(model)
    ids = torch.arange(3, 43).view(1, 40)
    pos = torch.arange(40).view(1, 40)
    _, kl_shared = CausalLMObjective(model, base_reference=True, chunk_size=16)(ids, pos, ids, with_kl=True)
    _, kl_copy = CausalLMObjective(model, base, chunk_size=16)(ids, pos, ids, with_kl=True)
    assert float(kl_shared.detach().mean()) > 1e-6
    torch.testing.assert_close(kl_shared, kl_copy, rtol=1e-5, atol=1e-7)


def test_peft_with_fsdp_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="peft: LoRA runs on one process or under DDP"):
        load_config(RunConfig, data={"model": str(tiny_model_dir), "output_dir": str(tmp_path),
                                     "train": {"max_steps": 1, "fsdp": True, "peft": LORA}})  # fmt: skip


def lora_config(model_dir, out, datasets):
    return run_config(
        model_dir,
        out,
        datasets,
        train={"max_steps": 8, "lr": 5e-3, "warmup_ratio": 0.1, "peft": LORA},
        regularization={"kl": {"weight": 0.1, "on": "all"}, "ewc": {"weight": 1.0, "fisher_samples": 2}},
        eval={"every_steps": 4, "max_sequences": 2},
        checkpoint={"every_steps": 4, "keep_last": 2},
    )


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_lora_run_final_model_adapter_and_kill_9_resume(tmp_path, tiny_model_dir, tokenizer_dir):
    from peft import PeftModel
    from transformers import AutoTokenizer

    datasets = make_datasets(tmp_path / "data", tokenizer_dir)
    straight = tmp_path / "straight"
    train(load_config(RunConfig, data=lora_config(tiny_model_dir, straight, datasets)))
    logged = records(straight)
    assert logged[-1]["kl"] > 0 and logged[-1]["ewc"] > 0
    assert logged[-1]["domain_ppl"] != logged[0]["domain_ppl"]  # the adapters learned something

    # final/ is a plain HF model (merged): it loads without peft and gives the last logged eval.
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    sets = {name: eval_sequences(datasets[f"{name}_val"], tokenizer, 64, 2) for name in ("domain", "general")}
    final = AutoModelForCausalLM.from_pretrained(str(straight / "final"), dtype=torch.float32)
    got = evaluate(final, sets, micro_batch_size=2)
    for key in ("domain_ppl", "general_ppl"):
        assert got[key] == pytest.approx(logged[-1][key], rel=1e-5)
    # final-adapter/ is the peft adapter on top of the base.
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, str(straight / adapters.ADAPTER))
    assert evaluate(with_adapter, sets, micro_batch_size=2)["domain_ppl"] == pytest.approx(got["domain_ppl"], rel=1e-5)
    # A checkpoint holds the trainable tensors only (no frozen base weights).
    metadata = (straight / "checkpoint-8" / ".metadata").read_bytes()
    assert b"lora_A" in metadata and b"mlp.up_proj.weight" not in metadata

    out = tmp_path / "killed"
    config_path = write_config(tmp_path / "killed.yaml", lora_config(tiny_model_dir, out, datasets))
    kill_after_first_checkpoint(config_path, out)
    assert not (out / "final").exists()
    state = train(load_run_config(config_path), resume=True)
    assert state.step == 8
    for a, b in zip(logged, records(out), strict=True):
        for key in ("loss", "kl", "ewc", "grad_norm", "domain_ppl", "general_ppl"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)


@pytest.mark.slow
def test_lora_under_ddp_matches_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir, tokenizer_dir):
    import subprocess
    import sys

    from tests.trainer.trainutil import SUBPROCESS_ENV

    datasets = make_datasets(tmp_path / "data", tokenizer_dir)
    single = tmp_path / "single"
    common = {
        "regularization": {"kl": {"weight": 0.1, "on": "all"}},
        "eval": {"every_steps": 3, "max_sequences": 2},
        "checkpoint": {"every_steps": 3, "keep_last": 1},
    }
    lora_train = {"max_steps": 4, "lr": 5e-3, "peft": LORA}
    train(load_config(RunConfig, data=run_config(tiny_model_dir, single, datasets, train=lora_train, **common)))
    out = tmp_path / "ddp"
    ddp_train = {**lora_train, "micro_batch_size": 1}  # 2 ranks x 1 sequence x 2 accumulation
    config = write_config(tmp_path / "ddp.yaml", run_config(tiny_model_dir, out, datasets, train=ddp_train, **common))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, "-m", "cpt.trainer", "--config", str(config)],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for a, b in zip(records(single), records(out), strict=True):
        for key in ("loss", "kl", "domain_ppl", "general_ppl"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-4), (a["step"], key)
    assert (out / "final" / "config.json").is_file() and (out / adapters.ADAPTER / "adapter_config.json").is_file()
