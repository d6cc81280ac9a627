"""Exact deduplication on a 128-bit hash of the normalised text.

Workers hash (`ExactHasher`). The decision is sharded (`ExactDedup`): every survivor's (hash, global index) goes
to the rank that owns the hash (its first 8 bytes modulo the rank count); the owner sorts what it got (an
external merge sort past its budget: spill.py) and, in each run of equal hashes, keeps the smallest global
index (the first document in input order) and answers the owners of the others with it: `exact_duplicate` of
that one.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np

from data_pipeline.base import Doc, Step
from data_pipeline.context import BuildContext, Stage, blocks, rank_file, survivor_bytes
from data_pipeline.distributed import aligned, max_chunks, owners, route
from data_pipeline.spill import ColumnWriter, SortedRuns, read_array

log = logging.getLogger("data_pipeline")
ENTRY = np.dtype([("h0", "<u8"), ("h1", "<u8"), ("s", "<i8")])
ANSWER = np.dtype([("s", "<i8"), ("of", "<i8")])


def text_hash(data: bytes) -> bytes:
    """128-bit BLAKE2b of the UTF-8 text: collisions are out of reach for any corpus size."""
    return hashlib.blake2b(data, digest_size=16).digest()


class ExactHasher(Step):
    """Hash the normalised text. A hash this worker has recently seen marks the document `seen`: it is an exact
    duplicate of an earlier document whatever the global decision, so MinHash and the text store skip it. The
    set is bounded (`limit` hashes, then started afresh): it saves work, the decision does not depend on it."""

    name = "exact_hash"

    def __init__(self, limit: int = 1 << 20) -> None:
        super().__init__()
        self._seen: set[bytes] = set()
        self.limit = limit

    def apply(self, doc: Doc) -> str | None:
        data = doc.cache.get("utf8")
        if data is None:
            data = doc.cache["utf8"] = doc.text.encode("utf-8")
        doc.hash = text_hash(data)
        if doc.hash in self._seen:
            doc.cache["seen"] = True
        else:
            if len(self._seen) >= self.limit:
                self._seen.clear()
            self._seen.add(doc.hash)
        return None


class FirstOccurrence:
    """The first index of each run of equal hashes in a stream of entries sorted by (hash, index), fed a
    chunk at a time: a run that spans chunks carries its hash and first index into the next."""

    def __init__(self) -> None:
        self._last: tuple[int, int, int] | None = None  # (h0, h1, first index) of the last chunk's last run

    def feed(self, rec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index, first index of its run) of every entry of `rec` that is not the first of its run."""
        if not len(rec):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        h0, h1, s = rec["h0"], rec["h1"], rec["s"]
        new = np.ones(len(rec), dtype=bool)
        new[1:] = (h0[1:] != h0[:-1]) | (h1[1:] != h1[:-1])
        if self._last is not None:
            new[0] = (int(h0[0]), int(h1[0])) != self._last[:2]
        head = np.maximum.accumulate(np.where(new, np.arange(len(rec)), -1))  # -1: the carried run
        first = np.where(head >= 0, s[np.maximum(head, 0)], -1 if self._last is None else self._last[2])
        self._last = (int(h0[-1]), int(h1[-1]), int(first[-1]))
        return s[~new], first[~new]


class ExactDedup(Stage):
    """Sharded first-occurrence of each hash: the rank file `exact_of` holds, per local survivor, the global
    survivor index it duplicates, or -1."""

    name = "exact_dedup"
    files = ("exact_of",)

    def run(self, ctx: BuildContext) -> None:
        comm, rank = ctx.comm, ctx.rank
        bounds = ctx.bounds("survivor_bounds")
        n = int(bounds[rank + 1] - bounds[rank])
        base = int(bounds[rank])
        block = max(1024, ctx.budget // (ENTRY.itemsize * 8))
        spill = ctx.tmp / "spill"
        store = SortedRuns(spill, f"exact-{rank:05d}", ENTRY, ctx.budget // 2)
        # the first occurrences of this rank's survivors' duplicates, sorted by survivor
        answers = SortedRuns(spill, f"answers-{rank:05d}", ANSWER, ctx.budget // 4)
        try:
            for lo, hi in blocks(n, block, max_chunks(comm, n, block)):
                h = read_array(rank_file(ctx.tmp, "hash", rank), "<u8", lo, hi, width=2)
                rec = np.empty(hi - lo, dtype=ENTRY)
                rec["h0"], rec["h1"], rec["s"] = h[:, 0], h[:, 1], base + np.arange(lo, hi)
                store.add(np.concatenate(route(comm, (rec["h0"] % comm.size).astype(np.int64), rec)))
            first = FirstOccurrence()
            for rec in aligned(comm, store, block):
                dup, of = first.feed(rec)
                ans = np.empty(len(dup), dtype=ANSWER)
                ans["s"], ans["of"] = dup, of
                answers.add(np.concatenate(route(comm, owners(bounds, dup), ans)))
            store.close()
            column = ColumnWriter(rank_file(ctx.tmp, "exact_of", rank), n)
            for ans in answers.chunks(block):
                column.put(ans["s"] - base, ans["of"])
            column.close()
            spilled = store.spilled + answers.spilled
            if spilled:
                log.info("rank %d: exact dedup spilled %.1f MB in sorted runs", rank, spilled / 1e6)
        finally:
            store.close()
            answers.close()
        self._count(ctx, n, block)

    def _count(self, ctx: BuildContext, n: int, block: int) -> None:
        st = self.stats
        for lo, hi in blocks(n, block):
            dup = read_array(rank_file(ctx.tmp, "exact_of", ctx.rank), "<i8", lo, hi) >= 0
            nbytes = survivor_bytes(ctx.tmp, ctx.rank, lo, hi)
            st.bytes_in += int(nbytes.sum())
            st.bytes_out += int(nbytes[~dup].sum())
            st.docs_out += int((~dup).sum())
        st.docs_in = n
        if n > st.docs_out:
            st.removed["exact_duplicate"] += n - st.docs_out
