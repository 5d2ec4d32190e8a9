"""Exact-duplicate keys: documents that differ only in Unicode form, case or whitespace share a key."""

from __future__ import annotations

import hashlib
import re
import unicodedata

_WHITESPACE = re.compile(r"\s+")


def normalize_for_dedup(text: str) -> str:
    """NFKC, casefold, every whitespace run → one space, stripped."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def dedup_key(text: str) -> str:
    """Hex sha256 of `normalize_for_dedup(text)` (lone surrogates hashed as they are, never an error)."""
    return hashlib.sha256(normalize_for_dedup(text).encode("utf-8", "surrogatepass")).hexdigest()
