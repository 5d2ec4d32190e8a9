"""A base model's conventions: BOS before every document where its tokenizer adds one, EOS, context, isolation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt.shared.config import ConfigError, load_config
from cpt.trainer.config import RunConfig
from cpt.trainer.conventions import IGNORE_INDEX, document_bos, run_problems, tokenizer_adds_bos
from cpt.trainer.data import DataConfig, MixtureLoader, eval_sequences
from tests.conftest import stdlib_texts
from tests.helpers import make_prepared_dataset, save_bos_tokenizer
from tests.trainer.trainutil import one_torch_thread  # noqa: F401 (autouse fixture)

TEXTS = stdlib_texts(24, max_chars=1500)


@pytest.fixture(scope="module")
def tokenizers(tokenizer_dir, tmp_path_factory):
    """{"plain": a GPT-2-like tokenizer (adds nothing), "bos": the same vocabulary adding BOS like LLaMA's}."""
    bos_dir = save_bos_tokenizer(tokenizer_dir, tmp_path_factory.mktemp("bos_tokenizer"))
    return {"plain": AutoTokenizer.from_pretrained(str(tokenizer_dir)), "bos": AutoTokenizer.from_pretrained(bos_dir)}


@pytest.fixture(scope="module")
def text_set(tmp_path_factory):
    """Text-only shards: each run tokenizes them with its own tokenizer (2 shards, ids interleaved)."""
    return make_prepared_dataset(tmp_path_factory.mktemp("conventions") / "code", TEXTS, id_prefix="code")


def test_the_convention_is_read_from_what_the_tokenizer_does(tokenizers):
    plain, bos = tokenizers["plain"], tokenizers["bos"]
    assert plain.bos_token_id == bos.bos_token_id == 1  # both HAVE a BOS token; only one puts it in front
    assert not tokenizer_adds_bos(plain) and tokenizer_adds_bos(bos)
    assert document_bos(None, plain) is None and document_bos(None, bos) == 1
    assert document_bos(True, plain) == 1 and document_bos(False, bos) is None  # data.add_bos overrides


def document_starts(batch: dict, lengths: dict[str, int], emitted: dict[str, int]) -> list[tuple[int, int]]:
    """(row, column) of every segment that begins a document (not the continuation of a longer one)."""
    starts = []
    for row, segments in enumerate(batch["segments"]):
        at = 0
        for _, doc_id, n in segments:
            if emitted.get(doc_id, 0) % lengths[doc_id] == 0:
                starts.append((row, at))
            emitted[doc_id] = emitted.get(doc_id, 0) + n
            at += n
    return starts


@pytest.mark.parametrize("kind", ["bos", "plain"])
def test_bos_starts_every_document_of_the_packed_batches_exactly_when_the_tokenizer_adds_it(
    kind, tokenizers, text_set
):
    tokenizer = tokenizers[kind]
    cfg = load_config(DataConfig, data={"seq_len": 128, "sources": [{"name": "code", "path": text_set}]})
    loader = MixtureLoader(cfg, tokenizer, seed=0, micro_batch_size=4)
    extra = 1 if kind == "bos" else 0
    body = [len(ids) for ids in tokenizer(TEXTS, add_special_tokens=False)["input_ids"]]
    lengths = {f"code-{i:06d}": n + 1 + extra for i, n in enumerate(body)}  # + EOS (+ BOS)
    emitted, starts, bos_count = {}, 0, 0
    for step, batch in enumerate(loader):
        if step == 12:
            break
        ids, labels = batch["input_ids"], batch["labels"]
        bos_count += int((ids == 1).sum())
        for row, column in document_starts(batch, lengths, emitted):
            starts += 1
            assert batch["position_ids"][row, column] == 0
            if kind == "bos":
                assert ids[row, column] == 1
                assert labels[row, column] == IGNORE_INDEX  # BOS is context, never a target
            else:
                assert ids[row, column] != 1
        assert (labels != IGNORE_INDEX).sum() == ids.numel() - int((ids == 1).sum()) * extra
    assert starts >= 8  # many documents began in these batches
    assert bos_count == (starts if kind == "bos" else 0)


@pytest.mark.parametrize("kind", ["bos", "plain"])
def test_eval_sequences_put_bos_before_every_document_the_same_way(kind, tokenizers, text_set):
    tokenizer = tokenizers[kind]
    sequences = eval_sequences(text_set, tokenizer, 128, 16)
    ids, positions, labels = sequences["input_ids"], sequences["position_ids"], sequences["labels"]
    # A document starts wherever positions restart inside a row (and at row 0, column 0).
    starts = (positions == 0).clone()
    # A later row's first position may continue a document of the previous row, unless it opens with BOS.
    starts[1:, 0] = ids[1:, 0] == 1 if kind == "bos" else False
    if kind == "bos":
        assert ids[0, 0] == 1
        assert torch.equal(ids == 1, starts) and int(starts.sum()) >= 3
        assert torch.equal(labels == IGNORE_INDEX, starts)
        assert int(sequences["bytes"][starts].sum()) == 0  # BOS covers no text
    else:
        assert not (ids == 1).any() and not (labels == IGNORE_INDEX).any()
    # Forcing the other choice (data.add_bos / cpt eval --add-bos) flips it.
    flipped = eval_sequences(text_set, tokenizer, 128, 16, add_bos=kind != "bos")
    assert bool((flipped["input_ids"] == 1).any()) == (kind != "bos")


def test_a_resume_that_would_change_the_bos_choice_is_refused(tokenizers, text_set):
    data = {"seq_len": 64, "sources": [{"name": "code", "path": text_set}]}
    with_bos = MixtureLoader(load_config(DataConfig, data=data), tokenizers["bos"], seed=0, micro_batch_size=1)
    next(iter(with_bos))
    state = with_bos.state_dict()
    assert state["bos"] == 1  # recorded in the mixture state every checkpoint stores
    without = MixtureLoader(
        load_config(DataConfig, data={**data, "add_bos": False}), tokenizers["bos"], seed=0, micro_batch_size=1
    )
    with pytest.raises(ValueError, match="bos: state has 1, config has None"):
        without.load_state_dict(state)


def test_seq_len_beyond_the_models_context_and_a_tokenizer_without_eos_are_refused_before_loading(
    tiny_model_dir, tokenizer_dir, text_set, tmp_path
):
    config = {
        "model": str(tiny_model_dir),  # max_position_embeddings: 512
        "output_dir": str(tmp_path / "run"),
        "data": {"seq_len": 1024, "sources": [{"name": "code", "path": text_set}]},
        "train": {"max_steps": 1},
        "checkpoint": {"best_metric": None},
    }
    with pytest.raises(ConfigError, match=r"data.seq_len: 1024 is longer than the model's context \(max_position"):
        load_config(RunConfig, data=config)
    no_eos = tmp_path / "no_eos"
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.eos_token = None
    tokenizer.save_pretrained(str(no_eos))
    problems = run_problems(str(tiny_model_dir), str(no_eos), 256, None)
    assert len(problems) == 1 and problems[0].startswith(f"tokenizer: {no_eos} has no eos_token")
    assert run_problems(str(tiny_model_dir), str(tokenizer_dir), 512, True) == []


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_documents_do_not_attend_to_each_other(attention, tokenizers, tiny_model_dir):
    """Packing relies on transformers treating restarting position_ids (no mask, no cache) as separate sequences.

    If an upgrade stops detecting packed rows, the second document attends to the first and its logits change.
    """
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation=attention).eval()
    encoded = tokenizers["plain"](TEXTS[:2], add_special_tokens=False)["input_ids"]
    first, second = torch.tensor(encoded[0][:24]), torch.tensor(encoded[1][:16])
    packed = torch.cat([first, second])[None]
    positions = torch.cat([torch.arange(24), torch.arange(16)])[None]
    with torch.no_grad():
        together = model(input_ids=packed, position_ids=positions, use_cache=False).logits[0]
        alone = [model(input_ids=doc[None], use_cache=False).logits[0] for doc in (first, second)]
    torch.testing.assert_close(together[:24], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[24:], alone[1], rtol=1e-5, atol=1e-5)
    # The check can fail: the same row with running positions lets the second document see the first.
    with torch.no_grad():
        joined = model(input_ids=packed, position_ids=torch.arange(40)[None], use_cache=False).logits[0]
    assert (joined[24:] - alone[1]).abs().max() > 1e-3


def test_token_shards_that_already_hold_special_tokens_are_refused(tokenizer_dir, tmp_path):
    from cpt.shared.dataset import MANIFEST, DatasetError, read_manifest, write_json_atomic
    from cpt.trainer.data import check_sources

    path = make_prepared_dataset(tmp_path / "code", TEXTS[:4], tokenizer_dir=tokenizer_dir)
    cfg = load_config(DataConfig, data={"seq_len": 64, "sources": [{"name": "code", "path": path}]})
    assert check_sources(cfg, str(tokenizer_dir)) == []
    manifest = read_manifest(path)
    manifest["tokenizer"]["add_special_tokens"] = True  # what a tool tokenizing with BOS/EOS would have to say
    write_json_atomic(f"{path}/{MANIFEST}", manifest)
    problems = check_sources(cfg, str(tokenizer_dir))
    assert len(problems) == 1 and "its token shards hold the tokenizer's special tokens" in problems[0]
    with pytest.raises(DatasetError, match="the trainer adds BOS and EOS itself"):
        eval_sequences(path, AutoTokenizer.from_pretrained(str(tokenizer_dir)), 64, 1)
