"""Sample order computed on the fly: which sample sits at each global position, in constant memory.

Epoch `e` of `n` samples visits them in a pseudo-random permutation keyed by (seed, key, e): a Feistel
network over the smallest even power of two >= n, with cycle walking (a value outside [0, n) is permuted
again until it falls inside), so the permutation of [0, n) is exact and any position is computed without
materialising the order. Memory is O(1) in `n`: a loader over a 4.6T-token corpus needs no index at all.

With `weights`, epoch `e` is instead `n` draws with replacement (probability proportional to the weight),
each draw a hash of (seed, key, e, position): the fine-tuner's class balancing.

The same order serves pre-training (windows of one source) and fine-tuning (examples): a position is a
global sample count, a global batch is positions `[c, c + G)`, and `RankBatches` cuts it per rank.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Protocol

import numpy as np
from torch import Tensor

from gptforge.errors import DataError

ROUNDS = 6  # Luby-Rackoff: 4 rounds of a good round function make a strong pseudo-random permutation
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-mixing 64-bit hash (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def round_keys(seed: int, key: str, epoch: int, rounds: int = ROUNDS) -> np.ndarray:
    """64-bit round keys from (seed, key, epoch): the same on every rank, machine and Python."""
    digest = hashlib.blake2b(f"{seed}/{key}/{epoch}".encode(), digest_size=8 * rounds).digest()
    return np.frombuffer(digest, dtype="<u8").astype(np.uint64)


class Feistel:
    """A keyed permutation of [0, n): balanced Feistel rounds on 2h bits plus cycle walking."""

    def __init__(self, n: int, keys: np.ndarray) -> None:
        self.n = n
        self.keys = keys
        self.half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)  # 2^(2h) >= n, < 4n: <= 4 walks expected
        self.mask = np.uint64((1 << self.half) - 1)

    def _round_trip(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << h) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        x = self._round_trip(np.asarray(index, dtype=np.uint64))
        out = x >= np.uint64(self.n)
        while out.any():  # cycle walking: stays a permutation of [0, n)
            x[out] = self._round_trip(x[out])
            out = x >= np.uint64(self.n)
        return x.astype(np.int64)


class SampleOrder:
    """Which of `n` samples sits at each global position: a pure function of (seed, key, epoch)."""

    def __init__(self, n: int, seed: int, key: str = "", weights: np.ndarray | None = None) -> None:
        self.n = n
        self.seed = seed
        self.key = key
        self.cdf = None
        if weights is not None:
            cdf = np.cumsum(np.asarray(weights, dtype=np.float64))
            self.cdf = cdf / cdf[-1]

    def __len__(self) -> int:
        return self.n

    def epoch_samples(self, epoch: int, index: np.ndarray) -> np.ndarray:
        """The samples at positions `index` (within [0, n)) of epoch `epoch`."""
        keys = round_keys(self.seed, self.key, epoch)
        if self.cdf is None:
            return Feistel(self.n, keys)(index)
        u = (_mix(np.asarray(index, dtype=np.uint64) ^ keys[0]) >> np.uint64(11)).astype(np.float64)
        return np.searchsorted(self.cdf, u * 2.0**-53, side="right").astype(np.int64)

    def order(self, epoch: int) -> np.ndarray:
        """The whole order of `epoch` (O(n): for inspection and tests; training never materialises it)."""
        return self.epoch_samples(epoch, np.arange(self.n))

    def positions(self, start: int, count: int) -> np.ndarray:
        """Samples at global positions [start, start + count) of the epoch-by-epoch order."""
        pos = np.arange(start, start + count, dtype=np.int64)
        epochs = pos // self.n
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self.epoch_samples(int(epoch), pos[sel] % self.n)
        return out


class Samples(Protocol):
    """What `RankBatches` cuts: samples at global positions, and a batch of them as tensors."""

    def __len__(self) -> int: ...

    def positions(self, start: int, count: int) -> np.ndarray: ...

    def stack(self, samples: np.ndarray) -> tuple[Tensor, Tensor]: ...

    def empty_error(self) -> str: ...


class RankBatches:
    """This rank's micro-batches of each global batch, from the number of samples consumed so far: the
    global batch at `c` is positions [c, c + G) of the data's order, data-parallel rank `r` of `dp` takes
    the `r`-th contiguous slice of G / dp, cut into `grad_accum` micro-batches. Pre-training and
    fine-tuning share it; resuming needs nothing but `c` (and a blend's per-source position)."""

    def __init__(self, data: Samples, micro_batch: int, grad_accum: int, dp_rank: int, dp_size: int) -> None:
        if len(data) == 0:
            raise DataError(data.empty_error())
        self.data = data
        self.micro_batch = micro_batch
        self.grad_accum = grad_accum
        self.dp_rank = dp_rank

    def step(self, consumed: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The micro-batches of the global batch that starts at position `consumed`."""
        local = self.micro_batch * self.grad_accum
        samples = self.data.positions(consumed + self.dp_rank * local, local)
        for m in range(self.grad_accum):
            yield self.data.stack(samples[m * self.micro_batch : (m + 1) * self.micro_batch])
