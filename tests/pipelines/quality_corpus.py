"""A varied set of real documents for the quality heuristics: prose, menus, keyword lists, repeated lines, tables.

Everything comes from this machine: installed packages' metadata (descriptions, summaries, keywords), the
standard library's docstrings and /etc/services. The kinds are the shapes a crawl has.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pydoc
import random
from pathlib import Path

STDLIB_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal", "email",
    "enum", "functools", "gettext", "heapq", "html", "http.client", "inspect", "ipaddress", "itertools", "json",
    "logging", "multiprocessing", "os", "pathlib", "pickle", "queue", "random", "re", "shutil", "socket",
    "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing",
    "unittest", "urllib.parse", "uuid", "zipfile",
)  # fmt: skip


def _distributions() -> list[importlib.metadata.Distribution]:
    by_name = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower()
        if name and name not in by_name:
            by_name[name] = dist
    return [by_name[n] for n in sorted(by_name)]


def _descriptions(limit: int) -> list[str]:
    out = []
    for dist in _distributions():
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        if len(body) > 500:
            out.append(body[:20_000])
    return out[:limit]


def _docstrings() -> list[str]:
    out = []
    for name in STDLIB_MODULES:
        doc = pydoc.getdoc(importlib.import_module(name))
        if len(doc) > 300:
            out.append(doc)
    return out


def _licence_sections(limit: int) -> list[str]:
    """Sections of the licence texts Debian installs: long, plain English prose."""
    out = []
    for path in sorted(Path("/usr/share/common-licenses").glob("*")):
        if path.is_file():
            paragraphs = path.read_text(encoding="utf-8", errors="replace").split("\n\n")
            out += ["\n\n".join(paragraphs[i : i + 8]) for i in range(0, len(paragraphs), 8)]
    return out[:limit]


def documents(seed: int = 0) -> list[tuple[str, str]]:
    """(kind, text) pairs, in a stable order."""
    rng = random.Random(seed)
    dists = _distributions()
    summaries = [
        d.metadata.get("Summary") for d in dists if d.metadata.get("Summary") and len(d.metadata.get("Summary")) > 10
    ]
    names = [d.metadata.get("Name") for d in dists]
    keywords = sorted({k.strip() for d in dists for k in (d.metadata.get("Keywords") or "").replace(",", " ").split()})
    prose = _descriptions(90) + _docstrings() + _licence_sections(60)
    docs = [("prose", text) for text in prose]
    for _ in range(25):  # a site menu: short link texts, one per line
        docs.append(("menu", "\n".join(rng.sample(names, 40))))
    for _ in range(20):  # a keyword list, the SEO kind
        docs.append(("keywords", ", ".join(rng.sample(keywords, min(len(keywords), 80)))))
    for _ in range(20):  # a real paragraph with boilerplate lines repeated between them
        chosen = rng.sample(summaries, 12)
        boiler = rng.sample(summaries, 2)
        docs.append(("repeated", "\n".join(line for s in chosen for line in (s, *boiler))))
    services = (
        [line for line in Path("/etc/services").read_text().splitlines() if line and not line.startswith("#")]
        if Path("/etc/services").exists()
        else []
    )
    for i in range(15):  # tables: tab-separated rows
        rows = services[i * 20 : (i + 1) * 20] or [f"{n}\t{len(n)}\t{n.upper()}" for n in rng.sample(names, 20)]
        docs.append(("table", "\n".join("\t".join(r.split()) for r in rows)))
    for _ in range(15):  # summaries as short prose paragraphs: some pass, some are too short
        docs.append(("summaries", " ".join(rng.sample(summaries, rng.randint(3, 25)))))
    return docs
