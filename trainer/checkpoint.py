"""Atomic checkpoints: written to a temporary folder, then renamed; found again by `--resume`.

output_dir/checkpoint-STEP/
  model.safetensors, config.json, tokenizer files   save_pretrained (HF format, loadable as is)
  optimizer.pt, scheduler.pt                        torch.save; loaded with weights_only=True
  rng_state_rank{R}.pt, data_state_rank{R}.json     per rank: RNG states, mixture state
  trainer_state.json                                step, tokens, metrics so far; written last
A folder only gets its final name once every file is in it, so a kill at any moment leaves either a
complete checkpoint or a `.tmp-*` folder that resume ignores (with a warning) and deletes.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import torch

from cpt.shared.dataset import write_json_atomic

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
REQUIRED = (TRAINER_STATE, "config.json", "optimizer.pt", "scheduler.pt")


def checkpoint_dirs(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint-STEP folder, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def is_complete(folder: Path, world_size: int | None = None) -> bool:
    if not all((folder / name).is_file() for name in REQUIRED):
        return False
    if not list(folder.glob("*.safetensors")):
        return False
    if world_size is not None:
        return all((folder / f"data_state_rank{r}.json").is_file() for r in range(world_size))
    return True


def latest_checkpoint(output_dir: str | Path, world_size: int | None = None) -> Path | None:
    """The newest complete checkpoint; half-written ones (and leftover .tmp-* folders) are skipped with a warning."""
    root = Path(output_dir)
    for leftover in sorted(root.glob(".tmp-*")) if root.is_dir() else []:
        warnings.warn(f"{leftover}: half-written checkpoint from an interrupted run; ignoring it", stacklevel=2)
    for step, folder in reversed(checkpoint_dirs(output_dir)):
        if is_complete(folder, world_size):
            return folder
        warnings.warn(f"{folder}: incomplete checkpoint (missing files); skipping it", stacklevel=2)
    return None


def remove_leftovers(output_dir: str | Path) -> None:
    for leftover in Path(output_dir).glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def temp_dir(output_dir: str | Path, name: str) -> Path:
    """The temporary folder a checkpoint called `name` is assembled in (same filesystem, so rename is atomic)."""
    return Path(output_dir) / f".tmp-{name}"


def publish(tmp: Path, final: Path) -> None:
    """Move a finished temporary folder into place, replacing an older folder of the same name."""
    if final.exists():
        old = final.with_name(f".tmp-old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def prune(output_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoint-STEP folders; returns the deleted ones."""
    dirs = checkpoint_dirs(output_dir)
    doomed = [folder for _, folder in dirs[: max(0, len(dirs) - keep_last)]]
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)
    return doomed


def is_better(
    results: dict, best: dict | None, baseline: dict, metric: str | None, max_general_increase: float | None
) -> bool:
    """Whether an eval result becomes the new best/: a lower `metric`, with general_ppl within the constraint."""
    if metric is None or not math.isfinite(results[metric]):
        return False
    if (
        max_general_increase is not None
        and results["general_ppl"] > (1 + max_general_increase) * baseline["general_ppl"]
    ):
        return False
    return best is None or results[metric] < best[metric]


def save_model(folder: Path, model, tokenizer, state_dict: dict) -> None:
    """The model in HF format (safetensors + config) and its tokenizer, as from_pretrained expects."""
    model.save_pretrained(str(folder), state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def load_model_weights(model, folder: Path) -> None:
    """Load a checkpoint's safetensors into `model` (weights only; tied weights may be absent from the file)."""
    from safetensors.torch import load_file

    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(path)))
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"{folder}: checkpoint weights do not match the model `model:` builds "
            f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}); "
            "was the run started from another model?"
        )
    if tied:
        model.tie_weights()


def rng_state() -> dict:
    """This process's RNG states, in types torch.load(weights_only=True) accepts."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_rank_files(folder: Path, rank: int, data_state: dict) -> None:
    torch.save(rng_state(), folder / f"rng_state_rank{rank}.pt")
    (folder / f"data_state_rank{rank}.json").write_text(json.dumps(data_state))


def read_rank_files(folder: Path, rank: int) -> tuple[dict, dict]:
    rng = torch.load(folder / f"rng_state_rank{rank}.pt", weights_only=True)
    data_state = json.loads((folder / f"data_state_rank{rank}.json").read_text())
    return rng, data_state


def write_trainer_state(folder: Path, state: dict) -> None:
    write_json_atomic(str(folder / TRAINER_STATE), state)


def read_trainer_state(folder: Path) -> dict:
    return json.loads((folder / TRAINER_STATE).read_text())


def torch_load(path: Path):
    """Optimizer / scheduler state: tensors and plain containers only, never arbitrary pickled objects."""
    return torch.load(path, weights_only=True, map_location="cpu")
