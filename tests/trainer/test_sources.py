"""A source's document order: shuffled across and inside row blocks, the same on every call and every epoch key."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from cpt.trainer.data.sources import SourceDocs, SourceIndex
from tests.conftest import stdlib_texts
from tests.helpers import make_prepared_dataset


@pytest.fixture(scope="module")
def one_block(tmp_path_factory, tokenizer_dir):
    """40 stdlib modules in ONE shard (one row block), stored in id order as `cpt prepare` writes them."""
    root = tmp_path_factory.mktemp("sources")
    path = make_prepared_dataset(root / "code", stdlib_texts(40, max_chars=600), num_shards=1, id_prefix="mod")
    return SourceIndex("code", path), AutoTokenizer.from_pretrained(str(tokenizer_dir))


def epoch_ids(docs: SourceDocs, epoch: int) -> list[str]:
    return [docs.doc(epoch, position)[0] for position in range(docs.num_docs)]


def test_documents_of_one_block_are_not_read_in_id_order_by_default(one_block):
    index, tokenizer = one_block
    assert len(index.unit_rows) == 1  # a single block: only a shuffle inside it can change the order
    order = epoch_ids(SourceDocs(index, tokenizer, seed=0), 0)
    ids = sorted(order)
    assert ids == [f"mod-{i:06d}" for i in range(40)]  # every document exactly once
    assert order != ids
    # A fixed function of (seed, source, epoch, block): another instance (a resumed run) reads the same order.
    assert epoch_ids(SourceDocs(index, tokenizer, seed=0), 0) == order
    assert epoch_ids(SourceDocs(index, tokenizer, seed=0), 1) != order  # a new epoch, a new order
    assert epoch_ids(SourceDocs(index, tokenizer, seed=1), 0) != order


def test_a_shuffle_buffer_permutes_on_top_of_the_block_order(one_block):
    index, tokenizer = one_block
    plain = epoch_ids(SourceDocs(index, tokenizer, seed=0), 0)
    windowed = epoch_ids(SourceDocs(index, tokenizer, seed=0, shuffle_buffer=8), 0)
    assert sorted(windowed) == sorted(plain) and windowed != plain
    for start in range(0, 40, 8):  # each window of 8 holds the same documents, in another order
        assert sorted(windowed[start : start + 8]) == sorted(plain[start : start + 8])
