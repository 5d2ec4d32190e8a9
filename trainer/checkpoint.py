"""Atomic checkpoints: written to a temporary folder, then renamed; found again by `--resume`.

output_dir/checkpoint-STEP/
  .metadata, __R_0.distcp                           torch.distributed.checkpoint (DCP): model weights and
                                                    AdamW state, each rank writing its own shards in parallel
  scheduler.pt                                      torch.save; loaded with weights_only=True
  config.json, tokenizer files                      so `cpt export` can turn the folder into an HF model
  rng_state_rank{R}.pt, data_state_rank{R}.json     per rank: RNG states, mixture state (global: equal on all)
  trainer_state.json                                step, tokens, metrics so far; written last (the marker)
A folder only gets its final name once every file is in it, so a kill at any moment leaves either a
complete checkpoint or a `.tmp-*` folder that resume ignores (with a warning) and deletes. DCP
reshards on load, so a checkpoint of W ranks resumes on any other number of ranks. With
`checkpoint.async_save` the DCP files are written by a background thread (dcp.async_save) while
training goes on; the folder is published when that write has finished, at the next checkpoint or
at the end of the run.
"""

from __future__ import annotations

import contextlib
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
REQUIRED = (TRAINER_STATE, "config.json", ".metadata", "scheduler.pt")


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


@contextlib.contextmanager
def quiet_single_process():
    """Silence DCP's "assuming the intent is to save in a single process": without torchrun that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class Checkpointer:
    """Writes and reads checkpoint-STEP/ folders: DCP for model + optimizer, small files for the rest."""

    def __init__(self, out: Path, world, model, optimizer, scheduler, tokenizer, cfg):
        self.out, self.world, self.model, self.optimizer = Path(out), world, model, optimizer
        self.scheduler, self.tokenizer, self.cfg = scheduler, tokenizer, cfg
        self.pending = None  # (future, tmp folder, final folder, trainer-state payload) of an async save
        self._group = None

    def state(self) -> dict:
        """{"model": ..., "optimizer": ...}: this rank's shards (DTensors under FSDP), tensors only."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        optim = get_optimizer_state_dict(self.model, self.optimizer)
        # Only the per-parameter tensors: DCP pickles any non-tensor value and unpickles it with
        # weights_only=False on load. The hyperparameters come back from the config and the scheduler.
        model = get_model_state_dict(self.model, options=self.model_options())
        return {"model": model, "optimizer": {"state": optim["state"]}}

    def model_options(self):
        """LoRA (frozen base): only the trainable tensors go into a checkpoint; the base comes from `model:`."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        frozen = any(not p.requires_grad for p in self.model.parameters())
        return StateDictOptions(ignore_frozen_params=True, strict=False) if frozen else StateDictOptions()

    def process_group(self):
        """A gloo group of its own for async saves: their collectives then never interleave with training's."""
        import torch.distributed as dist

        if self._group is None and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")
        return self._group

    def save(self, step: int, data_state: dict, payload, name: str | None = None) -> None:
        """Start writing checkpoint-STEP (synchronously, or in the background with async_save).

        `payload()` returns trainer_state.json's content; it is taken now, written when the folder is complete.
        `name`: another folder name (e.g. stable-checkpoint-STEP), which keep_last never prunes.
        """
        import torch.distributed.checkpoint as dcp

        from cpt.trainer import distributed

        self.wait()
        world, name = self.world, name or f"checkpoint-{step}"
        tmp = temp_dir(self.out, name)
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            self.model.config.save_pretrained(str(tmp))
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(tmp))
        distributed.barrier(world)
        write_rank_files(tmp, world.rank, data_state)
        state = self.state()
        if self.cfg.async_save:
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.process_group())
        else:
            with quiet_single_process():
                dcp.save(state, checkpoint_id=str(tmp), no_dist=not self.world.distributed)
            future = None
        self.pending = (future, tmp, self.out / name, payload())
        if future is None:
            self.wait()

    def wait(self) -> None:
        """Finish the save in flight: every rank's DCP files are written, then mark and publish the folder."""
        from cpt.trainer import distributed

        if self.pending is None:
            return
        future, tmp, final, payload = self.pending
        self.pending = None
        if future is not None:
            future.result()
        distributed.barrier(self.world)
        if self.world.is_main:
            write_trainer_state(tmp, payload)  # last: its presence marks the folder complete
            publish(tmp, final)
            prune(self.out, self.cfg.keep_last)
        distributed.barrier(self.world)

    def load(self, folder: Path) -> None:
        """Model, optimizer and scheduler from a checkpoint, resharded to this run's ranks by DCP."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        state = self.state()
        with quiet_single_process():
            dcp.load(state, checkpoint_id=str(folder), no_dist=not self.world.distributed)
        optim = get_optimizer_state_dict(self.model, self.optimizer)
        optim["state"] = state["optimizer"]["state"]
        set_model_state_dict(self.model, state["model"], options=self.model_options())
        set_optimizer_state_dict(self.model, self.optimizer, optim)
        self.scheduler.load_state_dict(torch_load(folder / "scheduler.pt"))
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr  # the scheduled lr of the step we resume at, as the uninterrupted run has it
