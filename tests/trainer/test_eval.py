"""`cpt eval`: perplexity = exp(token-mean NLL) over fixed sequences, printed and written as JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt.trainer.data import eval_sequences
from cpt.trainer.evaluate import evaluate, main
from tests.conftest import stdlib_texts
from tests.helpers import make_prepared_dataset
from tests.trainer.trainutil import one_torch_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("eval")
    return make_prepared_dataset(root / "code", stdlib_texts(6, max_chars=2000), tokenizer_dir=tokenizer_dir)


def test_perplexity_is_exp_of_the_token_mean_nll(tiny_model_dir, held_out):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    sequences = eval_sequences(held_out, tokenizer, 32, 3)
    result = evaluate(model, {"code": sequences}, micro_batch_size=2)
    with torch.no_grad():  # HF's own loss is the token mean over the same 3 x 31 targets
        loss = model(
            input_ids=sequences["input_ids"], position_ids=sequences["position_ids"], labels=sequences["input_ids"]
        ).loss
    assert result == {"code_ppl": pytest.approx(math.exp(float(loss)), rel=1e-5)}
    assert evaluate(model, {"code": sequences}, micro_batch_size=3) == pytest.approx(result, rel=1e-6)  # batching


def test_cli_prints_and_writes_json(tiny_model_dir, held_out, tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["--model", str(tiny_model_dir), "--data", f"code={held_out}", "--data", f"again={held_out}"]
    assert main(argv + ["--seq-len", "32", "--max-sequences", "3", "--output", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["code_ppl"] == payload["again_ppl"] > 1
    assert payload["sets"]["code"] == {"path": held_out, "sequences": 3}
    assert f"code             ppl {payload['code_ppl']:.4f}  (3 sequences)" in capsys.readouterr().out


def test_cli_names_a_malformed_data_argument(tiny_model_dir, capsys):
    assert main(["--model", str(tiny_model_dir), "--data", "just_a_path"]) == 2
    assert "--data 'just_a_path': expected NAME=DIR" in capsys.readouterr().err


def test_cli_refuses_a_folder_that_is_not_a_model(tmp_path, held_out, capsys):
    assert main(["--model", str(tmp_path), "--data", f"code={held_out}"]) == 2
    assert "is not a Hugging Face model folder (no config.json)" in capsys.readouterr().err
