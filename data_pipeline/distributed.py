"""Who does what: MPI ranks (mpi4py, under `mpirun`/`srun`) split the input files; `--workers` processes on
each rank run the per-document steps; the global stages exchange numpy buffers between ranks.

Ranks get contiguous runs of the sorted input files (balanced by size), so a document's global index (its
position in global input order) is its rank's exclusive prefix sum plus its local index: every decision is
made on global indices, and the output is the same for any rank or worker count.

Exchanges go through `alltoallv` / `allgatherv` over numpy arrays (mpi4py's buffer interface, as bytes): one
call is cut into rounds of at most `max_bytes` so that no MPI count passes 2**31. Pickled collectives are used
only for O(ranks) or O(shards) data (options, counters, shard descriptions).
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Protocol

import numpy as np

from data_pipeline.readers import Source
from gptforge.errors import DataError, GptforgeError
from gptforge.launcher import launched_by_mpi

MAX_MESSAGE_BYTES = 1 << 30  # per rank and round: MPI's int counts stay below 2**31


class Comm:
    """One process, no MPI: the collectives are identities. Counts bytes exchanged (here: none)."""

    rank = 0
    size = 1

    def __init__(self) -> None:
        self.bytes_sent = 0

    def gather(self, obj: Any) -> list[Any] | None:
        return [obj]

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def barrier(self) -> None:
        pass

    def abort(self, code: int = 1) -> None:
        pass

    def allreduce(self, values: np.ndarray, op: str = "sum") -> np.ndarray:
        return np.asarray(values).copy()

    def exscan(self, value: int) -> int:
        """Sum of `value` over the ranks before this one."""
        return 0

    def alltoallv(self, parts: list[np.ndarray]) -> list[np.ndarray]:
        """`parts[d]` goes to rank d; returns what each rank sent here, by source rank."""
        return [np.ascontiguousarray(parts[0])]

    def allgatherv(self, array: np.ndarray) -> np.ndarray:
        """Every rank's `array`, concatenated in rank order."""
        return np.ascontiguousarray(array)


class MpiComm(Comm):
    """MPI.COMM_WORLD through mpi4py."""

    def __init__(self, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        from mpi4py import MPI

        super().__init__()
        self._mpi = MPI
        self._comm = MPI.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        self.max_bytes = max_bytes

    def gather(self, obj: Any) -> list[Any] | None:
        return self._comm.gather(obj, root=0)

    def allgather(self, obj: Any) -> list[Any]:
        return self._comm.allgather(obj)

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return self._comm.bcast(obj, root=root)

    def barrier(self) -> None:
        self._comm.Barrier()

    def abort(self, code: int = 1) -> None:
        """End every rank: one that crashed outside `agree` would leave the others waiting forever."""
        self._comm.Abort(code)

    def allreduce(self, values: np.ndarray, op: str = "sum") -> np.ndarray:
        send = np.ascontiguousarray(values)
        recv = np.empty_like(send)
        self._comm.Allreduce(
            send, recv, op={"sum": self._mpi.SUM, "max": self._mpi.MAX, "min": self._mpi.MIN}[op]
        )
        return recv

    def exscan(self, value: int) -> int:
        send = np.array([value], dtype=np.int64)
        recv = np.zeros(1, dtype=np.int64)
        self._comm.Exscan(send, recv, op=self._mpi.SUM)
        return int(recv[0]) if self.rank else 0

    def _rounds(self, nbytes: int) -> int:
        most = int(self.allreduce(np.array([nbytes], dtype=np.int64), "max")[0])
        return max(1, -(-most // self.max_bytes))

    def alltoallv(self, parts: list[np.ndarray]) -> list[np.ndarray]:
        parts = [np.ascontiguousarray(p) for p in parts]
        dtype = parts[0].dtype
        item = dtype.itemsize
        counts = np.array([len(p) for p in parts], dtype=np.int64)
        recv_counts = np.empty(self.size, dtype=np.int64)
        self._comm.Alltoall(counts, recv_counts)
        self.bytes_sent += int(counts.sum() - counts[self.rank]) * item
        rounds = self._rounds(int(max(counts.sum(), recv_counts.sum())) * item)
        got: list[list[np.ndarray]] = [[] for _ in range(self.size)]
        for k in range(rounds):  # round k carries elements [n*k//rounds, n*(k+1)//rounds) of every part
            lo, hi = counts * k // rounds, counts * (k + 1) // rounds
            rlo, rhi = recv_counts * k // rounds, recv_counts * (k + 1) // rounds
            send = np.concatenate([p[a:b] for p, a, b in zip(parts, lo, hi, strict=True)]).view(np.uint8)
            recv = np.empty(int((rhi - rlo).sum()), dtype=dtype)
            sc, rc = (hi - lo) * item, (rhi - rlo) * item
            sd = np.concatenate(([0], np.cumsum(sc)[:-1]))
            rd = np.concatenate(([0], np.cumsum(rc)[:-1]))
            byte = self._mpi.BYTE
            self._comm.Alltoallv(
                [send, sc.astype(np.int32), sd.astype(np.int32), byte],
                [recv.view(np.uint8), rc.astype(np.int32), rd.astype(np.int32), byte],
            )
            bounds = np.concatenate(([0], np.cumsum(rhi - rlo)))
            for s in range(self.size):
                got[s].append(recv[bounds[s] : bounds[s + 1]])
        return [np.concatenate(g) if len(g) > 1 else g[0] for g in got]

    def allgatherv(self, array: np.ndarray) -> np.ndarray:
        array = np.ascontiguousarray(array)
        item = array.dtype.itemsize
        counts = np.array(self._comm.allgather(len(array)), dtype=np.int64)
        self.bytes_sent += len(array) * item * (self.size - 1)
        rounds = self._rounds(int(counts.sum()) * item)
        pieces: list[list[np.ndarray]] = [[] for _ in range(self.size)]
        for k in range(rounds):
            lo, hi = counts * k // rounds, counts * (k + 1) // rounds
            mine = array[lo[self.rank] : hi[self.rank]]
            recv = np.empty(int((hi - lo).sum()), dtype=array.dtype)
            rc = (hi - lo) * item
            rd = np.concatenate(([0], np.cumsum(rc)[:-1]))
            self._comm.Allgatherv(
                [mine.view(np.uint8), self._mpi.BYTE],
                [recv.view(np.uint8), rc.astype(np.int32), rd.astype(np.int32), self._mpi.BYTE],
            )
            bounds = np.concatenate(([0], np.cumsum(hi - lo)))
            for s in range(self.size):
                pieces[s].append(recv[bounds[s] : bounds[s + 1]])
        return np.concatenate([p for ps in pieces for p in ps])


def get_comm() -> Comm:
    if not launched_by_mpi():
        return Comm()
    try:
        comm = MpiComm()
    except ImportError as exc:
        raise DataError(
            f"launched under MPI but mpi4py cannot load ({exc}); pip install mpi4py mpich"
        ) from None
    return comm if comm.size > 1 else Comm()


def agree(comm: Comm, fn: Callable[[], Any]) -> Any:
    """Run `fn` on every rank; if it raised a user error on any rank, raise it on all of them, so that no rank
    is left waiting in a collective for one that has given up."""
    result, error = None, None
    try:
        result = fn()
    except GptforgeError as exc:
        error = exc
    errors = comm.allgather(None if error is None else str(error))
    if error is not None:
        raise error
    for rank, message in enumerate(errors):
        if message is not None:
            raise DataError(f"rank {rank} failed: {message}")
    return result


def owners(bounds: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The rank holding each global index, given every rank's start (`bounds`, length ranks + 1)."""
    return np.searchsorted(bounds, index, side="right") - 1


def route(comm: Comm, dest: np.ndarray, records: np.ndarray) -> list[np.ndarray]:
    """Send each record to rank `dest[i]`; returns the records this rank received, by source."""
    order = np.argsort(dest, kind="stable")
    cuts = np.searchsorted(dest[order], np.arange(comm.size + 1))
    sorted_records = records[order]
    return comm.alltoallv([sorted_records[cuts[d] : cuts[d + 1]] for d in range(comm.size)])


def fetch(
    comm: Comm, bounds: np.ndarray, keys: np.ndarray, lookup: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """`lookup(keys)` evaluated on the rank that owns each key (global indices, ranks' starts in `bounds`):
    keys go out, values come back in the order asked. `lookup` sees only its own rank's keys."""
    dest = owners(bounds, keys)
    order = np.argsort(dest, kind="stable")
    cuts = np.searchsorted(dest[order], np.arange(comm.size + 1))
    asked = comm.alltoallv([keys[order[cuts[d] : cuts[d + 1]]] for d in range(comm.size)])
    answers = comm.alltoallv([lookup(a) for a in asked])
    out = np.empty(len(keys), dtype=answers[0].dtype)
    out[order] = np.concatenate(answers)
    return out


class Chunked(Protocol):
    """Records read back in order a chunk at a time (spill.py's `Spool` and `SortedRuns`)."""

    count: int
    dtype: np.dtype

    def chunks(self, size: int) -> Iterator[np.ndarray]: ...


def max_chunks(comm: Comm, count: int, size: int) -> int:
    """The most `size`-row chunks of `count` rows that any rank has: how many collective exchanges every rank
    takes part in when each chunk is sent in one."""
    return int(comm.allreduce(np.array([-(-count // size)]), "max")[0])


def aligned(comm: Comm, source: Chunked, size: int) -> Iterator[np.ndarray]:
    """`source`'s records in order, `size` at a time, as many chunks on every rank (empty ones past the
    end): each chunk's exchange is collective."""
    it, empty = source.chunks(size), np.zeros(0, source.dtype)
    for _ in range(max_chunks(comm, source.count, size)):
        yield next(it, empty)


def split_sources(sources: list[Source], parts: int) -> list[list[Source]]:
    """Contiguous runs of `sources` with about equal bytes each (a file goes where its middle byte falls)."""
    weights = [max(s.size, 1) for s in sources]
    total = sum(weights)
    out: list[list[Source]] = [[] for _ in range(parts)]
    seen = 0
    for src, w in zip(sources, weights, strict=True):
        out[min(parts - 1, int((seen + w / 2) * parts / total))].append(src)
        seen += w
    return out


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class WorkerPool:
    """Ordered map over batches on `workers` processes, at most 4 x workers batches in flight (memory holds a
    few batches, never the corpus; a slow batch does not idle the other workers at once). With one worker the
    function runs in this process."""

    def __init__(
        self, workers: int, initializer: Callable[..., None], initargs: tuple, fork: bool = False
    ) -> None:
        self.workers = max(1, workers)
        self._pool: ProcessPoolExecutor | None = None
        if self.workers == 1:
            initializer(*initargs)
        else:
            # fork starts a worker in milliseconds, spawn re-imports everything (~0.4 s each); but a forked MPI
            # process is not safe to use, so MPI ranks spawn.
            method = "fork" if fork and "fork" in multiprocessing.get_all_start_methods() else "spawn"
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context(method),
                initializer=initializer,
                initargs=initargs,
            )

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        if self._pool is None:
            for item in items:
                yield fn(item)
            return
        window: deque[Future] = deque()
        for item in items:
            window.append(self._pool.submit(fn, item))
            while len(window) >= 4 * self.workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
