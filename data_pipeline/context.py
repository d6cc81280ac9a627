"""The build's stages and what they share: every stage runs on every rank, reads what earlier stages left in the
`BuildContext` (this rank's arrays and a few global values), adds its own, and counts its work in a `StepStats`,
like the per-document steps. `run_stages` is the executor: it runs the stages in order and, after each, saves
the arrays and values it produced with a completion marker, so a re-run of a killed build reuses every stage
that all ranks had finished.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.base import StepStats, merge_stats
from data_pipeline.distributed import Comm
from data_pipeline.options import BuildOptions
from data_pipeline.spill import read_array


def rank_file(tmp: Path, kind: str, rank: int) -> Path:
    """One of a rank's files in the build's temporary directory (see scan.FILES)."""
    return tmp / f"{kind}-{rank:05d}.bin"


def survivor_bytes(tmp: Path, rank: int) -> np.ndarray:
    """Input bytes of each of the rank's scan survivors."""
    return read_array(rank_file(tmp, "nbytes", rank), "<i8")[read_array(rank_file(tmp, "surv", rank), "<i8")]


@dataclass
class BuildContext:
    opts: BuildOptions
    comm: Comm
    out: Path
    tmp: Path
    budget: int  # bytes a stage may hold on this rank (--memory-per-rank)
    show: bool  # progress bars (rank 0)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # this rank's, by name
    values: dict[str, Any] = field(default_factory=dict)  # JSON-able, the same on every rank unless noted
    stats: dict[str, StepStats] = field(default_factory=dict)  # this rank's counters, in step order
    seconds: dict[str, float] = field(default_factory=dict)  # wall seconds per stage on this rank
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per stage of this process

    @property
    def rank(self) -> int:
        return self.comm.rank

    def bounds(self, name: str) -> np.ndarray:
        """Every rank's first global index of `name` (documents, survivors), plus the total: ranks + 1."""
        return np.asarray(self.values[name], dtype=np.int64)


class Stage:
    """A global stage: `run` on every rank; `arrays` and `values` name what it adds (saved for resume).
    `stats` holds this rank's counters of the stage (None: the stage counts nothing of its own). A stage
    raises a user error either on every rank at once (a global fact: the corpus is empty) or from inside
    `agree` (a local one: a malformed line), so that no rank is left waiting in a collective."""

    name = "stage"
    arrays: tuple[str, ...] = ()
    values: tuple[str, ...] = ()
    resumable = True  # False: its outputs are not kept for a re-run (it always runs)

    def __init__(self) -> None:
        self.stats: StepStats | None = StepStats(self.name)

    def run(self, ctx: BuildContext) -> None:
        raise NotImplementedError

    def all_stats(self) -> list[StepStats]:
        return [] if self.stats is None else [self.stats]


def _paths(ctx: BuildContext, stage: Stage) -> tuple[Path, Path]:
    return (
        ctx.tmp / f"stage-{stage.name}-{ctx.rank:05d}.npz",
        ctx.tmp / f"stage-{stage.name}-{ctx.rank:05d}.json",
    )


def _save(ctx: BuildContext, stage: Stage) -> None:
    npz, marker = _paths(ctx, stage)
    if stage.arrays:
        part = npz.with_suffix(".tmp.npz")
        np.savez(part, **{k: ctx.arrays[k] for k in stage.arrays})
        os.replace(part, npz)
    state = {
        "values": {k: ctx.values[k] for k in stage.values},
        "stats": [st.state() for st in stage.all_stats()],
    }
    part = marker.with_suffix(".json.tmp")
    part.write_text(json.dumps(state))
    os.replace(part, marker)  # the completion marker, last


def _load(ctx: BuildContext, stage: Stage) -> list[StepStats] | None:
    npz, marker = _paths(ctx, stage)
    try:
        state = json.loads(marker.read_text())
        if stage.arrays:
            with np.load(npz) as data:
                ctx.arrays.update({k: data[k] for k in stage.arrays})
    except (OSError, ValueError, KeyError):
        return None
    ctx.values.update(state["values"])
    return [StepStats.from_state(s) for s in state["stats"]]


def run_stages(ctx: BuildContext, stages: list[Stage]) -> None:
    """Run `stages` in order on every rank. A stage that every rank finished before (same options, same inputs)
    is loaded instead, up to the first one that is not: the stages after it run again."""
    resuming = True
    for stage in stages:
        t0, c0 = time.perf_counter(), time.process_time()
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
