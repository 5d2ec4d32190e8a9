"""Fault injection for `cpt prepare`: make chosen documents fail at a chosen step, for tests and chaos drills.

Set `CPT_INJECT_FAULTS` to a JSON object before launching a run, e.g.

    CPT_INJECT_FAULTS='{"raise": {"pii": ["doc-7"], "perplexity": ["doc-9"]},
                        "exit": {"length": ["doc-3"]}, "exit_marker_dir": "/tmp/cpt-faults"}'

- `raise`: step -> ids; that step raises `InjectedFault` on those documents (they must become dead letters
  naming the step while the job goes on).
- `exit`: step -> ids; the worker process running that step ends itself with `os._exit` the first time it
  sees one of those ids (a dead worker; the runner must retry the work). A marker file per id in
  `exit_marker_dir`, created atomically, makes it happen once per id across all processes and retries.

Why a hook read by the launcher rather than a monkeypatch in a test: the spec is read once, when the pipeline is
built, and travels pickled inside the steps, so the same faults fire on every runner (in-process DirectRunner,
its worker processes, Dask workers, Dataflow) without reaching into worker processes. Without the variable
the hook is a no-op (an empty frozenset lookup per document).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

ENV_VAR = "CPT_INJECT_FAULTS"


class InjectedFault(RuntimeError):
    """The error an injected `raise` fault throws: a stand-in for a library crashing on one document."""


@dataclass(frozen=True)
class Faults:
    """Which documents fail at which step; `check(step, doc_id)` is called by each step before its work."""

    raise_at: dict[str, frozenset[str]] = field(default_factory=dict)
    exit_at: dict[str, frozenset[str]] = field(default_factory=dict)
    exit_marker_dir: str | None = None

    @classmethod
    def from_env(cls) -> Faults:
        spec = os.environ.get(ENV_VAR)
        return cls.parse(spec) if spec else NO_FAULTS

    @classmethod
    def parse(cls, spec: str) -> Faults:
        try:
            data = json.loads(spec)
        except json.JSONDecodeError as err:
            raise ValueError(f"{ENV_VAR}: not JSON ({err}); see cpt/pipelines/faults.py for the format") from None
        unknown = set(data) - {"raise", "exit", "exit_marker_dir"}
        if unknown:
            raise ValueError(f"{ENV_VAR}: unknown keys {sorted(unknown)}; use raise, exit, exit_marker_dir")
        if data.get("exit") and not data.get("exit_marker_dir"):
            raise ValueError(f"{ENV_VAR}: `exit` faults need `exit_marker_dir` (so each worker dies only once)")
        return cls(
            raise_at={step: frozenset(ids) for step, ids in (data.get("raise") or {}).items()},
            exit_at={step: frozenset(ids) for step, ids in (data.get("exit") or {}).items()},
            exit_marker_dir=data.get("exit_marker_dir"),
        )

    def check(self, step: str, doc_id: str) -> None:
        """Raise InjectedFault, or end this process once, when `doc_id` is marked for `step`."""
        if doc_id in self.exit_at.get(step, ()) and self._first_exit(step, doc_id):
            os._exit(70)  # no cleanup, no exception: what an OOM kill or a lost VM looks like to the runner
        if doc_id in self.raise_at.get(step, ()):
            raise InjectedFault(f"injected fault at step {step} for document {doc_id}")

    def _first_exit(self, step: str, doc_id: str) -> bool:
        folder = Path(self.exit_marker_dir)
        folder.mkdir(parents=True, exist_ok=True)
        marker = folder / f"{step}-{abs(hash_id(doc_id))}.exited"
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # atomic: one process wins
        except FileExistsError:
            return False
        return True


def hash_id(doc_id: str) -> int:
    """A stable file-name-safe number for an id (ids may hold '/' or ':')."""
    import hashlib

    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:6], "big")


NO_FAULTS = Faults()
