"""Language ID side by side: langdetect, fastText lid.176 alone and the cascade, accuracy and docs per CPU second.

`python -m tests.bench language` (or `make bench ARGS=language`). Accuracy on the 1,500 lingua-py sentences of
30 languages committed in tests/pipelines/data/language (a region suffix is ignored: langdetect's zh-cn is zh);
speed also on ~2,000-character README chunks of the installed packages, where the cascade reads the start,
middle and end of each chunk. Each backend runs in turn, best of three passes, in one process.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from cpt.pipelines.text import detect_language
from cpt.pipelines.text.language import BACKENDS, FASTTEXT_THRESHOLD
from tests.bench.bench_text import readme_docs

LINGUA = Path(__file__).parents[1] / "pipelines" / "data" / "language" / "lingua_sentences.json"


def lingua_sentences() -> list[tuple[str, str]]:
    data = json.loads(LINGUA.read_text(encoding="utf-8"))
    return [(lang, sentence) for lang, sentences in data["sentences"].items() for sentence in sentences]


def cpu_rates(texts: list[str], repeat: int = 3) -> dict[str, float]:
    """Texts per CPU second of each backend, best of `repeat` passes run in turn (fair on a shared machine)."""
    best = dict.fromkeys(BACKENDS, float("inf"))
    for _ in range(repeat):
        for backend in BACKENDS:
            start = time.process_time()
            for text in texts:
                detect_language(text, backend=backend)
            best[backend] = min(best[backend], time.process_time() - start)
    return {backend: len(texts) / seconds for backend, seconds in best.items()}


def accuracy(items: list[tuple[str, str]], backend: str) -> tuple[float, Counter]:
    wrong = Counter(lang for lang, s in items if detect_language(s, backend=backend)[0].split("-")[0] != lang)
    return 1 - sum(wrong.values()) / len(items), wrong


def main() -> None:
    items = lingua_sentences()
    sentences = [s for _, s in items]
    docs = readme_docs()
    for backend in BACKENDS:  # load fastText's model and langdetect's profiles before any clock starts
        detect_language(sentences[0], backend=backend)
    rates, doc_rates = cpu_rates(sentences), cpu_rates(docs)
    fallback = sum(detect_language(s, backend="fasttext")[1] < FASTTEXT_THRESHOLD for s in sentences) / len(items)
    langs = len({lang for lang, _ in items})
    print(f"detect_language on {len(items)} lingua sentences of {langs} languages, and {len(docs)} README chunks:")
    print(f"  {'backend':11} {'accuracy':>8} {'sent/cpu-s':>11} {'vs ld':>6} {'docs/cpu-s':>11} {'vs ld':>6}  worst")
    for backend in BACKENDS:
        acc, wrong = accuracy(items, backend)
        worst = ", ".join(f"{lang} {n}" for lang, n in wrong.most_common(4))
        print(
            f"  {backend:11} {acc:8.4f} {rates[backend]:11.0f} {rates[backend] / rates['langdetect']:5.1f}x"
            f" {doc_rates[backend]:11.0f} {doc_rates[backend] / doc_rates['langdetect']:5.1f}x  {worst}"
        )
    print(f"  the cascade asks langdetect on {fallback:.1%} of the sentences (fastText below {FASTTEXT_THRESHOLD})")


if __name__ == "__main__":
    main()
