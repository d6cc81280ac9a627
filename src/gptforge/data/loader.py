"""Training windows over a build output's memory-mapped shards.

A split's shards, in manifest order, are one token stream (each document followed by eot). Sample `i` is
the window `stream[i*T : i*T + T + 1]` for context length `T`: windows run across document boundaries
(as in nanoGPT and Megatron-LM) and overlap by one token, so every token is a target once per epoch.

Nothing grows with the corpus: shard sizes come from the manifest, shards are opened on first read
through a bounded LRU of memory maps, and the sample order (`gptforge.data.order`) is computed on the fly.
Epoch `e` visits the samples in a permutation keyed by (seed, data, e), the same on every rank; a run's
position in one source is the number of samples consumed over all ranks (`gptforge.data.blend` mixes
several sources).
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gptforge.data.format import MANIFEST, Manifest, ShardInfo, open_shard, read_index, verify_shard
from gptforge.data.order import SampleOrder
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
        if theirs != ours or not same_model_file(data_tok, weights_tokenizer):
            if theirs == ours:  # same name and sizes, another model file
                ours["sha256"], theirs["sha256"] = data_tok["sha256"][:12], weights_tokenizer["sha256"][:12]
            raise DataError(
                f"{where}: the data's tokenizer {ours} is not the one the starting weights (model.init_from) "
                f"were trained with {theirs}; rebuild the data with --tokenizer {theirs['name']}"
                + (f":{weights_tokenizer['model']}" if weights_tokenizer.get("model") else "")
            )


def same_model_file(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two tokenizer records name the same model file (SentencePiece: by its sha256, where both know it;
    two models of one name and size are still different tokenizers)."""
    return not (a.get("sha256") and b.get("sha256")) or a["sha256"] == b["sha256"]


# ---------------------------------------------------------------------------------------------- shards


class ShardCache:
    """A bounded LRU of open shard memory maps (each holds one file descriptor and one kernel map):
    a corpus of any number of shards runs under `ulimit -n 256` and `vm.max_map_count`. A shard is
    opened on first read: its index is read then (its token count checked against the manifest) and
    the `.bin` mapped for exactly those tokens (a file shorter than that is an error naming it)."""

    def __init__(self, capacity: int = 64) -> None:
        if capacity < 1:
            raise DataError(f"data.max_open_shards must be >= 1, got {capacity}")
        self.capacity = capacity
        self._open: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self.opened = 0  # shards mapped so far (evicted ones counted again when reopened)

    def get(self, key: tuple[str, str], manifest: Manifest, shard: ShardInfo) -> np.ndarray:
        """The tokens of `shard` (`key`: its directory and name, as the caller keeps them)."""
        tokens = self._open.get(key)
        if tokens is not None:
            self._open.move_to_end(key)
            return tokens
        tokens = _map_shard(manifest, shard)
        self._open[key] = tokens
        self.opened += 1
        if len(self._open) > self.capacity:
            self._open.popitem(last=False)  # unmapped once no window still refers to it
        return tokens

    def __len__(self) -> int:
        return len(self._open)


def _map_shard(manifest: Manifest, shard: ShardInfo) -> np.ndarray:
    path = manifest.root / shard.bin
    index = read_index(manifest.root / shard.idx)
    indexed = int(index.lengths.astype(np.int64).sum())
    if indexed != shard.tokens or len(index.lengths) != shard.documents:
        raise DataError(
            f"shard {path}: its index {shard.idx} says {indexed} tokens in {len(index.lengths)} documents, the "
            f"manifest {shard.tokens} in {shard.documents}: corrupt; rebuild the data"
        )
    dtype = np.dtype(manifest.dtype).newbyteorder("<")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < shard.tokens * dtype.itemsize:
                raise DataError(
                    f"shard {path} is truncated or corrupt: {size} bytes = {size // dtype.itemsize} tokens, its "
                    f"index and the manifest say {shard.tokens}; tokens from offset {size // dtype.itemsize} "
                    "are missing; rebuild the data"
                )
            return np.memmap(f, dtype=dtype, mode="r", shape=(shard.tokens,))
    except FileNotFoundError:
        raise DataError(
            f"shard missing: {path} (listed in {manifest.root / MANIFEST}); rebuild the data"
        ) from None


# ---------------------------------------------------------------------------------------------- windows


class TokenStream:
    """A split's shards as one read-only token sequence. Shard sizes come from the manifest: nothing is
    opened, stat-ed or read until a window needs it (then through a `ShardCache`)."""

    def __init__(self, manifest: Manifest, split: str, cache: ShardCache | None = None) -> None:
        if split not in manifest.splits:
            raise DataError(
                f"{manifest.root / MANIFEST} has no split {split!r} (it has {sorted(manifest.splits)})"
            )
        self.manifest = manifest
        self.shards = [s for s in manifest.splits[split].shards if s.tokens > 0]
        self.cache = cache if cache is not None else ShardCache()
        self.keys = [(str(manifest.root), s.bin) for s in self.shards]
        self.starts = np.cumsum([0] + [s.tokens for s in self.shards], dtype=np.int64)
        self.tokens = int(self.starts[-1])

    def locate(self, start: int) -> tuple[ShardInfo, int]:
        """The shard holding stream position `start` and the offset in it."""
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        return self.shards[k], start - int(self.starts[k])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length), crossing shard boundaries where needed."""
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        offset = start - int(self.starts[k])
        first = self.cache.get(self.keys[k], self.manifest, self.shards[k])[offset : offset + length]
        if len(first) == length:
            return first
        parts, have = [first], len(first)
        while have < length:
            k += 1
            part = self.cache.get(self.keys[k], self.manifest, self.shards[k])[: length - have]
            parts.append(part)
            have += len(part)
        return np.concatenate(parts)


class WindowDataset:
    """Fixed windows of `context_length + 1` tokens over one split of one build, in a shuffled order per
    epoch (`SampleOrder` keyed by the manifest's sha256: the order belongs to the data, not its path).
    Every batch is checked against the vocabulary: a corrupt id is an error naming shard and offset."""

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        context_length: int,
        seed: int,
        cache: ShardCache | None = None,
    ) -> None:
        self.stream = TokenStream(manifest, split, cache)
        self.manifest = manifest
        self.split = split
        self.context_length = context_length
        self.seed = seed
        self.vocab_size = int(manifest.tokenizer["vocab_size"])
        self.num_samples = max(0, (self.stream.tokens - 1) // context_length)
        self.sample_order = SampleOrder(self.num_samples, seed, key=manifest.sha256)

    def __len__(self) -> int:
        return self.num_samples

    def order(self, epoch: int) -> np.ndarray:
        """The sample order of `epoch`: a pure function of (seed, data, epoch)."""
        return self.sample_order.order(epoch)

    def positions(self, start: int, count: int) -> np.ndarray:
        """Sample indices at global positions [start, start + count) of the epoch-by-epoch order."""
        return self.sample_order.positions(start, count)

    def window(self, sample: int) -> np.ndarray:
        T = self.context_length
        return self.stream.read(sample * T, T + 1)

    def block(self, samples: np.ndarray | list[int], out: np.ndarray | None = None) -> np.ndarray:
        """The windows of `samples` as int64 rows of T + 1 tokens (into `out` if given), checked against
        the vocabulary."""
        block = np.empty((len(samples), self.context_length + 1), dtype=np.int64) if out is None else out
        for row, i in enumerate(samples):
            block[row] = self.window(int(i))
        if block.size and (block.max() >= self.vocab_size or block.min() < 0):
            self._bad_token(block, samples)
        return block

    def stack(self, samples: np.ndarray | list[int]) -> tuple[Tensor, Tensor]:
        """Inputs and targets (B, T) int64 for the given sample indices."""
        data = torch.from_numpy(self.block(samples))
        return data[:, :-1], data[:, 1:]

    def _bad_token(self, block: np.ndarray, samples: np.ndarray | list[int]) -> None:
        row, col = (int(v[0]) for v in np.nonzero((block >= self.vocab_size) | (block < 0)))
        shard, offset = self.stream.locate(int(samples[row]) * self.context_length + col)
        raise DataError(
            f"shard {self.manifest.root / shard.bin} is corrupt: token {offset} is id {block[row, col]}, outside "
            f"the tokenizer's vocabulary of {self.vocab_size} ({self.manifest.root / MANIFEST}); rebuild the data"
        )

    def empty_error(self) -> str:
        return (
            f"the {self.split} split of {self.manifest.root} has {self.stream.tokens} tokens: not one window of "
            f"model.context_length + 1 = {self.context_length + 1}; use more data or a shorter context"
        )


def eval_samples(data: WindowDataset, num_windows: int) -> np.ndarray:
    """A fixed set of up to `num_windows` windows spread evenly over the split (the same at every
    evaluation and in every layout, so val losses are comparable)."""
    n = min(num_windows, len(data))
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, len(data) - 1, n).round().astype(np.int64))


def eval_batches(
    data: WindowDataset, num_windows: int, micro_batch: int, dp_rank: int, dp_size: int
) -> list[tuple[Tensor, Tensor]]:
    """This rank's share of `eval_samples`, cut into micro-batches."""
    mine = np.array_split(eval_samples(data, num_windows), dp_size)[dp_rank]
    return [data.stack(mine[i : i + micro_batch]) for i in range(0, len(mine), micro_batch)]
