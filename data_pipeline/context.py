"""The build's stages and what they share: every stage runs on every rank, reads what earlier stages left (this
rank's files in the build's temporary directory and a few global values in the `BuildContext`), adds its own,
and counts its work in a `StepStats`, like the per-document steps. Per-document state lives in rank files read a
block at a time, never whole in memory. `run_stages` is the executor: it runs the stages in order and, after
each, writes the values it produced with a completion marker, so a re-run of a killed build reuses every stage
that all ranks had finished (and the rank files written before its marker).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.base import StepStats, merge_stats
from data_pipeline.distributed import Comm
from data_pipeline.options import BuildOptions
from data_pipeline.spill import read_array


def memory() -> tuple[int, int]:
    """This process's resident and peak resident bytes (Linux's VmRSS and VmHWM: unlike getrusage's maximum,
    the peak does not carry over the memory of the process that forked it before the exec); (0, 0) elsewhere."""
    found = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                found[line[:5]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return found.get("VmRSS", 0), found.get("VmHWM", 0)


def reset_peak() -> None:
    """Start this process's peak resident bytes afresh (so that each stage's own peak is measured)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def rank_file(tmp: Path, kind: str, rank: int) -> Path:
    """One of a rank's files in the build's temporary directory (see scan.FILES)."""
    return tmp / f"{kind}-{rank:05d}.bin"


def survivor_bytes(tmp: Path, rank: int, lo: int, hi: int) -> np.ndarray:
    """Input bytes of the rank's scan survivors lo..hi-1 (two contiguous reads)."""
    docs = read_array(rank_file(tmp, "surv", rank), "<i8", lo, hi)
    if not len(docs):
        return np.zeros(0, np.int64)
    return read_array(rank_file(tmp, "nbytes", rank), "<i8", int(docs[0]), int(docs[-1]) + 1)[docs - docs[0]]


def column(tmp: Path, kind: str, rank: int, lo: int, hi: int, present: bool = True) -> np.ndarray:
    """Rows lo..hi-1 of a rank's per-survivor <i8 column (`exact_of`, `near_of`); all -1 when the stage that
    writes it is not part of this build (`present` False)."""
    if not present:
        return np.full(hi - lo, -1, np.int64)
    return read_array(rank_file(tmp, kind, rank), "<i8", lo, hi)


def blocks(n: int, size: int, rounds: int | None = None) -> Iterator[tuple[int, int]]:
    """(lo, hi) of `size`-row blocks of `n` rows; `rounds` of them when given (empty ones past the end), so
    that ranks with different row counts take part in as many collective exchanges."""
    for b in range(-(-n // size) if rounds is None else rounds):
        yield min(n, b * size), min(n, (b + 1) * size)


@dataclass
class BuildContext:
    opts: BuildOptions
    comm: Comm
    out: Path
    tmp: Path
    budget: int  # bytes a stage may hold on this rank (--memory-per-rank)
    show: bool  # progress bars (rank 0)
    values: dict[str, Any] = field(default_factory=dict)  # JSON-able, the same on every rank unless noted
    stats: dict[str, StepStats] = field(default_factory=dict)  # this rank's counters, in step order
    seconds: dict[str, float] = field(default_factory=dict)  # wall seconds per stage on this rank
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per stage of this process
    # per stage: this process's resident bytes at its start and its peak during it
    rss: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.comm.rank

    def rows(self, row_bytes: int) -> int:
        """Rows per block for a pass that holds about `row_bytes` per row: a small part of the budget."""
        return max(1024, min(1 << 16, self.budget // (4 * row_bytes)))

    @property
    def copy_bytes(self) -> int:
        """Bytes per read when a stage copies a file's contents (shards' tokens, removed.jsonl)."""
        return max(1 << 16, min(1 << 22, self.budget // 8))

    def bounds(self, name: str) -> np.ndarray:
        """Every rank's first global index of `name` (documents, survivors), plus the total: ranks + 1."""
        return np.asarray(self.values[name], dtype=np.int64)


class Stage:
    """A global stage: `run` on every rank; `files` (rank file kinds) and `values` name what it adds (kept for a
    re-run).
    `stats` holds this rank's counters of the stage (None: the stage counts nothing of its own). A stage
    raises a user error either on every rank at once (a global fact: the corpus is empty) or from inside
    `agree` (a local one: a malformed line), so that no rank is left waiting in a collective."""

    name = "stage"
    files: tuple[str, ...] = ()
    values: tuple[str, ...] = ()
    resumable = True  # False: its outputs are not kept for a re-run (it always runs)

    def __init__(self) -> None:
        self.stats: StepStats | None = StepStats(self.name)

    def run(self, ctx: BuildContext) -> None:
        raise NotImplementedError

    def all_stats(self) -> list[StepStats]:
        return [] if self.stats is None else [self.stats]


def _marker(ctx: BuildContext, stage: Stage) -> Path:
    return ctx.tmp / f"stage-{stage.name}-{ctx.rank:05d}.json"


def _save(ctx: BuildContext, stage: Stage) -> None:
    """The completion marker, last: the stage's rank files are on disk before it names them done."""
    for kind in stage.files:
        with open(rank_file(ctx.tmp, kind, ctx.rank), "rb") as f:
            os.fsync(f.fileno())
    state = {
        "values": {k: ctx.values[k] for k in stage.values},
        "stats": [st.state() for st in stage.all_stats()],
    }
    marker = _marker(ctx, stage)
    part = marker.with_suffix(".json.tmp")
    part.write_text(json.dumps(state))
    os.replace(part, marker)


def _load(ctx: BuildContext, stage: Stage) -> list[StepStats] | None:
    try:
        state = json.loads(_marker(ctx, stage).read_text())
    except (OSError, ValueError):
        return None
    if not all(rank_file(ctx.tmp, kind, ctx.rank).exists() for kind in stage.files):
        return None
    ctx.values.update(state["values"])
    return [StepStats.from_state(s) for s in state["stats"]]


def run_stages(ctx: BuildContext, stages: list[Stage]) -> None:
    """Run `stages` in order on every rank. A stage that every rank finished before (same options, same inputs)
    is loaded instead, up to the first one that is not: the stages after it run again."""
    resuming = True
    for stage in stages:
        t0, c0 = time.perf_counter(), time.process_time()
        start = memory()[0]
        reset_peak()
        saved = _load(ctx, stage) if resuming and stage.resumable else None
        resuming = bool(ctx.comm.allreduce(np.array([int(saved is not None)]), "min")[0])
        if resuming:
            stats = saved
        else:
            stage.run(ctx)
            if stage.stats is not None:
                stage.stats.seconds += time.perf_counter() - t0
            if stage.resumable:
                _save(ctx, stage)
            stats = stage.all_stats()
        merge_stats(ctx.stats, stats)
        ctx.seconds[stage.name] = time.perf_counter() - t0
        ctx.cpu[stage.name] = time.process_time() - c0
        ctx.rss[stage.name] = (start, memory()[1])
