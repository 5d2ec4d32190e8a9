"""A seeded random sample of a source's documents, packed into full sequences (the EWC Fisher's data).

Unlike the eval sets (the first documents by id, the same ones every time), the Fisher should see the
source as a whole: the first N documents by id are one corner of it (ids often follow file or crawl order).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from cpt.shared.dataset import DatasetError
from cpt.trainer.conventions import bos_labels, document_bos
from cpt.trainer.data.evalset import checked_index
from cpt.trainer.data.sources import SourceIndex, read_rows

# Documents fetched per round, and rows per read: a read walks one block of a shard, not the whole file.
CHUNK_DOCS = 256
BLOCK = 1024


def _fetch(index: SourceIndex, tokenizer, rows: list[tuple[int, int]]) -> list[np.ndarray]:
    """Token ids of the documents at (shard, row), in that order (text shards are tokenized here)."""
    column = "input_ids" if index.tokenized else "text"
    by_block = defaultdict(list)
    for shard, row in rows:
        by_block[(shard, row // BLOCK)].append(row)
    found = {}
    for (shard, block), wanted in by_block.items():
        start = block * BLOCK
        stop = min(start + BLOCK, int(index.manifest["shards"][shard]["rows"]))
        values = read_rows(index.urls[shard], start, stop, [column]).column(column).take([r - start for r in wanted])
        values = values.to_pylist()
        if not index.tokenized:
            values = tokenizer(values, add_special_tokens=False)["input_ids"]
        for row, ids in zip(wanted, values):
            found[(shard, row)] = np.asarray(ids, dtype=np.int64)
    return [found[key] for key in rows]


def sampled_sequences(
    path: str, tokenizer, seq_len: int, num_sequences: int, seed: int, add_bos: bool | None = None
) -> dict:
    """Up to `num_sequences` sequences of `seq_len` tokens from documents drawn in a seeded random order.

    Same layout as `eval_sequences` ({"input_ids", "position_ids", "labels"}, positions restart per document,
    BOS in front of each document as in training and masked in labels); the same seed gives the same sequences.
    """
    index = checked_index("fisher", path, tokenizer)
    keys = [(shard, row) for shard, entry in enumerate(index.manifest["shards"]) for row in range(int(entry["rows"]))]
    order = np.random.default_rng(seed).permutation(len(keys))
    keys = [keys[i] for i in order]
    eos = tokenizer.eos_token_id
    bos = document_bos(add_bos, tokenizer)
    head = [] if bos is None else [bos]
    need = seq_len * num_sequences
    ids, positions, filled = [], [], 0
    for start in range(0, len(keys), CHUNK_DOCS):
        if filled >= need:
            break
        for tokens in _fetch(index, tokenizer, keys[start : start + CHUNK_DOCS]):
            doc = np.concatenate([head, tokens, [eos]]).astype(np.int64)
            offset = 0
            while offset < len(doc) and filled < need:
                take = min(len(doc) - offset, seq_len - filled % seq_len)
                ids.append(doc[offset : offset + take])
                positions.append(np.arange(take, dtype=np.int64))
                offset, filled = offset + take, filled + take
            if filled >= need:
                break
    count = filled // seq_len
    if count == 0:
        raise DatasetError(
            f"{path}: {filled} tokens in {len(keys)} documents, fewer than one sequence of seq_len={seq_len}; "
            "use a larger source for the Fisher (regularization.ewc.source) or a smaller seq_len"
        )
    size = count * seq_len
    input_ids = torch.from_numpy(np.concatenate(ids)[:size].reshape(count, seq_len))
    position_ids = torch.from_numpy(np.concatenate(positions)[:size].reshape(count, seq_len))
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": bos_labels(input_ids, position_ids, bos)}
