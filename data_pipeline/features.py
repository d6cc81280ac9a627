"""Per-document features shared by several steps, computed at most once per document (cached in `doc.cache`)
and, where numeric, for a whole batch at once."""

from __future__ import annotations

import numpy as np

from data_pipeline.base import Doc
from data_pipeline.textfeatures import batch_word_hashes, batch_word_stats


def utf8(doc: Doc) -> bytes:
    if "utf8" not in doc.cache:
        doc.cache["utf8"] = doc.text.encode("utf-8")
    return doc.cache["utf8"]


def lower(doc: Doc) -> str:
    if "lower" not in doc.cache:
        doc.cache["lower"] = doc.text.lower()
    return doc.cache["lower"]


def lines(doc: Doc) -> list[str]:
    """Non-blank lines, stripped."""
    if "lines" not in doc.cache:
        doc.cache["lines"] = [s for s in map(str.strip, doc.text.split("\n")) if s]
    return doc.cache["lines"]


def word_hashes(docs: list[Doc]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(hash, length) of the lower-cased, punctuation-split words (what MinHash shingles and the repetition
    filter counts)."""
    need = [d for d in docs if "words" not in d.cache]
    if need:
        for doc, words in zip(need, batch_word_hashes([lower(d).encode("utf-8") for d in need]), strict=True):
            doc.cache["words"] = words
    return [d.cache["words"] for d in docs]


def word_stats(docs: list[Doc]) -> list[tuple[int, int, int]]:
    """(words, words with a letter, characters in words), words split at whitespace."""
    need = [d for d in docs if "word_stats" not in d.cache]
    if need:
        for doc, stats in zip(need, batch_word_stats([utf8(d) for d in need]), strict=True):
            doc.cache["word_stats"] = stats
    return [d.cache["word_stats"] for d in docs]
