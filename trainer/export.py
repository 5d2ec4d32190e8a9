"""`cpt export --checkpoint DIR --output DIR [--dtype bf16]`: a checkpoint-STEP/ folder as a Hugging Face model.

checkpoint-STEP/ keeps the weights as a torch.distributed.checkpoint (DCP) folder, in shards of however
many ranks wrote it. This reads them back one tensor at a time (DCP assembles each tensor from its
shards) and streams them into safetensors files of at most 5 GB with an index, so other tools can
evaluate intermediate checkpoints; no GPU and no process group needed, and never the whole model in memory.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

from cpt.trainer import checkpoint as ckpt
from cpt.trainer import weights

PREFIX = "model."  # the checkpoint's model weights live under this key of the DCP state dict


def model_entries(folder: Path, dtype: torch.dtype) -> dict[str, weights.Entry]:
    """Entries for every model tensor of a DCP checkpoint, each read from disk when it is written."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(folder)).read_metadata()

    def fetch(key: str, meta: TensorStorageMetadata) -> torch.Tensor:
        tensor = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        with ckpt.quiet_single_process():
            dcp.load({key: tensor}, checkpoint_id=str(folder), no_dist=True)
        return tensor.to(dtype) if tensor.is_floating_point() else tensor

    entries = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith(PREFIX) and isinstance(meta, TensorStorageMetadata):
            stored = dtype if meta.properties.dtype.is_floating_point else meta.properties.dtype
            entries[key[len(PREFIX) :]] = weights.Entry(tuple(meta.size), stored, partial(fetch, key, meta))
    return entries


def export_checkpoint(checkpoint: str | Path, output: str | Path, dtype: str = "fp32", trust_remote_code=False):
    """Write `output` (an HF model folder: config, safetensors, tokenizer) from a checkpoint-STEP/ folder."""
    import copy

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, out = Path(checkpoint), Path(output)
    problems = []
    if not (folder / ".metadata").is_file():
        problems.append(f"{folder}: no .metadata; give a checkpoint-STEP folder written by `cpt train`")
    if not (folder / "config.json").is_file():
        problems.append(f"{folder}: no config.json (the model's config is saved in every checkpoint)")
    if out.exists() and any(out.iterdir()):
        problems.append(f"{out}: exists and is not empty; choose a new --output folder")
    if problems:
        raise ValueError("; ".join(problems))
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    with weights.meta_parameters():  # only for the names of tied weights, which HF files leave out
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    entries = model_entries(folder, weights.DTYPES[dtype])
    for name in weights.tied_names(skeleton):
        entries.pop(name, None)
    out.mkdir(parents=True, exist_ok=True)
    weights.write_safetensors(entries, out, "model")
    config = copy.deepcopy(config)
    config.dtype = weights.DTYPES[dtype]
    config.save_pretrained(str(out))
    if (folder / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code).save_pretrained(str(out))
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cpt export", description="Turn a `cpt train` checkpoint-STEP folder into a Hugging Face model folder."
    )
    parser.add_argument("--checkpoint", required=True, help="output_dir/checkpoint-STEP")
    parser.add_argument("--output", required=True, help="new folder for the HF model (from_pretrained loads it)")
    parser.add_argument("--dtype", choices=sorted(weights.DTYPES), default="fp32", help="dtype of the weights")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.output, args.dtype, args.trust_remote_code)
    except ValueError as err:
        print(f"cpt export: {err}", file=sys.stderr)
        return 2
    print(f"cpt export: {args.checkpoint} -> {out} ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
