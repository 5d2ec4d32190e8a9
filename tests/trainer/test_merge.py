"""`cpt merge`: linear interpolation with the base, streamed from safetensors, and its refusals."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from cpt.trainer import evaluate, merge
from tests.conftest import stdlib_texts
from tests.helpers import make_prepared_dataset
from tests.trainer.trainutil import one_torch_thread  # noqa: F401 (autouse fixture)


def save_nudged(source, out, seed=1, scale=0.05, dtype=torch.float32, **save_kwargs):
    """A copy of the model in `source` with every weight moved a little (a stand-in for CPT), saved to `out`."""
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(str(out), **save_kwargs)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    return model


def state(folder):
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).state_dict()


@pytest.fixture(scope="module")
def trained_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    save_nudged(tiny_model_dir, out)
    return out


def test_alpha_one_half_gives_the_mean_of_the_two_models(tiny_model_dir, trained_dir, tmp_path):
    folders = merge.merge(tiny_model_dir, trained_dir, [0.0, 0.5, 1.0], tmp_path / "merged")
    assert [f.name for f in folders] == ["alpha-0.00", "alpha-0.50", "alpha-1.00"]
    base, trained, half = state(tiny_model_dir), state(trained_dir), state(folders[1])
    assert set(half) == set(base)
    for name in base:
        torch.testing.assert_close(half[name], (base[name] + trained[name]) / 2, rtol=0, atol=1e-7)
    for name, value in state(folders[0]).items():  # the end points are the inputs themselves
        torch.testing.assert_close(value, base[name], rtol=0, atol=0)
    for name, value in state(folders[2]).items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0)
    info = json.loads((folders[1] / "merge.json").read_text())
    assert info["alpha"] == 0.5 and info["method"] == "linear"
    assert (folders[1] / "tokenizer.json").is_file() and (folders[1] / "config.json").is_file()


def test_tied_embeddings_stay_tied_and_untied_tensors_are_not_written_twice(tiny_model_dir, trained_dir, tmp_path):
    (folder,) = merge.merge(tiny_model_dir, trained_dir, [0.3], tmp_path)
    with safe_open(str(folder / merge.SINGLE), framework="pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names  # tie_word_embeddings: HF re-ties the head on load
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_sharded_bf16_inputs_keep_their_shards_and_dtype(tiny_model_dir, tmp_path):
    base = tmp_path / "base"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)
    model.save_pretrained(str(base), max_shard_size="40KB")
    shutil.copy2(tiny_model_dir / "tokenizer.json", base / "tokenizer.json")
    trained = tmp_path / "trained"
    save_nudged(base, trained, dtype=torch.bfloat16, max_shard_size="40KB")
    index = json.loads((trained / merge.INDEX).read_text())["weight_map"]
    assert len(set(index.values())) > 1, "the test needs a sharded checkpoint"
    (folder,) = merge.merge(base, trained, [0.5], tmp_path / "out")
    assert json.loads((folder / merge.INDEX).read_text())["weight_map"] == index
    a, b = state(base), state(trained)
    merged = AutoModelForCausalLM.from_pretrained(str(folder))
    assert merged.dtype == torch.bfloat16
    for name, value in merged.state_dict().items():
        # Combined in fp32, rounded once to bf16.
        expected = ((a[name] + b[name]) / 2).to(torch.bfloat16)
        torch.testing.assert_close(value, expected, rtol=0, atol=0)


def test_a_model_of_another_architecture_is_refused_with_the_differences(tiny_model_dir, tokenizer_dir, tmp_path):
    from cpt.trainer.bootstrap import init_llama

    wider = tmp_path / "wider"
    init_llama(tokenizer_dir, wider, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=512)
    with pytest.raises(merge.MergeError) as err:
        merge.merge(tiny_model_dir, wider, [0.5], tmp_path / "out")
    text = str(err.value)
    assert "hidden_size: base 64 != model 32" in text and "shape" in text
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_model_with_another_tokenizer_is_refused(tiny_model_dir, trained_dir, tmp_path):
    from cpt.trainer.bootstrap import train_bpe_tokenizer

    other = tmp_path / "other"
    shutil.copytree(trained_dir, other)
    train_bpe_tokenizer(stdlib_texts(80)[40:], tmp_path / "tok", vocab_size=1024)
    shutil.copy2(tmp_path / "tok" / "tokenizer.json", other / "tokenizer.json")
    with pytest.raises(merge.MergeError, match="tokenizers .* differ"):
        merge.merge(tiny_model_dir, other, [0.5], tmp_path / "out")


def test_pickled_weights_are_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy2(tiny_model_dir / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(merge.MergeError, match="never unpickles"):
        merge.merge(tiny_model_dir, folder, [0.5], tmp_path / "out")


def test_cpt_merge_then_cpt_eval_on_the_merged_folder(tiny_model_dir, trained_dir, tokenizer_dir, tmp_path, capsys):
    assert merge.main(["--base", str(tiny_model_dir), "--model", str(trained_dir), "--alpha", "0.5",
                       "--alpha", "0.75", "--output", str(tmp_path / "m")]) == 0  # fmt: skip
    assert "alpha 0.75 -> " in capsys.readouterr().out
    data = make_prepared_dataset(tmp_path / "val", stdlib_texts(60)[50:], tokenizer_dir=tokenizer_dir)
    results = {}
    for name in ("alpha-0.50", "alpha-0.75"):
        out = tmp_path / f"{name}.json"
        args = ["--model", str(tmp_path / "m" / name), "--data", f"domain={data}", "--seq-len", "64"]
        assert evaluate.main([*args, "--max-sequences", "4", "--output", str(out)]) == 0
        results[name] = json.loads(out.read_text())["domain_ppl"]
    assert all(1.0 < v < 1e6 for v in results.values()) and results["alpha-0.50"] != results["alpha-0.75"]
    assert merge.main(["--base", str(tiny_model_dir), "--model", str(tmp_path / "nowhere"), "--alpha", "0.5",
                       "--output", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "not a Hugging Face model folder" in capsys.readouterr().err


def test_float8_and_unsigned_tensors_are_merged_or_copied_in_their_own_dtype(tiny_model_dir, tmp_path):
    """Quantised checkpoints carry F8 weights and U16/U32 buffers; the shared writer stores each in its dtype."""
    from safetensors.torch import save_file

    extra = {
        "extra.f8": torch.tensor([0.5, -1.0, 2.0, 0.25]),
        "extra.u16": torch.tensor([1, 2, 65535], dtype=torch.uint16),
    }
    u32 = {"base": torch.tensor([7, 3_000_000_000], dtype=torch.uint32), "model": torch.tensor([8, 3_000_000_001])}
    folders = {}
    for name, scale in (("base", 1.0), ("model", 2.0)):
        folder = tmp_path / name
        shutil.copytree(tiny_model_dir, folder)
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        tensors["extra.f8"] = (extra["extra.f8"] * scale).to(torch.float8_e4m3fn)
        tensors["extra.u16"] = extra["extra.u16"]
        tensors["extra.u32"] = u32[name].to(torch.uint32)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        folders[name] = folder
    (out,) = merge.merge(folders["base"], folders["model"], [0.5], tmp_path / "merged")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        f8, u16, u32 = f.get_tensor("extra.f8"), f.get_tensor("extra.u16"), f.get_tensor("extra.u32")
    assert f8.dtype == torch.float8_e4m3fn and u16.dtype == torch.uint16 and u32.dtype == torch.uint32
    assert f8.float().tolist() == [0.75, -1.5, 3.0, 0.375]  # floats are interpolated (exact in e4m3 here)
    assert u16.tolist() == [1, 2, 65535]  # integers are the model's own
    assert u32.tolist() == [8, 3_000_000_001]


def test_ties_keeps_the_largest_quarter_of_each_task_vector_and_density_one_is_linear(
    tiny_model_dir, trained_dir, tmp_path
):
    (ties,) = merge.merge(tiny_model_dir, trained_dir, [0.5], tmp_path / "ties", method="ties", density=0.25)
    (whole,) = merge.merge(tiny_model_dir, trained_dir, [0.5], tmp_path / "whole", method="ties", density=1.0)
    (linear,) = merge.merge(tiny_model_dir, trained_dir, [0.5], tmp_path / "linear")
    base, trained, got = state(tiny_model_dir), state(trained_dir), state(ties)
    for name, value in state(whole).items():
        torch.testing.assert_close(value, state(linear)[name], rtol=0, atol=1e-7)
    for name in base:
        delta = (trained[name] - base[name]).flatten()
        kept = torch.zeros_like(delta, dtype=torch.bool)
        kept[delta.abs().topk(math.ceil(0.25 * delta.numel())).indices] = True
        expected = torch.where(kept, base[name].flatten() + 0.5 * delta, base[name].flatten())
        torch.testing.assert_close(got[name].flatten(), expected, rtol=0, atol=1e-6, msg=name)
    info = json.loads((ties / "merge.json").read_text())
    assert (info["method"], info["density"]) == ("ties", 0.25)
    with pytest.raises(merge.MergeError, match="--density"):
        merge.merge(tiny_model_dir, trained_dir, [0.5], tmp_path / "bad", method="ties", density=0.0)
