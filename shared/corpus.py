"""Collect this machine's own text into raw files for the demo: stdlib code, pydoc HTML, docs as JSONL.

Nothing here is invented or downloaded. The domain ("code") is the standard library's `.py` files; the
general English side is the HTML that `pydoc` renders for standard-library modules, the `pydoc_data`
topics and the README / long description of every installed distribution. Each document goes to a
`train/` or `val/` folder by a hash of its name, so the held-out sets never share a document with training.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import io
import json
import pydoc
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val")

# Modules whose import has side effects (opens a browser, prints, starts a GUI) or that are not prose.
UNSAFE_MODULES = frozenset(
    {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "ensurepip", "pydoc_data", "lib2to3"}
)
# Folders of the stdlib that are not library code a user would write (tests, vendored tools, sites).
SKIP_CODE_PARTS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "__pycache__"}
)


@dataclass
class CorpusConfig:
    """How much local text to collect, and how much of it to hold out."""

    code_files: int = 400
    """at most this many stdlib `.py` files (domain), in path order"""
    html_pages: int = 200
    """at most this many pydoc HTML pages of stdlib modules (general)"""
    readmes: int = 200
    """at most this many distribution READMEs (general, JSONL)"""
    topics: int = 1000
    """at most this many `pydoc_data` topics (general, JSONL)"""
    min_chars: int = 500
    """documents shorter than this are not collected (stub `__init__.py`, one-line READMEs)"""
    max_chars: int = 60_000
    """longer code files are skipped, so one generated table does not dominate the domain"""
    val_fraction: float = 0.1
    """share of documents held out for evaluation, chosen by a hash of the name"""

    def problems(self) -> list[str]:
        out = []
        if not 0.0 < self.val_fraction < 1.0:
            out.append(f"corpus.val_fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("code_files", "html_pages", "readmes", "topics"):
            if getattr(self, name) < 0:
                out.append(f"corpus.{name} must be >= 0, got {getattr(self, name)}")
        if self.min_chars >= self.max_chars:
            out.append(f"corpus.min_chars ({self.min_chars}) must be below corpus.max_chars ({self.max_chars})")
        return out


def split_of(name: str, val_fraction: float) -> str:
    """'val' or 'train' for a document name: a stable hash, independent of order and machine."""
    bucket = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64
    return "val" if bucket < val_fraction else "train"


def split_key(domain: str, name: str) -> str:
    """What decides a document's split: its top-level module for code files and pydoc pages alike.

    A module's pydoc page quotes its docstrings word for word, so the page and the source must fall on
    the same side, or held-out text of one domain is trained on through the other.
    """
    if domain == "code" or (domain == "general" and "/" not in name):
        return "module/" + name.split(".")[0]
    return f"{domain}/{name}"


def content_key(text: str) -> str:
    """Hash of the whitespace-normalised text; identical files must not land in both splits."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def code_files(root: Path, cfg: CorpusConfig) -> Iterator[tuple[str, str]]:
    """(flat name, source) of stdlib `.py` files in path order, without tests, tiny or giant files."""
    count = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if count >= cfg.code_files:
            return
        if SKIP_CODE_PARTS.intersection(rel.parts) or rel.name.startswith("_sysconfigdata"):
            continue  # tests, vendored tools, and the machine-generated build-configuration dict
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a non-UTF-8 file is the pipeline's dead-letter test, not the demo's
        if cfg.min_chars <= len(text) <= cfg.max_chars:
            count += 1
            # Flat names (email.mime.text.py) keep one glob per split and a readable id.
            yield ".".join(rel.parts), text


def stdlib_module_names() -> list[str]:
    """Public top-level standard-library modules that are safe to import, sorted."""
    return sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in UNSAFE_MODULES)


def pydoc_page(module_name: str) -> str | None:
    """The HTML page `pydoc` renders for a module, or None when it cannot be imported here."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(module_name)
            return pydoc.html.page(pydoc.describe(module), pydoc.html.document(module, module_name))
        except Exception:  # noqa: BLE001  (platform-specific modules: msvcrt, winreg, ... fail to import)
            return None


def html_pages(cfg: CorpusConfig) -> Iterator[tuple[str, str]]:
    """(module name, pydoc HTML) for stdlib modules, in name order."""
    count = 0
    for name in stdlib_module_names():
        if count >= cfg.html_pages:
            return
        page = pydoc_page(name)
        if page is not None and len(page) >= cfg.min_chars:
            count += 1
            yield name, page


def topic_records(cfg: CorpusConfig) -> Iterator[dict]:
    """The `pydoc_data` help topics (the language reference as plain text), one record per topic."""
    from pydoc_data.topics import topics

    kept = [(name, text) for name, text in sorted(topics.items()) if len(text) >= cfg.min_chars]
    for name, text in kept[: cfg.topics]:
        yield {"id": f"topic/{name}", "text": text}


def readme_records(cfg: CorpusConfig) -> Iterator[dict]:
    """README / long description of installed distributions (metadata body or Description field)."""
    seen = set()
    records = []
    for dist in importlib.metadata.distributions():
        name = dist.metadata.get("Name")
        if not name or name.lower() in seen:
            continue
        seen.add(name.lower())
        text = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        if len(text) >= cfg.min_chars:
            records.append({"id": f"readme/{name.lower()}", "text": text})
    yield from sorted(records, key=lambda r: r["id"])[: cfg.readmes]


def _split_dirs(base: Path) -> dict[str, Path]:
    dirs = {split: base / split for split in SPLITS}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    return dirs


def collect(out_dir: str | Path, cfg: CorpusConfig) -> dict:
    """Write code/{train,val}/*.py, general/{train,val}/*.html and docs.jsonl; return the counts."""
    out = Path(out_dir)
    counts = {domain: {split: {"docs": 0, "chars": 0} for split in SPLITS} for domain in ("code", "general")}
    seen: set[str] = set()

    def add(domain: str, name: str, text: str) -> str | None:
        key = content_key(text)
        if key in seen:
            return None  # exact duplicates (identical __init__.py files) would leak across splits
        seen.add(key)
        split = split_of(split_key(domain, name), cfg.val_fraction)
        counts[domain][split]["docs"] += 1
        counts[domain][split]["chars"] += len(text)
        return split

    code_dirs = _split_dirs(out / "code")
    for name, text in code_files(stdlib_root(), cfg):
        if split := add("code", name, text):
            (code_dirs[split] / name).write_text(text, encoding="utf-8")

    general_dirs = _split_dirs(out / "general")
    for name, page in html_pages(cfg):
        if split := add("general", name, page):
            (general_dirs[split] / f"{name}.html").write_text(page, encoding="utf-8")
    lines = {split: [] for split in SPLITS}
    for record in [*topic_records(cfg), *readme_records(cfg)]:
        if split := add("general", record["id"], record["text"]):
            lines[split].append(json.dumps(record, ensure_ascii=False))
    for split, rows in lines.items():
        (general_dirs[split] / "docs.jsonl").write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    return counts


def input_patterns(raw_dir: str | Path, domain: str, split: str) -> list[str]:
    """The `cpt prepare --input` globs for one domain and split of a collected corpus."""
    base = Path(raw_dir) / domain / split
    if domain == "code":
        return [str(base / "*.py")]
    return [str(base / "*.html"), str(base / "*.jsonl")]
