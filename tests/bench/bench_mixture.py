"""Mixture figures: tokens/s of the MixtureLoader (as `cpt data-check` streams) on token shards and on text
shards, against the same mixture built with Hugging Face `datasets` (load_from_disk + interleave_datasets +
packing in Python) on the same data in the same run; and the loader's resident memory with 10 vs 1,000 shards.

`python -m tests.bench mixture`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cpt.trainer.bootstrap import train_bpe_tokenizer
from cpt.trainer.data import DataConfig, MixtureLoader, SourceConfig
from tests.conftest import stdlib_texts
from tests.helpers import make_prepared_dataset

SEQ_LEN, MICRO_BATCH, WEIGHTS = 1024, 8, (3.0, 1.0)
TOKENS = 1_000_000  # streamed per measurement: about one pass over the data, so caches stay cold


def loader_rate(paths: tuple[str, str], tokenizer) -> float:
    """tokens/s of MixtureLoader, one process, no workers, as `cpt data-check` streams."""
    cfg = DataConfig(
        seq_len=SEQ_LEN,
        sources=[SourceConfig("domain", paths[0], WEIGHTS[0]), SourceConfig("general", paths[1], WEIGHTS[1])],
    )
    start, tokens = time.perf_counter(), 0
    for batch in MixtureLoader(cfg, tokenizer, seed=0, micro_batch_size=MICRO_BATCH):
        tokens += batch["input_ids"].numel()
        if tokens >= TOKENS:
            break
    return tokens / (time.perf_counter() - start)


def datasets_rate(paths: tuple[str, str], tokenizer) -> float:
    """tokens/s of the same mixture with HF datasets: interleave_datasets(probabilities) + packing in Python."""
    import datasets

    start = time.perf_counter()
    parts = [datasets.load_from_disk(p) for p in paths]
    mixed = datasets.interleave_datasets(
        parts, probabilities=[w / sum(WEIGHTS) for w in WEIGHTS], seed=0, stopping_strategy="all_exhausted"
    )
    eos, tokens = tokenizer.eos_token_id, 0
    buffer, positions, rows = [], [], []

    def emit():
        nonlocal tokens
        ids = torch.tensor([r[0] for r in rows])
        batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.tensor([r[1] for r in rows])}
        tokens += batch["input_ids"].numel()
        rows.clear()

    for row in mixed:
        ids = row["input_ids"] if "input_ids" in row else tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        ids = list(ids) + [eos]
        buffer += ids
        positions += range(len(ids))
        while len(buffer) >= SEQ_LEN:
            rows.append((buffer[:SEQ_LEN], positions[:SEQ_LEN]))
            del buffer[:SEQ_LEN], positions[:SEQ_LEN]
            if len(rows) == MICRO_BATCH:
                emit()
        if tokens >= TOKENS:
            break
    return tokens / (time.perf_counter() - start)


RSS_SCRIPT = """
import json, sys
import psutil
from transformers import AutoTokenizer
from cpt.trainer.data import DataConfig, MixtureLoader, SourceConfig
tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
cfg = DataConfig(seq_len=1024, sources=[SourceConfig("domain", sys.argv[1])])
before = psutil.Process().memory_info().rss
loader = MixtureLoader(cfg, tokenizer, seed=0, micro_batch_size=8)
tokens = 0
for batch in loader:
    tokens += batch["input_ids"].numel()
    if tokens >= int(sys.argv[3]):
        break
after = psutil.Process().memory_info().rss
print(json.dumps({"before": before, "after": after, "epochs": loader.state_dict()["cursors"][0][0]}))
"""


def loader_rss(path: str, tokenizer_dir: str, tokens: int) -> dict:
    """RSS of a fresh process streaming `tokens` from one source; `before` is after imports and the tokenizer.

    (ru_maxrss is no use here: Linux carries the parent's peak across exec.)
    """
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, path, tokenizer_dir, str(tokens)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def chunks(texts: list[str], size: int) -> list[str]:
    return [text[i : i + size] for text in texts for i in range(0, len(text), size)]


def main() -> None:
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        texts = stdlib_texts(200, max_chars=10**7)
        train_bpe_tokenizer(texts[:80], root / "tok", vocab_size=1024)
        tokenizer = AutoTokenizer.from_pretrained(str(root / "tok"))
        half = len(texts) // 2
        token_paths = tuple(
            make_prepared_dataset(root / f"tok_{name}", part, tokenizer_dir=root / "tok", num_shards=4, id_prefix=name)
            for name, part in (("d", texts[:half]), ("g", texts[half:]))
        )
        text_paths = tuple(
            make_prepared_dataset(root / f"txt_{name}", part, num_shards=4, id_prefix=name)
            for name, part in (("d", texts[:half]), ("g", texts[half:]))
        )
        print(f"data: {len(texts)} stdlib sources, {sum(map(len, texts)) / 1e6:.1f} M chars, 2 sources x 4 shards")
        print(f"{'shards':<8} {'MixtureLoader':>16} {'HF datasets':>14} {'ratio':>7}   (tokens/s, {TOKENS:,} tokens)")
        for label, paths in (("token", token_paths), ("text", text_paths)):
            ours, theirs = loader_rate(paths, tokenizer), datasets_rate(paths, tokenizer)
            print(f"{label:<8} {ours:>16,.0f} {theirs:>14,.0f} {ours / theirs:>6.1f}x")

        pieces = chunks(texts, 2000)
        rss = {}
        for count in (10, 1000):
            path = make_prepared_dataset(
                root / f"rss_{count}", pieces, tokenizer_dir=root / "tok", num_shards=count, id_prefix="p"
            )
            rss[count] = loader_rss(path, str(root / "tok"), 2_000_000)
        print(f"resident memory after streaming 2M tokens ({len(pieces)} docs, ~2 epochs) from one token source:")
        for count, r in rss.items():
            grown = (r["after"] - r["before"]) / 2**20
            print(f"  {count:>5} shards: RSS {r['after'] / 2**20:6.1f} MiB, of which the loader {grown:5.1f} MiB")
        ratio = (rss[1000]["after"] - rss[1000]["before"]) / max(rss[10]["after"] - rss[10]["before"], 1)
        print(f"  loader memory 1,000 vs 10 shards: {ratio:.2f}x")


if __name__ == "__main__":
    main()
