"""Val split and shards: every rank writes the shards that start in its token stream, hashing while it writes.

The val split is chosen per document by a hash of (seed, id), so adding documents never moves others between
splits. When that leaves a split empty (a corpus of one book, a handful of documents), val is instead the last
`ceil(val_fraction * tokens)` tokens of the token stream: the document that straddles the cut is split in two,
each piece ending in end-of-text like every document in a shard.

A shard holds whole pieces (documents): a new shard starts at the first piece that starts at or after each
multiple of `--shard-tokens` in its split's token stream, so shards hold about that many tokens (a piece longer
than that gets a shard of its own plus what starts after it in the same stretch). Every piece's place follows
from the exclusive prefix sum of the ranks' token counts: its first token's position, divided by
`--shard-tokens`, is its grid cell, and the non-empty cells numbered in order are the shards; an all-gather
of three integers per split per rank (first cell, last cell, distinct cells) numbers them on every rank. A
shard is written by the rank holding its first piece, which reads the rest of it, when it runs on, from the
next ranks' token files. Names are `{split}-NNNNN` with as many digits as the shard count needs (five at
least), so they sort in order for a million shards and more.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
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


def grid_cells(sizes: np.ndarray, start: int, shard_tokens: int) -> np.ndarray:
    """Each piece's grid cell: the position of its first token in the split's stream (this rank's pieces
    start at `start`), divided by `shard_tokens`."""
    return (start + np.cumsum(sizes) - sizes) // shard_tokens


@dataclass(frozen=True)
class Span:
    """One rank's shards of one split: the numbers of its first and last pieces' shards (-1 without
    pieces), and whether its first piece opens that shard (or continues one an earlier rank opened)."""

    first: int
    last: int
    opens: bool


def number_shards(cells: list[tuple[int, int, int]]) -> tuple[list[Span], int]:
    """Every rank's span from every rank's (first cell, last cell, distinct cells), in rank order: the
    non-empty cells numbered in order (a cell shared by consecutive ranks counted once). And the count."""
    spans, count, prev = [], 0, -1
    for first, last, distinct in cells:
        if distinct == 0:
            spans.append(Span(-1, -1, False))
            continue
        continues = first == prev
        offset = count - continues
        spans.append(Span(offset, offset + distinct - 1, not continues))
        count += distinct - continues
        prev = last
    return spans, count


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
        keep = ctx.arrays["keep"]
        ends = read_array(rank_file(ctx.tmp, "tokend", ctx.rank), "<i8")
        sizes = np.diff(np.concatenate(([0], ends)))
        lengths, offsets = sizes[keep], (ends - sizes)[keep]
        split_pieces = self._split(ctx, lengths, offsets)
        spans, counts = self._place(ctx, split_pieces)
        written = self._write(ctx, split_pieces, spans, counts)
        self._count(ctx, lengths)
        gathered = ctx.comm.gather(written)
        if ctx.rank == 0:
            ctx.values["splits"] = self._describe(w for ws in gathered for w in ws)

    @staticmethod
    def _split(ctx: BuildContext, lengths: np.ndarray, offsets: np.ndarray) -> dict[str, np.ndarray]:
        """This rank's documents as pieces of each split: by their val flags, or by the global tail cut (a
        min-reduction of the cut each rank proposes, so a document is split only where it lies)."""
        comm, opts = ctx.comm, ctx.opts
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
        return split_pieces

    @staticmethod
    def _place(ctx: BuildContext, split_pieces: dict[str, np.ndarray]) -> tuple[list[list[Span]], list[int]]:
        """Shard numbers for every piece (`grid_cells`, numbered by `number_shards`); every rank's span
        and each split's shard count. The piece tables go to disk for the ranks that finish a shard."""
        mine = []
        for s in SPLITS:
            p = split_pieces[s]
            sizes = p["n"] + p["eot"]
            cells = grid_cells(sizes, ctx.comm.exscan(int(sizes.sum())), ctx.opts.shard_tokens)
            distinct, local = np.unique(cells, return_inverse=True)
            p["shard"] = local  # the rank's offset is added below
            mine.append((int(distinct[0]), int(distinct[-1]), len(distinct)) if len(p) else (-1, -1, 0))
        table = ctx.comm.allgather(mine)
        spans, counts = [], []
        for i, s in enumerate(SPLITS):
            split_spans, count = number_shards([t[i] for t in table])
            split_pieces[s]["shard"] += max(split_spans[ctx.rank].first, 0)
            spans.append(split_spans)
            counts.append(count)
            f = Appender(rank_file(ctx.tmp, f"pieces-{s}", ctx.rank))
            f.write(split_pieces[s])
            f.close()
        ctx.comm.barrier()  # every rank's piece table is on disk
        return spans, counts

    def _write(
        self,
        ctx: BuildContext,
        split_pieces: dict[str, np.ndarray],
        spans: list[list[Span]],
        counts: list[int],
    ) -> list[tuple[str, int, ShardInfo]]:
        """Write every shard whose first piece is on this rank, running on into the next ranks' streams."""
        rank, dtype, eot = ctx.rank, ctx.values["dtype"], ctx.values["eot"]
        written: list[tuple[str, int, ShardInfo]] = []
        for i, s in enumerate(SPLITS):
            p = split_pieces[s]
            for k in np.unique(p["shard"]).tolist():
                if k == spans[i][rank].first and not spans[i][rank].opens:
                    continue  # opened on an earlier rank, which writes it
                shard = ShardFile(ctx.out, shard_name(s, k, name_width(counts[i])), dtype)
                self._copy(shard, rank_file(ctx.tmp, "tokens", rank), p[p["shard"] == k], dtype, eot)
                for r in range(rank + 1, ctx.comm.size):  # the shard runs on into the next ranks' streams
                    span = spans[i][r]
                    if span.first < 0:
                        continue  # a rank without pieces of this split
                    if span.opens or span.first != k:
                        break
                    q = read_array(rank_file(ctx.tmp, f"pieces-{s}", r), PIECE)
                    self._copy(shard, rank_file(ctx.tmp, "tokens", r), q[q["shard"] == k], dtype, eot)
                    if span.last != k:
                        break
                written.append((s, k, shard.close()))
        return written

    def _count(self, ctx: BuildContext, lengths: np.ndarray) -> None:
        """This step's stats, and the kept documents' share of the scan's tokenizing."""
        st = self.stats
        st.docs_in = st.docs_out = len(lengths)
        st.bytes_in = int(lengths.sum()) * np.dtype(ctx.values["dtype"]).itemsize
        tok = self.tokenize_stats
        tok.docs_in = tok.docs_out = len(lengths)
        textlen = read_array(rank_file(ctx.tmp, "textlen", ctx.rank), "<i8")
        tok.bytes_in = tok.bytes_out = int(textlen[ctx.arrays["keep"]].sum())
        tok.seconds = ctx.values["scan"]["tokenize_seconds"]

    @staticmethod
    def _describe(written: Iterable[tuple[str, int, ShardInfo]]) -> dict[str, SplitInfo]:
        """Each split's shards in order, with its token and document counts (rank 0, for the manifest)."""
        splits = {s: SplitInfo() for s in SPLITS}
        for s, _, info in sorted(written, key=lambda w: (w[0], w[1])):
            splits[s].shards.append(info)
            splits[s].tokens += info.tokens
            splits[s].documents += info.documents
        return splits

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
