"""`cpt eval`: perplexity = exp(token-mean NLL) over fixed sequences, printed and written as JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt.trainer.bootstrap import init_llama, train_bpe_tokenizer
from cpt.trainer.data import eval_sequences
from cpt.trainer.evaluate import evaluate, main
from tests.conftest import stdlib_texts
from tests.helpers import make_prepared_dataset, save_bos_tokenizer
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
    assert result["code_ppl"] == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert evaluate(model, {"code": sequences}, micro_batch_size=3) == pytest.approx(result, rel=1e-6)  # batching


def test_cli_prints_and_writes_json(tiny_model_dir, held_out, tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["--model", str(tiny_model_dir), "--data", f"code={held_out}", "--data", f"again={held_out}"]
    assert main(argv + ["--seq-len", "32", "--max-sequences", "3", "--output", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["code_ppl"] == payload["again_ppl"] > 1
    assert payload["sets"]["code"] == {"path": held_out, "sequences": 3}
    assert 0 < payload["code_bpb"] == payload["again_bpb"] < 20
    line = f"code             ppl {payload['code_ppl']:.4f}  bpb {payload['code_bpb']:.4f}  (3 sequences)"
    assert line in capsys.readouterr().out


def test_cli_names_a_malformed_data_argument(tiny_model_dir, capsys):
    assert main(["--model", str(tiny_model_dir), "--data", "just_a_path"]) == 2
    assert "--data 'just_a_path': expected NAME=DIR" in capsys.readouterr().err


def test_cli_refuses_a_folder_that_is_not_a_model(tmp_path, held_out, capsys):
    assert main(["--model", str(tmp_path), "--data", f"code={held_out}"]) == 2
    assert "is not a Hugging Face model folder (no config.json)" in capsys.readouterr().err


def non_ascii_passages() -> list[str]:
    """Two passages of standard-library source around non-ASCII characters (multi-byte in UTF-8)."""
    passages = []
    for text in stdlib_texts(200, max_chars=2000):
        at = next((i for i, c in enumerate(text) if ord(c) > 127), None)
        if at is not None:
            passages.append(text[max(0, at - 120) : at + 60])
        if len(passages) == 2:
            return passages
    raise AssertionError("the standard library should hold two sources with non-ASCII characters")


def test_bits_per_byte_matches_a_hand_computation(tiny_model_dir, tokenizer_dir, tmp_path):
    passages = non_ascii_passages()
    bos_dir = save_bos_tokenizer(tokenizer_dir, tmp_path / "bos_tokenizer")  # BOS covers no bytes: exact sums
    tokenizer = AutoTokenizer.from_pretrained(str(bos_dir))
    path = make_prepared_dataset(tmp_path / "set", passages, num_shards=1)
    docs = [[1] + tokenizer(p, add_special_tokens=False)["input_ids"] + [2] for p in passages]  # BOS ... EOS
    seq_len = sum(map(len, docs))  # one sequence holding both passages whole
    sequences = eval_sequences(path, tokenizer, seq_len, 1)
    assert sequences["input_ids"][0].tolist() == docs[0] + docs[1]

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    result = evaluate(model, {"text": sequences})
    with torch.no_grad():  # each passage alone: packing must not change its NLL
        nll = sum(F.cross_entropy(model(torch.tensor([d])).logits[0, :-1], torch.tensor(d[1:]), reduction="sum")
                  for d in docs)  # fmt: skip
    utf8 = sum(len(p.encode("utf-8")) for p in passages)
    assert utf8 > sum(len(p) for p in passages)  # multi-byte characters are counted as bytes, not characters
    assert result["text_bpb"] == pytest.approx(float(nll) / (math.log(2) * utf8), rel=1e-5)
    targets = seq_len - 1 - 1  # every position predicts the next, except the second passage's BOS
    assert result["text_ppl"] == pytest.approx(math.exp(float(nll) / targets), rel=1e-5)


@pytest.mark.slow
def test_two_tokenizers_give_different_perplexity_but_comparable_bits_per_byte(tmp_path):
    """Two tiny models, same text and training budget, vocabularies of 1024 and 320: ppl differs, bpb agrees."""
    train_text = stdlib_texts(60, max_chars=3000)
    held = stdlib_texts(70, max_chars=3000)[60:]
    path = make_prepared_dataset(tmp_path / "held", held, num_shards=1)
    results = {}
    for vocab in (1024, 320):
        tok_dir, model_dir = tmp_path / f"tok{vocab}", tmp_path / f"model{vocab}"
        tokenizer = train_bpe_tokenizer(train_text, tok_dir, vocab_size=vocab)
        init_llama(tok_dir, model_dir, hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=128)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir))
        fit(model, tokenizer, train_text)
        results[vocab] = evaluate(model, {"held": eval_sequences(str(path), tokenizer, 128, 16)})
    big, small = results[1024], results[320]
    assert big["held_ppl"] > 1.5 * small["held_ppl"]  # a token of the larger vocabulary carries more text
    assert big["held_bpb"] == pytest.approx(small["held_bpb"], rel=0.2)


def fit(model, tokenizer, texts: list[str], steps: int = 150) -> None:
    """A few hundred Adam steps on 128-token windows of `texts` (seeded): enough to learn the text's statistics."""
    torch.manual_seed(0)
    ids = torch.tensor([t for text in texts for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]])
    windows = ids[: len(ids) // 128 * 128].view(-1, 128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = windows[torch.randint(len(windows), (8,))]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
