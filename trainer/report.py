"""Run logging: metrics.jsonl (one line per step), TensorBoard scalars, and report.png (loss, ppl, bpb).

metrics.jsonl is the record; TensorBoard and the picture are views of it. On resume, the file is cut
back to the checkpoint's byte offset and TensorBoard purges events after the checkpoint's step, so a
resumed run leaves the same history as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

METRICS = "metrics.jsonl"
REPORT = "report.png"


def truncate(path: Path, size: int) -> None:
    """Cut a file back to `size` bytes (what it held at the checkpoint); create it empty if missing.

    A file shorter than `size` (deleted or cut by hand since the checkpoint) is kept as it is, with a
    warning: `truncate()` would pad it with NUL bytes, which no JSON-lines reader accepts.
    """
    with open(path, "a+b") as f:
        held = f.seek(0, os.SEEK_END)
        if held < size:
            warnings.warn(
                f"{path} holds {held} bytes but the checkpoint recorded {size}; its lines up to the checkpoint "
                "are lost (was it deleted or moved?). Logging continues after what it holds",
                stacklevel=2,
            )
            return
        f.truncate(size)


def finite_or_null(value):
    """NaN/inf become null: metrics.jsonl stays strict JSON that any reader (jq, pandas) accepts."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_null(v) for v in value]
    return value


class JsonlFile:
    """An append-only JSON-lines file that a resume cuts back to a checkpoint's byte offset (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool, resume_bytes: int = 0):
        self.path, self.enabled = Path(path), enabled
        if enabled:
            truncate(self.path, resume_bytes)
            self.file = open(self.path, "a", encoding="utf-8")

    def write(self, records: list[dict]) -> None:
        if self.enabled:
            self.file.writelines(json.dumps(finite_or_null(r), sort_keys=True) + "\n" for r in records)

    def offset(self) -> int:
        """Bytes written so far (flushed): stored in each checkpoint to cut back to on resume."""
        if not self.enabled:
            return 0
        self.file.flush()
        return self.path.stat().st_size

    def close(self) -> None:
        if self.enabled:
            self.file.close()


class RunLog:
    """metrics.jsonl + TensorBoard scalars, written by rank 0 only."""

    def __init__(self, output_dir: Path, enabled: bool, resume_bytes: int = 0, resume_step: int | None = None):
        self.jsonl = JsonlFile(Path(output_dir) / METRICS, enabled, resume_bytes)
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops the events a killed run wrote after its last checkpoint.
            purge = None if resume_step is None else resume_step + 1
            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=purge)

    def write(self, record: dict) -> None:
        if self.writer is None:
            return
        self.jsonl.write([record])
        for key, value in flatten(record).items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, record["step"])

    def offset(self) -> int:
        if self.writer is not None:
            self.writer.flush()
        return self.jsonl.offset()

    def close(self) -> None:
        self.jsonl.close()
        if self.writer is not None:
            self.writer.close()


def flatten(record: dict, prefix: str = "") -> dict:
    """{"loss_per_source": {"code": 1.0}} -> {"loss_per_source/code": 1.0} (TensorBoard tag names)."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_report(records: list[dict], out_png: str | Path) -> None:
    """Training loss, and each eval set's perplexity and bits per byte against step, step-0 baselines marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    fig, (ax_loss, ax_ppl, ax_bpb) = plt.subplots(1, 3, figsize=(16, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    ax_loss.set(xlabel="step", ylabel="train loss (token-mean NLL)", title="training loss")
    panels = (
        (ax_ppl, "_ppl", "perplexity", "held-out perplexity (dashed: step-0 baseline)"),
        (ax_bpb, "_bpb", "bits per byte", "held-out bits per byte (comparable across tokenizers)"),
    )
    for ax, suffix, ylabel, title in panels:
        keys = sorted({k for r in records for k in r if k.endswith(suffix)})
        for index, key in enumerate(keys):
            # null (unknown bytes, or NaN written as null) is left out of the line.
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if not points:
                continue
            color = f"C{index}"
            ax.plot(*zip(*points), marker="o", ms=3, color=color, label=key.removesuffix(suffix))
            baseline = [value for step, value in points if step == 0]
            if baseline:
                ax.axhline(baseline[0], ls="--", lw=0.8, color=color)
                ax.annotate("step 0", (0, baseline[0]), color=color, fontsize=8, va="bottom")
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        if keys:
            ax.legend()
    fig.tight_layout()
    tmp = Path(f"{out_png}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)
