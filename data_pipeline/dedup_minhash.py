"""Near deduplication: MinHash signatures of word n-gram shingles, LSH candidates, Jaccard confirmation,
union-find groups.

Workers compute signatures (`MinHasher`: datasketch's `affine32` permutations, applied to numpy-hashed
shingles: see textfeatures.py); the grouping is global (`NearDedup`, on rank 0, in input order). LSH bands and
rows come from the threshold through datasketch's `MinHashLSH` with false-positive/negative weights 0.2/0.8:
candidates are confirmed by their estimated Jaccard similarity, so a false positive costs one comparison while
a false negative is a missed duplicate. Confirmed pairs are merged by union-find; in each group the first
document in input order is kept and the others are `near_duplicate` of it.
"""

from __future__ import annotations

import math
import time

import numpy as np

from data_pipeline.base import Doc, Step, StepStats
from data_pipeline.features import word_hashes
from data_pipeline.textfeatures import fmix32, fmix64, ngram_hashes, shingle_hashes

LSH_WEIGHTS = (0.2, 0.8)  # (false positive, false negative)
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


class NearDedup:
    """Groups of near duplicates over signatures given in global input order."""

    name = "near_dedup"

    def __init__(self, threshold: float = 0.8, num_perm: int = 128) -> None:
        self.threshold = threshold
        self.num_perm = num_perm
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self.min_matches = math.ceil(threshold * num_perm - 1e-9)
        self.stats = StepStats(self.name)

    def run(self, signatures: np.ndarray, nbytes: list[int]) -> list[int]:
        """For each document the index of the kept document of its group, or -1 if it is kept.

        The LSH index is datasketch's `MinHashLSH` (its bands, rows and bucket tables). Each document's band
        keys (datasketch's own: the band's values byte-swapped) are made for all documents in one numpy pass
        and used for both the query and the insert, where `query()` + `insert()` would build them twice.
        """
        from datasketch import MinHashLSH

        t0 = time.perf_counter()
        lsh = MinHashLSH(num_perm=self.num_perm, params=(self.bands, self.rows))
        sigs = np.ascontiguousarray(signatures, dtype=np.uint32)
        band_keys = [
            np.ascontiguousarray(sigs[:, lo:hi].byteswap())
            .view(np.dtype((np.void, 4 * (hi - lo))))
            .ravel()
            .tolist()
            for lo, hi in lsh.hashranges
        ]
        tables = list(zip(band_keys, lsh.hashtables, strict=True))
        parent = list(range(len(sigs)))

        def find(x: int) -> int:
            root = x
            while parent[root] != root:
                root = parent[root]
            while parent[x] != root:
                parent[x], x = root, parent[x]
            return root

        for i, sig in enumerate(sigs):
            candidates: set[int] = set()
            for keys, table in tables:
                candidates.update(table.get(keys[i]))
            for c in sorted(candidates):
                rc, ri = find(c), find(i)
                if rc != ri and np.count_nonzero(sigs[c] == sig) >= self.min_matches:
                    parent[max(rc, ri)] = min(rc, ri)  # the root is the group's first document
            for keys, table in tables:
                table.insert(keys[i], i)
        out = []
        st = self.stats
        for i, n in enumerate(nbytes):
            root = find(i)
            out.append(-1 if root == i else root)
            st.docs_in += 1
            st.bytes_in += n
            if root == i:
                st.docs_out += 1
                st.bytes_out += n
            else:
                st.removed["near_duplicate"] += 1
        st.seconds += time.perf_counter() - t0
        return out
