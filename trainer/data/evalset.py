"""Fixed, deterministic held-out sequences for perplexity: documents in id order, packed with EOS."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from cpt.shared.dataset import DatasetError, tokenizer_fingerprint
from cpt.trainer.data.sources import (
    BLOCK_ROWS,
    SourceIndex,
    local_tokenizer_dir,
    read_rows,
    text_block,
    tokenized_block,
    tokenizer_problem,
)

# Documents fetched per round while filling the sequences (text shards are tokenized per round).
CHUNK_DOCS = 512


def _doc_keys(index: SourceIndex) -> list[tuple[str, int, int]]:
    """(id, shard, row) of every document, in id order (shards are hash-partitioned, so ids interleave)."""
    keys = []
    for shard, (url, entry) in enumerate(zip(index.urls, index.manifest["shards"])):
        ids = read_rows(url, 0, int(entry["rows"]), ["id"]).column("id").to_pylist()
        keys += [(doc_id, shard, row) for row, doc_id in enumerate(ids)]
    keys.sort()
    return keys


def _fetch_tokens(index: SourceIndex, tokenizer, keys: list[tuple[str, int, int]]) -> list[np.ndarray]:
    """Token ids of `keys` (in that order), reading each row block once and tokenizing text shards here."""
    by_block = defaultdict(list)
    for doc_id, shard, row in keys:
        by_block[(shard, row // BLOCK_ROWS)].append(row)
    tokens = {}
    for (shard, block), rows in by_block.items():
        start = block * BLOCK_ROWS
        stop = min(start + BLOCK_ROWS, int(index.manifest["shards"][shard]["rows"]))
        column = "input_ids" if index.tokenized else "text"
        table = read_rows(index.urls[shard], start, stop, ["id", column]).take([r - start for r in rows])
        docs = tokenized_block(table) if index.tokenized else text_block(table, tokenizer)
        for i, row in enumerate(rows):
            tokens[(shard, row)] = docs.doc(i)[1]
    return [tokens[(shard, row)] for _, shard, row in keys]


def eval_sequences(path: str, tokenizer, seq_len: int, max_sequences: int) -> dict:
    """Up to `max_sequences` full sequences of `seq_len` tokens; position_ids restart at every segment.

    Returns {"input_ids": LongTensor[N, T], "position_ids": LongTensor[N, T]}. Only full sequences are
    kept, so every position is a real target and the perplexity needs no mask.
    """
    index = SourceIndex("eval", path)
    folder = local_tokenizer_dir(tokenizer)
    if index.tokenized and folder is not None:
        # Token ids from another tokenizer would give a meaningless perplexity (or an index error).
        problem = tokenizer_problem(index, tokenizer_fingerprint(folder), folder)
        if problem:
            raise DatasetError(problem)
    keys = _doc_keys(index)
    eos = tokenizer.eos_token_id
    need = seq_len * max_sequences
    ids, positions, filled = [], [], 0
    for start in range(0, len(keys), CHUNK_DOCS):
        for tokens in _fetch_tokens(index, tokenizer, keys[start : start + CHUNK_DOCS]):
            doc = np.concatenate([tokens, [eos]]).astype(np.int64)
            offset = 0
            while offset < len(doc) and filled < need:
                # A document that crosses a sequence boundary restarts its positions in the next sequence.
                take = min(len(doc) - offset, seq_len - filled % seq_len)
                ids.append(doc[offset : offset + take])
                positions.append(np.arange(take, dtype=np.int64))
                offset, filled = offset + take, filled + take
            if filled >= need:
                break
        if filled >= need:
            break
    count = filled // seq_len
    if count == 0:
        raise DatasetError(
            f"{path}: {filled} tokens in {len(keys)} documents, fewer than one sequence of seq_len={seq_len}; "
            "use a larger held-out set or a smaller seq_len"
        )
    size = count * seq_len
    input_ids = torch.from_numpy(np.concatenate(ids)[:size].reshape(count, seq_len))
    position_ids = torch.from_numpy(np.concatenate(positions)[:size].reshape(count, seq_len))
    return {"input_ids": input_ids, "position_ids": position_ids}
