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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.base import StepStats
from data_pipeline.context import BuildContext, Stage, blocks, rank_file
from data_pipeline.spill import Appender, read_array
from gptforge.data.format import ShardInfo, SplitInfo, write_index
from gptforge.errors import DataError

SPLITS = ("train", "val")
PIECE = np.dtype([("cell", "<i8"), ("start", "<i8"), ("n", "<i8"), ("eot", "<i8")])
SURVIVOR_BYTES = 160  # what a pass holds per survivor: its columns and pieces


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


def cell_runs(path: Path, block: int) -> Iterator[np.ndarray]:
    """A piece file's runs of pieces in the same grid cell, in order, read a block at a time (a run cut by a
    block's end comes as two)."""
    n = path.stat().st_size // PIECE.itemsize
    for lo, hi in blocks(n, block):
        p = read_array(path, PIECE, lo, hi)
        cuts = np.flatnonzero(np.diff(p["cell"])) + 1
        yield from np.split(p, cuts)


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
    shard's description (`ctx.values["splits"]`). Every pass reads the rank's files a block at a time."""

    name = "write"
    resumable = False  # the shards are removed before a re-run, and the manifest needs their descriptions

    def __init__(self) -> None:
        super().__init__()
        self.tokenize_stats = StepStats("tokenize")  # the kept documents' share of the scan's tokenizing

    def all_stats(self) -> list[StepStats]:
        return [self.tokenize_stats, self.stats]

    def run(self, ctx: BuildContext) -> None:
        local = self._count(ctx)
        start = ctx.comm.exscan(local)
        cut = self._cut(ctx, local, start)
        spans, counts = self._place(ctx, start, cut)
        written = [w for i, s in enumerate(SPLITS) for w in self._write(ctx, i, s, spans, counts[i])]
        gathered = ctx.comm.gather(written)
        if ctx.rank == 0:
            ctx.values["splits"] = self._describe(w for ws in gathered for w in ws)

    @staticmethod
    def _kept(ctx: BuildContext) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """This rank's kept documents, a block of survivors at a time: token lengths, offsets in the token
        file, val flags and normalised text bytes."""
        tmp, rank = ctx.tmp, ctx.rank
        n = int(ctx.bounds("survivor_bounds")[rank + 1] - ctx.bounds("survivor_bounds")[rank])
        done = 0  # kept documents before the block (rows of the val file)
        for lo, hi in blocks(n, ctx.rows(SURVIVOR_BYTES)):
            ends = read_array(rank_file(tmp, "tokend", rank), "<i8", max(lo - 1, 0), hi)
            ends = np.concatenate(([0], ends)) if lo == 0 else ends
            sizes = np.diff(ends)
            keep = read_array(rank_file(tmp, "keep", rank), "<u1", lo, hi).astype(bool)
            k = int(keep.sum())
            val = read_array(rank_file(tmp, "val", rank), "<u1", done, done + k).astype(bool)
            textlen = read_array(rank_file(tmp, "textlen", rank), "<i8", lo, hi)
            done += k
            yield sizes[keep], ends[:-1][keep], val, textlen[keep]

    def _count(self, ctx: BuildContext) -> int:
        """This step's stats and the kept documents' share of the scan's tokenizing; this rank's tokens."""
        st, tok = self.stats, self.tokenize_stats
        tokens = 0
        for lengths, _, _, textlen in self._kept(ctx):
            tokens += int(lengths.sum())
            st.docs_in += len(lengths)
            tok.bytes_in += int(textlen.sum())
        st.docs_out = tok.docs_in = tok.docs_out = st.docs_in
        st.bytes_in = tokens * np.dtype(ctx.values["dtype"]).itemsize
        tok.bytes_out = tok.bytes_in
        tok.seconds = ctx.values["scan"]["tokenize_seconds"]
        return tokens

    def _cut(self, ctx: BuildContext, local: int, start: int) -> int | None:
        """The global tail cut when val is the stream's tail (a min-reduction of the cut each rank proposes,
        so a document is split only where it lies), else None."""
        if not ctx.values["tail"]:
            return None
        total = int(ctx.comm.allreduce(np.array([local]), "sum")[0])
        cut0 = total - max(1, math.ceil(ctx.opts.val_fraction * total))
        mine, at = total, start
        for lengths, _, _, _ in self._kept(ctx):
            found = cut_within(lengths, at, cut0)
            mine = min(mine, total if found is None else found)
            at += int(lengths.sum())
        return int(ctx.comm.allreduce(np.array([mine]), "min")[0])

    def _pieces(self, ctx: BuildContext, start: int, cut: int | None) -> Iterator[dict[str, np.ndarray]]:
        """This rank's pieces of each split, a block at a time (their stream starts at global token
        `start`)."""
        at = start
        for lengths, offsets, val, _ in self._kept(ctx):
            yield pieces(lengths, offsets, val, at, cut)
            at += int(lengths.sum())

    def _place(self, ctx: BuildContext, start: int, cut: int | None) -> tuple[list[list[Span]], list[int]]:
        """Every piece's grid cell, into this rank's piece files (`grid_cells`); every rank's span of shards
        (`number_shards`) and each split's shard count. A split left empty is an error."""
        comm = ctx.comm
        sums = np.zeros(len(SPLITS), np.int64)
        for block in self._pieces(ctx, start, cut):
            sums += [int((block[s]["n"] + block[s]["eot"]).sum()) for s in SPLITS]
        totals = comm.allreduce(sums, "sum")
        if ctx.opts.val_fraction > 0 and (totals == 0).any():
            raise DataError(
                f"the corpus is too small to split ({int(totals.sum())} tokens): val or train would be empty; "
                "add text or pass --val-fraction 0"
            )
        at = [comm.exscan(int(x)) for x in sums]
        files = [Appender(rank_file(ctx.tmp, f"pieces-{s}", ctx.rank)) for s in SPLITS]
        mine = [[-1, -1, 0] for _ in SPLITS]  # first cell, last cell, distinct cells
        for block in self._pieces(ctx, start, cut):
            for i, s in enumerate(SPLITS):
                p = block[s]
                if not len(p):
                    continue
                sizes = p["n"] + p["eot"]
                p["cell"] = grid_cells(sizes, at[i], ctx.opts.shard_tokens)
                at[i] += int(sizes.sum())
                first, last, distinct = mine[i]
                distinct += int(np.count_nonzero(np.diff(p["cell"]))) + int(first < 0 or p["cell"][0] != last)
                mine[i] = [int(p["cell"][0]) if first < 0 else first, int(p["cell"][-1]), distinct]
                files[i].write(p)
        for f in files:
            f.close()
        table = comm.allgather(mine)
        spans, counts = [], []
        for i in range(len(SPLITS)):
            split_spans, count = number_shards([tuple(t[i]) for t in table])
            spans.append(split_spans)
            counts.append(count)
        comm.barrier()  # every rank's piece files are on disk
        return spans, counts

    def _write(
        self, ctx: BuildContext, i: int, split: str, spans: list[list[Span]], count: int
    ) -> list[tuple[str, int, ShardInfo]]:
        """Write every shard of `split` whose first piece is on this rank (its cells in order: shard numbers
        from the rank's span), the last one running on into the next ranks' streams."""
        rank, dtype = ctx.rank, ctx.values["dtype"]
        span = spans[i][rank]
        written: list[tuple[str, int, ShardInfo]] = []
        shard: ShardFile | None = None
        cell, k = None, span.first - 1
        tokens = rank_file(ctx.tmp, "tokens", rank)
        for run in cell_runs(rank_file(ctx.tmp, f"pieces-{split}", rank), ctx.rows(PIECE.itemsize)):
            if run["cell"][0] != cell:
                if shard is not None:
                    written.append((split, k, shard.close()))
                cell, k = int(run["cell"][0]), k + 1
                opened_before = k == span.first and not span.opens  # an earlier rank writes it
                shard = (
                    None
                    if opened_before
                    else ShardFile(ctx.out, shard_name(split, k, name_width(count)), dtype)
                )
            if shard is not None:
                self._copy(ctx, shard, tokens, run)
        if shard is not None:
            for r in range(rank + 1, ctx.comm.size):  # the shard runs on into the next ranks' streams
                if spans[i][r].first < 0:
                    continue  # a rank without pieces of this split
                if spans[i][r].opens or spans[i][r].first != k:
                    break
                for run in cell_runs(rank_file(ctx.tmp, f"pieces-{split}", r), ctx.rows(PIECE.itemsize)):
                    if run["cell"][0] != cell:
                        break
                    self._copy(ctx, shard, rank_file(ctx.tmp, "tokens", r), run)
                if spans[i][r].last != k:
                    break
            written.append((split, k, shard.close()))
        return written

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
    def _copy(ctx: BuildContext, shard: ShardFile, tokens_path: Path, p: np.ndarray) -> None:
        """Append pieces `p` of a token file to `shard`: runs of adjacent pieces are copied `copy_bytes` at a
        time."""
        if not len(p):
            return
        eot = ctx.values["eot"]
        np_dtype = np.dtype(ctx.values["dtype"]).newbyteorder("<")
        step = ctx.copy_bytes // np_dtype.itemsize
        ends = p["start"] + p["n"]
        cuts = np.flatnonzero((p["start"][1:] != ends[:-1]) | (p["eot"][:-1] == 1)) + 1
        with open(tokens_path, "rb") as f:
            for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), len(p)], strict=True):
                for lo in range(int(p["start"][a]), int(ends[b - 1]), step):
                    f.seek(lo * np_dtype.itemsize)
                    shard.write(np.fromfile(f, dtype=np_dtype, count=min(step, int(ends[b - 1]) - lo)))
                if p["eot"][b - 1]:
                    shard.write(np.array([eot], dtype=np_dtype))
        shard.add_lengths(p["n"] + p["eot"])
