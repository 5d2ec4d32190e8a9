"""`cpt experiment`: forgetting-mitigation variants from the demo's base model and data, at equal token budgets.

    cpt experiment --workdir demo [--variants NAME ...] [--steps N] [--force]

Each variant is one `cpt train` run (the same steps, batch and sequence length, so the same number of
tokens) followed by `cpt eval` on the demo's held-out sets. EXPERIMENT.md gets the table and a comparison
with Gururangan et al. 2020 and Ibrahim et al. 2024 written from the numbers, frontier.png the trade-off.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from cpt.shared import report
from cpt.shared.corpus import CorpusConfig
from cpt.shared.demo import (
    STATE,
    DemoScale,
    StageError,
    Stages,
    contamination_lines,
    cpt_command,
    eval_command,
    exit_on_sigterm,
    train,
    train_config,
)


@dataclass(frozen=True)
class Variant:
    """One way to continue pre-training: the general replay share, a curriculum, or a regulariser."""

    name: str
    description: str
    replay: float = 0.0
    """constant share of general tokens (0 = domain only)"""
    curriculum: tuple[float, float] | None = None
    """linear domain share start -> end over the run (general replay is the rest)"""
    kl_weight: float = 0.0
    ewc_weight: float = 0.0
    lora: bool = False
    """LoRA adapters (train.peft) instead of updating every weight, at LORA_LR_FACTOR x the CPT lr"""
    anneal: bool = False
    """wsd schedule; the last ANNEAL_RATIO of the run draws from an even code/general mixture"""


# λ values: the usual orders of magnitude for a token-mean loss (KL: distillation weight ~1; EWC: with the
# per-token Fisher, (λ/2) Σ F Δθ² is ~ λ x the predicted rise of general NLL per token, so λ ~ 10 weighs
# forgetting above domain gain; it is about what λ = 1000 was with the old per-sequence Fisher at seq_len 256).
# Not tuned on this table.
VARIANTS = (
    Variant("domain-only", "no mitigation: code only"),
    Variant("replay-5", "5% general replay", replay=0.05),
    Variant("replay-25", "25% general replay", replay=0.25),
    Variant("curriculum", "domain share 0.5 → 0.9 (general 50% → 10%)", curriculum=(0.5, 0.9)),
    Variant("kl", "code only + KL to the frozen base (λ=1, all tokens)", kl_weight=1.0),
    Variant("ewc", "code only + EWC, per-token Fisher on general text (λ=10)", ewc_weight=10.0),
    Variant("lora", "code only, LoRA r=16 on attention + MLP (10x lr)", lora=True),
    Variant("anneal", "code only, wsd; last 20%: 50% code / 50% general", anneal=True),
)
#: Merges of domain-only's final/ with the base (no training: the same token budget as domain-only).
MERGE_ALPHAS = (0.25, 0.5, 0.75)
# LoRA needs a larger lr than full training (Biderman et al. 2024 use ~10-20x); 10x, not tuned on this table.
LORA_LR_FACTOR = 10.0
LORA = {"method": "lora", "r": 16, "alpha": 32.0, "dropout": 0.0}
ANNEAL_RATIO = 0.2


FISHER_SET = "general_train"


def variant_sources(variant: Variant, paths: dict[str, str]) -> tuple[list[dict], dict | None]:
    """The `data.sources` (code first: it is the domain source) and `data.schedule` of a variant."""
    code = {"name": "code", "path": paths["code-train"], "weight": 1.0}
    general = {"name": "general", "path": paths["general-train"], "weight": 0.0}
    if variant.curriculum:
        start, end = variant.curriculum
        schedule = {"type": "linear", "source": "code", "start": start, "end": end}
        return [code, {**general, "weight": 1.0}], schedule
    if variant.replay > 0:
        return [{**code, "weight": round(1 - variant.replay, 6)}, {**general, "weight": variant.replay}], None
    return [code], None


def variant_regularization(variant: Variant) -> dict | None:
    reg = {}
    if variant.kl_weight:
        reg["kl"] = {"weight": variant.kl_weight, "on": "all"}  # no replay tokens to restrict it to
    if variant.ewc_weight:
        # The Fisher comes from general *training* text (eval set FISHER_SET), never from the held-out set.
        reg["ewc"] = {"weight": variant.ewc_weight, "source": FISHER_SET}
    return reg or None


def variant_overrides(variant: Variant, config: dict, paths: dict[str, str]) -> dict:
    """`config` (a train_config) with the variant's LoRA or anneal settings applied."""
    if variant.lora:
        config["train"]["peft"] = dict(LORA)
        config["train"]["lr"] = config["train"]["lr"] * LORA_LR_FACTOR
    if variant.anneal:
        config["train"].update({"lr_schedule": "wsd", "decay_ratio": ANNEAL_RATIO})
        general = {"name": "general", "path": paths["general-train"], "weight": 0.5}
        config["data"]["anneal"] = {"start": "decay", "sources": [{"name": "code", "weight": 0.5}, general]}
    return config


#: TIES' trim step on domain-only's task vector: keep the largest 20% of each tensor's change, at full weight.
TIES_DENSITY = 0.2
TIES_NAME = f"ties-{TIES_DENSITY:.2f}"


def merge_command(base: str, model: Path, out: Path, ties: bool = False) -> list[str]:
    args = ["merge", "--base", base, "--model", str(model), "--output", str(out)]
    if ties:
        return cpt_command(*args, "--method", "ties", "--density", str(TIES_DENSITY), "--alpha", "1.0")
    for alpha in MERGE_ALPHAS:
        args += ["--alpha", str(alpha)]
    return cpt_command(*args)


def result_row(name: str, base: dict[str, float], result: dict[str, float]) -> dict:
    """Perplexities of one variant and its forgetting / gain against the base model, in percent."""
    return {
        "variant": name,
        "domain_ppl": result["domain"],
        "general_ppl": result["general"],
        "forgetting_pct": report.change_pct(base["general"], result["general"]),
        "domain_gain_pct": -report.change_pct(base["domain"], result["domain"]),
    }


def results_table(base: dict[str, float], rows: list[dict], seconds: dict[str, float]) -> str:
    table = [["base (before CPT)", f"{base['domain']:.2f}", f"{base['general']:.2f}", "—", "—", "—"]]
    for r in rows:
        table.append(
            [
                r["variant"],
                f"{r['domain_ppl']:.2f}",
                f"{r['general_ppl']:.2f}",
                f"{r['forgetting_pct']:+.1f}%",
                f"{r['domain_gain_pct']:+.1f}%",
                f"{seconds.get(r['variant'], 0):.0f}",
            ]
        )
    headers = ["variant", "domain ppl", "general ppl", "forgetting", "domain gain", "time (s)"]
    return report.format_table(headers, table)


def comparison(rows: list[dict]) -> list[str]:
    """Plain sentences comparing the table with the two papers; each claim is computed from the rows."""
    by = {r["variant"]: r for r in rows}
    lines = []
    gains = [r["domain_gain_pct"] for r in rows]
    if gains:
        verdict = "agrees" if min(gains) > 0 else "does not fully agree"
        lines.append(
            f"- **Gururangan et al. 2020** (adaptive pre-training lowers the domain's held-out loss): {verdict}. "
            f"Domain perplexity fell by {min(gains):.1f}% to {max(gains):.1f}% across the variants"
            + ("." if min(gains) > 0 else "; at least one variant did not lower it.")
        )
    if "domain-only" in by:
        f0 = by["domain-only"]["forgetting_pct"]
        text = (
            f"- **Ibrahim et al. 2024** (re-warming and re-decaying the LR on new data causes forgetting; a small "
            f"replay fraction removes most of it): with the LR re-warmed and no mitigation, general perplexity "
            f"moved {f0:+.1f}%"
        )
        if f0 <= 0:
            text += ", so this run showed no forgetting to remove and cannot confirm the replay finding."
        else:
            text += " (forgetting: agrees)."
            for name in ("replay-5", "replay-25"):
                if name in by:
                    removed = 100 * (f0 - by[name]["forgetting_pct"]) / f0
                    kept = by[name]["domain_gain_pct"]
                    word = "most of it" if removed >= 50 else "less than half of it"
                    text += (
                        f" {name} removed {removed:.0f}% of that increase ({word}) while keeping a "
                        f"{kept:.1f}% domain gain (domain-only: {by['domain-only']['domain_gain_pct']:.1f}%)."
                    )
            if "replay-5" in by:
                removed = 100 * (f0 - by["replay-5"]["forgetting_pct"]) / f0
                text += " On the small-replay claim this run " + ("agrees." if removed >= 50 else "disagrees.")
        lines.append(text)
    if "lora" in by and "domain-only" in by:
        r, d = by["lora"], by["domain-only"]
        learns_less = r["domain_gain_pct"] < d["domain_gain_pct"]
        forgets_less = r["forgetting_pct"] < d["forgetting_pct"]
        verdict = "agrees" if learns_less and forgets_less else "disagrees"
        lines.append(
            f"- **Biderman et al. 2024** (LoRA learns less and forgets less than full CPT): {verdict}. LoRA gained "
            f"{r['domain_gain_pct']:.1f}% on the domain vs {d['domain_gain_pct']:.1f}% for full training"
            f" ({'less' if learns_less else 'not less'}) and moved general perplexity {r['forgetting_pct']:+.1f}% vs "
            f"{d['forgetting_pct']:+.1f}% ({'less' if forgets_less else 'not less'} forgetting)."
        )
    merges = [by[f"merge-{a:.2f}"] for a in MERGE_ALPHAS if f"merge-{a:.2f}" in by]
    if merges and "domain-only" in by:
        d = by["domain-only"]
        parts = []
        f0, g0 = d["forgetting_pct"], d["domain_gain_pct"]
        for r in merges:
            removed = 100 * (f0 - r["forgetting_pct"]) / f0 if f0 > 0 else 0.0
            kept = 100 * r["domain_gain_pct"] / g0 if g0 > 0 else 0.0
            parts.append(f"{r['variant']} removed {removed:.0f}% of the forgetting, kept {kept:.0f}% of the gain")
        half = by.get("merge-0.50")
        if half is not None and d["forgetting_pct"] > 0 and d["domain_gain_pct"] > 0:
            removed = (d["forgetting_pct"] - half["forgetting_pct"]) / d["forgetting_pct"]
            kept = half["domain_gain_pct"] / d["domain_gain_pct"]
            verdict = "agrees" if removed > 1 - kept else "disagrees"
        else:
            verdict = "cannot be checked (domain-only showed no forgetting or no gain)"
        lines.append(
            "- **Alexandrov et al. 2024** (merging the CPT model with its base recovers more of the forgetting than "
            f"it costs in domain gain): {verdict}. " + "; ".join(parts) + "."
        )
    if TIES_NAME in by and "domain-only" in by:
        r, d = by[TIES_NAME], by["domain-only"]
        f0, g0 = d["forgetting_pct"], d["domain_gain_pct"]
        removed = 100 * (f0 - r["forgetting_pct"]) / f0 if f0 > 0 else 0.0
        kept = 100 * r["domain_gain_pct"] / g0 if g0 > 0 else 0.0
        lines.append(
            f"- {TIES_NAME} (TIES' trim, Yadav et al. 2023: only the largest {TIES_DENSITY:.0%} of each tensor's "
            f"change kept): removed {removed:.0f}% of the forgetting and kept {kept:.0f}% of the domain gain."
        )
    for name in ("curriculum", "kl", "ewc", "anneal"):
        if name in by and "domain-only" in by:
            r, d = by[name], by["domain-only"]
            lines.append(
                f"- {name} (neither paper's recipe): forgetting {r['forgetting_pct']:+.1f}% vs "
                f"{d['forgetting_pct']:+.1f}% without mitigation, domain gain {r['domain_gain_pct']:.1f}% vs "
                f"{d['domain_gain_pct']:.1f}%."
            )
    lines.append(
        "- Scale: the papers continue models of 0.1B to 10B parameters on billions of tokens; here a model of a few"
        " million parameters, pre-trained for a few hundred steps, sees a few hundred thousand tokens. A base this far"
        " from converged moves easily in either direction, so the sizes of these percentages say little about large"
        " models; the orderings are what to compare."
    )
    return lines


def bpb_table(base: dict[str, float], variants: dict[str, dict[str, float]]) -> str | None:
    """Bits per byte of the base and of each variant on the two held-out sets; None if an eval lacks them."""
    every = [base, *variants.values()]
    if not all("domain" in v and "general" in v for v in every):
        return None  # eval files written before cpt reported bits per byte
    table = [["base (before CPT)", f"{base['domain']:.3f}", f"{base['general']:.3f}"]]
    table += [[name, f"{v['domain']:.3f}", f"{v['general']:.3f}"] for name, v in variants.items()]
    return report.format_table(["variant", "domain bpb", "general bpb"], table)


def write_experiment(
    workdir: Path, state: dict, base: dict, rows: list[dict], seconds: dict, steps: int, bpb: dict | None = None
) -> Path:
    scale = state["scale"]
    tokens = steps * scale["micro_batch_size"] * scale["grad_accum"] * scale["seq_len"]
    lines = [
        "# cpt experiment: forgetting mitigation at an equal token budget",
        "",
        f"Base: `{state['base_model']}`. Every variant: {steps} steps x {scale['micro_batch_size']} x"
        f" {scale['grad_accum']} x {scale['seq_len']} tokens = {tokens:,} training tokens, LR re-warmed to"
        f" {scale['cpt_lr']:g} (2% warmup) and cosine-decayed to 0.1x; the same held-out sequences as the demo.",
        f"Exceptions: lora trains adapters only at {LORA_LR_FACTOR:g}x that lr; anneal uses wsd and draws its last"
        f" {ANNEAL_RATIO:.0%} from an even code/general mix; merge-α = (1 − α)·base + α·domain-only (no training);"
        f" {TIES_NAME} = base + the largest {TIES_DENSITY:.0%} (per tensor) of domain-only's change.",
        "Forgetting = general-ppl increase over the base; domain gain = domain-ppl decrease from the base.",
        "",
        results_table(base, rows, seconds),
        "",
    ]
    bits = bpb_table(state.get("before_bpb") or {}, bpb or {})
    if bits:
        lines += ["Bits per byte (comparable across tokenizers, unlike perplexity):", "", bits, ""]
    lines += [
        "![frontier](frontier.png)",
        "",
        "## Against the published findings",
        "",
        *comparison(rows),
        "",
        f"Total time: {sum(seconds.values()):.0f} s.",
    ]
    path = workdir / "EXPERIMENT.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_experiment(workdir: Path, variants: list[Variant], steps: int | None, force: bool) -> list[dict]:
    state = json.loads((workdir / STATE).read_text(encoding="utf-8"))
    scale_dict = dict(state["scale"])
    scale = DemoScale(**{**scale_dict, "corpus": CorpusConfig(**scale_dict["corpus"])})
    steps = steps or scale.cpt_steps
    base = state["before"]
    runs = workdir / "experiment"
    stages = Stages(workdir, force)
    rows, seconds, bpb = [], {}, {}
    print("\n".join(contamination_lines(state["dataset_paths"])) or "  held-out check: no decontaminated training set")
    for variant in variants:
        sources, schedule = variant_sources(variant, state["dataset_paths"])
        eval_sets = dict(state["eval_sets"])
        if variant.ewc_weight:
            eval_sets[FISHER_SET] = state["dataset_paths"]["general-train"]
        config = train_config(
            Path(state["base_model"]),
            runs / variant.name,
            sources,
            eval_sets,
            scale,
            steps=steps,
            lr=scale.cpt_lr,
            warmup_ratio=0.02,
            schedule=schedule,
            regularization=variant_regularization(variant),
        )
        config = variant_overrides(variant, config, state["dataset_paths"])
        out = runs / variant.name / "eval.json"
        cmd = eval_command(runs / variant.name / "final", state["eval_sets"], scale, out)
        # A fresh chain per variant: one variant's settings never invalidate another's run.
        stages.chain = state["base_model"]
        final = runs / variant.name / "final" / "config.json"
        stages.run(f"variant-{variant.name}", config, partial(train, stages, f"exp-{variant.name}", config), (final,))
        work = partial(stages.command, f"exp-{variant.name}-eval", cmd)
        stages.run(f"variant-{variant.name}-eval", {"cmd": cmd}, work, (out,))
        seconds[variant.name] = stages.times[f"variant-{variant.name}"] + stages.times[f"variant-{variant.name}-eval"]
        rows.append(result_row(variant.name, base, report.read_eval(out)))
        bpb[variant.name] = report.read_eval(out, "bpb")
    if any(r["variant"] == "domain-only" for r in rows):
        merged = runs / "merge-domain-only"
        cmd = merge_command(state["base_model"], runs / "domain-only" / "final", merged)
        outputs = tuple(merged / f"alpha-{a:.2f}" / "config.json" for a in MERGE_ALPHAS)
        stages.run("merge-domain-only", {"cmd": cmd}, partial(stages.command, "exp-merge", cmd), outputs)
        seconds["merge"] = stages.times["merge-domain-only"]
        for alpha in MERGE_ALPHAS:
            name = f"merge-{alpha:.2f}"
            out = merged / f"{name}-eval.json"
            cmd = eval_command(merged / f"alpha-{alpha:.2f}", state["eval_sets"], scale, out)
            stages.run(f"{name}-eval", {"cmd": cmd}, partial(stages.command, f"exp-{name}-eval", cmd), (out,))
            seconds[name] = stages.times[f"{name}-eval"]
            rows.append(result_row(name, base, report.read_eval(out)))
            bpb[name] = report.read_eval(out, "bpb")
        ties = runs / "ties-domain-only"
        cmd = merge_command(state["base_model"], runs / "domain-only" / "final", ties, ties=True)
        folder = ties / "alpha-1.00"
        stages.run(
            "ties-domain-only", {"cmd": cmd}, partial(stages.command, "exp-ties", cmd), (folder / "config.json",)
        )
        out = ties / f"{TIES_NAME}-eval.json"
        cmd = eval_command(folder, state["eval_sets"], scale, out)
        stages.run(f"{TIES_NAME}-eval", {"cmd": cmd}, partial(stages.command, f"exp-{TIES_NAME}-eval", cmd), (out,))
        seconds[TIES_NAME] = stages.times["ties-domain-only"] + stages.times[f"{TIES_NAME}-eval"]
        rows.append(result_row(TIES_NAME, base, report.read_eval(out)))
        bpb[TIES_NAME] = report.read_eval(out, "bpb")
    report.plot_frontier(
        [(r["variant"], r["domain_gain_pct"], r["forgetting_pct"]) for r in rows], workdir / "frontier.png"
    )
    (workdir / "experiment.json").write_text(json.dumps({"base": base, "rows": rows, "seconds": seconds}, indent=2))
    path = write_experiment(workdir, state, base, rows, seconds, steps, bpb)
    print("\n" + results_table(base, rows, seconds))
    print(f"\nreport: {path}, {workdir / 'frontier.png'}  ({sum(seconds.values()):.0f} s)")
    return rows


def main(argv: list[str]) -> int:
    names = [v.name for v in VARIANTS]
    parser = argparse.ArgumentParser(prog="cpt experiment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="demo", help="a folder where `cpt demo` ran (default: demo/)")
    parser.add_argument("--variants", nargs="+", choices=names, default=names, help="which variants to run")
    parser.add_argument("--steps", type=int, default=None, help="steps per variant (default: the demo's CPT steps)")
    parser.add_argument("--force", action="store_true", help="redo variants run before")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    if not (workdir / STATE).is_file():
        print(
            f"cpt experiment: {workdir / STATE} not found; run `cpt demo --workdir {args.workdir}` first "
            "(the experiment reuses its base model and data)",
            file=sys.stderr,
        )
        return 2
    variants = [v for v in VARIANTS if v.name in args.variants]
    exit_on_sigterm()
    try:
        run_experiment(workdir, variants, args.steps, args.force)
    except StageError as err:
        print(f"\ncpt experiment: {err}", file=sys.stderr)
        return 1
    return 0
