"""Near deduplication: MinHash signatures of word n-gram shingles, LSH candidates, Jaccard confirmation,
connected components, sharded over the ranks.

Workers compute signatures (`MinHasher`: datasketch's `affine32` permutations, applied to numpy-hashed
shingles: see textfeatures.py) into their rank's signature file. LSH bands and rows come from the threshold
through datasketch's `MinHashLSH` with false-positive/negative weights 0.2/0.8: candidates are confirmed by
their estimated Jaccard similarity, so a false positive costs one comparison while a false negative is a
missed duplicate.

The grouping (`NearDedup`) never gathers the signatures: every rank makes its documents' band keys (a 64-bit
hash of the band index and its rows) and sends (key, global index) to the key's owner rank; an owner sorts its
keys (an external merge sort past its budget: spill.py) and, in each bucket of equal keys, pairs the members (every pair
of a bucket of up to `ALL_PAIRS`; in a larger one each member with the smallest and with the one before it).
A candidate pair goes to the rank of its smaller index, which confirms it against both full signatures
(its own from memory-mapped reads of its file, the partner's from the partner rank's file on the shared
output filesystem). Groups are the connected components of the confirmed pairs (components.py: label
propagation as merge joins of sorted streams, spooled to disk past the budget); each group keeps its smallest
global index (the first document in input order), the others are `near_duplicate` of it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from data_pipeline.base import Doc, Step
from data_pipeline.components import components
from data_pipeline.context import BuildContext, Stage, blocks, column, rank_file, survivor_bytes
from data_pipeline.distributed import Comm, aligned, max_chunks, owners, route
from data_pipeline.features import word_hashes
from data_pipeline.spill import ColumnWriter, SortedRuns, Spool, read_array, read_rows
from data_pipeline.textfeatures import fmix32, fmix64, ngram_hashes, shingle_hashes

log = logging.getLogger("data_pipeline")
LSH_WEIGHTS = (0.2, 0.8)  # (false positive, false negative)
ALL_PAIRS = 32  # buckets up to this size confirm every pair (exactly the union-find over all candidates)
KEY = np.dtype([("k", "<u8"), ("s", "<i8")])
PAIR = np.dtype([("u", "<i8"), ("v", "<i8")])
_BLOCK = 2048  # shingles per numpy pass: a (num_perm, _BLOCK) uint32 matrix stays in cache


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) that datasketch's MinHashLSH derives for `threshold` with our weights."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
    return lsh.b, lsh.r


def minhash_permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's `affine32` permutations (a odd, b) for `seed`. Computed once by the parent and handed to
    the workers, which then never import datasketch (and scipy with it: half a second per process)."""
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
    return np.asarray(a, dtype=np.uint32), np.asarray(b, dtype=np.uint32)


class MinHasher(Step):
    """MinHash signature (`num_perm` uint32 values) of a document's word `ngram` shingles.

    The values equal those of `datasketch.MinHash(num_perm, seed).update_batch(shingles)` with a hash function
    returning our 32-bit shingle hashes; only the hashing is vectorized.
    """

    name = "minhash"

    def __init__(
        self,
        num_perm: int = 128,
        ngram: int = 5,
        seed: int = 1,
        permutations: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        super().__init__()
        a, b = permutations if permutations is not None else minhash_permutations(num_perm, seed)
        self.a = np.asarray(a, dtype=np.uint32)
        self.b = np.asarray(b, dtype=np.uint32)
        self.ngram = ngram
        self.num_perm = num_perm

    def signature_of_shingles(self, hv: np.ndarray) -> np.ndarray:
        """min over shingles of a_k * fmix32(h) + b_k (mod 2**32), for every permutation k."""
        hv = fmix32(hv.astype(np.uint32, copy=False))
        sig = np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
        for lo in range(0, len(hv), _BLOCK):
            block = np.multiply.outer(self.a, hv[lo : lo + _BLOCK])  # (num_perm, shingles): reduce along rows
            block += self.b[:, None]
            np.minimum(sig, block.min(axis=1), out=sig)
        return sig

    def signature(self, text: str) -> np.ndarray:
        return self.signature_of_shingles(shingle_hashes(text.lower().encode("utf-8"), self.ngram))

    def prepare(self, docs: list[Doc]) -> None:
        """Signatures of the whole batch: shingles of all documents in one array, the permutations applied
        to blocks of it, and the minimum taken per document with `np.minimum.reduceat`."""
        todo = [d for d in docs if not d.cache.get("seen")]
        words = word_hashes(todo)
        n = self.ngram
        many = [i for i, (h, _) in enumerate(words) if len(h) >= n]
        for i, (h, _) in enumerate(words):
            if len(h) < n:  # fewer words than a shingle (or none): the single-document path
                todo[i].signature = self.signature_of_shingles(
                    (ngram_hashes(h, n) >> np.uint64(32)).astype(np.uint32)
                    if len(h)
                    else shingle_hashes(todo[i].text.lower().encode("utf-8"), n)
                )
        if not many:
            return
        hashes = np.concatenate([words[i][0] for i in many])
        counts = np.array([len(words[i][0]) for i in many])
        doc_of = np.repeat(np.arange(len(many)), counts)
        m = len(hashes) - n + 1
        with np.errstate(over="ignore"):
            grams = hashes[:m].copy()
            for j in range(1, n):
                grams = grams * np.uint64(0x2545F4914F6CDD1D) + hashes[j : j + m]
        valid = doc_of[:m] == doc_of[n - 1 :]
        shingles = fmix32((fmix64(grams[valid]) >> np.uint64(32)).astype(np.uint32))
        owner = doc_of[:m][valid]
        sigs = np.full((len(many), self.num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
        for lo in range(0, len(shingles), _BLOCK):
            block = np.multiply.outer(self.a, shingles[lo : lo + _BLOCK])
            block += self.b[:, None]
            own = owner[lo : lo + _BLOCK]
            seg = np.flatnonzero(np.diff(own, prepend=-1))  # where each document's run starts in the block
            rows = own[seg]
            sigs[rows] = np.minimum(sigs[rows], np.minimum.reduceat(block, seg, axis=1).T)
        for k, i in enumerate(many):
            todo[i].signature = sigs[k]

    def apply(self, doc: Doc) -> str | None:
        if doc.signature is None and not doc.cache.get("seen"):
            self.prepare([doc])
        return None


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(documents, bands) 64-bit keys: a hash of the band's index and its `rows` values."""
    sigs = sigs.astype(np.uint64)
    keys = np.empty((len(sigs), bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for b in range(bands):
            acc = np.full(len(sigs), (b + 1) * 0x9E3779B97F4A7C15 % (1 << 64), dtype=np.uint64)
            for j in range(b * rows, (b + 1) * rows):
                acc = fmix64(acc * np.uint64(0x100000001B3) + sigs[:, j])
            keys[:, b] = acc
    return keys


def bucket_pairs(keys: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entries sorted by (key, member): candidate pairs (u < v) within each bucket of equal keys."""
    start = np.ones(len(keys), dtype=bool)
    start[1:] = keys[1:] != keys[:-1]
    shared = ~start
    shared[:-1] |= ~start[1:]  # in a bucket of two or more: the others cannot pair
    keys, members, start = keys[shared], members[shared], start[shared]
    if len(keys) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    bucket = np.cumsum(start) - 1
    first = np.flatnonzero(start)
    size = np.diff(np.append(first, len(keys)))[bucket]
    us, vs = [], []
    big = size > ALL_PAIRS
    head = first[bucket]
    star = big & (np.arange(len(keys)) != head)  # large buckets: every member with the smallest ...
    us.append(members[head[star]])
    vs.append(members[star])
    for d in range(1, min(ALL_PAIRS, int(size.max())) if len(size) else 1):  # ... and the one before it
        i = np.arange(len(keys) - d)
        ok = bucket[i] == bucket[i + d]
        if d > 1:
            ok &= ~big[i]
        us.append(members[i[ok]])
        vs.append(members[i[ok] + d])
    return np.concatenate(us), np.concatenate(vs)


class BucketStream:
    """Candidate pairs of a stream of (key, member) entries sorted by (key, member), fed a chunk at a time.
    The bucket at a chunk's end may go on in the next chunk: while it is small its entries are held back
    and joined to the next chunk; once it is large (more than `ALL_PAIRS`, so star and chain) its pairs so
    far are made and only its head and last member are carried. The pairs are those of `bucket_pairs` over
    the whole stream, whatever the chunks."""

    def __init__(self) -> None:
        self._held = np.zeros(0, KEY)
        self._big: tuple[int, int, int] | None = None  # (key, head, last member) of a large open bucket

    def feed(self, rec: np.ndarray, last: bool) -> tuple[np.ndarray, np.ndarray]:
        """Pairs (u < v) complete with `rec`; `last`: the stream ends with it."""
        us, vs = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        if self._big is not None:
            key, head, prev = self._big
            n = int(np.searchsorted(rec["k"], np.uint64(key), side="right"))
            if n:
                members = rec["s"][:n]
                us += [np.full(n, head, np.int64), np.concatenate(([prev], members[:-1]))]
                vs += [members, members]
                rec, self._big = rec[n:], (key, head, int(members[-1]))
            if not len(rec) and not last:
                return np.concatenate(us), np.concatenate(vs)
            self._big = None
        rec = np.concatenate([self._held, rec])
        self._held = np.zeros(0, KEY)
        if not last and len(rec):
            tail = int(np.searchsorted(rec["k"], rec["k"][-1], side="left"))
            if len(rec) - tail <= ALL_PAIRS:
                self._held = rec[tail:]
            else:
                self._big = (int(rec["k"][-1]), int(rec["s"][tail]), int(rec["s"][-1]))
                u, v = bucket_pairs(rec["k"][tail:], rec["s"][tail:])
                us.append(u)
                vs.append(v)
            rec = rec[:tail]
        u, v = bucket_pairs(rec["k"], rec["s"])
        return np.concatenate([*us, u]), np.concatenate([*vs, v])


class NearGrouping:
    """The sharded near-duplicate grouping over any signature store (a rank's files, or arrays in memory)."""

    def __init__(self, threshold: float, num_perm: int) -> None:
        self.num_perm = num_perm
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self.min_matches = math.ceil(threshold * num_perm - 1e-9)
        self.candidates = 0
        self.confirmed = 0
        self.rounds = 0
        self.spilled = 0
        self.remote_bytes = 0  # signature rows read from other ranks' files

    def run(
        self,
        comm: Comm,
        bounds: np.ndarray,
        alive: Callable[[int, int], np.ndarray],
        block_sigs: Callable[[int, int], np.ndarray],
        rank_rows: Callable[[int, np.ndarray], np.ndarray],
        budget: int,
        spill: Path,
        found: Callable[[np.ndarray, np.ndarray], None],
    ) -> None:
        """`alive(lo, hi)`: which of this rank's survivors lo..hi-1 take part (bool). Hands `found` the near
        duplicates among this rank's survivors and their groups' kept documents (global indices), a chunk at
        a time in ascending order. The band entries get half of `budget`, the candidate pairs and the
        confirmed links a quarter each, then the components the rest."""
        rank = comm.rank
        base = int(bounds[rank])
        n = int(bounds[rank + 1]) - base
        block = max(256, budget // (4 * self.num_perm * 2 + self.bands * KEY.itemsize * 6))
        store = SortedRuns(spill, f"bands-{rank:05d}", KEY, budget // 2)
        cands = SortedRuns(spill, f"pairs-{rank:05d}", PAIR, budget // 4)  # at u's rank: sorted by (u, v)
        links = Spool(spill, f"links-{rank:05d}", PAIR, budget // 4)  # confirmed pairs, read every round
        try:
            for lo, hi in blocks(n, block, max_chunks(comm, n, block)):
                idx = np.flatnonzero(alive(lo, hi))
                keys = band_keys(block_sigs(lo, hi)[idx], self.bands, self.rows)
                rec = np.empty(keys.size, dtype=KEY)
                rec["k"] = keys.ravel()
                rec["s"] = np.repeat(base + lo + idx, self.bands)
                store.add(np.concatenate(route(comm, (rec["k"] % comm.size).astype(np.int64), rec)))
            self._pairs(comm, bounds, store, cands, max(1024, budget // (KEY.itemsize * 64)))
            self._confirm(rank, bounds, cands, links, rank_rows, budget)
            chunk = max(1024, budget // 512)  # edges per exchange: each is copied a few times on the way
            labels, self.rounds = components(comm, bounds, links, chunk, spill, budget)
            for t in labels.chunks(chunk):
                moved = t[t["l"] != t["n"]]
                found(moved["n"], moved["l"])
            self.spilled += store.spilled + cands.spilled + links.spilled + labels.spilled
            labels.close()
        finally:
            store.close()
            cands.close()
            links.close()

    @staticmethod
    def _pairs(comm: Comm, bounds: np.ndarray, store: SortedRuns, cands: SortedRuns, chunk: int) -> None:
        """Every bucket's candidate pairs, from this rank's band entries in (key, member) order, to the rank
        of their smaller member (as many exchanges on every rank)."""
        mine, buckets = -(-store.count // chunk), BucketStream()
        for i, entries in enumerate(aligned(comm, store, chunk)):
            u, v = buckets.feed(entries, last=i >= mine - 1)
            pair = np.empty(len(u), dtype=PAIR)
            pair["u"], pair["v"] = u, v
            cands.add(np.concatenate(route(comm, owners(bounds, u), pair)))
        store.close()

    def _confirm(
        self,
        rank: int,
        bounds: np.ndarray,
        cands: SortedRuns,
        links: Spool,
        rank_rows: Callable[[int, np.ndarray], np.ndarray],
        budget: int,
    ) -> None:
        """The distinct candidate pairs (in (u, v) order: copies of a pair from several bands are
        neighbours) confirmed against both signatures, into `links`."""
        prev = np.zeros(0, PAIR)
        for pair in cands.chunks(max(1024, budget // (PAIR.itemsize * 16))):
            fresh = np.ones(len(pair), dtype=bool)
            fresh[1:] = pair[1:] != pair[:-1]
            if len(prev):
                fresh[0] = pair[0] != prev[0]
            prev, pair = pair[-1:], pair[fresh]
            self.candidates += len(pair)
            links.add(pair[self._confirmed(rank, bounds, pair, rank_rows, budget)])
        self.confirmed += links.count
        cands.close()

    def _confirmed(
        self,
        rank: int,
        bounds: np.ndarray,
        pair: np.ndarray,
        rank_rows: Callable[[int, np.ndarray], np.ndarray],
        budget: int,
    ) -> np.ndarray:
        """Which candidate pairs (u on this rank) agree in >= `min_matches` of their signatures' values."""
        keep = np.zeros(len(pair), dtype=bool)
        step = max(256, budget // (8 * self.num_perm * 4))
        for lo in range(0, len(pair), step):
            chunk = pair[lo : lo + step]
            su = rank_rows(rank, chunk["u"] - bounds[rank])
            sv = np.empty_like(su)
            where = owners(bounds, chunk["v"])
            for r in np.unique(where):
                sel = where == r
                sv[sel] = rank_rows(int(r), chunk["v"][sel] - bounds[r])
                if r != rank:
                    self.remote_bytes += int(sel.sum()) * sv.shape[1] * 4
            keep[lo : lo + step] = np.count_nonzero(su == sv, axis=1) >= self.min_matches
        return keep


class NearDedup(Stage):
    """Sharded near-duplicate groups of the survivors that are not exact duplicates: the rank file `near_of`
    holds, per local survivor, the global survivor index of its group's kept document, or -1."""

    name = "near_dedup"
    files = ("near_of",)

    def __init__(self, threshold: float = 0.8, num_perm: int = 128) -> None:
        super().__init__()
        self.grouping = NearGrouping(threshold, num_perm)

    def run(self, ctx: BuildContext) -> None:
        bounds = ctx.bounds("survivor_bounds")
        base = int(bounds[ctx.rank])
        n = int(bounds[ctx.rank + 1]) - base
        exact = "exact" in ctx.opts.dedup
        width = self.grouping.num_perm
        sig_file = rank_file(ctx.tmp, "sig", ctx.rank)

        def alive(lo: int, hi: int) -> np.ndarray:
            return column(ctx.tmp, "exact_of", ctx.rank, lo, hi, exact) < 0

        near_of = ColumnWriter(rank_file(ctx.tmp, "near_of", ctx.rank), n)
        self.grouping.run(
            ctx.comm,
            bounds,
            alive,
            lambda lo, hi: read_array(sig_file, "<u4", lo, hi, width=width),
            lambda r, rows: read_rows(rank_file(ctx.tmp, "sig", r), rows, width),
            ctx.budget,
            ctx.tmp / "spill",
            lambda dups, kept: near_of.put(dups - base, kept),
        )
        near_of.close()
        g = self.grouping
        log.info(
            "rank %d: near dedup: %d candidate pairs, %d confirmed, %d rounds, %.3f MB of signatures read from "
            "other ranks%s",
            ctx.rank,
            g.candidates,
            g.confirmed,
            g.rounds,
            g.remote_bytes / 1e6,
            f", spilled {g.spilled / 1e6:.1f} MB" if g.spilled else "",
        )
        st = self.stats
        for lo, hi in blocks(n, ctx.rows(32)):
            live = alive(lo, hi)
            out = live & (read_array(rank_file(ctx.tmp, "near_of", ctx.rank), "<i8", lo, hi) < 0)
            nbytes = survivor_bytes(ctx.tmp, ctx.rank, lo, hi)
            st.docs_in += int(live.sum())
            st.bytes_in += int(nbytes[live].sum())
            st.docs_out += int(out.sum())
            st.bytes_out += int(nbytes[out].sum())
        if st.docs_in > st.docs_out:
            st.removed["near_duplicate"] += st.docs_in - st.docs_out


def near_groups(signatures: np.ndarray, threshold: float = 0.8, num_perm: int = 128) -> list[int]:
    """One process, signatures in memory (global input order): for each document the index of its group's
    kept document, or -1 if it is kept."""
    sigs = np.ascontiguousarray(signatures, dtype=np.uint32)
    grouping = NearGrouping(threshold, num_perm)
    near_of = np.full(len(sigs), -1, dtype=np.int64)

    def found(dups: np.ndarray, kept: np.ndarray) -> None:
        near_of[dups] = kept

    grouping.run(
        Comm(),
        np.array([0, len(sigs)]),
        lambda lo, hi: np.ones(hi - lo, dtype=bool),
        lambda lo, hi: sigs[lo:hi],
        lambda r, rows: sigs[rows],
        1 << 40,
        Path("."),
        found,
    )
    return near_of.tolist()
