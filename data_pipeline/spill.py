"""Bounded memory: the per-rank budget (`--memory-per-rank`), append-only rank files, partitioned spill, and
spools of records read back a chunk at a time.

A global stage that must group records by a key (exact hashes, LSH band keys) routes them to the key's owner
rank; when what an owner will receive exceeds its budget, the records are appended to `parts` files on disk by a
second hash of the key (a distribution sort), and each part, small enough to sort in memory, is grouped in turn.
The result does not depend on the number of parts, so the bytes of the output do not depend on the budget.
Records that are read again and again (near dedup's confirmed links, once per label-propagation round) go to a
`Spool`: one file once they outgrow their share of the budget, read back a chunk at a time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
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


class Partitions:
    """Records grouped into `n` parts by the caller's part number: in memory when `n == 1`, else appended to
    files under `root` (one per part) and read back one part at a time."""

    def __init__(self, root: Path, name: str, n: int, dtype: np.dtype) -> None:
        self.n, self.dtype = max(1, n), dtype
        self._mem: list[np.ndarray] = []
        self._files: list[Appender] = []
        self.spilled = 0
        if self.n > 1:
            root.mkdir(parents=True, exist_ok=True)
            self._files = [Appender(root / f"{name}-{p:05d}.part") for p in range(self.n)]

    def add(self, records: np.ndarray, part: np.ndarray) -> None:
        if self.n == 1:
            self._mem.append(records)
            return
        order = np.argsort(part, kind="stable")
        cuts = np.searchsorted(part[order], np.arange(self.n + 1))
        records = records[order]
        for p in np.flatnonzero(np.diff(cuts)):
            chunk = records[cuts[p] : cuts[p + 1]]
            self._files[p].write(chunk)
            self.spilled += chunk.nbytes

    def take(self, p: int) -> np.ndarray:
        """Part `p`, removed from the store."""
        if self.n == 1:
            out = np.concatenate(self._mem) if self._mem else np.zeros(0, self.dtype)
            self._mem = []
            return out
        f = self._files[p]
        f.close()
        out = np.fromfile(f.path, dtype=self.dtype)
        f.path.unlink()
        return out

    def close(self) -> None:
        for f in self._files:
            f.close()
            f.path.unlink(missing_ok=True)


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
