"""Shared inputs of the `cpt train` tests: small prepared datasets of real local text and a RUN config."""

from __future__ import annotations

import copy
import os
from importlib.metadata import distributions
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import stdlib_texts
from tests.helpers import make_prepared_dataset


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Train on one intra-op thread: on 2 shared cores, 2 spinning OpenMP threads make a tiny step ~18x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: Environment for `cpt train` subprocesses: the same single thread, so their numbers match in-process runs.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def package_readmes(limit: int, max_chars: int = 6000) -> list[str]:
    """English prose this machine has: installed packages' long descriptions (their READMEs), in name order."""
    texts = {}
    for dist in distributions():
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        if len(body) > 1500:
            texts.setdefault(dist.metadata["Name"].lower(), body[:max_chars])
    return [texts[name] for name in sorted(texts)][:limit]


def make_datasets(root: Path, tokenizer_dir: Path, max_chars: int = 3000) -> dict[str, str]:
    """domain = standard-library Python, general = package READMEs; a train and a held-out split of each."""
    code = stdlib_texts(48, max_chars=max_chars)
    prose = package_readmes(36, max_chars=max_chars)
    assert len(prose) >= 24, "the venv should hold at least 24 packages with a README"
    cut = len(prose) * 2 // 3
    splits = {
        "domain": (code[:40], "code"),
        "domain_val": (code[40:], "code"),
        "general": (prose[:cut], "general"),
        "general_val": (prose[cut:], "general"),
    }
    return {
        name: make_prepared_dataset(root / name, texts, domain=domain, tokenizer_dir=tokenizer_dir, id_prefix=name)
        for name, (texts, domain) in splits.items()
    }


def run_config(model_dir: Path, output_dir: Path, datasets: dict[str, str], **sections) -> dict:
    """A small RUN config (seq_len 64, 2 x 2 sequences per step); `sections` replace/extend its sections."""
    config = {
        "model": str(model_dir),
        "output_dir": str(output_dir),
        "seed": 0,
        "data": {
            "seq_len": 64,
            "sources": [
                {"name": "domain", "path": datasets["domain"], "weight": 3.0},
                {"name": "general", "path": datasets["general"], "weight": 1.0},
            ],
        },
        "train": {"max_steps": 6, "micro_batch_size": 2, "grad_accum": 2, "lr": 2.0e-3, "warmup_ratio": 0.2},
        "eval": {
            "every_steps": 3,
            "max_sequences": 4,
            "sets": {"domain": datasets["domain_val"], "general": datasets["general_val"]},
        },
        "checkpoint": {"every_steps": 3, "keep_last": 2},
    }
    for section, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(section), dict):
            config[section] = {**copy.deepcopy(config[section]), **value}
        else:
            config[section] = value
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path
