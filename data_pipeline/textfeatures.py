"""Vectorized word and shingle hashing (numpy), shared by the repetition filter and MinHash.

Hashing each shingle in Python (datasketch's `update` with sha1, or datatrove's per-shingle xxhash) costs
about a microsecond of interpreter time per word. Here every step is a whole-array numpy operation:

- words are maximal runs of bytes that are not ASCII whitespace or ASCII punctuation, in the lower-cased
  UTF-8 bytes (so "King," and "king" are one word; non-ASCII letters stay inside words);
- a word's hash is a polynomial hash of its bytes modulo 2**64, computed for all words at once from prefix
  sums, then avalanched with MurmurHash3's 64-bit finalizer;
- a shingle (n consecutive words) hashes to the high 32 bits of the finalized polynomial combination of its
  word hashes: the 32-bit input that datasketch's `affine32` MinHash scheme expects.

`tests/test_build_dedup.py` checks these against a per-word pure-Python reference.
"""

from __future__ import annotations

import numpy as np

# Byte classes as range comparisons (a few SIMD passes; a 256-entry table lookup costs more per byte).


def _whitespace(a: np.ndarray) -> np.ndarray:
    """ASCII whitespace: space, tab, newline, vertical tab, form feed, carriage return."""
    return (a == 32) | ((a >= 9) & (a <= 13))


def _separators(a: np.ndarray) -> np.ndarray:
    """ASCII whitespace and ASCII punctuation (string.punctuation)."""
    return (
        ((a >= 9) & (a <= 13))
        | ((a >= 32) & (a <= 47))
        | ((a >= 58) & (a <= 64))
        | ((a >= 91) & (a <= 96))
        | ((a >= 123) & (a <= 126))
    )


def _non_letters(a: np.ndarray) -> np.ndarray:
    """Bytes of a word that are not letters: ASCII non-letters (a byte >= 0x80 belongs to a non-ASCII
    character, counted as a letter: scripts other than Latin are letters far more often than not)."""
    folded = a | np.uint8(32)  # lower-cases ASCII letters
    return (a < 128) & ~((folded >= 97) & (folded <= 122)) & ~_whitespace(a)


def _utf8_lead(a: np.ndarray) -> np.ndarray:
    """The first byte of each UTF-8 character."""
    return (a & np.uint8(0xC0)) != 0x80


_PRIME = 0x100000001B3  # odd, so it is invertible modulo 2**64
_PRIME_INV = pow(_PRIME, -1, 1 << 64)
_LENGTH_MUL = np.uint64(0x9E3779B97F4A7C15)
_SHINGLE_MUL = np.uint64(0x2545F4914F6CDD1D)
_CHUNK = 1 << 20  # bytes hashed per numpy pass: bounds memory for a huge single document
_LOOKAHEAD = 4096  # how far past a chunk end to look for a separator to cut at
_POWERS: tuple[np.ndarray, np.ndarray] | None = None


def _powers() -> tuple[np.ndarray, np.ndarray]:
    """PRIME**i and PRIME**-i modulo 2**64 for every position in a chunk (computed once per process)."""
    global _POWERS
    if _POWERS is None:
        n = _CHUNK + _LOOKAHEAD
        with np.errstate(over="ignore"):
            pw = np.full(n, _PRIME, dtype=np.uint64)
            pw[0] = 1
            pinv = np.full(n, _PRIME_INV, dtype=np.uint64)
            pinv[0] = 1
            _POWERS = (np.cumprod(pw, dtype=np.uint64), np.cumprod(pinv, dtype=np.uint64))
    return _POWERS


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer: a bijection that spreads every input bit over the output."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (datasketch's `affine32` pre-mix)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _edges(mask: np.ndarray) -> np.ndarray:
    """+1 where a run of True starts, -1 one past where it ends (length len(mask) + 1)."""
    return np.diff(mask.view(np.int8), prepend=np.int8(0), append=np.int8(0))


def word_stats(data: bytes) -> tuple[int, int, int]:
    """(words, words containing a letter, characters in words) of UTF-8 `data`, words split at ASCII
    whitespace. A word has no letter iff one run of non-letter bytes spans it from its start to its end."""
    arr = np.frombuffer(data, dtype=np.uint8)
    in_word = ~_whitespace(arr)
    edges = _edges(in_word)
    starts, ends = edges == 1, edges == -1
    n_words = int(np.count_nonzero(starts))
    chars = int(np.count_nonzero(in_word & _utf8_lead(arr)))
    nl_edges = _edges(_non_letters(arr))
    no_letter = np.count_nonzero(starts[np.flatnonzero(nl_edges == 1)] & ends[np.flatnonzero(nl_edges == -1)])
    return n_words, n_words - int(no_letter), chars


def _chunk_bounds(arr: np.ndarray) -> list[tuple[int, int]]:
    n, lo, bounds = len(arr), 0, []
    while lo < n:
        hi = min(lo + _CHUNK, n)
        if hi < n:
            seps = np.flatnonzero(_separators(arr[hi : hi + _LOOKAHEAD]))
            hi = hi + int(seps[0]) if len(seps) else hi
        bounds.append((lo, hi))
        lo = hi
    return bounds


def _word_hashes(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hash, byte length, start offset) of every word of `data`."""
    arr = np.frombuffer(data, dtype=np.uint8)
    pw, pinv = _powers()
    hashes, lengths, offsets = [], [], []
    with np.errstate(over="ignore"):
        for lo, hi in _chunk_bounds(arr):
            a = arr[lo:hi]
            edges = _edges(~_separators(a))
            starts = np.flatnonzero(edges == 1)
            ends = np.flatnonzero(edges == -1)
            prefix = np.zeros(len(a) + 1, dtype=np.uint64)
            np.cumsum((a.astype(np.uint64) + np.uint64(1)) * pw[: len(a)], out=prefix[1:])
            length = (ends - starts).astype(np.uint64)
            h = (prefix[ends] - prefix[starts]) * pinv[starts]
            hashes.append(fmix64(h ^ (length * _LENGTH_MUL)))
            lengths.append(length)
            offsets.append(starts + lo)
    if not hashes:
        empty = np.zeros(0, np.uint64)
        return empty, empty, np.zeros(0, np.int64)
    return np.concatenate(hashes), np.concatenate(lengths), np.concatenate(offsets)


def word_hashes(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(64-bit hash, byte length) of every word of `data` (lower-cased UTF-8), in order."""
    hashes, lengths, _ = _word_hashes(data)
    return hashes, lengths


def ngram_hashes(words: np.ndarray, n: int) -> np.ndarray:
    """64-bit hashes of every window of `n` consecutive word hashes (one window if there are fewer)."""
    k = max(len(words) - n + 1, 1)
    with np.errstate(over="ignore"):
        h = words[:k].copy()
        for j in range(1, min(n, len(words))):
            h = h * _SHINGLE_MUL + words[j : j + k]
        return fmix64(h)


def shingle_hashes(data: bytes, n: int) -> np.ndarray:
    """32-bit hashes of the word n-gram shingles of `data` (lower-cased UTF-8 bytes)."""
    words, _ = word_hashes(data)
    if len(words) == 0:  # no word at all (only punctuation): the text's bytes are the one shingle
        a = np.frombuffer(data, dtype=np.uint8)[:_CHUNK]
        with np.errstate(over="ignore"):
            poly = np.sum((a.astype(np.uint64) + np.uint64(1)) * _powers()[0][: len(a)], dtype=np.uint64)
        words = fmix64(np.array([poly], dtype=np.uint64))
    return (ngram_hashes(words, n) >> np.uint64(32)).astype(np.uint32)


# ---------------------------------------------------------------------------------------------- batches
# Many small documents: one numpy pass over several documents joined by a space (a separator, so no word
# spans two documents). Groups never exceed one chunk and a larger document is hashed alone, so every word's
# hash is the one `word_hashes` gives for its document alone, whatever the batch.


def _groups(datas: list[bytes]) -> list[list[int]]:
    groups: list[list[int]] = []
    cur: list[int] = []
    size = 0
    for i, data in enumerate(datas):
        if len(data) > _CHUNK:
            groups.append([i])
            continue
        if cur and size + len(data) + 1 > _CHUNK:
            groups.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += len(data) + 1
    if cur:
        groups.append(cur)
    return groups


def _joined(datas: list[bytes], group: list[int]) -> tuple[bytes, np.ndarray]:
    """The group's documents joined by b" ", and each document's start offset."""
    starts = np.zeros(len(group), dtype=np.int64)
    if len(group) > 1:
        np.cumsum([len(datas[i]) + 1 for i in group[:-1]], out=starts[1:])
    return b" ".join(datas[i] for i in group), starts


def batch_word_hashes(datas: list[bytes]) -> list[tuple[np.ndarray, np.ndarray]]:
    """`word_hashes` of every document, computed group by group."""
    out: list[tuple[np.ndarray, np.ndarray]] = [None] * len(datas)  # type: ignore[list-item]
    for group in _groups(datas):
        if len(group) == 1:
            out[group[0]] = word_hashes(datas[group[0]])
            continue
        joined, starts = _joined(datas, group)
        hashes, lengths, word_starts = _word_hashes(joined)
        cuts = np.searchsorted(word_starts, starts[1:])
        for i, h, n in zip(group, np.split(hashes, cuts), np.split(lengths, cuts), strict=True):
            out[i] = (h, n)
    return out


def _per_doc(positions: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """How many of `positions` fall in each document (documents start at `starts`)."""
    return np.bincount(np.searchsorted(starts, positions, side="right") - 1, minlength=len(starts))


def batch_word_stats(datas: list[bytes]) -> list[tuple[int, int, int]]:
    """`word_stats` of every document, computed group by group."""
    out: list[tuple[int, int, int]] = [None] * len(datas)  # type: ignore[list-item]
    for group in _groups(datas):
        if len(group) == 1:
            out[group[0]] = word_stats(datas[group[0]])
            continue
        joined, starts = _joined(datas, group)
        arr = np.frombuffer(joined + b" ", dtype=np.uint8)  # every document starts inside the array
        in_word = ~_whitespace(arr)
        edges = _edges(in_word)
        start_mask, end_mask = edges == 1, edges == -1
        words = _per_doc(np.flatnonzero(start_mask), starts)
        chars = np.add.reduceat(in_word & _utf8_lead(arr), starts, dtype=np.int64)
        nl_edges = _edges(_non_letters(arr))
        nl_starts, nl_ends = np.flatnonzero(nl_edges == 1), np.flatnonzero(nl_edges == -1)
        no_letter = _per_doc(nl_starts[start_mask[nl_starts] & end_mask[nl_ends]], starts)
        for k, i in enumerate(group):
            out[i] = (int(words[k]), int(words[k] - no_letter[k]), int(chars[k]))
    return out
