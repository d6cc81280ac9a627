"""Shard writer and val split: tokens in input order -> `{split}-NNNNN.bin/.idx` through gptforge.data.format.

The val split is chosen per document by a hash of (seed, id), so adding documents never moves others between
splits. When that leaves a split empty (a corpus of one book, a handful of documents), val is instead the last
`ceil(val_fraction * tokens)` tokens of the token stream: the document that straddles the cut is split in two,
each piece ending in end-of-text like every document in a shard.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_pipeline.base import StepStats
from gptforge.data.format import ShardInfo, SplitInfo, file_sha256, write_index

SPLITS = ("train", "val")


def in_val(seed: int, doc_id: str, val_fraction: float) -> bool:
    """Whether a document belongs to val: a hash of (seed, id), uniform in [0, 1), below the fraction."""
    digest = hashlib.blake2b(f"{seed}\x00{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < val_fraction


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}"


class ShardSeries:
    """The shards of one split. Whole documents only; a shard is closed once it holds >= `shard_tokens`."""

    def __init__(self, root: Path, split: str, dtype: str, shard_tokens: int) -> None:
        self.root, self.split, self.dtype, self.shard_tokens = root, split, dtype, shard_tokens
        self.np_dtype = np.dtype(dtype).newbyteorder("<")
        self.info = SplitInfo()
        self._file = None
        self._lengths: list[np.ndarray] = []
        self._tokens = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents stored back to back in `tokens`, of `lengths` tokens each."""
        pos = 0
        while len(lengths):
            room = self.shard_tokens - self._tokens
            cum = np.cumsum(lengths)
            k = int(np.searchsorted(cum, room, side="left")) + 1  # docs up to the one reaching the limit
            k = min(k, len(lengths))
            n = int(cum[k - 1])
            self._write(tokens[pos : pos + n], lengths[:k])
            pos += n
            lengths = lengths[k:]
            if self._tokens >= self.shard_tokens:
                self._close_shard()

    def _write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if self._file is None:
            name = shard_name(self.split, len(self.info.shards))
            self._file = open(self.root / f"{name}.bin", "wb")  # noqa: SIM115 - closed in _close_shard
        step = 1 << 24  # copy at most 16M tokens at a time out of a memory-mapped part
        for lo in range(0, len(tokens), step):
            self._file.write(memoryview(np.ascontiguousarray(tokens[lo : lo + step], dtype=self.np_dtype)))
        self._lengths.append(np.asarray(lengths, dtype=np.int64))
        self._tokens += int(np.sum(lengths))

    def _close_shard(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        name = shard_name(self.split, len(self.info.shards))
        lengths = np.concatenate(self._lengths)
        write_index(self.root / f"{name}.idx", lengths, self.dtype)
        shard = ShardInfo(
            f"{name}.bin", f"{name}.idx", self._tokens, len(lengths), file_sha256(self.root / f"{name}.bin")
        )
        self.info.shards.append(shard)
        self.info.tokens += shard.tokens
        self.info.documents += shard.documents
        self._lengths, self._tokens = [], 0

    def close(self) -> SplitInfo:
        self._close_shard()
        return self.info


def _runs(flags: np.ndarray) -> Iterator[tuple[int, int, bool]]:
    """Maximal runs [a, b) of equal flags."""
    if len(flags) == 0:
        return
    cuts = np.flatnonzero(np.diff(flags.astype(np.int8))) + 1
    bounds = [0, *cuts.tolist(), len(flags)]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        yield a, b, bool(flags[a])


class SplitWriter:
    """Routes documents (in input order, part by part) to the train and val shard series."""

    name = "write"

    def __init__(self, root: Path, dtype: str, shard_tokens: int, eot_id: int) -> None:
        self.series = {split: ShardSeries(root, split, dtype, shard_tokens) for split in SPLITS}
        self.eot = eot_id
        self.stats = StepStats(self.name)

    def write_part(self, tokens: np.ndarray, lengths: np.ndarray, val: np.ndarray) -> None:
        """Documents with their val flags (hash-chosen split)."""
        t0 = time.perf_counter()
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        for a, b, is_val in _runs(val):
            self.series["val" if is_val else "train"].add(tokens[offsets[a] : offsets[b]], lengths[a:b])
        self._count(lengths, t0)

    def write_part_tail(self, tokens: np.ndarray, lengths: np.ndarray, start: int, cut: int) -> None:
        """Documents whose stream starts at token `start`; val is everything from global token `cut` on."""
        t0 = time.perf_counter()
        offsets = np.concatenate(([0], np.cumsum(lengths))) + start
        i = int(np.searchsorted(offsets, cut, side="right")) - 1  # the document containing the cut
        i = min(max(i, 0), len(lengths))
        train, val = self.series["train"], self.series["val"]
        if i < len(lengths) and offsets[i] < cut:  # the cut falls inside document i: split it in two
            train.add(tokens[: offsets[i] - start], lengths[:i])
            doc = np.asarray(tokens[offsets[i] - start : offsets[i + 1] - start])
            head = cut - offsets[i]
            train.add(np.append(doc[:head], doc.dtype.type(self.eot)), np.array([head + 1]))
            val.add(doc[head:], np.array([len(doc) - head]))
            i += 1
        else:
            train.add(tokens[: offsets[i] - start], lengths[:i])
        val.add(tokens[offsets[i] - start :], lengths[i:])
        self._count(lengths, t0)

    def _count(self, lengths: np.ndarray, t0: float) -> None:
        st = self.stats
        st.docs_in += len(lengths)
        st.docs_out += len(lengths)
        st.bytes_in += int(np.sum(lengths)) * self.series["train"].np_dtype.itemsize
        st.seconds += time.perf_counter() - t0

    def close(self) -> dict[str, SplitInfo]:
        t0 = time.perf_counter()
        out = {split: s.close() for split, s in self.series.items()}
        self.stats.seconds += time.perf_counter() - t0
        return out


def tail_cut(lengths: np.ndarray, val_fraction: float) -> int:
    """The global token position where a tail val split starts: `ceil(val_fraction * total)` tokens from the
    end, moved so that both pieces of a split document keep at least one token besides end-of-text."""
    total = int(np.sum(lengths))
    cut = total - max(1, math.ceil(val_fraction * total))
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    i = int(np.searchsorted(offsets, cut, side="right")) - 1
    if i < len(lengths) and offsets[i] < cut:
        start, end = int(offsets[i]), int(offsets[i + 1])
        if end - start < 3:  # too short to split: the whole document goes to val
            return start
        return min(max(cut, start + 1), end - 2)
    return cut
