"""Merge a continued-pre-trained model with its base: theta = (1 - alpha) * theta_base + alpha * theta_cpt.

Weight interpolation with the base recovers much of what CPT forgot at a small cost in domain gain,
with no retraining (model soups, Branch-and-Merge). `cpt merge` writes one Hugging Face folder per alpha:

    cpt merge --base BASE_DIR --model CPT_DIR --alpha 0.25 --alpha 0.5 --alpha 0.75 --output DIR
    -> DIR/alpha-0.25/, DIR/alpha-0.50/, DIR/alpha-0.75/  (each loads with from_pretrained; `cpt eval` on each)

Streamed tensor by tensor: each input tensor is read lazily with safetensors' safe_open and each
output tensor is written straight to its file, so peak memory is a few tensors, not two models (a 70B
merge needs no 2x RAM). Sharded checkpoints (model.safetensors.index.json) keep the --model's shard
layout; tied embeddings stay tied (a tensor absent from both files is re-tied by from_pretrained).
Float tensors are combined in fp32 and stored in the --model's dtype; other tensors are copied from --model.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
#: Config fields that fix the tensors' meaning; a mismatch in any of them makes a merge meaningless.
ARCHITECTURE_KEYS = (
    "model_type",
    "architectures",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "head_dim",
    "tie_word_embeddings",
    "rope_theta",
    "max_position_embeddings",
)
#: Files copied from --model into every merged folder (config, generation config, tokenizer).
COPIED = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)


class MergeError(ValueError):
    """The two models cannot be merged; the message says what differs and what to give instead."""


@dataclass(frozen=True)
class Weights:
    """Where each tensor of a model folder lives: tensor name -> safetensors file (relative name)."""

    folder: Path
    files: dict[str, str]
    sharded: bool

    @classmethod
    def of(cls, folder: str | Path, flag: str) -> Weights:
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise MergeError(f"{flag} {folder}: not a Hugging Face model folder (no config.json)")
        if (folder / INDEX).is_file():
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            return cls(folder, dict(weight_map), True)
        if (folder / SINGLE).is_file():
            from safetensors import safe_open

            with safe_open(str(folder / SINGLE), framework="pt") as f:
                return cls(folder, {name: SINGLE for name in f.keys()}, False)
        if list(folder.glob("*.bin")):
            raise MergeError(
                f"{flag} {folder}: weights are pickled .bin files, which cpt never unpickles; re-save the model with "
                "save_pretrained(..., safe_serialization=True) to get safetensors"
            )
        raise MergeError(f"{flag} {folder}: no {SINGLE} or {INDEX}")


def alpha_folder(alpha: float) -> str:
    """alpha-0.50: the output subfolder of one alpha."""
    return f"alpha-{alpha:.2f}"


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def architecture_problems(base: Path, model: Path) -> list[str]:
    """Differences between the two configs in the fields that define the tensors."""
    a, b = read_config(base), read_config(model)
    text_a, text_b = a.get("text_config") or {}, b.get("text_config") or {}
    found = []
    for key in ARCHITECTURE_KEYS:
        left, right = a.get(key, text_a.get(key)), b.get(key, text_b.get(key))
        if left != right:
            found.append(f"config.json {key}: base {left!r} != model {right!r}")
    return found


def tokenizer_problem(base: Path, model: Path) -> str | None:
    """A message if both folders carry a tokenizer and the two differ (token ids would mean different text)."""
    from cpt.shared.dataset import DatasetError, tokenizer_fingerprint

    prints = []
    for folder in (base, model):
        try:
            prints.append(tokenizer_fingerprint(str(folder)))
        except DatasetError:
            prints.append(None)
    if None not in prints and prints[0] != prints[1]:
        return (
            f"the tokenizers of {base} and {model} differ (tokenizer.json / vocab files); a merged embedding row "
            "would average two different tokens. Merge only a model with the base it was trained from"
        )
    return None


def tensor_layout(weights: Weights) -> dict[str, tuple[str, list[int]]]:
    """name -> (safetensors dtype string, shape), read from the file headers only (no tensor data)."""
    from safetensors import safe_open

    layout = {}
    by_file: dict[str, list[str]] = {}
    for name, file in weights.files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(str(weights.folder / file), framework="pt") as f:
            for name in names:
                piece = f.get_slice(name)
                layout[name] = (piece.get_dtype(), list(piece.get_shape()))
    return layout


def check_compatible(base: Weights, model: Weights) -> dict[str, tuple[str, list[int]]]:
    """The --model's tensor layout, after checking that base and model hold the same tensors with the same shapes."""
    problems = architecture_problems(base.folder, model.folder)
    tokenizer = tokenizer_problem(base.folder, model.folder)
    if tokenizer:
        problems.append(tokenizer)
    base_layout, model_layout = tensor_layout(base), tensor_layout(model)
    only_base = sorted(set(base_layout) - set(model_layout))
    only_model = sorted(set(model_layout) - set(base_layout))
    if only_base:
        problems.append(f"{len(only_base)} tensor(s) only in the base, e.g. {only_base[:3]}")
    if only_model:
        problems.append(f"{len(only_model)} tensor(s) only in the model, e.g. {only_model[:3]}")
    from cpt.trainer.weights import TORCH_DTYPES

    unknown = sorted({dtype for dtype, _ in model_layout.values()} - set(TORCH_DTYPES))
    if unknown:
        problems.append(f"tensor dtype(s) {unknown} are not supported (supported: {sorted(TORCH_DTYPES)})")
    for name in sorted(set(base_layout) & set(model_layout)):
        if base_layout[name][1] != model_layout[name][1]:
            problems.append(f"{name}: shape {base_layout[name][1]} in the base, {model_layout[name][1]} in the model")
    if problems:
        raise MergeError(
            f"cannot merge {model.folder} with base {base.folder}: "
            + "; ".join(problems[:6])
            + ("; ..." if len(problems) > 6 else "")
            + ". Give the base the model was continued from"
        )
    return model_layout


class _Inputs:
    """The open safetensors files of base and model (opened once, on first use), and the merged tensor of a name."""

    def __init__(self, base: Weights, model: Weights, density: float = 1.0):
        self.base, self.model, self.density, self.open_files = base, model, density, {}

    def tensor(self, weights: Weights, name: str):
        from safetensors import safe_open

        key = (str(weights.folder), weights.files[name])
        if key not in self.open_files:
            self.open_files[key] = safe_open(str(weights.folder / weights.files[name]), framework="pt").__enter__()
        return self.open_files[key].get_tensor(name)

    def merged(self, name: str, alpha: float):
        """base + alpha * trim(model - base) in fp32 for floats, in the model dtype; others from the model.

        With density 1 (no trim) this is (1 - alpha) * base + alpha * model.
        """
        theta = self.tensor(self.model, name)
        if theta.is_floating_point():
            theta0 = self.tensor(self.base, name).float()
            delta = trim(theta.float().sub_(theta0), self.density)
            theta = theta0.add_(delta, alpha=alpha).to(theta.dtype)
        return theta

    def close(self) -> None:
        for f in self.open_files.values():
            f.__exit__(None, None, None)
        self.open_files.clear()


def trim(delta, density: float):
    """TIES' trim step: keep the `density` fraction of entries with the largest |delta| (ties at the cut are kept),
    zero the rest. Per tensor, as in Yadav et al. 2023; density 1 returns `delta` unchanged."""
    import torch

    if density >= 1.0 or delta.numel() == 0:
        return delta
    keep = max(1, math.ceil(density * delta.numel()))
    magnitude = delta.abs().flatten()
    cut = torch.kthvalue(magnitude, magnitude.numel() - keep + 1).values
    return delta.mul_(delta.abs() >= cut)


def merge_one(
    base: Weights, model: Weights, layout: dict, alpha: float, out: Path, method: str = "linear", density: float = 1.0
) -> Path:
    """Write out/alpha-X.XX/ (weights, config, tokenizer, merge.json), assembled in a temp folder and renamed."""
    from cpt.trainer import checkpoint as ckpt
    from cpt.trainer import weights

    inputs = _Inputs(base, model, density if method == "ties" else 1.0)
    name = alpha_folder(alpha)
    tmp = ckpt.temp_dir(out, name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # The shared header-first writer streams one merged tensor at a time: peak memory is a few tensors.
    entries = {
        n: weights.Entry(tuple(shape), weights.TORCH_DTYPES[dtype], partial(inputs.merged, n, alpha))
        for n, (dtype, shape) in layout.items()
    }
    by_file: dict[str, list[str]] = {}
    for tensor in layout:
        by_file.setdefault(model.files[tensor], []).append(tensor)
    total = 0
    try:
        for file, names in by_file.items():
            total += weights.write_safetensors_file(entries, names, tmp / file, metadata={"format": "pt"})
    finally:
        inputs.close()
    if model.sharded:
        index = {"metadata": {"total_size": total}, "weight_map": dict(model.files)}
        (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for file in COPIED:
        if (model.folder / file).is_file():
            shutil.copy2(model.folder / file, tmp / file)
    info = {"method": method, "alpha": alpha, "base": str(base.folder), "model": str(model.folder)}
    if method == "ties":
        info["density"] = density
    (tmp / "merge.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    ckpt.publish(tmp, out / name)
    return out / name


METHODS = ("linear", "ties")


def merge(
    base: str | Path,
    model: str | Path,
    alphas: list[float],
    output: str | Path,
    method: str = "linear",
    density: float = 0.2,
) -> list[Path]:
    """`model` merged with `base` at each alpha (linear interpolation, or TIES-trimmed task vector); the folders."""
    bad = [a for a in alphas if not math.isfinite(a)]
    if bad or not alphas:
        raise MergeError(f"--alpha: give one or more finite numbers (0 = base, 1 = model), got {alphas}")
    if method not in METHODS:
        raise MergeError(f"--method: {method!r} is not one of {', '.join(METHODS)}")
    if method == "ties" and not 0.0 < density <= 1.0:
        raise MergeError(f"--density: the fraction of each task vector kept must be in (0, 1], got {density}")
    names = [alpha_folder(a) for a in alphas]
    if len(set(names)) != len(names):
        raise MergeError(f"--alpha: values {alphas} give the same folder name twice (two decimals are kept)")
    base_w, model_w = Weights.of(base, "--base"), Weights.of(model, "--model")
    layout = check_compatible(base_w, model_w)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    return [merge_one(base_w, model_w, layout, a, out, method, density) for a in alphas]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="cpt merge",
        description="Merge a continued-pre-trained model with its base: (1 - alpha) * base + alpha * model, or TIES.",
    )
    parser.add_argument("--base", required=True, help="HF folder of the base model the run started from")
    parser.add_argument("--model", required=True, help="HF folder of the trained model (a run's final/ or best/)")
    parser.add_argument(
        "--alpha", type=float, action="append", required=True, help="weight of --model (repeat for a sweep)"
    )
    parser.add_argument("--output", required=True, help="folder that receives alpha-X.XX/ per alpha")
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="linear",
        help="linear: (1 - alpha) * base + alpha * model; ties: base + alpha * the task vector (model - base) with "
        "all but its largest --density fraction of entries per tensor zeroed (TIES' trim step)",
    )
    parser.add_argument("--density", type=float, default=0.2, help="ties: fraction of each task vector kept")
    args = parser.parse_args(argv)
    try:
        folders = merge(args.base, args.model, args.alpha, args.output, args.method, args.density)
    except MergeError as err:
        print(f"cpt merge: {err}", file=sys.stderr)
        return 2
    for alpha, folder in zip(args.alpha, folders):
        print(f"alpha {alpha:.2f} -> {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
