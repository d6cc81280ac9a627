"""Exact deduplication on a 128-bit hash of the normalised text.

Workers hash (`ExactHasher`); the decision is global (`ExactDedup`, on rank 0, over all ranks' hashes in
input order): the first document with a given hash is kept, later ones are `exact_duplicate` of it.
"""

from __future__ import annotations

import hashlib
import time

from data_pipeline.base import Doc, Step, StepStats


def text_hash(data: bytes) -> bytes:
    """128-bit BLAKE2b of the UTF-8 text: collisions are out of reach for any corpus size."""
    return hashlib.blake2b(data, digest_size=16).digest()


class ExactHasher(Step):
    """Hash the normalised text. A hash this worker has already seen marks the document `seen`: it is an exact
    duplicate of an earlier document whatever the global decision, so MinHash and the text store skip it."""

    name = "exact_hash"

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[bytes] = set()

    def apply(self, doc: Doc) -> str | None:
        data = doc.cache.get("utf8")
        if data is None:
            data = doc.cache["utf8"] = doc.text.encode("utf-8")
        doc.hash = text_hash(data)
        if doc.hash in self._seen:
            doc.cache["seen"] = True
        else:
            self._seen.add(doc.hash)
        return None


class ExactDedup:
    """First occurrence of each hash, over documents given in global input order."""

    name = "exact_dedup"

    def __init__(self) -> None:
        self.stats = StepStats(self.name)

    def run(self, hashes: list[bytes], nbytes: list[int]) -> list[int]:
        """For each document the index of the document it duplicates, or -1 (kept)."""
        t0 = time.perf_counter()
        first: dict[bytes, int] = {}
        out = []
        for i, h in enumerate(hashes):
            j = first.setdefault(h, i)
            out.append(-1 if j == i else j)
            self.stats.docs_in += 1
            self.stats.bytes_in += nbytes[i]
            if j == i:
                self.stats.docs_out += 1
                self.stats.bytes_out += nbytes[i]
            else:
                self.stats.removed["exact_duplicate"] += 1
        self.stats.seconds += time.perf_counter() - t0
        return out
