"""A near-duplicate test set from real text, with the exact word-5-gram Jaccard of every pair that matters.

Bases are pieces of pydoc_data help topics and of installed packages' READMEs (real English prose). Each base
may get edited copies: a few percent of words replaced, a header and footer added, two paragraphs
swapped, or all three. Hard negatives are different bases wrapped in the same long template (a
header and footer shared by all of them), so they share text without sharing content.
"""

from __future__ import annotations

import random
from collections import defaultdict

from faker import Faker

from cpt.pipelines.near_dedup import jaccard, shingles


def chunks(text: str, min_words: int) -> list[str]:
    """Consecutive paragraphs grouped into pieces of at least min_words words (the tail joins the last piece)."""
    out, current = [], []
    for paragraph in (p.strip() for p in text.split("\n\n")):
        if paragraph:
            current.append(paragraph)
        if sum(len(p.split()) for p in current) >= min_words:
            out.append("\n\n".join(current))
            current = []
    if current and out:
        out[-1] += "\n\n" + "\n\n".join(current)
    return out


def _candidate_texts(min_words: int):
    """Help topics, then installed packages' long descriptions (their READMEs), in pieces."""
    import importlib.metadata
    from pydoc_data.topics import topics

    for _, text in sorted(topics.items()):
        yield from chunks(text, min_words)
    readmes = {}
    for dist in importlib.metadata.distributions():  # a layered venv lists a package twice: the first wins
        readmes.setdefault(dist.metadata.get("Name") or "", dist.metadata.get_payload() or "")
    for name in sorted(readmes):
        yield from chunks(readmes[name], min_words)


def base_texts(n: int, min_words: int = 250) -> list[str]:
    """Up to n distinct real texts of at least min_words words: help topics first, then package READMEs."""
    out, seen = [], set()
    for text in _candidate_texts(min_words):
        key = " ".join(text.split())[:200]
        if len(text.split()) >= min_words and key not in seen:
            seen.add(key)
            out.append(text.strip()[:6000])
            if len(out) >= n:
                break
    return out


def replace_words(text: str, share: float, rng: random.Random, vocab: list[str]) -> str:
    """Replace about `share` of the words (whitespace tokens) by random vocabulary words, keeping the layout."""
    parts = text.split(" ")
    for i in rng.sample(range(len(parts)), max(1, int(len(parts) * share))):
        parts[i] = rng.choice(vocab)
    return " ".join(parts)


def add_header_footer(text: str, fake: Faker) -> str:
    header = f"Posted by {fake.name()} on {fake.date()} in {fake.word().title()} | {fake.catch_phrase()}"
    footer = f"Share this page. Copyright {fake.year()} {fake.company()}. All rights reserved."
    return f"{header}\n\n{text}\n\n{footer}"


def swap_paragraphs(text: str, rng: random.Random) -> str:
    paragraphs = text.split("\n\n")
    if len(paragraphs) < 2:
        lines = text.split("\n")
        i, j = sorted(rng.sample(range(len(lines)), 2)) if len(lines) > 1 else (0, 0)
        lines[i], lines[j] = lines[j], lines[i]
        return "\n".join(lines)
    i, j = rng.sample(range(len(paragraphs)), 2)
    paragraphs[i], paragraphs[j] = paragraphs[j], paragraphs[i]
    return "\n\n".join(paragraphs)


EDITS = ("words", "header_footer", "swap", "all")


def edit(text: str, kind: str, rng: random.Random, fake: Faker, vocab: list[str]) -> str:
    if kind == "words":
        return replace_words(text, rng.uniform(0.01, 0.04), rng, vocab)
    if kind == "header_footer":
        return add_header_footer(text, fake)
    if kind == "swap":
        return swap_paragraphs(text, rng)
    return add_header_footer(swap_paragraphs(replace_words(text, rng.uniform(0.01, 0.03), rng, vocab), rng), fake)


def template(fake: Faker) -> tuple[str, str]:
    """A long header and footer shared by every hard negative (a site's boilerplate)."""
    header = "\n".join(f"{fake.catch_phrase()} | {fake.bs()}" for _ in range(4))
    footer = " ".join(fake.sentence(nb_words=12) for _ in range(5))
    return header, footer


def near_dup_docs(n_bases: int, seed: int = 0, hard_negatives: int = 10) -> list[dict]:
    """[{id, text, family}]: bases with 0-3 edited copies each, plus hard negatives on one template.

    Ids are hashes, so a family's base is not always its smallest id (the kept document may be a copy).
    """
    rng = random.Random(seed)
    fake = Faker()
    fake.seed_instance(seed)
    bases = base_texts(n_bases + hard_negatives)
    vocab = sorted({w for text in bases[:50] for w in text.split() if w.isalpha()})
    docs = []
    for b, text in enumerate(bases[:n_bases]):
        docs.append({"text": text, "family": f"base-{b}"})
        for kind in rng.sample(EDITS, rng.randint(0, 3)):
            docs.append({"text": edit(text, kind, rng, fake, vocab), "family": f"base-{b}"})
    header, footer = template(fake)
    for k, text in enumerate(bases[n_bases:]):
        docs.append({"text": f"{header}\n\n{text[:1500]}\n\n{footer}", "family": f"negative-{k}"})
    for i, doc in enumerate(docs):
        doc["id"] = f"{random.Random(i).getrandbits(48):012x}"
    return sorted(docs, key=lambda d: d["id"])


def similar_pairs(texts: dict[str, str], min_jaccard: float = 0.5) -> dict[tuple[str, str], float]:
    """Exact word-5-gram Jaccard of every pair that shares a shingle and reaches min_jaccard (inverted index)."""
    sets = {doc_id: shingles(text, 5) for doc_id, text in texts.items()}
    index = defaultdict(set)
    for doc_id, grams in sets.items():
        for g in grams:
            index[g].add(doc_id)
    out = {}
    for a, grams in sets.items():
        candidates = set().union(*(index[g] for g in grams)) if grams else set()
        for b in candidates:
            if a < b:
                j = jaccard(grams, sets[b])
                if j >= min_jaccard:
                    out[(a, b)] = j
    return out


def quality(texts: dict[str, str], rejected: dict[str, str], pairs: dict[tuple[str, str], float]) -> dict:
    """Precision (rejects with true J >= 0.7 to the doc they point to), recall (docs with J >= 0.8 to a kept one)."""
    sets = {doc_id: shingles(text, 5) for doc_id, text in texts.items()}
    pointed = [jaccard(sets[doc], sets[kept]) for doc, kept in sorted(rejected.items())]
    kept = set(texts) - set(rejected)
    # Every document with J >= 0.8 to a kept document (when both are kept, both count: two misses).
    should = {x for (a, b), j in pairs.items() if j >= 0.8 for x, y in ((a, b), (b, a)) if y in kept}
    hits = should & set(rejected)
    return {
        "rejected": len(rejected),
        "precision": sum(j >= 0.7 for j in pointed) / len(pointed) if pointed else 1.0,
        "should_reject": len(should),
        "recall": len(hits) / len(should) if should else 1.0,
        "pointed_jaccard": pointed,
    }


def histogram(values: list[float], edges=(0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0001)) -> list[tuple[str, int]]:
    return [
        (f"[{lo:.1f}, {min(hi, 1.0):.1f}{']' if hi > 1 else ')'}", sum(lo <= v < hi for v in values))
        for lo, hi in zip(edges, edges[1:])
    ]
