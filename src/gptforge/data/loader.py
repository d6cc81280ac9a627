"""Training windows over a build output's memory-mapped shards.

A split's shards, in manifest order, are one token stream (each document followed by eot). Sample `i` is
the window `stream[i*T : i*T + T + 1]` for context length `T`: windows run across document boundaries
(as in nanoGPT and Megatron-LM) and overlap by one token, so every token is a target once per epoch.

Order: epoch `e` visits the samples in `permutation(seed, e)`, the same on every rank. A run's position in
the data is one integer, the number of samples consumed over all ranks: a global batch is positions
`[c, c + G)` of that order whatever the number of ranks, and data-parallel rank `r` of `dp` takes the
`r`-th contiguous slice of `G / dp`. Resuming needs nothing but `c`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gptforge.data.format import Manifest, ShardInfo, open_shard, verify_shard
from gptforge.errors import DataError

log = logging.getLogger(__name__)

VERIFIED_FILE = ".gptforge-verified.json"
PROGRESS_BYTES = 256 << 20


# ---------------------------------------------------------------------------------------------- checksums


def _stat_key(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _remembered(root: Path) -> dict[str, Any]:
    try:
        return json.loads((root / VERIFIED_FILE).read_text())
    except (OSError, ValueError):
        return {}


def shards_to_verify(manifest: Manifest, splits: list[str]) -> list[ShardInfo]:
    """Shards of `splits` not yet verified (or changed since: size or mtime differs from the record)."""
    seen = _remembered(manifest.root)
    todo = []
    for split in splits:
        for shard in manifest.splits[split].shards:
            path = manifest.root / shard.bin
            record = seen.get(shard.bin)
            if not (path.is_file() and record == {"sha256": shard.sha256, **_stat_key(path)}):
                todo.append(shard)
    return todo


def verify_shards(manifest: Manifest, shards: list[ShardInfo], rank: int = 0, world: int = 1) -> list[str]:
    """sha256 of this rank's share of `shards` (every `world`-th one); returns the problems found, one line
    each. The ranks share the hashing, so a large dataset is checked `world` times faster."""
    from tqdm import tqdm

    mine = shards[rank::world]
    sizes = [(manifest.root / s.bin).stat().st_size if (manifest.root / s.bin).is_file() else 0 for s in mine]
    problems = []
    quick = sum(sizes) < PROGRESS_BYTES  # a bar only when hashing takes a noticeable time
    with tqdm(
        total=sum(sizes), unit="B", unit_scale=True, desc="verify shards", disable=rank != 0 or quick
    ) as bar:
        for shard, size in zip(mine, sizes, strict=True):
            try:
                open_shard(manifest.root, shard, manifest.dtype)  # size first: a truncated shard says so
                verify_shard(manifest.root, shard)
            except DataError as exc:
                problems.append(str(exc))
            bar.update(size)
    return problems


def remember_verified(manifest: Manifest, shards: list[ShardInfo]) -> None:
    """Record verified shards in DIR/.gptforge-verified.json (with size and mtime, so a rewritten shard
    is checked again). A read-only data directory just means checking again next time."""
    seen = _remembered(manifest.root)
    for shard in shards:
        seen[shard.bin] = {"sha256": shard.sha256, **_stat_key(manifest.root / shard.bin)}
    path = manifest.root / VERIFIED_FILE
    try:
        tmp = path.with_name(f"{VERIFIED_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(seen, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.info("could not record verified shards in %s (%s): they are checked again next run", path, exc)


# ---------------------------------------------------------------------------------------------- compatibility


def check_tokenizer(
    manifest: Manifest, vocab_size: int, weights_tokenizer: dict[str, Any] | None = None
) -> None:
    """Refuse data the model cannot read: ids beyond its vocabulary, or another tokenizer than the one
    its starting weights were trained with."""
    data_tok = manifest.tokenizer
    where = manifest.root / "manifest.json"
    if int(data_tok.get("vocab_size", 0)) > vocab_size:
        raise DataError(
            f"{where}: the data was tokenized with {data_tok.get('name')} ({data_tok.get('vocab_size')} ids) but "
            f"model.vocab_size is {vocab_size}; set model.vocab_size >= {data_tok.get('vocab_size')} (or null to "
            "take it from the data), or rebuild the data with the model's tokenizer"
        )
    if weights_tokenizer is not None:
        keys = ("name", "vocab_size", "eot_id")
        theirs = {k: weights_tokenizer.get(k) for k in keys}
        ours = {k: data_tok.get(k) for k in keys}
        if theirs != ours:
            raise DataError(
                f"{where}: the data's tokenizer {ours} is not the one the starting weights (model.init_from) "
                f"were trained with {theirs}; rebuild the data with --tokenizer {theirs['name']}"
            )


# ---------------------------------------------------------------------------------------------- windows


class TokenStream:
    """A split's shards as one read-only token sequence (memory-mapped, nothing loaded up front)."""

    def __init__(self, manifest: Manifest, split: str) -> None:
        if split not in manifest.splits:
            raise DataError(
                f"{manifest.root / 'manifest.json'} has no split {split!r} (it has {sorted(manifest.splits)})"
            )
        shards = [s for s in manifest.splits[split].shards if s.tokens > 0]
        self.arrays = [open_shard(manifest.root, s, manifest.dtype) for s in shards]
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])
        self.tokens = int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length), crossing shard boundaries where needed."""
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        offset = start - int(self.starts[shard])
        first = self.arrays[shard][offset : offset + length]
        if len(first) == length:
            return first
        parts, have = [first], len(first)
        while have < length:
            shard += 1
            part = self.arrays[shard][: length - have]
            parts.append(part)
            have += len(part)
        return np.concatenate(parts)


class WindowDataset:
    """Fixed windows of `context_length + 1` tokens over one split, in a shuffled order per epoch."""

    def __init__(self, manifest: Manifest, split: str, context_length: int, seed: int) -> None:
        self.stream = TokenStream(manifest, split)
        self.split = split
        self.context_length = context_length
        self.seed = seed
        self.num_samples = max(0, (self.stream.tokens - 1) // context_length)
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    def order(self, epoch: int) -> np.ndarray:
        """The sample order of `epoch`: a pure function of (seed, epoch)."""
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # a batch spans at most two epochs
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return self._orders[epoch]

    def window(self, sample: int) -> np.ndarray:
        T = self.context_length
        return self.stream.read(sample * T, T + 1)

    def stack(self, samples: np.ndarray | list[int]) -> tuple[Tensor, Tensor]:
        """Inputs and targets (B, T) int64 for the given sample indices."""
        block = np.stack([self.window(int(i)) for i in samples]).astype(np.int64)
        data = torch.from_numpy(block)
        return data[:, :-1], data[:, 1:]

    def positions(self, start: int, count: int) -> np.ndarray:
        """Sample indices at global positions [start, start + count) of the epoch-by-epoch order."""
        n = self.num_samples
        pos = np.arange(start, start + count)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(pos // n):
            sel = pos // n == epoch
            out[sel] = self.order(int(epoch))[pos[sel] % n]
        return out


class TrainBatches:
    """This rank's micro-batches of each global batch, from the number of samples consumed so far."""

    def __init__(
        self, data: WindowDataset, micro_batch: int, grad_accum: int, dp_rank: int, dp_size: int
    ) -> None:
        if len(data) == 0:
            raise DataError(
                f"the {data.split} split has {data.stream.tokens} tokens: not one window of "
                f"model.context_length + 1 = {data.context_length + 1}; use more data or a shorter context"
            )
        self.data = data
        self.micro_batch = micro_batch
        self.grad_accum = grad_accum
        self.dp_rank = dp_rank
        self.global_batch = micro_batch * grad_accum * dp_size

    def step(self, consumed: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The micro-batches of the global batch that starts at position `consumed`."""
        local = self.micro_batch * self.grad_accum
        samples = self.data.positions(consumed + self.dp_rank * local, local)
        for m in range(self.grad_accum):
            yield self.data.stack(samples[m * self.micro_batch : (m + 1) * self.micro_batch])

    def epoch(self, consumed: int) -> float:
        return consumed / len(self.data)


def eval_batches(
    data: WindowDataset, num_windows: int, micro_batch: int, dp_rank: int, dp_size: int
) -> list[tuple[Tensor, Tensor]]:
    """A fixed set of up to `num_windows` windows spread evenly over the split (the same at every
    evaluation, so val losses are comparable), this rank's share cut into micro-batches."""
    n = min(num_windows, len(data))
    if n == 0:
        return []
    samples = np.unique(np.linspace(0, len(data) - 1, n).round().astype(np.int64))
    mine = np.array_split(samples, dp_size)[dp_rank]
    return [data.stack(mine[i : i + micro_batch]) for i in range(0, len(mine), micro_batch)]
