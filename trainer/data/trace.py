"""The data trace: one JSON line per sequence, written by `cpt data-check --trace` and by the trainer."""

from __future__ import annotations


def trace_lines(batch: dict, rank: int) -> list[dict]:
    """{"index", "rank", "segments": [[source, doc_id, n_tokens], ...]} for each sequence of a micro-batch."""
    return [
        {"index": int(index), "rank": int(rank), "segments": [list(s) for s in segments]}
        for index, segments in zip(batch["index"], batch["segments"])
    ]
