"""Fixed, deterministic held-out sequences for perplexity and bits per byte: documents in id order, packed with EOS."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from cpt.shared.dataset import DatasetError, tokenizer_fingerprint
from cpt.trainer.conventions import bos_labels, document_bos
from cpt.trainer.data.sources import (
    BLOCK_ROWS,
    SourceIndex,
    local_tokenizer_dir,
    read_rows,
    tokenized_block,
    tokenizer_problem,
)

# Documents fetched per round while filling the sequences (text shards are tokenized per round).
CHUNK_DOCS = 512


def checked_index(name: str, path: str, tokenizer) -> SourceIndex:
    """The dataset's index, refused (DatasetError) when its stored token ids come from another tokenizer:
    they would give a meaningless perplexity or Fisher (or an index error)."""
    index = SourceIndex(name, path)
    folder = local_tokenizer_dir(tokenizer)
    if index.tokenized and folder is not None:
        problem = tokenizer_problem(index, tokenizer_fingerprint(folder), folder)
        if problem:
            raise DatasetError(problem)
    return index


def _doc_keys(index: SourceIndex) -> list[tuple[str, int, int]]:
    """(id, shard, row) of every document, in id order (shards are hash-partitioned, so ids interleave)."""
    keys = []
    for shard, (url, entry) in enumerate(zip(index.urls, index.manifest["shards"])):
        ids = read_rows(url, 0, int(entry["rows"]), ["id"]).column("id").to_pylist()
        keys += [(doc_id, shard, row) for row, doc_id in enumerate(ids)]
    keys.sort()
    return keys


def utf8_ends(text: str) -> np.ndarray:
    """UTF-8 byte offset of every character boundary of `text` (len(text) + 1 values)."""
    if text.isascii():
        return np.arange(len(text) + 1, dtype=np.int64)
    sizes = np.fromiter((len(c.encode("utf-8")) for c in text), dtype=np.int64, count=len(text))
    return np.concatenate([[0], np.cumsum(sizes)])


def token_bytes(text: str, offsets: list[tuple[int, int]]) -> np.ndarray:
    """UTF-8 bytes of `text` each token covers, from the tokenizer's character offsets; they sum to the text's bytes.

    A token owns the text from the previous token's end to its own end (so spaces a tokenizer trims from
    the offsets still count), and the last token owns whatever follows it. Byte-level BPE splits one
    character over several tokens that share its offsets: the first of them gets its bytes, the rest 0.
    """
    if not offsets:
        return np.zeros(0, dtype=np.int64)
    ends = np.maximum.accumulate(np.asarray([end for _, end in offsets], dtype=np.int64))
    ends[-1] = len(text)
    byte_ends = utf8_ends(text)[ends]
    return np.diff(byte_ends, prepend=0)


def _encode(tokenizer, texts: list[str]) -> tuple[list[list[int]], list[np.ndarray] | None]:
    """Token ids of `texts` (no special tokens) and each token's bytes, or None when the tokenizer gives no offsets."""
    try:
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # a slow (Python) tokenizer has no offsets: no bits per byte
        return tokenizer(texts, add_special_tokens=False)["input_ids"], None
    return encoded["input_ids"], [token_bytes(t, o) for t, o in zip(texts, encoded["offset_mapping"])]


def _fetch_docs(index: SourceIndex, tokenizer, keys: list[tuple[str, int, int]]) -> list[tuple[np.ndarray, object]]:
    """(token ids, bytes per token or None) of `keys` in that order, reading each row block once.

    Token shards keep their stored ids; their text is tokenized again only for the byte offsets, which
    are used when it gives the same ids (the fingerprint check makes that the rule).
    """
    by_block = defaultdict(list)
    for doc_id, shard, row in keys:
        by_block[(shard, row // BLOCK_ROWS)].append(row)
    docs = {}
    for (shard, block), rows in by_block.items():
        start = block * BLOCK_ROWS
        stop = min(start + BLOCK_ROWS, int(index.manifest["shards"][shard]["rows"]))
        columns = ["id", "text"] + (["input_ids"] if index.tokenized else [])
        table = read_rows(index.urls[shard], start, stop, columns).take([r - start for r in rows])
        texts = [text or "" for text in table.column("text").to_pylist()]
        encoded, sizes = _encode(tokenizer, texts)
        stored = tokenized_block(table) if index.tokenized else None
        for i, row in enumerate(rows):
            tokens = stored.doc(i)[1] if stored is not None else np.asarray(encoded[i], dtype=np.int64)
            counts = sizes[i] if sizes is not None and len(sizes[i]) == len(tokens) else None
            if counts is not None and stored is not None and not np.array_equal(encoded[i], tokens):
                counts = None
            docs[(shard, row)] = (tokens, counts)
    return [docs[(shard, row)] for _, shard, row in keys]


def eval_sequences(path: str, tokenizer, seq_len: int, max_sequences: int, add_bos: bool | None = None) -> dict:
    """Up to `max_sequences` full sequences of `seq_len` tokens; position_ids restart at every segment.

    Returns {"input_ids", "position_ids", "labels"} (LongTensor[N, T]) and "bytes": the UTF-8 bytes of
    text each token covers (0 for BOS/EOS), or None when some token's bytes are unknown (a tokenizer
    without offsets). Documents get BOS in front as in training (`add_bos`, null = the tokenizer's
    convention); BOS is masked in `labels`. Only full sequences are kept, so every other position is a
    real target.
    """
    index = checked_index("eval", path, tokenizer)
    keys = _doc_keys(index)
    eos = tokenizer.eos_token_id
    bos = document_bos(add_bos, tokenizer)
    head = [] if bos is None else [bos]
    need = seq_len * max_sequences
    ids, sizes, positions, filled = [], [], [], 0
    for start in range(0, len(keys), CHUNK_DOCS):
        for tokens, counts in _fetch_docs(index, tokenizer, keys[start : start + CHUNK_DOCS]):
            doc = np.concatenate([head, tokens, [eos]]).astype(np.int64)
            doc_bytes = None if counts is None else np.concatenate([[0] * len(head), counts, [0]]).astype(np.int64)
            if doc_bytes is None:
                sizes = None
            offset = 0
            while offset < len(doc) and filled < need:
                # A document that crosses a sequence boundary restarts its positions in the next sequence.
                take = min(len(doc) - offset, seq_len - filled % seq_len)
                ids.append(doc[offset : offset + take])
                if sizes is not None:
                    sizes.append(doc_bytes[offset : offset + take])
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

    def rows(pieces: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(pieces)[:size].reshape(count, seq_len))

    input_ids, position_ids = rows(ids), rows(positions)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "labels": bos_labels(input_ids, position_ids, bos),
        "bytes": None if sizes is None else rows(sizes),
    }
