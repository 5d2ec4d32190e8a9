"""A seeded random sample of a source's documents, packed into full sequences (the EWC Fisher's data).

Unlike the eval sets (the first documents by id, the same ones every time), the Fisher should see the
source as a whole: the first N documents by id are one corner of it (ids often follow file or crawl order).
"""

from __future__ import annotations

import numpy as np
import torch

from cpt.shared.dataset import DatasetError, tokenizer_fingerprint
from cpt.trainer.data.evalset import CHUNK_DOCS, _doc_keys, _fetch_tokens
from cpt.trainer.data.sources import SourceIndex, local_tokenizer_dir, tokenizer_problem


def sampled_sequences(path: str, tokenizer, seq_len: int, num_sequences: int, seed: int) -> dict:
    """Up to `num_sequences` sequences of `seq_len` tokens from documents drawn in a seeded random order.

    Same layout as `eval_sequences` ({"input_ids", "position_ids"}, positions restart per document);
    the same seed gives the same sequences, whatever the machine.
    """
    index = SourceIndex("fisher", path)
    folder = local_tokenizer_dir(tokenizer)
    if index.tokenized and folder is not None:
        problem = tokenizer_problem(index, tokenizer_fingerprint(folder), folder)
        if problem:
            raise DatasetError(problem)
    keys = _doc_keys(index)
    order = np.random.default_rng(seed).permutation(len(keys))
    keys = [keys[i] for i in order]
    eos = tokenizer.eos_token_id
    need = seq_len * num_sequences
    ids, positions, filled = [], [], 0
    for start in range(0, len(keys), CHUNK_DOCS):
        if filled >= need:
            break
        for tokens in _fetch_tokens(index, tokenizer, keys[start : start + CHUNK_DOCS]):
            doc = np.concatenate([tokens, [eos]]).astype(np.int64)
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
    return {
        "input_ids": torch.from_numpy(np.concatenate(ids)[:size].reshape(count, seq_len)),
        "position_ids": torch.from_numpy(np.concatenate(positions)[:size].reshape(count, seq_len)),
    }
