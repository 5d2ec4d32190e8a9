"""One process or many under torchrun: DDP (gloo on CPU, nccl on GPU) or FSDP2 `fully_shard`.

Everything the loop needs from torch.distributed goes through the few helpers here, and each of them
is a no-op in a single process, so the loop has no `if distributed:` branches of its own.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    """Where this process sits: rank, world size, and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto", timeout_s: float = 3600) -> Dist:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK, pick the device and start the process group if needed.

    `timeout_s` bounds every collective: ranks waiting on a barrier while rank 0 writes a checkpoint
    wait up to that long (NCCL's default of 10 minutes is shorter than a large model's checkpoint).
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
    else:
        where = torch.device("cpu")
    # Under torchrun a process group also for one process: FSDP2 (train.fsdp) needs one even then.
    if (world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ) and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            device_id=where if use_cuda else None,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return Dist(rank, world_size, local_rank, where)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, world: Dist, fsdp: bool, layer_classes: list[str] | None = None, mp_policy=None):
    """DDP around `module`, or FSDP2 `fully_shard` on each decoder layer and then on `module` (the root).

    The layers are found by class name from the HF models' `_no_split_modules` (e.g. LlamaDecoderLayer),
    the same unit torchtitan shards. FSDP2 also runs in a single process (a mesh of one). `mp_policy` is
    FSDP2's MixedPrecisionPolicy (None: fp32 throughout). Works on meta-device modules too (sharded before
    any weight is allocated).
    """
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not dist.is_initialized():
            raise RuntimeError("train.fsdp: true needs torchrun (a process group), even with one process")
        names = set(layer_classes or [])
        for sub in module.modules():
            names.update(getattr(sub, "_no_split_modules", None) or [])
        layers = [m for m in module.modules() if type(m).__name__ in names]
        if not layers:
            raise RuntimeError(f"train.fsdp: found no decoder layers of classes {sorted(names)} to shard")
        kwargs = {"mp_policy": mp_policy or MixedPrecisionPolicy()}
        for layer in layers:
            fully_shard(layer, **kwargs)
        fully_shard(module, **kwargs)
        return module
    if not world.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [world.local_rank] if world.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def grad_sync(module: nn.Module, last: bool, fsdp_every_micro_batch: bool = True):
    """Context for one micro-batch: whether this backward reduces gradients over ranks.

    DDP all-reduces only on the last micro-batch of a step (each rank holds full gradients anyway). FSDP2
    reduce-scatters every micro-batch by default, so a rank only ever holds its gradient shard; with
    `fsdp_every_micro_batch=False` it waits for the last one, keeping full fp32 gradients of every
    layer until then (4 bytes per parameter per rank more) in exchange for fewer collectives.
    """
    if hasattr(module, "no_sync"):  # DDP
        return contextlib.nullcontext() if last else module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(last or fsdp_every_micro_batch)
    return contextlib.nullcontext()


def all_reduce_sum(tensor: torch.Tensor, world: Dist) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op in one process) and return it."""
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(obj, world: Dist) -> list:
    """Every rank's `obj`, in rank order (on all ranks)."""
    if not world.distributed:
        return [obj]
    out = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, world: Dist):
    """Rank 0's `obj` on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: Dist) -> None:
    if world.distributed:
        dist.barrier()
