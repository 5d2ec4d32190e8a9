"""Model weights in and out without ever holding the whole model on one rank.

In: under FSDP the model is built on the meta device (parameters only: buffers such as rotary
frequencies stay real), sharded, allocated shard by shard with `to_empty`, and every rank then reads
just its own rows of each tensor from the safetensors files (`get_slice`), so no rank reads or holds
the full model. Without FSDP, `from_pretrained` as usual.

Out: `write_safetensors` streams (name, tensor) pairs into HF-style safetensors files of at most
`max_shard_bytes` each (plus `PREFIX.safetensors.index.json` when there is more than one), gathering
one tensor at a time from its shards; only rank 0 holds a file's worth of tensors before writing it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

MAX_SHARD_BYTES = 5 * 1000**3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def mixed_precision(bf16: bool):
    """FSDP2's policy: bf16 parameters in forward/backward, fp32 gradient reduction; fp32 master weights stay."""
    if not bf16:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


@contextlib.contextmanager
def meta_parameters():
    """Create modules with their parameters on the meta device and their buffers real.

    What accelerate's init_empty_weights(include_buffers=False) does, without the dependency: buffers such
    as rotary inv_freq are computed in __init__ and not stored in checkpoints, so they must stay real.
    """
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def load_model(folder: str, *, world, fsdp: bool, bf16: bool, trust_remote_code: bool, frozen: bool = False):
    """The causal LM of `folder`: loaded (fp32, on the device), or under FSDP built empty on meta for `materialize`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if fsdp:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with meta_parameters():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)
        model.name_or_path = folder
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust_remote_code, dtype=torch.float32)
        model = model.to(world.device)
    if frozen:
        model.eval()
        model.requires_grad_(False)
    return model


def materialize(root: nn.Module, sources: dict[str, str], device: torch.device) -> None:
    """Allocate a sharded meta module's parameters (this rank's shards only), then fill them from safetensors.

    `sources` maps a submodule name of `root` (e.g. "model", "reference") to the HF folder its weights
    come from. Buffers keep the values they were built with.
    """
    buffers = {name: b.detach().clone() for name, b in root.named_buffers()}
    root.to_empty(device=device)
    with torch.no_grad():
        for name, b in root.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])
        for prefix, folder in sources.items():
            load_shards(root.get_submodule(prefix), folder)


def weight_files(folder: str | Path) -> dict[str, Path]:
    """tensor name -> the safetensors file that holds it, for a model folder (single file or index)."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (save the model with safe_serialization=True)")
    found = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            found.update({name: path for name in f.keys()})
    return found


def local_region(tensor: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of this rank's part of `tensor`: the whole tensor unless it is a DTensor."""
    if not hasattr(tensor, "device_mesh"):
        return tuple(tensor.shape), (0,) * tensor.ndim
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(shape), tuple(offset)


def read_region(handle, name: str, shape: tuple[int, ...], offset: tuple[int, ...]) -> torch.Tensor:
    """Rows `offset : offset + shape` of one stored tensor, read without loading the rest."""
    part = handle.get_slice(name)
    if not shape:
        return handle.get_tensor(name)
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    return part[index]


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@torch.no_grad()
def fill_from_files(targets: dict[str, torch.Tensor], files: dict[str, Path], where: str) -> None:
    """Copy each stored tensor's part that `targets[name]` (a plain tensor or a DTensor shard) holds into it."""
    from safetensors import safe_open

    missing = sorted(set(targets) - set(files))
    if missing:
        raise RuntimeError(
            f"{where}: the weights have no tensor(s) {missing[:3]} ({len(missing)} in all) that the model "
            "built from its config.json needs; was the folder written by another model class?"
        )
    by_file: dict[Path, list[str]] = {}
    for name in targets:
        by_file.setdefault(files[name], []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as handle:
            for name in names:
                target = targets[name]
                shape, offset = local_region(target)
                stored = handle.get_slice(name).get_shape()
                if tuple(stored) != tuple(target.shape):
                    wanted = tuple(target.shape)
                    raise RuntimeError(f"{where}: {name} is {tuple(stored)} on disk, the model wants {wanted}")
                local_tensor(target).copy_(read_region(handle, name, shape, offset))


def load_shards(model: nn.Module, folder: str) -> None:
    """Fill `model`'s parameters (and stored buffers) from `folder`'s safetensors, each rank its own shards."""
    files = weight_files(folder)
    targets = dict(model.named_parameters())  # tied weights appear once, under the name the file holds
    targets.update({n: b for n, b in model.named_buffers() if n in files})
    fill_from_files(targets, files, str(folder))


def tied_names(model: nn.Module) -> set[str]:
    """State-dict keys that are ties to another key (e.g. lm_head.weight), which HF files leave out."""
    return set(getattr(model, "all_tied_weights_keys", None) or {})


@dataclass
class Entry:
    """One tensor to write: its global shape and stored dtype, and how to get the whole of it (maybe a collective)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    fetch: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def entries_of(state: dict[str, torch.Tensor], dtype: torch.dtype | None = None, skip=()) -> dict[str, Entry]:
    """Entries for a (maybe sharded) state dict; floating tensors are cast to `dtype` when it is given."""

    def fetch(tensor, out_dtype):
        whole = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # DTensor: all-gather
        return whole.detach().to(device="cpu", dtype=out_dtype)

    found = {}
    for name, tensor in state.items():
        if name in skip:
            continue
        out_dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        found[name] = Entry(tuple(tensor.shape), out_dtype, partial(fetch, tensor, out_dtype))
    return found


# safetensors' own writer needs every tensor of a file in memory at once; this one writes the header from the
# shapes first and then each tensor as soon as it is gathered, so a rank holds one tensor, not a 5 GB file.
SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip
#: safetensors dtype string -> torch dtype (to build an Entry from a file header).
TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}


def plan_files(entries: dict[str, Entry], max_shard_bytes: int) -> list[list[str]]:
    """Names grouped into files of at most `max_shard_bytes` (a larger single tensor gets a file of its own)."""
    files, current, size = [], [], 0
    for name, entry in entries.items():
        if current and size + entry.nbytes > max_shard_bytes:
            files.append(current)
            current, size = [], 0
        current.append(name)
        size += entry.nbytes
    if current or not files:
        files.append(current)
    return files


def safetensors_header(entries: dict[str, Entry], names: list[str], metadata: dict | None) -> bytes:
    header, offset = {}, 0
    for name in names:
        entry = entries[name]
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    header["__metadata__"] = {str(k): str(v) for k, v in (metadata or {"format": "pt"}).items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors_file(
    entries: dict[str, Entry], names: list[str], path: str | Path, *, main: bool = True, metadata: dict | None = None
) -> int:
    """Write one safetensors file of `names`, header first, one fetched tensor at a time; renamed into place once
    complete. Returns the bytes of tensor data. Every rank calls it (a fetch may be collective); only `main` writes.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") if main else contextlib.nullcontext() as f:
        if main:
            f.write(safetensors_header(entries, names, metadata))
        for name in names:
            tensor = entries[name].fetch()
            if tuple(tensor.shape) != entries[name].shape or tensor.dtype != entries[name].dtype:
                raise RuntimeError(f"internal: {name} should be {entries[name].shape} {entries[name].dtype}, "
                                   f"got {tuple(tensor.shape)} {tensor.dtype}")  # fmt: skip
            if main:
                f.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            del tensor
    if main:
        os.replace(tmp, path)
    return sum(entries[name].nbytes for name in names)


def write_safetensors(
    entries: dict[str, Entry],
    folder: str | Path,
    prefix: str = "model",
    *,
    main: bool = True,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    metadata: dict | None = None,
) -> list[Path]:
    """Write PREFIX.safetensors, or PREFIX-0000i-of-0000n.safetensors + PREFIX.safetensors.index.json.

    Every rank must call this (fetching a sharded tensor is collective); only `main` writes. Files get
    their names by rename once complete.
    """
    folder = Path(folder)
    groups = plan_files(entries, max_shard_bytes)
    many = len(groups) > 1
    written, weight_map = [], {}
    for i, names in enumerate(groups, 1):
        final = folder / (f"{prefix}-{i:05d}-of-{len(groups):05d}.safetensors" if many else f"{prefix}.safetensors")
        write_safetensors_file(entries, names, final, main=main, metadata=metadata)
        if main:
            written.append(final)
            weight_map.update({name: final.name for name in names})
    if main and many:
        total = sum(e.nbytes for e in entries.values())
        index = {"metadata": {"total_size": total, **(metadata or {})}, "weight_map": weight_map}
        (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return written


def safetensors_files(path: str | Path) -> dict[str, Path]:
    """tensor name -> file for PREFIX.safetensors, or for the sharded files its PREFIX.safetensors.index.json names."""
    from safetensors import safe_open

    path = Path(path)
    index = Path(f"{path}.index.json") if not str(path).endswith(".index.json") else path
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: index.parent / file for name, file in weight_map.items()}
    with safe_open(str(path), framework="pt") as f:
        return {name: path for name in f.keys()}


def safetensors_exists(path: str | Path) -> bool:
    return Path(path).is_file() or Path(f"{path}.index.json").is_file()


def save_hf_folder(folder: Path, model: nn.Module, tokenizer, state: dict, dtype: str, main: bool) -> None:
    """An HF model folder (config, sharded safetensors in `dtype`, tokenizer), streamed one tensor at a time."""
    write_safetensors(entries_of(state, DTYPES[dtype], skip=tied_names(model)), folder, "model", main=main)
    if main:
        config = copy.deepcopy(model.config)  # the running model keeps its own dtype
        config.dtype = DTYPES[dtype]
        config.save_pretrained(str(folder))
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(str(folder))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
