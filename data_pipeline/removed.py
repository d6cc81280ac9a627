"""The decisions, per rank: which documents are kept, why the others were removed, and the val split.

`removed.jsonl` is written in parallel: each rank writes its lines (its documents, in input order) to a part
file, an exclusive prefix sum of the parts' sizes gives each rank its byte offset, and every rank copies its part
into the one file there; rank 0 renames it into place once all have written. The id a `duplicate_of` names
may be another rank's: it is read from that rank's id file (on the shared output filesystem).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import TextIO

import numpy as np

from data_pipeline.context import BuildContext, Stage, blocks, column, rank_file
from data_pipeline.distributed import fetch, max_chunks, owners
from data_pipeline.output import REMOVED
from data_pipeline.spill import Appender, read_array, read_rows
from data_pipeline.writer import in_val
from gptforge.errors import DataError

DOC_BYTES = 400  # what a pass holds per document: its id, reason, columns and removed.jsonl line


def read_ids(tmp: Path, rank: int, docs: np.ndarray) -> list[str]:
    """Ids of a rank's documents (local indices), read from its id file."""
    if not len(docs):
        return []
    ends = read_rows(rank_file(tmp, "idend", rank), docs, 1, "<i8")[:, 0]
    starts = read_rows(rank_file(tmp, "idend", rank), np.maximum(docs - 1, 0), 1, "<i8")[:, 0]
    starts[docs == 0] = 0
    out = []
    fd = os.open(rank_file(tmp, "ids", rank), os.O_RDONLY)
    try:
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            out.append(os.pread(fd, b - a, a).decode("utf-8"))
    finally:
        os.close(fd)
    return out


def block_ids(tmp: Path, rank: int, lo: int, hi: int) -> list[str]:
    """Ids of the rank's documents lo..hi-1 (one read)."""
    ends = read_array(rank_file(tmp, "idend", rank), "<i8", max(lo - 1, 0), hi)
    start = 0 if lo == 0 else int(ends[0])
    ends = ends[1:] if lo else ends
    with open(rank_file(tmp, "ids", rank), "rb") as f:
        f.seek(start)
        blob = f.read(int(ends[-1]) - start if len(ends) else 0)
    cuts = np.concatenate(([0], ends - start)).tolist()
    return [blob[a:b].decode("utf-8") for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


class Decide(Stage):
    """Reasons and `duplicate_of` for every document of this rank, `removed.jsonl`, and the rank files `keep`
    (per survivor) and `val` (per kept document), a block of documents at a time."""

    name = "decide"
    files = ("keep", "val")
    values = ("kept", "removed", "tail")

    def __init__(self) -> None:
        super().__init__()
        self.stats = None

    def run(self, ctx: BuildContext) -> None:
        tmp, rank, scan = ctx.tmp, ctx.rank, ctx.values["scan"]
        size = ctx.rows(DOC_BYTES)
        rounds = max_chunks(ctx.comm, scan["docs"], size)
        part = tmp / f"removed-{rank:05d}.part"
        keep_file, val_file = Appender(rank_file(tmp, "keep", rank)), Appender(rank_file(tmp, "val", rank))
        counts: Counter = Counter()
        kept = n_val = survivor = 0
        with open(part, "w", encoding="utf-8") as f:
            for lo, hi in blocks(scan["docs"], size, rounds):
                codes = read_array(rank_file(tmp, "reason", rank), "<i2", lo, hi)
                s_hi = survivor + int(np.count_nonzero(codes == 0))
                exact_of = column(tmp, "exact_of", rank, survivor, s_hi, "exact" in ctx.opts.dedup)
                near_of = column(tmp, "near_of", rank, survivor, s_hi, "minhash" in ctx.opts.dedup)
                target, target_ids = self._targets(ctx, exact_of, near_of)
                keep = (exact_of < 0) & (near_of < 0)
                ids = block_ids(tmp, rank, lo, hi)
                val = self._write_block(ctx, f, codes, ids, keep, exact_of >= 0, target, target_ids, counts)
                keep_file.write(keep.astype(np.uint8))
                val_file.write(val.astype(np.uint8))
                kept, n_val, survivor = kept + int(keep.sum()), n_val + int(val.sum()), s_hi
        keep_file.close()
        val_file.close()
        self._write_parallel(ctx, part)
        self._totals(ctx, counts, kept, n_val)

    @staticmethod
    def _targets(
        ctx: BuildContext, exact_of: np.ndarray, near_of: np.ndarray
    ) -> tuple[np.ndarray, dict[int, str]]:
        """The survivor each duplicate of a block points at (global index, -1 for none), and the ids of
        those targets, read from their ranks' files. An exact copy of a near duplicate points at the near
        group's kept document (asked of the rank that holds the copied one: one exchange per block)."""
        comm, tmp, sb = ctx.comm, ctx.tmp, ctx.bounds("survivor_bounds")
        base = int(sb[ctx.rank])
        near = rank_file(tmp, "near_of", ctx.rank)
        ex = np.flatnonzero(exact_of >= 0)
        if "minhash" in ctx.opts.dedup:
            of_near = fetch(comm, sb, exact_of[ex], lambda keys: read_rows(near, keys - base, 1, "<i8")[:, 0])
        else:
            of_near = np.full(len(ex), -1, np.int64)
        target = np.where(near_of >= 0, near_of, exact_of)
        target[ex] = np.where(of_near >= 0, of_near, exact_of[ex])
        wanted = np.unique(target[target >= 0])
        where = owners(sb, wanted)
        target_ids: dict[int, str] = {}
        for r in np.unique(where).tolist():
            sel = wanted[where == r]
            docs = read_rows(rank_file(tmp, "surv", r), sel - sb[r], 1, "<i8")[:, 0]
            target_ids.update(zip(sel.tolist(), read_ids(tmp, r, docs), strict=True))
        return target, target_ids

    @staticmethod
    def _write_block(
        ctx: BuildContext,
        f: TextIO,
        codes: np.ndarray,
        ids: list[str],
        keep: np.ndarray,
        exact: np.ndarray,
        target: np.ndarray,
        target_ids: dict[int, str],
        counts: Counter,
    ) -> np.ndarray:
        """A block's `removed.jsonl` lines in input order, counted by reason; the val flag of every kept
        document of the block."""
        reasons = ctx.values["scan"]["reasons"]
        val: list[bool] = []
        s = 0
        for code, doc_id in zip(codes.tolist(), ids, strict=True):
            dup = None
            if code:
                reason = reasons[code - 1]
            else:
                s += 1
                if keep[s - 1]:
                    val.append(in_val(ctx.opts.seed, doc_id, ctx.opts.val_fraction))
                    continue
                reason = "exact_duplicate" if exact[s - 1] else "near_duplicate"
                dup = target_ids[int(target[s - 1])]
            counts[reason] += 1
            f.write(json.dumps({"id": doc_id, "reason": reason, "duplicate_of": dup}, ensure_ascii=False))
            f.write("\n")
        return np.array(val, dtype=bool)

    @staticmethod
    def _totals(ctx: BuildContext, counts: Counter, kept: int, n_val: int) -> None:
        """Global kept and removed counts (an error if nothing is kept), and whether val falls back to the
        token stream's tail because the hash split left it or train empty."""
        comm = ctx.comm
        removed: Counter = Counter()
        for c in comm.allgather(dict(counts)):
            removed.update(c)
        kept, n_val = (int(x) for x in comm.allreduce(np.array([kept, n_val]), "sum"))
        total = int(ctx.bounds("doc_bounds")[-1])
        if not kept:
            detail = ", ".join(f"{k}: {v}" for k, v in sorted(removed.items(), key=lambda kv: -kv[1])[:5])
            raise DataError(
                f"all {total} documents were removed ({detail}); nothing to write. See {ctx.out / REMOVED}; "
                "relax the filters (--filters none or a YAML file) or the dedup (--dedup none)"
            )
        ctx.values["kept"] = kept
        ctx.values["removed"] = dict(sorted(removed.items()))
        ctx.values["tail"] = ctx.opts.val_fraction > 0 and n_val in (0, kept)

    @staticmethod
    def _write_parallel(ctx: BuildContext, part: Path) -> None:
        comm = ctx.comm
        size = part.stat().st_size
        offset = comm.exscan(size)
        total = int(comm.allreduce(np.array([size]), "sum")[0])
        final = ctx.out / REMOVED
        tmp = final.with_suffix(".jsonl.tmp")
        if comm.rank == 0:
            with open(tmp, "wb") as f:
                f.truncate(total)
        comm.barrier()
        with open(part, "rb") as src, open(tmp, "r+b") as dst:
            dst.seek(offset)
            while chunk := src.read(ctx.copy_bytes):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        comm.barrier()
        if comm.rank == 0:
            os.replace(tmp, final)
        part.unlink()
