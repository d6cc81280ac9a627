"""Who does what: MPI ranks (mpi4py, under `mpirun`/`srun`) split the input files; `--workers` processes on
each rank run the per-document steps; rank 0 takes the global decisions and writes the output.

Ranks get contiguous runs of the sorted input files (balanced by size), so concatenating the ranks' results
in rank order is global input order: the output is the same for any rank or worker count.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from data_pipeline.readers import Source
from gptforge.errors import DataError, GptforgeError

_MPI_ENV = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "SLURM_STEP_NUM_TASKS", "MPI_LOCALNRANKS")


class Comm:
    """One process, no MPI: the collectives are identities."""

    rank = 0
    size = 1

    def gather(self, obj: Any) -> list[Any] | None:
        return [obj]

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def bcast(self, obj: Any) -> Any:
        return obj

    def scatter(self, objs: list[Any] | None) -> Any:
        return objs[0]

    def barrier(self) -> None:
        pass

    def abort(self, code: int = 1) -> None:
        pass


class MpiComm(Comm):
    """MPI.COMM_WORLD through mpi4py's pickle-based collectives."""

    def __init__(self) -> None:
        from mpi4py import MPI

        self._comm = MPI.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()

    def gather(self, obj: Any) -> list[Any] | None:
        return self._comm.gather(obj, root=0)

    def allgather(self, obj: Any) -> list[Any]:
        return self._comm.allgather(obj)

    def bcast(self, obj: Any) -> Any:
        return self._comm.bcast(obj, root=0)

    def scatter(self, objs: list[Any] | None) -> Any:
        return self._comm.scatter(objs, root=0)

    def barrier(self) -> None:
        self._comm.Barrier()

    def abort(self, code: int = 1) -> None:
        """End every rank: one that crashed outside `agree` would leave the others waiting forever."""
        self._comm.Abort(code)


def launched_by_mpi() -> bool:
    """mpirun/mpiexec (MPICH, Open MPI) or a multi-task srun step set one of these; plain runs skip MPI."""
    for var in _MPI_ENV:
        value = os.environ.get(var)
        if value is not None and (var == "PMIX_RANK" or value.isdigit() and int(value) > 1):
            return True
    return False


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
