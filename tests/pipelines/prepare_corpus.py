"""Small real corpora for the `cpt prepare` tests: pydoc HTML, stdlib sources, JSONL with broken records.

Every file is built from text this machine has (pydoc_data topics, pydoc pages, stdlib .py files)
plus Faker PII, and each builder returns what the pipeline must make of it, so tests assert exact counts.
"""

from __future__ import annotations

import gzip
import json
import sysconfig
import zlib
from pathlib import Path

from faker import Faker

from cpt.shared.corpus import pydoc_page

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Small, pure-Python stdlib modules: their pages and sources are stable and quick to render.
HTML_MODULES = ("bisect", "colorsys", "heapq", "keyword", "shlex", "textwrap")
CODE_MODULES = ("bisect.py", "colorsys.py", "heapq.py", "shlex.py", "textwrap.py", "fnmatch.py")


def topic_texts(n: int) -> list[tuple[str, str]]:
    """(name, text) of pydoc_data help topics: real English prose of the language reference."""
    from pydoc_data.topics import topics

    picked = [(name, text) for name, text in sorted(topics.items()) if 800 <= len(text) <= 6000]
    return picked[:n]


def gz_complete_lines(truncated: bytes) -> int:
    """How many whole lines a streaming reader gets out of a truncated gzip before it fails."""
    return zlib.decompressobj(31).decompress(truncated).count(b"\n")


def jsonl_corpus(folder: Path, seed: int = 0) -> dict:
    """docs.jsonl (good + broken lines) and part.jsonl.gz (truncated): returns the expected accounting."""
    folder.mkdir(parents=True, exist_ok=True)
    fake = Faker("en_US")
    Faker.seed(seed)
    german = Faker("de_DE")
    topics = topic_texts(10)
    email, ssn = fake.email(), fake.ssn()
    lines: list[bytes] = []
    for i, (name, text) in enumerate(topics):
        if i == 0:
            text = f"{text}\nQuestions go to {email}; the clerk's SSN {ssn} must never be stored."
        lines.append(json.dumps({"id": f"topic/{name}", "text": text}).encode())
    lines.append(json.dumps({"id": "zz-copy-of-first", "text": topics[1][1]}).encode())  # duplicate
    lines.append(json.dumps({"id": "short", "text": "Too short to keep."}).encode())  # too_short
    lines.append(json.dumps({"id": "german", "text": german.paragraph(nb_sentences=12)}).encode())  # language
    lines.append(json.dumps({"text": topics[2][1][:900] + " again, no id given"}).encode())  # derived id
    lines.append(b'{"id": "broken", "text": "unterminated ' + email.encode())  # broken JSON, carries PII
    lines.append(json.dumps({"id": "number", "text": 42}).encode())  # non-string text
    lines.append(json.dumps({"id": "no-text", "body": "x"}).encode())  # missing text field
    lines.append(b'{"id": "latin1", "text": "caf\xe9 cr\xe8me"}')  # undecodable bytes
    lines.append(json.dumps({"id": "giant", "text": "word " * 30_000}).encode())  # over --max-bytes 100000
    (folder / "docs.jsonl").write_bytes(b"\n".join(lines) + b"\n\n")
    gz_lines = [json.dumps({"id": f"gz/{name}", "text": text}) for name, text in topic_texts(14)[10:14]]
    whole = gzip.compress(("\n".join(gz_lines) + "\n").encode())
    truncated = whole[: len(whole) * 3 // 4]
    (folder / "part.jsonl.gz").write_bytes(truncated)
    complete = gz_complete_lines(truncated)
    return {"email": email, "ssn": ssn, "topics": topics, "gz_ids": [json.loads(x)["id"] for x in gz_lines[:complete]]}


def html_corpus(folder: Path) -> list[str]:
    """pydoc pages of a few stdlib modules, one exact duplicate and one tiny page; returns the module names."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in HTML_MODULES:
        (folder / f"{name}.html").write_text(pydoc_page(name), encoding="utf-8")
    (folder / "zz_copy.html").write_text(pydoc_page(HTML_MODULES[0]), encoding="utf-8")
    (folder / "tiny.html").write_text("<html><body><p>len(obj)</p></body></html>", encoding="utf-8")
    return list(HTML_MODULES)


def code_corpus(folder: Path) -> None:
    """stdlib sources, a copy, a truncated (unparsable) one, a Latin-1 one and one over the size guard."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in CODE_MODULES:
        (folder / name).write_bytes((STDLIB / name).read_bytes())
    (folder / "zz_copy.py").write_bytes((STDLIB / CODE_MODULES[0]).read_bytes())
    source = (STDLIB / "heapq.py").read_text(encoding="utf-8")
    (folder / "truncated.py").write_text(source[: source.index("def heappop")] + "def heappop(heap:\n")
    (folder / "latin1.py").write_bytes(b"# caf\xe9\n" + (STDLIB / "bisect.py").read_bytes())
    (folder / "giant.py").write_text((STDLIB / "textwrap.py").read_text(encoding="utf-8") * 8)
