"""The base model's own conventions that training and eval must follow: BOS per document, EOS, context length.

LLaMA, Mistral and Gemma tokenizers put BOS in front of every text they encode, and their models
were pre-trained on documents that start with it; GPT-2 and Qwen tokenizers add nothing. Shards from
`cpt prepare --tokenizer` hold the bare tokens (no special tokens), so the trainer and `cpt eval`
insert BOS themselves, in the same place, when the tokenizer's convention (or `data.add_bos`) says so.
The choice is part of the mixture state, which every checkpoint stores: a resume that would change it
is refused. BOS is context, never a target: it carries no text (no loss, no bytes in bits per byte).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

#: The label value the loss ignores (HF's convention, also cpt.trainer.objectives.IGNORE_INDEX).
IGNORE_INDEX = -100

# A short probe text: what the tokenizer does around it is its convention.
PROBE = "a"


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether `tokenizer(text)` (special tokens on, as the model's users call it) starts with its BOS token.

    Probed rather than read from `add_bos_token`: the post-processor in tokenizer.json decides, and
    transformers versions expose the flag differently.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    plain = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    special = tokenizer(PROBE, add_special_tokens=True)["input_ids"]
    return special[:1] == [bos] and special[1 : 1 + len(plain)] == plain


def document_bos(add_bos: bool | None, tokenizer) -> int | None:
    """The token id to put in front of every document, or None: `add_bos`, or the tokenizer's convention if null."""
    if add_bos is None:
        return tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
    if not add_bos:
        return None
    if tokenizer.bos_token_id is None:
        raise ValueError("data.add_bos: true, but the tokenizer has no bos_token; set data.add_bos: null or false")
    return tokenizer.bos_token_id


def bos_labels(input_ids: torch.Tensor, position_ids: torch.Tensor, bos: int | None) -> torch.Tensor:
    """Labels = input_ids, except an inserted BOS (a document's first position) which is never a target."""
    labels = input_ids.clone()
    if bos is not None:
        labels[(input_ids == bos) & (position_ids == 0)] = IGNORE_INDEX
    return labels


def with_bos(offsets: np.ndarray, tokens: np.ndarray, bos: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, tokens) of documents laid end to end, each given `bos` in front."""
    tokens = np.insert(tokens, offsets[:-1], bos)
    return offsets + np.arange(len(offsets), dtype=offsets.dtype), tokens


def context_length(model_dir: str) -> int | None:
    """The model's max_position_embeddings from its config.json (GPT-2's n_positions; a text_config's), or None."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            if isinstance(section.get(key), int):
                return section[key]
    return None


def run_problems(
    model_dir: str, tokenizer_dir: str, seq_len: int, add_bos: bool | None, trust_remote_code: bool = False
) -> list[str]:
    """What in the model / tokenizer pair the run's data settings cannot work with (checked before weights load)."""
    from transformers import AutoTokenizer

    found = []
    limit = context_length(model_dir)
    if limit is not None and isinstance(seq_len, int) and seq_len > limit:
        found.append(
            f"data.seq_len: {seq_len} is longer than the model's context (max_position_embeddings={limit} in "
            f"{model_dir}/config.json); set data.seq_len <= {limit}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        return found + [f"tokenizer: cannot load {tokenizer_dir} ({err})"]
    if tokenizer.eos_token_id is None:
        found.append(
            f"tokenizer: {tokenizer_dir} has no eos_token; packing separates documents with EOS. Give a tokenizer "
            "with one (set eos_token in its tokenizer_config.json)"
        )
    try:
        document_bos(add_bos, tokenizer)
    except ValueError as err:
        found.append(str(err))
    return found
