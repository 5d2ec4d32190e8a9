"""The `data:` section of a run: which prepared datasets to mix, how, and how to pack them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cpt.shared.dataset import MANIFEST, filesystem, join


@dataclass
class SourceConfig:
    """One prepared dataset (local path or fsspec URL) in the mixture."""

    name: str
    """Name used in logs, metrics, traces and `schedule.source`."""
    path: str | None = None
    """Folder written by `cpt prepare` (must contain manifest.json); required except for a data.sources name
    repeated in data.anneal.sources."""
    weight: float = 1.0
    """Relative token share when no schedule drives this source (normalised over the sources)."""
    finite: bool = False
    """End the run when this source is exhausted instead of starting a new epoch."""


@dataclass
class ScheduleConfig:
    """The target token share of ONE source as a function of the tokens consumed; the rest share by weight."""

    type: Literal["constant", "linear", "steps"] = "constant"
    """constant: `start` all run; linear: `start` -> `end` over total_tokens; steps: [[fraction, share], ...]."""
    source: str | None = None
    """The source the schedule drives (a `sources[].name`)."""
    start: float | None = None
    """constant and linear: the share at the start of the run."""
    end: float | None = None
    """linear: the share at the end of the run (total_tokens)."""
    steps: list[list[float]] = field(default_factory=list)
    """steps: [[fraction_of_run, share], ...], fractions ascending from 0.0."""

    def problems(self) -> list[str]:
        found = []
        if self.source is None:
            found.append(f"source: required for a {self.type} schedule (name the source it drives)")
        shares = {"constant": [("start", self.start)], "linear": [("start", self.start), ("end", self.end)]}
        for key, value in shares.get(self.type, []):
            if value is None or not 0.0 <= value <= 1.0:
                found.append(f"{key}: a {self.type} schedule needs a share in [0, 1], got {value!r}")
        if self.type == "steps":
            if not self.steps:
                found.append("steps: give [[fraction_of_run, share], ...] starting at fraction 0.0")
            fractions = []
            for i, step in enumerate(self.steps):
                if len(step) != 2 or not all(0.0 <= x <= 1.0 for x in step):
                    found.append(f"steps[{i}]: {step!r} must be [fraction_of_run, share], both in [0, 1]")
                else:
                    fractions.append(step[0])
            if fractions and (fractions[0] != 0.0 or any(b <= a for a, b in zip(fractions, fractions[1:]))):
                found.append(f"steps: fractions {fractions} must start at 0.0 and strictly increase")
        return found


@dataclass
class AnnealConfig:
    """The anneal (cooldown) phase: documents starting at or after `start` come from another mixture."""

    start: float | Literal["decay"] = "decay"
    """decay: the first token of the LR decay (train.lr_schedule: wsd); a number: that fraction of the run's tokens."""
    sources: list[SourceConfig] = field(default_factory=list)
    """The anneal mixture: names of `data.sources` (path may be omitted) and/or new sources with a path."""
    schedule: ScheduleConfig | None = None
    """A share schedule over the anneal phase (progress 0 at `start`, 1 at the end); null = constant weights."""

    def problems(self) -> list[str]:
        found = []
        if self.start != "decay" and not (isinstance(self.start, float) and 0.0 < self.start < 1.0):
            found.append(f"start: give decay or a fraction of the run in (0, 1), got {self.start!r}")
        if not self.sources:
            found.append("sources: give the anneal mixture ({name, weight}; a path for a source not in data.sources)")
        names = [s.name for s in self.sources if s is not None]
        if self.schedule is not None and self.schedule.source is not None and self.schedule.source not in names:
            found.append(f"schedule.source: {self.schedule.source!r} is not one of the anneal sources {names}")
        return found


def _manifest_problem(where: str, path: str) -> str | None:
    try:
        fs, manifest = filesystem(join(path, MANIFEST))
        exists = fs.exists(manifest)
    except (ImportError, OSError, ValueError) as err:  # unknown protocol, missing fsspec backend, no access
        return f"{where}: cannot open {path} ({err})"
    if not exists:
        return (
            f"{where}: {path} has no {MANIFEST}; give a folder written by `cpt prepare` "
            "(a run that did not finish writes no manifest)"
        )
    return None


@dataclass
class DataConfig:
    """How the trainer streams its data: sources, mixing schedule, packing and loader workers."""

    seq_len: int = 1024
    """Tokens per packed sequence."""
    sources: list[SourceConfig] = field(default_factory=list)
    """The prepared datasets to mix (e.g. a domain set and a general replay set)."""
    schedule: ScheduleConfig | None = None
    """None = constant shares from the weights (normalised)."""
    shuffle_buffer: int = 0
    """Documents permuted together inside each epoch on top of the (shard, row-block) shuffle; 0 = off."""
    num_workers: int = 0
    """DataLoader worker processes per rank (each walks the global stream, see the README)."""
    trace: bool = False
    """The trainer writes output_dir/data_trace.jsonl (one line per sequence) when true."""
    add_bos: bool | None = None
    """BOS before every document, in training and eval; null = the tokenizer's convention (LLaMA yes, GPT-2 no)."""

    anneal: AnnealConfig | None = None
    """A second mixture for the end of the run (WSD cooldown); null = one mixture all run."""

    def stream_sources(self) -> list[SourceConfig]:
        """Every source the stream draws from: `sources`, then the anneal's sources that are not among them."""
        names = {s.name for s in self.sources if s is not None}
        extra = [s for s in (self.anneal.sources if self.anneal else []) if s is not None and s.name not in names]
        return [s for s in self.sources if s is not None] + extra

    def anneal_problems(self) -> list[str]:
        """Anneal sources: a known name keeps its data.sources path; a new name needs a prepared folder."""
        if self.anneal is None:
            return []
        found = []
        paths = {s.name: s.path for s in self.sources if s is not None}
        for i, source in enumerate(self.anneal.sources):
            if source is None:
                continue
            where = f"anneal.sources[{i}]"
            if not source.weight > 0:
                found.append(f"{where}.weight: must be > 0, got {source.weight} (drop the source instead)")
            if source.name in paths:
                if source.path and source.path != paths[source.name]:
                    found.append(
                        f"{where}.path: {source.name!r} is a data source with path {paths[source.name]}; "
                        "omit the path or give the anneal source another name"
                    )
            elif not source.path:
                found.append(f"{where}.path: {source.name!r} is not in data.sources, so it needs a path")
            else:
                problem = _manifest_problem(f"{where}.path", source.path)
                if problem:
                    found.append(problem)
        return found

    def problems(self) -> list[str]:
        found = []
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            found.append(f"seq_len: must be an integer >= 2, got {self.seq_len!r}")
        if self.shuffle_buffer < 0:
            found.append(f"shuffle_buffer: must be >= 0, got {self.shuffle_buffer}")
        if self.num_workers < 0:
            found.append(f"num_workers: must be >= 0, got {self.num_workers}")
        if not self.sources:
            found.append("sources: give at least one {name, path, weight} (e.g. a domain and a general set)")
        names = [s.name for s in self.sources if s is not None]
        for name in sorted({n for n in names if names.count(n) > 1}):
            found.append(f"sources: name {name!r} is used twice; names must be unique")
        for i, source in enumerate(self.sources):
            if source is not None and source.path is None:
                found.append(f"sources[{i}].path: required (a folder written by `cpt prepare`)")
            if source is None or source.path is None:
                continue
            if not source.weight > 0:
                found.append(f"sources[{i}].weight: must be > 0, got {source.weight} (drop the source instead)")
            try:
                fs, path = filesystem(join(source.path, MANIFEST))
                exists = fs.exists(path)
            except (ImportError, OSError, ValueError) as err:  # unknown protocol, missing fsspec backend, no access
                found.append(f"sources[{i}].path: cannot open {source.path} ({err})")
                continue
            if not exists:
                found.append(
                    f"sources[{i}].path: {source.path} has no {MANIFEST}; give a folder written by `cpt prepare` "
                    "(a run that did not finish writes no manifest)"
                )
        found += self.anneal_problems()
        if self.schedule is not None and self.schedule.source is not None:
            if self.schedule.source not in names:
                found.append(f"schedule.source: {self.schedule.source!r} is not a source name (sources: {names})")
            elif len(names) < 2:
                found.append("schedule: a schedule moves shares between sources; give at least two sources")
        return found
