"""Val split and shards: every rank writes the shards that start in its token stream, hashing while it writes.

The val split is chosen per document by a hash of (seed, id), so adding documents never moves others between
splits. When that leaves a split empty (a corpus of one book, a handful of documents), val is instead the last
`ceil(val_fraction * tokens)` tokens of the token stream: the document that straddles the cut is split in two,
each piece ending in end-of-text like every document in a shard.

A shard holds whole pieces (documents) and is closed at the first piece that brings it to `--shard-tokens`. The
exclusive prefix sum of the ranks' token counts places every rank's pieces in the global stream; the one
sequential fact, how full the shard open at a rank's first piece is, is relayed from rank to rank (two integers
per split per rank). A shard is written by the rank holding its first piece, which reads the rest of it, when it
runs on, from the next ranks' token files. Names are `{split}-NNNNN` with as many digits as the shard count
needs (five at least), so they sort in order for a million shards and more.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np

from data_pipeline.base import StepStats
from data_pipeline.context import BuildContext, Stage, rank_file
from data_pipeline.spill import Appender, read_array
from gptforge.data.format import ShardInfo, SplitInfo, write_index
from gptforge.errors import DataError

SPLITS = ("train", "val")
PIECE = np.dtype([("shard", "<i8"), ("start", "<i8"), ("n", "<i8"), ("eot", "<i8")])
COPY_TOKENS = 1 << 22  # tokens copied at a time


def in_val(seed: int, doc_id: str, val_fraction: float) -> bool:
    """Whether a document belongs to val: a hash of (seed, id), uniform in [0, 1), below the fraction."""
    digest = hashlib.blake2b(f"{seed}\x00{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < val_fraction


def shard_name(split: str, index: int, width: int = 5) -> str:
    return f"{split}-{index:0{width}d}"


def name_width(shards: int) -> int:
    return max(5, len(str(max(shards - 1, 0))))


def cut_within(lengths: np.ndarray, start: int, cut: int) -> int | None:
    """The tail cut moved so that both pieces of a split document keep at least one token besides
    end-of-text, if `cut` falls in these documents (whose stream starts at token `start`); else None."""
    offsets = start + np.concatenate(([0], np.cumsum(lengths)))
    if not offsets[0] <= cut < offsets[-1]:
        return None
    i = int(np.searchsorted(offsets, cut, side="right")) - 1
    if offsets[i] < cut:
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        if hi - lo < 3:  # too short to split: the whole document goes to val
            return lo
        return min(max(cut, lo + 1), hi - 2)
    return cut


def tail_cut(lengths: np.ndarray, val_fraction: float) -> int:
    """The global token position where a tail val split starts: `ceil(val_fraction * total)` tokens from the
    end, moved by `cut_within`."""
    total = int(np.sum(lengths))
    cut = total - max(1, math.ceil(val_fraction * total))
    found = cut_within(np.asarray(lengths), 0, cut)
    return cut if found is None else found


def pieces(
    lengths: np.ndarray, offsets: np.ndarray, val: np.ndarray | None, start: int, cut: int | None
) -> dict[str, np.ndarray]:
    """This rank's kept documents (token `lengths`, at `offsets` in its token file; their stream starts at
    global token `start`) as pieces of each split: by the val flags, or by the global tail `cut` (the document
    across it gives a train piece plus an end-of-text, and a val piece)."""
    out = {}
    if cut is None:
        for split, mask in (("train", ~val), ("val", val)):
            p = np.zeros(int(mask.sum()), dtype=PIECE)
            p["start"], p["n"] = offsets[mask], lengths[mask]
            out[split] = p
        return out
    g = start + np.concatenate(([0], np.cumsum(lengths)))[:-1]
    train, val_ = g + lengths <= cut, g >= cut
    across = np.flatnonzero(~train & ~val_)
    head = cut - g[across]
    t = np.zeros(int(train.sum()) + len(across), dtype=PIECE)
    t["start"] = np.concatenate((offsets[train], offsets[across]))
    t["n"] = np.concatenate((lengths[train], head))
    t["eot"][int(train.sum()) :] = 1
    v = np.zeros(len(across) + int(val_.sum()), dtype=PIECE)
    v["start"] = np.concatenate((offsets[across] + head, offsets[val_]))
    v["n"] = np.concatenate((lengths[across] - head, lengths[val_]))
    return {"train": t, "val": v}


def assign_shards(p: np.ndarray, state: tuple[int, int], shard_tokens: int) -> tuple[int, int]:
    """Fill `p["shard"]` from the shard open at the first piece (`state`: its index, tokens in it); returns the
    state after the last piece."""
    shard, filled = state
    sizes = p["n"] + p["eot"]
    cum = np.concatenate(([0], np.cumsum(sizes)))
    i = 0
    while i < len(p):
        k = int(np.searchsorted(cum[i + 1 :] - cum[i], shard_tokens - filled, side="left"))
        k = min(k, len(p) - 1 - i)  # pieces i..i+k: up to the one that reaches the limit
        p["shard"][i : i + k + 1] = shard
        filled += int(cum[i + k + 1] - cum[i])
        if filled >= shard_tokens:
            shard, filled = shard + 1, 0
        i += k + 1
    return shard, filled


class ShardFile:
    """One shard being written: `.bin` with its sha256 computed on the way, `.idx` at close."""

    def __init__(self, root: Path, name: str, dtype: str) -> None:
        self.root, self.name, self.dtype = root, name, dtype
        self.np_dtype = np.dtype(dtype).newbyteorder("<")
        self._file = Appender(root / f"{name}.bin")
        self._sha = hashlib.sha256()
        self._lengths: list[np.ndarray] = []

    def write(self, tokens: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(tokens, dtype=self.np_dtype)).cast("B")
        self._sha.update(data)
        self._file.write(data)

    def add_lengths(self, lengths: np.ndarray) -> None:
        self._lengths.append(np.asarray(lengths, dtype=np.int64))

    def close(self) -> ShardInfo:
        self._file.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        write_index(self.root / f"{self.name}.idx", lengths, self.dtype)
        return ShardInfo(
            f"{self.name}.bin", f"{self.name}.idx", int(lengths.sum()), len(lengths), self._sha.hexdigest()
        )


class WriteShards(Stage):
    """Place this rank's documents in the splits and shards, write the shards it opens; rank 0 gets every
    shard's description (`ctx.values["splits"]`)."""

    name = "write"
    resumable = False  # the shards are removed before a re-run, and the manifest needs their descriptions

    def __init__(self) -> None:
        super().__init__()
        self.tokenize_stats = StepStats("tokenize")  # the kept documents' share of the scan's tokenizing

    def all_stats(self) -> list[StepStats]:
        return [self.tokenize_stats, self.stats]

    def run(self, ctx: BuildContext) -> None:
        comm, opts, rank = ctx.comm, ctx.opts, ctx.rank
        dtype = ctx.values["dtype"]
        keep = ctx.arrays["keep"]
        ends = read_array(rank_file(ctx.tmp, "tokend", rank), "<i8")
        lengths = np.diff(np.concatenate(([0], ends)))[keep]
        offsets = (ends - np.diff(np.concatenate(([0], ends))))[keep]
        local = int(lengths.sum())
        start = comm.exscan(local)
        total = int(comm.allreduce(np.array([local]), "sum")[0])
        cut = None
        if ctx.values["tail"]:
            cut0 = total - max(1, math.ceil(opts.val_fraction * total))
            mine = cut_within(lengths, start, cut0)
            cut = int(comm.allreduce(np.array([total if mine is None else mine]), "min")[0])
        split_pieces = pieces(lengths, offsets, ctx.arrays.get("val"), start, cut)
        sums = np.array([int((split_pieces[s]["n"] + split_pieces[s]["eot"]).sum()) for s in SPLITS])
        sums = comm.allreduce(sums, "sum")
        if opts.val_fraction > 0 and (sums == 0).any():
            raise DataError(
                f"the corpus is too small to split ({total} tokens): val or train would be "
                "empty; add text or pass --val-fraction 0"
            )

        def place(states: list[tuple[int, int]]) -> list[tuple[int, int]]:
            return [
                assign_shards(split_pieces[s], st, opts.shard_tokens)
                for s, st in zip(SPLITS, states, strict=True)
            ]

        exits = comm.allgather(comm.relay(place, [(0, 0), (0, 0)]))
        counts = [exits[-1][i][0] + (exits[-1][i][1] > 0) for i in range(len(SPLITS))]
        for s in SPLITS:
            f = Appender(rank_file(ctx.tmp, f"pieces-{s}", rank))
            f.write(split_pieces[s])
            f.close()
        comm.barrier()  # every rank's piece table is on disk

        tokens_path = rank_file(ctx.tmp, "tokens", rank)
        written: list[tuple[str, int, ShardInfo]] = []
        for i, s in enumerate(SPLITS):
            p = split_pieces[s]
            entry = (0, 0) if rank == 0 else exits[rank - 1][i]
            for k in np.unique(p["shard"]).tolist():
                if k == entry[0] and entry[1] > 0:
                    continue  # opened on an earlier rank, which writes it
                shard = ShardFile(ctx.out, shard_name(s, k, name_width(counts[i])), dtype)
                self._copy(shard, tokens_path, p[p["shard"] == k], dtype, ctx.values["eot"])
                for r in range(rank + 1, comm.size):  # the shard runs on into the next ranks' streams
                    open_shard, filled = exits[r - 1][i]
                    if open_shard != k or filled == 0:
                        break
                    q = read_array(rank_file(ctx.tmp, f"pieces-{s}", r), PIECE)
                    self._copy(
                        shard, rank_file(ctx.tmp, "tokens", r), q[q["shard"] == k], dtype, ctx.values["eot"]
                    )
                written.append((s, k, shard.close()))
        st = self.stats
        st.docs_in = st.docs_out = len(lengths)
        st.bytes_in = local * np.dtype(dtype).itemsize
        tok = self.tokenize_stats
        tok.docs_in = tok.docs_out = len(lengths)
        tok.bytes_in = tok.bytes_out = int(read_array(rank_file(ctx.tmp, "textlen", rank), "<i8")[keep].sum())
        tok.seconds = ctx.values["scan"]["tokenize_seconds"]
        gathered = comm.gather(written)
        if rank == 0:
            splits = {s: SplitInfo() for s in SPLITS}
            for s, _, info in sorted((w for ws in gathered for w in ws), key=lambda w: (w[0], w[1])):
                splits[s].shards.append(info)
                splits[s].tokens += info.tokens
                splits[s].documents += info.documents
            ctx.values["splits"] = splits

    @staticmethod
    def _copy(shard: ShardFile, tokens_path: Path, p: np.ndarray, dtype: str, eot: int) -> None:
        """Append pieces `p` of a token file to `shard`: runs of adjacent pieces are copied a few million
        tokens at a time."""
        if not len(p):
            return
        np_dtype = np.dtype(dtype).newbyteorder("<")
        ends = p["start"] + p["n"]
        cuts = np.flatnonzero((p["start"][1:] != ends[:-1]) | (p["eot"][:-1] == 1)) + 1
        with open(tokens_path, "rb") as f:
            for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), len(p)], strict=True):
                for lo in range(int(p["start"][a]), int(ends[b - 1]), COPY_TOKENS):
                    f.seek(lo * np_dtype.itemsize)
                    shard.write(np.fromfile(f, dtype=np_dtype, count=min(COPY_TOKENS, int(ends[b - 1]) - lo)))
                if p["eot"][b - 1]:
                    shard.write(np.array([eot], dtype=np_dtype))
        shard.add_lengths(p["n"] + p["eot"])
