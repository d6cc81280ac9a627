"""Bounded memory: the per-rank budget (`--memory-per-rank`), append-only rank files, an external merge sort,
and spools of records read back a chunk at a time.

A global stage that must group records by a key (exact hashes, LSH band keys, candidate pairs) routes them to
the key's owner rank, which needs them in key order: `SortedRuns` sorts in memory while they fit the owner's
share of the budget, else writes sorted runs to disk and merges them, and the stage reads the result a chunk
at a time, carrying a group of equal keys that spans two chunks into the next. The order does not depend on
the budget, so neither do the bytes of the output. Records read again and again (near dedup's confirmed links,
once per label-propagation round) go to a `Spool`: one file once they outgrow their share of the budget.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from gptforge.errors import ConfigError

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(spec: str) -> int:
    """`512M`, `4G`, `1.5g`, `1000000` (bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)[bB]?\s*", str(spec))
    if not m:
        raise ConfigError(f"--memory-per-rank {spec!r}: give a size such as 512M, 4G or 1000000 (bytes)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def node_memory() -> int:
    """Physical memory of this node (bytes)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def default_memory(local_ranks: int) -> int:
    """Half of the node's memory, shared by the ranks on it (the rest: page cache, workers, tokenizer)."""
    return max(64 << 20, node_memory() // 2 // max(1, local_ranks))


class Appender:
    """An append-only binary file of fixed-size records; `size` is what is on disk (for commits)."""

    def __init__(self, path: Path, truncate_to: int = 0) -> None:
        mode = "r+b" if path.exists() else "wb"
        self._f = open(path, mode)  # noqa: SIM115 - closed by close()
        self._f.truncate(truncate_to)
        self._f.seek(truncate_to)
        self.path = path

    def write(self, data: bytes | np.ndarray) -> None:
        self._f.write(memoryview(np.ascontiguousarray(data)) if isinstance(data, np.ndarray) else data)

    def sync(self) -> None:
        """On disk (not just in the page cache) before a commit names its size."""
        self._f.flush()
        os.fsync(self._f.fileno())

    @property
    def size(self) -> int:
        self._f.flush()
        return self._f.tell()

    def close(self) -> None:
        self._f.close()


class ColumnWriter:
    """A rank file of `n` <i8 values, one per row, written in row order from sparse pieces (rows ascending
    across all `put`s, the values of those rows); every other row holds `fill`. Holds a block at a time."""

    BLOCK = 1 << 16

    def __init__(self, path: Path, n: int, fill: int = -1) -> None:
        self._file = Appender(path)
        self.n, self.fill, self._row = n, fill, 0

    def _fill_to(self, row: int) -> None:
        while self._row < row:
            k = min(self.BLOCK, row - self._row)
            self._file.write(np.full(k, self.fill, np.int64))
            self._row += k

    def put(self, rows: np.ndarray, values: np.ndarray) -> None:
        i = 0
        while i < len(rows):
            self._fill_to(int(rows[i]))
            j = int(np.searchsorted(rows, self._row + self.BLOCK))  # rows[i:j]: within the next block
            seg = np.full(int(rows[j - 1]) + 1 - self._row, self.fill, np.int64)
            seg[rows[i:j] - self._row] = values[i:j]
            self._file.write(seg)
            self._row += len(seg)
            i = j

    def close(self) -> None:
        self._fill_to(self.n)
        self._file.close()


def read_array(
    path: Path, dtype: np.dtype | str, lo: int = 0, hi: int | None = None, width: int = 1
) -> np.ndarray:
    """Records [lo, hi) of a file of `dtype` records (`width` per row), read (not memory-mapped: a mapping's
    touched pages would count towards this process's resident memory)."""
    dt = np.dtype(dtype)
    row = dt.itemsize * width
    if hi is None:
        hi = path.stat().st_size // row
    with open(path, "rb") as f:
        f.seek(lo * row)
        out = np.fromfile(f, dtype=dt, count=(hi - lo) * width)
    return out.reshape(-1, width) if width > 1 else out


def read_rows(path: Path, rows: np.ndarray, width: int, dtype: str = "<u4") -> np.ndarray:
    """Rows `rows` of a file of fixed-width rows, by `pread` of each distinct row (random access, bounded
    memory)."""
    dt = np.dtype(dtype)
    size = dt.itemsize * width
    uniq, inverse = np.unique(rows, return_inverse=True)
    out = np.empty((len(uniq), width), dtype=dt)
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = out.view(np.uint8).reshape(len(uniq), size)
        for k, r in enumerate(uniq.tolist()):
            buf[k] = np.frombuffer(os.pread(fd, size, r * size), dtype=np.uint8)
    finally:
        os.close(fd)
    return out[inverse]


def record_order(records: np.ndarray) -> np.ndarray:
    """Indices that sort structured records by all their fields, the first field first."""
    return np.lexsort([records[f] for f in reversed(records.dtype.names)])


MIN_BLOCK = 4096  # records read from a run at a time, at least (fewer: the runs are merged in passes)


class SortedRuns:
    """Records handed back sorted by all their fields, in bounded memory (an external merge sort).

    Records are buffered up to a quarter of `budget` (sorting needs a copy and an index besides); each full
    buffer is sorted and written as a run file under `root`. `chunks` merges the runs from disk, a block of
    each at a time: every round takes, from each run's block, the records up to the smallest of the blocks'
    last records, which no record still on disk can precede. Without runs, the buffer is sorted in memory. A
    key shared by many records (one text copied a million times) costs no more memory than any other: this
    is why it is a merge sort and not a hash partition of the keys.
    """

    def __init__(self, root: Path, name: str, dtype: np.dtype, budget: int) -> None:
        self.root, self.name, self.dtype = root, name, np.dtype(dtype)
        self.capacity = max(MIN_BLOCK, budget // (4 * self.dtype.itemsize))  # records held at a time
        self.count = 0
        self.spilled = 0
        self._buf: list[np.ndarray] = []
        self._buffered = 0
        self._runs: list[Path] = []
        self._made = 0

    def add(self, records: np.ndarray) -> None:
        self.count += len(records)
        self._buf.append(records)
        self._buffered += len(records)
        if self._buffered >= self.capacity:
            self._runs.append(self._write_run([self._take_sorted()]))

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        """All records in order, exactly `size` at a time (the last chunk shorter): `ceil(count / size)`."""
        if not self._runs:
            rec = self._take_sorted()
            for lo in range(0, len(rec), size):
                yield rec[lo : lo + size]
            return
        if self._buffered:
            self._runs.append(self._write_run([self._take_sorted()]))
        fan_in = max(2, self.capacity // MIN_BLOCK)
        while len(self._runs) > fan_in:  # too many runs for blocks of MIN_BLOCK: merge them in passes
            groups = [self._runs[i : i + fan_in] for i in range(0, len(self._runs), fan_in)]
            self._runs = []
            for group in groups:
                self._runs.append(self._write_run(self._merge(group)))
                for path in group:
                    path.unlink()
        pending: list[np.ndarray] = []
        have = 0
        for piece in self._merge(self._runs):
            pending.append(piece)
            have += len(piece)
            if have >= size:
                rec = np.concatenate(pending)
                for lo in range(0, len(rec) - size + 1, size):
                    yield rec[lo : lo + size]
                pending = [rec[len(rec) - len(rec) % size :].copy()]
                have = len(pending[0])
        if have:
            yield np.concatenate(pending)

    def _take_sorted(self) -> np.ndarray:
        rec = np.concatenate(self._buf) if self._buf else np.zeros(0, self.dtype)
        self._buf, self._buffered = [], 0
        return rec[record_order(rec)]

    def _write_run(self, pieces: Iterable[np.ndarray]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{self.name}-{self._made:06d}.run"
        self._made += 1
        f = Appender(path)
        for piece in pieces:
            f.write(piece)
            self.spilled += piece.nbytes
        f.close()
        return path

    def _merge(self, runs: list[Path]) -> Iterator[np.ndarray]:
        """The records of sorted `runs` in order, in pieces of at most `capacity` records."""
        block = max(1, self.capacity // len(runs))
        total = [p.stat().st_size // self.dtype.itemsize for p in runs]
        pos = [min(n, block) for n in total]
        blocks = [read_array(p, self.dtype, 0, e) for p, e in zip(runs, pos, strict=True)]
        while live := [i for i, b in enumerate(blocks) if len(b)]:
            lasts = np.concatenate([blocks[i][-1:] for i in live])
            bound = lasts[record_order(lasts)[:1]]
            out = []
            for i in live:
                cut = int(np.searchsorted(blocks[i], bound, side="right")[0])
                out.append(blocks[i][:cut])
                blocks[i] = blocks[i][cut:]
                if not len(blocks[i]) and pos[i] < total[i]:
                    blocks[i] = read_array(runs[i], self.dtype, pos[i], min(total[i], pos[i] + block))
                    pos[i] += len(blocks[i])
            rec = np.concatenate(out)
            yield rec[record_order(rec)]

    def close(self) -> None:
        self._buf = []
        for path in self._runs:
            path.unlink(missing_ok=True)
        self._runs = []


class Spool:
    """Records appended once and read back in order, a chunk at a time, as often as needed (the confirmed
    near-duplicate links, once per label-propagation round): in memory while they fit in `budget` bytes,
    then all of them in one file under `root`."""

    def __init__(self, root: Path, name: str, dtype: np.dtype, budget: int) -> None:
        self.root, self.name, self.dtype, self.budget = root, name, np.dtype(dtype), budget
        self.count = 0
        self.spilled = 0
        self._mem: list[np.ndarray] = []
        self._file: Appender | None = None

    def add(self, records: np.ndarray) -> None:
        self.count += len(records)
        if self._file is None and self.count * self.dtype.itemsize <= self.budget:
            self._mem.append(records)
            return
        if self._file is None:
            self.root.mkdir(parents=True, exist_ok=True)
            self._file = Appender(self.root / f"{self.name}.spool")
            records, self._mem = np.concatenate([*self._mem, records]), []
        self._file.write(records)
        self.spilled += records.nbytes

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        """The records in order, `size` at a time."""
        if self._file is None:
            self._mem = [np.concatenate(self._mem)] if self._mem else [np.zeros(0, self.dtype)]
            for lo in range(0, self.count, size):
                yield self._mem[0][lo : lo + size]
            return
        self._file.sync()
        for lo in range(0, self.count, size):
            yield read_array(self._file.path, self.dtype, lo, min(self.count, lo + size))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file.path.unlink(missing_ok=True)
