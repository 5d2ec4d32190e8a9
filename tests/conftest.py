"""Shared fixtures: real local text, a BPE tokenizer and a tiny LLaMA, all made here and saved to disk."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_texts(limit: int = 200, max_chars: int = 20_000) -> list[str]:
    """Real text this machine has: standard-library Python sources, in a stable order."""
    texts = []
    for path in sorted(STDLIB.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")[:max_chars]
        if len(text) > 500:
            texts.append(text)
        if len(texts) >= limit:
            break
    return texts


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE (1k vocab) trained on standard-library sources, saved with save_pretrained."""
    from cpt.trainer.bootstrap import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(stdlib_texts(80), out, vocab_size=1024)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """A 2-layer, 64-wide LLaMA-config model with the tokenizer above, saved with save_pretrained."""
    from cpt.trainer.bootstrap import init_llama

    out = tmp_path_factory.mktemp("tiny_llama")
    init_llama(tokenizer_dir, out, hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=512)
    return out
