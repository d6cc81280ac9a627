"""Weighted blends of several builds (web, books, code, ...), as Megatron-LM's `BlendedDataset` mixes them.

Which source global sample `i` comes from keeps every source within 1 of its share: after any prefix of n
samples, |count_s - w_s * n| <= 1 - 1/(2k - 2) for each of k >= 2 sources (1/2 for two, 3/4 for three).
Megatron's greedy rule (`build_blending_indices`: take `argmax_s(w_s * max(i, 1) - count_s)`) keeps within
1 for two sources only; with three or more it lets a source lag by more than 1 (1.25 in
tests/test_blend_order.py). The rule here is Tijdeman's chairman assignment (1980) as earliest deadline
first: with slack d = 1/(2k - 2), the j-th sample of source s may be taken at the prefix t = i + 1 once
w_s * t - (j - 1) >= d (it would not run ahead by more than 1 - d), and is due while it would not lag by
more; among the sources allowed the one due first, deadline (j - d) / w_s, is taken (the first on ties).
Tijdeman proved a sequence within these bounds exists, and earliest deadline first meets every deadline
that any sequence meets. The weights are exact integer ratios (52-bit numerators), so the rule's
comparisons are exact at any n.

The k-th sample drawn from a source is position k of that source's own order (`WindowDataset`): each
source runs through its own epochs, and reshuffles when it is exhausted, independently of the others.

The blend's position is `consumed_samples` plus each source's count: both are saved with a checkpoint.
The schedule is piecewise: a segment starts at a sample position with per-source base counts and
weights, so a resume with other weights (a curriculum) starts a new segment at the current position and
each source continues where it was. Memory is O(sources): the schedule is replayed from the last known
position (a few microseconds per sample), never stored.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gptforge.config import BlendSource, DataConfig
from gptforge.data.format import MANIFEST, Manifest, read_manifest
from gptforge.data.loader import (
    ShardCache,
    WindowDataset,
    eval_batches,
    eval_samples,
    remember_verified,
    same_model_file,
    shards_to_verify,
    verify_shards,
)
from gptforge.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Source:
    """One corpus of the run: its name (metrics, checkpoints), normalised weight and manifest."""

    name: str
    path: str
    weight: float
    manifest: Manifest


def read_sources(d: DataConfig) -> list[Source]:
    """The run's sources: `data.blend`, or `data.path` as a blend of one. All must share one tokenizer."""
    specs = d.blend or [BlendSource(path=d.path)]
    if not any(s.path for s in specs):
        raise DataError("no data: set data.path (a build output directory) or data.blend")
    total = sum(s.weight for s in specs)
    sources = [
        Source(s.name or Path(s.path).resolve().name, s.path, s.weight / total, read_manifest(s.path))
        for s in specs
    ]
    first = sources[0]
    keys = ("name", "vocab_size", "eot_id")
    for other in sources[1:]:
        a, b = first.manifest.tokenizer, other.manifest.tokenizer
        if any(a.get(k) != b.get(k) for k in keys) or not same_model_file(a, b):
            show = (*keys, "sha256")
            raise DataError(
                f"data.blend: sources {first.name} ({first.path}) and {other.name} ({other.path}) were tokenized "
                f"differently: { ({k: a.get(k) for k in show if k in a}) } vs "
                f"{ ({k: b.get(k) for k in show if k in b}) }; build every source with the same --tokenizer"
            )
    return sources


def data_sha256(sources: list[Source]) -> str:
    """What identifies the data in a checkpoint: the manifest's sha256 for one source, else a digest of
    the sources' names and manifests (weights may change on resume: they are not part of it)."""
    if len(sources) == 1:
        return sources[0].manifest.sha256
    text = "\n".join(f"{s.name}={s.manifest.sha256}" for s in sorted(sources, key=lambda s: s.name))
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- schedule


class BlendSchedule:
    """The blending rule over one segment: from sample position `start`, with per-source `base` counts and
    `weights`. Replays forward from a cursor (training only moves forward)."""

    def __init__(self, weights: list[float], start: int = 0, base: list[int] | None = None) -> None:
        self.weights = [float(w) for w in weights]
        self.start = start
        self.base = list(base) if base is not None else [0] * len(weights)
        # share_s = num_s / den exactly: the tests of the rule are integer comparisons
        self._num = [round(w / sum(self.weights) * 2**52) for w in self.weights]
        self._den = sum(self._num)
        self._cursor = (0, [0] * len(weights))  # (position in the segment, counts in the segment)

    def _advance(self, n: int, counts: list[int], steps: int, out: np.ndarray | None) -> None:
        num, den, S = self._num, self._den, len(self.weights)
        m = max(2 * S - 2, 1)  # the slack is 1/m: every count stays within 1 - 1/m of its share
        for k in range(steps):
            t = n + 1  # the prefix this sample completes
            best = -1
            for s in range(S):
                # allowed: w_s * t - c_s >= 1/m; the earliest deadline (c_s + 1 - 1/m) / w_s, crosswise
                if m * (num[s] * t - counts[s] * den) >= den and (
                    best < 0 or (m * counts[s] + m - 1) * num[best] < (m * counts[best] + m - 1) * num[s]
                ):
                    best = s
            if out is not None:
                out[k, 0], out[k, 1] = best, self.base[best] + counts[best]
            counts[best] += 1
            n += 1

    def _state(self, pos: int) -> tuple[int, list[int]]:
        n = pos - self.start
        if n < 0:
            raise ValueError(f"position {pos} is before the blend segment's start {self.start}")
        if len(self.weights) == 1:
            return n, [n]
        at, counts = self._cursor if self._cursor[0] <= n else (0, [0] * len(self.weights))
        counts = list(counts)
        self._advance(at, counts, n - at, None)
        return n, counts

    def take(self, pos: int, count: int) -> np.ndarray:
        """(count, 2): source and its sample number for global positions [pos, pos + count)."""
        n, counts = self._state(pos)
        out = np.empty((count, 2), dtype=np.int64)
        if len(self.weights) == 1:
            out[:, 0], out[:, 1] = 0, self.base[0] + n + np.arange(count)
            return out
        self._advance(n, counts, count, out)
        self._cursor = (n + count, counts)
        return out

    def seek(self, pos: int, counts: list[int]) -> None:
        """Place the cursor at `pos` with the per-source `counts` there (from a checkpoint): no replay."""
        self._cursor = (pos - self.start, [c - b for c, b in zip(counts, self.base, strict=True)])

    def counts(self, pos: int) -> list[int]:
        """Each source's samples drawn before global position `pos`."""
        n, counts = self._state(pos)
        if len(self.weights) > 1:
            self._cursor = (n, list(counts))
        return [b + c for b, c in zip(self.base, counts, strict=True)]


# ---------------------------------------------------------------------------------------------- samples


class Mixture:
    """The training samples of a blend: global position -> (source, window) -> tensors."""

    def __init__(self, sources: list[Source], datasets: list[WindowDataset], is_blend: bool = True) -> None:
        for source, data in zip(sources, datasets, strict=True):
            if len(data) == 0:
                raise DataError(f"source {source.name}: {data.empty_error()}")
        self.sources = sources
        self.datasets = datasets
        self.is_blend = is_blend
        self.names = [s.name for s in sources]
        self.schedule = BlendSchedule([s.weight for s in sources])

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def positions(self, start: int, count: int) -> np.ndarray:
        """(count, 2): source index and window index for positions [start, start + count)."""
        drawn = self.schedule.take(start, count)
        out = drawn.copy()
        for s, data in enumerate(self.datasets):
            sel = drawn[:, 0] == s
            if sel.any():
                # sample numbers of a source are consecutive: one call per source, epochs handled there
                first = int(drawn[sel, 1][0])
                out[sel, 1] = data.positions(first, int(sel.sum()))
        return out

    def stack(self, samples: np.ndarray) -> tuple[Tensor, Tensor]:
        block = np.empty((len(samples), self.datasets[0].context_length + 1), dtype=np.int64)
        for s, data in enumerate(self.datasets):
            rows = np.nonzero(samples[:, 0] == s)[0]
            if len(rows):
                block[rows] = data.block(samples[rows, 1])
        tokens = torch.from_numpy(block)
        return tokens[:, :-1], tokens[:, 1:]

    def empty_error(self) -> str:
        return "no training windows in any source"

    # -------------------------------------------------------------------------------- position

    def counts(self, consumed: int) -> dict[str, int]:
        return dict(zip(self.names, self.schedule.counts(consumed), strict=True))

    def by_source(self, consumed: int) -> dict[str, dict[str, float]]:
        """metrics.jsonl's per-source fields: cumulative tokens and epochs of each source (blends only)."""
        if not self.is_blend:
            return {}
        counts = self.counts(consumed)
        T = self.datasets[0].context_length
        return {
            "tokens_by_source": {n: c * T for n, c in counts.items()},
            "epochs_by_source": {
                n: c / len(d) for (n, c), d in zip(counts.items(), self.datasets, strict=True)
            },
        }

    def state(self, consumed: int) -> dict[str, Any]:
        """What a checkpoint records: the segment (start, base counts, weights) and the counts now."""
        s = self.schedule
        return {
            "names": self.names,
            "weights": s.weights,
            "segment_start": s.start,
            "segment_base": s.base,
            "counts": self.schedule.counts(consumed),
        }

    def restore(self, saved_data: dict[str, Any], consumed: int) -> str | None:
        """Continue from a checkpoint's position (`saved_data`: its metadata's `data`). The same sources and
        weights continue its segment (bitwise the same samples as a run never stopped); other weights or
        sources start a new segment here, each source from its saved count (new ones from 0). Returns what
        changed, for the log, or None."""
        saved = saved_data.get("blend")
        if saved is None:  # saved from one source (`data.path`): all `consumed` samples came from it
            name = Path(saved_data.get("path") or ".").resolve().name
            saved = {
                "names": [name],
                "weights": [1.0],
                "segment_start": 0,
                "segment_base": [0],
                "counts": [consumed],
            }
        weights = [s.weight for s in self.sources]
        if len(self.names) == 1 and len(saved["names"]) == 1:
            return None  # one source, renamed or not: its position is `consumed`
        if saved["names"] == self.names and np.allclose(saved["weights"], weights, rtol=0, atol=1e-12):
            self.schedule = BlendSchedule(saved["weights"], saved["segment_start"], saved["segment_base"])
            self.schedule.seek(consumed, saved["counts"])
            return None
        before = dict(zip(saved["names"], saved["weights"], strict=True))
        count = dict(zip(saved["names"], saved["counts"], strict=True))
        base = [int(count.get(n, 0)) for n in self.names]
        self.schedule = BlendSchedule(weights, consumed, base)
        change = ", ".join(
            f"{n} {before[n]:.3f} -> {w:.3f}" if n in before else f"{n} new at {w:.3f}"
            for n, w in zip(self.names, weights, strict=True)
        )
        dropped = [n for n in saved["names"] if n not in self.names]
        return (
            f"blend changed at sample {consumed:,}: {change}"
            + (f"; dropped {', '.join(dropped)}" if dropped else "")
            + "; every source continues from its position ("
            + ", ".join(f"{n} {b:,} samples" for n, b in zip(self.names, base, strict=True))
            + ")"
        )


# ---------------------------------------------------------------------------------------------- the run's data


class PretrainData:
    """A run's data: its sources (one, or a blend), checked, verified, cut into train and val samples."""

    def __init__(self, d: DataConfig) -> None:
        self.cfg = d
        self.sources = read_sources(d)
        self.is_blend = bool(d.blend)
        self.manifest = self.sources[0].manifest  # the tokenizer all sources share
        self.sha256 = data_sha256(self.sources)
        self.cache = ShardCache(d.max_open_shards)  # one bound over every source and split
        self.val_counts: dict[str, int] = {}  # val windows per source, all ranks together

    @property
    def path(self) -> str:
        """The data as a checkpoint records it."""
        if not self.is_blend:
            return self.cfg.path
        return ",".join(f"{s.path}:{s.weight:.6g}" for s in self.sources)

    def verify(self, dist_ctx: Any) -> None:
        """sha256 of the shards not verified before, the ranks sharing the work; remembered on success."""
        if not self.cfg.verify_checksums:
            return
        todo = []
        for s in self.sources:
            splits = [x for x in (self.cfg.train_split, self.cfg.val_split) if x in s.manifest.splits]
            todo.append(shards_to_verify(s.manifest, splits))
        problems = []
        for s, shards in zip(self.sources, todo, strict=True):
            if shards:
                mine = verify_shards(s.manifest, shards, dist_ctx.rank, dist_ctx.world_size)
                problems += [p for rank_problems in dist_ctx.gather(mine) for p in rank_problems]
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise DataError(problems[0] + more)
        if dist_ctx.is_main:
            for s, shards in zip(self.sources, todo, strict=True):
                if shards:
                    remember_verified(s.manifest, shards)

    def train(self, context_length: int, seed: int) -> Mixture:
        split = self.cfg.train_split
        return Mixture(
            self.sources,
            [WindowDataset(s.manifest, split, context_length, seed, self.cache) for s in self.sources],
            self.is_blend,
        )

    def val(
        self, context_length: int, num_windows: int, micro_batch: int, dp_rank: int, dp_size: int
    ) -> dict[str, list[tuple[Tensor, Tensor]]]:
        """Each source's fixed val windows (this rank's share, in micro-batches); sources without a val
        split, or shorter than one window, are left out (and said so)."""
        split, out = self.cfg.val_split, {}
        for s in self.sources:
            if split not in s.manifest.splits:
                log.warning("no evaluation of %s: its data has no '%s' split", s.name, split)
                continue
            data = WindowDataset(s.manifest, split, context_length, 0, self.cache)
            if len(data) == 0:
                log.warning("no evaluation of %s: its '%s' split is shorter than one window", s.name, split)
                continue
            out[s.name] = eval_batches(data, num_windows, micro_batch, dp_rank, dp_size)
            self.val_counts[s.name] = len(eval_samples(data, num_windows))
        return out

    def val_loss(self, by_source: dict[str, float]) -> float:
        """A blend's val loss: the mean over every source's val windows (stable when weights change)."""
        total = sum(self.val_counts[n] for n in by_source)
        return (
            sum(loss * self.val_counts[n] for n, loss in by_source.items()) / total if total else float("nan")
        )

    def setup_lines(self, train: Mixture, max_steps: int, global_batch: int, val_batches: int) -> list[str]:
        """The start-up log: tokens, windows, weight and the epochs `max_steps` implies, per source."""
        samples = max_steps * global_batch
        if not self.is_blend:
            data = train.datasets[0]
            return [
                f"data: {self.cfg.path}, {data.stream.tokens:,} train tokens = {len(data):,} windows; "
                f"{max_steps} steps = {samples / len(data):.2f} epochs; {val_batches} val batches per rank"
            ]
        unused = f" (data.path {self.cfg.path} is not used)" if self.cfg.path else ""
        lines = [
            f"data: blend of {len(self.sources)} sources{unused}; {max_steps} steps = {samples:,} samples"
        ]
        for s, data in zip(self.sources, train.datasets, strict=True):
            lines.append(
                f"data: {s.name} ({s.manifest.root / MANIFEST}): weight {s.weight:.3f}, {data.stream.tokens:,} "
                f"train tokens = {len(data):,} windows; {max_steps} steps = {samples * s.weight / len(data):.2f} "
                "epochs"
            )
        return lines
