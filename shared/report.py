"""Tables and pictures for the demo and the experiment, built from what `cpt train` and `cpt eval` wrote.

Only files are read here (metrics.jsonl, eval JSON), never trainer code: `shared/` imports neither side.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file (a run's metrics.jsonl); [] when it does not exist."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_eval(path: str | Path, metric: str = "ppl") -> dict[str, float]:
    """{set name: value} from a `cpt eval --output` file: keys `<name>_ppl`, or `<name>_bpb` (bits per byte).

    A value `cpt eval` could not compute (null: bytes unknown for a tokenizer without offsets) reads as NaN.
    """
    payload = json.loads(Path(path).read_text(encoding="utf-8"))
    suffix = f"_{metric}"
    return {
        key.removesuffix(suffix): float("nan") if value is None else float(value)
        for key, value in payload.items()
        if key.endswith(suffix)
    }


def change_pct(before: float, after: float) -> float:
    """Relative change in percent: negative when the perplexity fell."""
    return 100.0 * (after - before) / before


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown pipe table whose columns line up in a terminal too (first column left, others right)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        padded = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ("-" if i == 0 else ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def before_after_table(
    before: dict[str, float], after: dict[str, float], labels: dict[str, str], metric: str = "ppl"
) -> str:
    """The demo's table: one row per eval set, perplexity (or bits per byte) before → after and the change."""
    rows = []
    digits = 2 if metric == "ppl" else 3
    for name, label in labels.items():
        b, a = before[name], after[name]
        rows.append([label, f"{b:.{digits}f}", "→", f"{a:.{digits}f}", f"{change_pct(b, a):+.1f}%"])
    return format_table(["held-out set", f"{metric} before", "", f"{metric} after", "change"], rows)


def eval_series(records: list[dict], name: str) -> list[tuple[int, float]]:
    """(step, perplexity) of one eval set over a run, from its metrics.jsonl records."""
    key = f"{name}_ppl"
    return [(r["step"], r[key]) for r in records if key in r]


def loss_series(records: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def _save(fig, out_png: str | Path) -> None:
    import matplotlib.pyplot as plt

    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{out_png}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_png)  # readers (the README) never see half a picture


def plot_demo(runs: list[tuple[str, list[dict]]], labels: dict[str, str], out_png: str | Path) -> None:
    """One panel per run (base pre-training, CPT): training loss and each eval set's perplexity by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(runs), figsize=(5.5 * len(runs), 6.5), squeeze=False, sharex="col")
    for col, (title, records) in enumerate(runs):
        ax_loss, ax_ppl = axes[0][col], axes[1][col]
        loss = loss_series(records)
        if loss:
            ax_loss.plot(*zip(*loss), lw=0.8, color="0.3")
        ax_loss.set(title=title, ylabel="train loss")
        for index, (name, label) in enumerate(labels.items()):
            points = eval_series(records, name)
            if not points:
                continue
            color = f"C{index}"
            ax_ppl.plot(*zip(*points), marker="o", ms=3, color=color, label=label)
            ax_ppl.axhline(points[0][1], ls="--", lw=0.8, color=color)  # the step-0 value: "before"
        ax_ppl.set(xlabel="optimizer step", ylabel="held-out perplexity (log)", yscale="log")
        ax_ppl.legend(fontsize=8)
    fig.suptitle("dashed: perplexity at step 0", fontsize=9)
    _save(fig, out_png)


def plot_frontier(points: list[tuple[str, float, float]], out_png: str | Path) -> None:
    """Forgetting frontier: general-ppl increase (%) against domain-ppl gain (%), one point per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for index, (name, gain, forgetting) in enumerate(points):
        ax.scatter([gain], [forgetting], color=f"C{index}", s=40, zorder=3)
        ax.annotate(name, (gain, forgetting), textcoords="offset points", xytext=(5, 4), fontsize=9)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set(
        xlabel="domain gain (% lower code perplexity than the base) →  better",
        ylabel="forgetting (% higher general perplexity) ↓ better",
        title="Forgetting vs adaptation at an equal token budget",
    )
    ax.grid(alpha=0.3)
    _save(fig, out_png)
