"""`cpt demo`: the whole continued-pre-training story on this machine's own text, through the public commands.

    cpt demo --workdir demo [--model DIR] [--force] [--small]

1. collect: stdlib `.py` files (domain "code"); pydoc HTML, pydoc topics, package READMEs (general English)
2. prepare: `cpt prepare` each domain's train and held-out split (presets code and web)
3. base model (skipped with --model): BPE tokenizer + tiny LLaMA (`python -m cpt.trainer.bootstrap`), then a
   short `cpt train` on general text only, from random init: the stand-in for "LLaMA-7B"
4. `cpt eval` of the base on both held-out sets
5. `cpt train`: continued pre-training on code with general replay, from that base
6. `cpt eval` again; print the before → after table; write REPORT.md and report.png

Every stage runs as a subprocess (the same command a user types) with its output streamed, writes a done
marker keyed by its settings, and is reused on the next run unless --force or its settings changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import yaml

from cpt.shared import report
from cpt.shared.corpus import CorpusConfig, collect, input_patterns

#: eval set name -> how the table calls it
SET_LABELS = {"domain": "domain (stdlib code)", "general": "general (pydoc HTML, docs)"}
STATE = "demo.json"


@dataclass
class DemoScale:
    """Sizes and step counts of one demo run (the full demo, or the CI smoke run with --small)."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    vocab_size: int = 8192
    """BPE vocabulary, trained on the prepared general text"""
    hidden: int = 192
    layers: int = 4
    heads: int = 4
    seq_len: int = 256
    """tokens per packed training and eval sequence"""
    micro_batch_size: int = 8
    grad_accum: int = 1
    base_steps: int = 300
    """pre-training of the base model on general text only, from random init"""
    base_lr: float = 2.0e-3
    cpt_steps: int = 200
    """continued pre-training on code + replay"""
    cpt_lr: float = 2.0e-3
    """re-warmed to the base's peak and re-decayed (Ibrahim et al. 2024)"""
    replay: float = 0.2
    """share of general tokens mixed into the continued pre-training"""
    eval_every: int = 50
    eval_sequences: int = 32
    """fixed held-out sequences per set, the same ones before and after"""
    num_shards: int = 4

    def problems(self) -> list[str]:
        out = self.corpus.problems()
        if self.hidden % self.heads:
            out.append(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if not 0.0 <= self.replay < 1.0:
            out.append(f"replay must be in [0, 1), got {self.replay}")
        for name in ("base_steps", "cpt_steps", "seq_len", "micro_batch_size", "eval_every", "eval_sequences"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1, got {getattr(self, name)}")
        return out


SCALES = {
    "full": DemoScale(),
    # CI smoke scale: a few dozen documents, a 64-wide model, a few dozen steps (about a minute).
    "small": DemoScale(
        corpus=CorpusConfig(code_files=40, html_pages=24, readmes=12, topics=12, val_fraction=0.2),
        vocab_size=1024,
        hidden=64,
        layers=2,
        heads=4,
        seq_len=64,
        base_steps=40,
        base_lr=3.0e-3,
        cpt_steps=30,
        cpt_lr=3.0e-3,
        eval_every=15,
        eval_sequences=16,
        num_shards=2,
    ),
}


class StageError(RuntimeError):
    """A stage's command failed; the message names the stage, the command and its log."""


def cpt_command(*args: str) -> list[str]:
    """A `cpt` subcommand run with this interpreter (the console script may not be on PATH)."""
    return [sys.executable, "-m", "cpt.shared.cli", *args]


def stream(cmd: list[str], log_path: Path) -> int:
    """Run `cmd`, copying its output live to our stdout and to `log_path`; return its exit status.

    The child writes to a pseudo-terminal where the OS has one: progress bars (tqdm) only draw on a
    terminal, and a terminal keeps the child's output line-buffered.
    """
    print(f"$ {shlex.join(cmd)}", flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": env_columns()}
    with open(log_path, "ab") as log:
        if hasattr(os, "openpty"):
            reader, writer = os.openpty()
            _setup_terminal(writer)
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=writer, stderr=writer, env=env)
            os.close(writer)
            read = _pty_reader(reader)
        else:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            read = proc.stdout.read1
        try:
            while chunk := read(1 << 16):
                log.write(chunk)
                sys.stdout.write(chunk.decode("utf-8", errors="replace"))
                sys.stdout.flush()
        except BaseException:
            proc.kill()  # interrupted (Ctrl-C, SIGTERM): never leave a training run behind
            proc.wait()
            raise
        finally:
            if hasattr(os, "openpty"):
                os.close(reader)
        return proc.wait()


def env_columns() -> str:
    return os.environ.get("COLUMNS") or str(shutil.get_terminal_size((100, 24)).columns)


def _setup_terminal(fd: int) -> None:
    """Give the pseudo-terminal a width (tqdm sizes its bar from it; a new one is 0 wide), and keep newlines
    as they are (a terminal turns them into carriage return + newline), so logs read like pipe output."""
    import fcntl
    import struct
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, int(env_columns()), 0, 0))
    attrs = termios.tcgetattr(fd)
    attrs[1] &= ~termios.ONLCR
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def _pty_reader(fd: int) -> Callable[[int], bytes]:
    def read(size: int) -> bytes:
        try:
            return os.read(fd, size)
        except OSError:  # EIO: the child closed its side of the terminal (it exited)
            return b""

    return read


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so `stream` kills the running stage instead of orphaning it."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def cpu_seconds() -> float:
    """CPU time of this process and its finished children: on a shared machine, wall time alone misleads."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stages:
    """Runs named stages in order; a stage whose marker matches its key (settings + upstream) is reused."""

    def __init__(self, workdir: Path, force: bool):
        self.workdir = workdir
        self.force = force
        self.chain = ""
        self.times: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def marker(self, name: str) -> Path:
        return self.workdir / "stages" / f"{name}.done"

    def run(self, name: str, settings: dict, work: Callable[[], None], outputs: tuple[Path, ...] = ()) -> None:
        """Run `work` unless a marker with the same key exists and the stage's `outputs` are still there."""
        # Each key includes the previous one, so changing an early stage redoes everything after it.
        self.chain = digest([self.chain, name, settings])
        marker = self.marker(name)
        record = json.loads(marker.read_text()) if marker.is_file() else {}
        if not self.force and record.get("key") == self.chain and all(path.exists() for path in outputs):
            print(f"\n=== {name}: done before, reused ({marker}; --force redoes it)", flush=True)
            # Report what the stage cost when it ran, so a re-run's report keeps the real figures.
            self.times[name], self.cpu[name] = record.get("seconds", 0.0), record.get("cpu_seconds", 0.0)
            return
        marker.unlink(missing_ok=True)
        print(f"\n=== {name}", flush=True)
        start, cpu_start = time.monotonic(), cpu_seconds()
        work()
        self.times[name] = time.monotonic() - start
        self.cpu[name] = cpu_seconds() - cpu_start
        marker.parent.mkdir(parents=True, exist_ok=True)
        record = {"key": self.chain, "seconds": round(self.times[name], 1), "cpu_seconds": round(self.cpu[name], 1)}
        marker.write_text(json.dumps(record) + "\n")
        print(f"=== {name}: {self.times[name]:.0f} s ({self.cpu[name]:.0f} CPU s)", flush=True)

    def command(self, name: str, cmd: list[str]) -> None:
        log = self.workdir / "logs" / f"{name}.log"
        log.unlink(missing_ok=True)
        code = stream(cmd, log)
        if code != 0:
            raise StageError(f"stage {name!r} failed (exit {code}): {shlex.join(cmd)}\n  full output: {log}")


def prepare_command(raw: Path, domain: str, split: str, out: Path, num_shards: int) -> list[str]:
    """`cpt prepare` of one split: preset code for the code, web for the HTML + JSONL general text."""
    preset = "code" if domain == "code" else "web"
    args = ["prepare", "--preset", preset, "--domain", domain, "--output", str(out), "--num-shards", str(num_shards)]
    for pattern in input_patterns(raw, domain, split):
        args += ["--input", pattern]
    if domain != "code":
        args += ["--id-field", "id"]
    return cpt_command(*args)


def train_config(
    model: Path,
    output_dir: Path,
    sources: list[dict],
    eval_sets: dict[str, str],
    scale: DemoScale,
    *,
    steps: int,
    lr: float,
    warmup_ratio: float,
    schedule: dict | None = None,
    regularization: dict | None = None,
    best_metric: str | None = "domain_ppl",
) -> dict:
    """A RUN.yaml for `cpt train` (keys as documented in the README's `cpt train` section)."""
    config = {
        "model": str(model),
        "output_dir": str(output_dir),
        "seed": 0,
        "data": {"seq_len": scale.seq_len, "sources": sources},
        "train": {
            "max_steps": steps,
            "micro_batch_size": scale.micro_batch_size,
            "grad_accum": scale.grad_accum,
            "lr": lr,
            "min_lr_ratio": 0.1,
            "warmup_ratio": warmup_ratio,
            "lr_schedule": "cosine",
            "weight_decay": 0.01,
            "max_grad_norm": 1.0,
            "log_every_steps": 5,
        },
        "eval": {"every_steps": scale.eval_every, "max_sequences": scale.eval_sequences, "sets": eval_sets},
        # One checkpoint at the end: the demo needs final/, not a resumable history.
        "checkpoint": {"every_steps": steps, "keep_last": 1, "best_metric": best_metric},
    }
    if schedule:
        config["data"]["schedule"] = schedule
    if regularization:
        config["regularization"] = regularization
    return config


def write_yaml(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(payload, sort_keys=False), encoding="utf-8")
    return path


def train(stages: Stages, name: str, config: dict) -> None:
    """Run `cpt train` on a fresh output folder (a redone stage must not resume a stale run)."""
    out = Path(config["output_dir"])
    if out.exists():
        shutil.rmtree(out)
    cfg = write_yaml(stages.workdir / "configs" / f"{name}.yaml", config)
    stages.command(name, cpt_command("train", "--config", str(cfg)))


def eval_command(model: Path, sets: dict[str, str], scale: DemoScale, out: Path) -> list[str]:
    args = ["eval", "--model", str(model), "--seq-len", str(scale.seq_len)]
    args += ["--max-sequences", str(scale.eval_sequences), "--output", str(out)]
    for name, path in sets.items():
        args += ["--data", f"{name}={path}"]
    return cpt_command(*args)


def dataset_counts(path: Path) -> dict:
    """Kept and input document counts of a prepared dataset, from its manifest (for the report)."""
    manifest = json.loads((path / "manifest.json").read_text())
    return {"kept": manifest["counts"]["kept"], "input": manifest["counts"]["input"]}


def write_report(workdir: Path, state: dict, table: str) -> Path:
    """REPORT.md: what ran, the table, the picture and the time per stage."""
    scale = state["scale"]
    lines = [
        "# cpt demo report",
        "",
        f"Base model: `{state['base_model']}`"
        + (
            ""
            if state["given_model"]
            else f" (LLaMA {scale['layers']}x{scale['hidden']}, {scale['vocab_size']} BPE,"
            f" {scale['base_steps']} steps on general text from random init)"
        ),
        f"Continued pre-training: {scale['cpt_steps']} steps of {scale['micro_batch_size'] * scale['grad_accum']}"
        f" x {scale['seq_len']} tokens on stdlib code with {scale['replay']:.0%} general replay,"
        f" LR re-warmed to {scale['cpt_lr']:g} and cosine-decayed to 0.1x.",
        "",
        "Prepared datasets (kept / input documents):",
        "",
    ]
    for name, counts in state["datasets"].items():
        lines.append(f"- `{name}`: {counts['kept']} / {counts['input']}")
    lines += ["", "Held-out perplexity of the base model (before) and after continued pre-training:", "", table]
    lines += [
        "",
        "![report](report.png)",
        "",
        "Stage times when each stage ran (wall s / CPU s of all processes):",
        "",
    ]
    for name, seconds in state["stage_seconds"].items():
        lines.append(f"- {name}: {seconds:.0f} / {state['stage_cpu_seconds'][name]:.0f}")
    total_cpu = sum(state["stage_cpu_seconds"].values())
    total = sum(state["stage_seconds"].values())
    lines += ["", f"Total: {total:.0f} s wall, {total_cpu:.0f} CPU s."]
    path = workdir / "REPORT.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_demo(workdir: Path, scale: DemoScale, model: Path | None, force: bool) -> dict:
    """All stages in order; returns the state also written to workdir/demo.json (the experiment reads it)."""
    workdir.mkdir(parents=True, exist_ok=True)
    stages = Stages(workdir, force)
    raw, data, runs = workdir / "raw", workdir / "data", workdir / "runs"
    started = time.monotonic()

    def collect_corpus() -> None:
        if raw.exists():
            shutil.rmtree(raw)
        counts = collect(raw, scale.corpus)
        for domain, splits in counts.items():
            for split, c in splits.items():
                print(f"  {domain:<8} {split:<5} {c['docs']:>5} documents  {c['chars'] / 1e6:6.2f} M chars")

    stages.run("collect", asdict(scale.corpus), collect_corpus, (raw / "code", raw / "general"))

    datasets = {}
    for domain in ("code", "general"):
        for split in ("train", "val"):
            name = f"{domain}-{split}"
            datasets[name] = data / name
            cmd = prepare_command(raw, domain, split, data / name, scale.num_shards)
            work = partial(stages.command, f"prepare-{name}", cmd)
            stages.run(f"prepare-{name}", {"cmd": cmd}, work, (data / name / "manifest.json",))

    eval_sets = {"domain": str(datasets["code-val"]), "general": str(datasets["general-val"])}
    if model is None:
        tokenizer_dir, init_dir = workdir / "base" / "tokenizer", workdir / "base" / "init"
        tok_cmd = [sys.executable, "-m", "cpt.trainer.bootstrap", "tokenizer"]
        tok_cmd += ["--input", str(datasets["general-train"]), "--out", str(tokenizer_dir)]
        tok_cmd += ["--vocab-size", str(scale.vocab_size)]
        work = partial(stages.command, "tokenizer", tok_cmd)
        stages.run("tokenizer", {"cmd": tok_cmd}, work, (tokenizer_dir / "tokenizer.json",))
        init_cmd = [sys.executable, "-m", "cpt.trainer.bootstrap", "model", "--tokenizer", str(tokenizer_dir)]
        init_cmd += ["--out", str(init_dir), "--hidden", str(scale.hidden), "--layers", str(scale.layers)]
        init_cmd += ["--heads", str(scale.heads), "--max-positions", str(max(1024, scale.seq_len))]
        work = partial(stages.command, "init", init_cmd)
        stages.run("init", {"cmd": init_cmd}, work, (init_dir / "config.json",))
        base_cfg = train_config(
            init_dir,
            runs / "base",
            [{"name": "general", "path": str(datasets["general-train"]), "weight": 1.0}],
            eval_sets,
            scale,
            steps=scale.base_steps,
            lr=scale.base_lr,
            warmup_ratio=0.05,
            best_metric=None,  # a base model is its final weights, not the best code checkpoint
        )
        base_model = runs / "base" / "final"
        work = partial(train, stages, "pretrain-base", base_cfg)
        stages.run("pretrain-base", base_cfg, work, (base_model / "config.json",))
    else:
        base_model = model.resolve()
        stages.run("given-model", {"model": str(base_model)}, lambda: None)

    before_json, after_json = workdir / "eval" / "before.json", workdir / "eval" / "after.json"
    before_cmd = eval_command(base_model, eval_sets, scale, before_json)
    work = partial(stages.command, "eval-before", before_cmd)
    stages.run("eval-before", {"cmd": before_cmd}, work, (before_json,))

    sources = [{"name": "code", "path": str(datasets["code-train"]), "weight": round(1.0 - scale.replay, 6)}]
    if scale.replay > 0:
        sources.append({"name": "general", "path": str(datasets["general-train"]), "weight": scale.replay})
    cpt_cfg = train_config(
        base_model, runs / "cpt", sources, eval_sets, scale, steps=scale.cpt_steps, lr=scale.cpt_lr, warmup_ratio=0.02
    )
    stages.run("cpt", cpt_cfg, partial(train, stages, "cpt", cpt_cfg), (runs / "cpt" / "final" / "config.json",))

    after_cmd = eval_command(runs / "cpt" / "final", eval_sets, scale, after_json)
    work = partial(stages.command, "eval-after", after_cmd)
    stages.run("eval-after", {"cmd": after_cmd}, work, (after_json,))

    before, after = report.read_eval(before_json), report.read_eval(after_json)
    table = report.before_after_table(before, after, SET_LABELS)
    bpb_before, bpb_after = report.read_eval(before_json, "bpb"), report.read_eval(after_json, "bpb")
    if all(name in bpb_before and name in bpb_after for name in SET_LABELS):  # eval files of older cpt lack bpb
        bpb_table = report.before_after_table(bpb_before, bpb_after, SET_LABELS, "bpb")
        table += "\n\nBits per byte (comparable across tokenizers):\n\n" + bpb_table
    curves = [("continued pre-training on code", report.read_jsonl(runs / "cpt" / "metrics.jsonl"))]
    if model is None:
        curves.insert(0, ("base pre-training (general only)", report.read_jsonl(runs / "base" / "metrics.jsonl")))
    report.plot_demo(curves, SET_LABELS, workdir / "report.png")
    state = {
        "scale": asdict(scale),
        "given_model": model is not None,
        "base_model": str(base_model),
        "datasets": {name: dataset_counts(path) for name, path in datasets.items()},
        "dataset_paths": {name: str(path) for name, path in datasets.items()},
        "eval_sets": eval_sets,
        "before": before,
        "after": after,
        "before_bpb": bpb_before,
        "after_bpb": bpb_after,
        "stage_seconds": {k: round(v, 1) for k, v in stages.times.items()},
        "stage_cpu_seconds": {k: round(v, 1) for k, v in stages.cpu.items()},
        "total_seconds": round(time.monotonic() - started, 1),
    }
    (workdir / STATE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    write_report(workdir, state, table)
    print("\n" + table)
    print(f"\nreport: {workdir / 'REPORT.md'}, {workdir / 'report.png'}  ({state['total_seconds']:.0f} s)")
    return state


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cpt demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="demo", help="where everything goes (default: demo/)")
    parser.add_argument("--model", default=None, help="use this HF causal LM folder as the base (skips step 3)")
    parser.add_argument("--force", action="store_true", help="redo every stage, even those done before")
    parser.add_argument("--small", action="store_true", help="the CI smoke scale: tiny corpus and model, ~1 min")
    args = parser.parse_args(argv)
    scale = SCALES["small" if args.small else "full"]
    model = Path(args.model) if args.model else None
    if model is not None and not (model / "config.json").is_file():
        print(f"cpt demo: --model {model} is not a Hugging Face model folder (no config.json)", file=sys.stderr)
        return 2
    problems = scale.problems()
    if problems:
        print("cpt demo: " + "; ".join(problems), file=sys.stderr)
        return 2
    exit_on_sigterm()
    try:
        run_demo(Path(args.workdir).resolve(), scale, model, args.force)
    except StageError as err:
        print(f"\ncpt demo: {err}", file=sys.stderr)
        return 1
    return 0
