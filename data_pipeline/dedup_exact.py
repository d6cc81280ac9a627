"""Exact deduplication on a 128-bit hash of the normalised text.

Workers hash (`ExactHasher`). The decision is sharded (`ExactDedup`): every survivor's (hash, global index) goes
to the rank that owns the hash (its first 8 bytes modulo the rank count); the owner sorts what it got (in parts
on disk when over budget) and, in each run of equal hashes, keeps the smallest global index (the first document
in input order) and answers the owners of the others with it: `exact_duplicate` of that one.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np

from data_pipeline.base import Doc, Step
from data_pipeline.context import BuildContext, Stage, rank_file, survivor_bytes
from data_pipeline.distributed import owners, route
from data_pipeline.spill import Partitions, read_array

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


def first_of_runs(keys: list[np.ndarray], index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Records sorted by (keys..., index): for every record that is not the first of its run of equal keys,
    (its index, the run's first index)."""
    same = np.ones(len(index), dtype=bool)
    for k in keys:
        same[1:] &= k[1:] == k[:-1]
    new = ~same
    new[:1] = True
    first = index[np.maximum.accumulate(np.where(new, np.arange(len(index)), 0))]
    return index[~new], first[~new]


class ExactDedup(Stage):
    """Sharded first-occurrence of each hash: `exact_of[i]` is the global survivor index that local survivor
    i duplicates, or -1."""

    name = "exact_dedup"
    arrays = ("exact_of",)

    def run(self, ctx: BuildContext) -> None:
        comm, rank = ctx.comm, ctx.rank
        bounds = ctx.bounds("survivor_bounds")
        n = int(bounds[rank + 1] - bounds[rank])
        base = int(bounds[rank])
        exact_of = np.full(n, -1, dtype=np.int64)
        per_rank = int(bounds[-1]) / comm.size
        parts = max(1, int(np.ceil(per_rank * ENTRY.itemsize * 4 / ctx.budget)))
        block = max(1024, ctx.budget // (ENTRY.itemsize * 6))
        rounds = int(comm.allreduce(np.array([-(-n // block)]), "max")[0])
        store = Partitions(ctx.tmp / "spill", f"exact-{rank:05d}", parts, ENTRY)
        try:
            for b in range(rounds):
                lo, hi = min(n, b * block), min(n, (b + 1) * block)
                h = read_array(rank_file(ctx.tmp, "hash", rank), "<u8", lo, hi, width=2)
                rec = np.empty(hi - lo, dtype=ENTRY)
                rec["h0"], rec["h1"], rec["s"] = h[:, 0], h[:, 1], base + np.arange(lo, hi)
                got = np.concatenate(route(comm, (rec["h0"] % comm.size).astype(np.int64), rec))
                store.add(got, (got["h1"] % parts).astype(np.int64))
            for p in range(parts):
                rec = store.take(p)
                rec = rec[np.lexsort((rec["s"], rec["h1"], rec["h0"]))]
                dup, of = first_of_runs([rec["h0"], rec["h1"]], rec["s"])
                ans = np.empty(len(dup), dtype=ANSWER)
                ans["s"], ans["of"] = dup, of
                for got in route(comm, owners(bounds, dup), ans):
                    exact_of[got["s"] - base] = got["of"]
            if store.spilled:
                log.info("rank %d: exact dedup spilled %.1f MB in %d parts", rank, store.spilled / 1e6, parts)
        finally:
            store.close()
        ctx.arrays["exact_of"] = exact_of
        nbytes = survivor_bytes(ctx.tmp, rank)
        dup = exact_of >= 0
        st = self.stats
        st.docs_in, st.bytes_in = n, int(nbytes.sum())
        st.docs_out, st.bytes_out = n - int(dup.sum()), int(nbytes[~dup].sum())
        if dup.any():
            st.removed["exact_duplicate"] += int(dup.sum())
