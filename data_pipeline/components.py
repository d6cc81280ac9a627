"""Connected components of a graph whose edges are spread over the ranks, in bounded memory: min-label
propagation with pointer jumping, every step a merge join of sorted streams.

Every node (a global survivor index with at least one confirmed link) lives on the rank that read it, in a
label table of (node, label) sorted by node, at first labelled with itself. Each edge is held twice, as
(local node, partner) sorted by the local node: by u's rank (the confirmed links) and by v's rank (the
reverse copies, made once). A round: (1) every edge copy carries its local node's label to the partner: a rank
streams its copies beside its label table (both sorted by node, so the labels are read in one pass), the
proposals go to the partners' ranks, which sort them and lower each label to the smallest it got; (2) pointer
jumping: every node labelled with another node asks that node's rank for its label and takes it, which halves
the distance to the root. Labels only fall and always name a member of the component, so when a round changes
nothing anywhere each label is its component's smallest index: the group's first document in input order is
kept. The tables, the copies and the proposals are `Spool`s and `SortedRuns` (spill.py): in memory while they
fit their share of the budget, else on disk, read a chunk at a time; a node with a million links costs no
more memory than any other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipeline.distributed import Comm, aligned, owners, route
from data_pipeline.spill import SortedRuns, Spool

LABEL = np.dtype([("n", "<i8"), ("l", "<i8")])  # a node and its label; a proposal of a label for a node


class _Streams:
    """Where a rank's streams and tables go: its spill directory and budget, and the chunk size."""

    def __init__(self, comm: Comm, bounds: np.ndarray, spill: Path, budget: int, chunk: int) -> None:
        self.comm, self.bounds, self.spill, self.chunk = comm, bounds, spill, chunk
        self.share = max(1, budget // 8)  # of each table, copy stream and sort
        self._made = 0

    def spool(self, what: str, dtype: np.dtype = LABEL) -> Spool:
        self._made += 1
        return Spool(self.spill, f"{what}-{self.comm.rank:05d}-{self._made:04d}", dtype, self.share)

    def runs(self, what: str) -> SortedRuns:
        self._made += 1
        return SortedRuns(self.spill, f"{what}-{self.comm.rank:05d}-{self._made:04d}", LABEL, self.share)

    def send(self, to: np.ndarray, value: np.ndarray, into: SortedRuns) -> None:
        """Proposals (node `to`, label `value`) to the nodes' ranks, sorted there into `into`."""
        prop = np.empty(len(to), dtype=LABEL)
        prop["n"], prop["l"] = to, value
        into.add(np.concatenate(route(self.comm, owners(self.bounds, to), prop)))


class _Cursor:
    """Labels of ascending nodes (each in the table), read from the table in one forward pass."""

    def __init__(self, table: Spool, chunk: int) -> None:
        self._chunks = table.chunks(chunk)
        self._buf = np.zeros(0, LABEL)

    def __call__(self, nodes: np.ndarray) -> np.ndarray:
        out = np.empty(len(nodes), dtype=np.int64)
        i = 0
        while i < len(nodes):
            while not len(self._buf) or self._buf["n"][-1] < nodes[i]:
                self._buf = next(self._chunks)
            j = int(np.searchsorted(nodes, self._buf["n"][-1], side="right"))
            out[i:j] = self._buf["l"][np.searchsorted(self._buf["n"], nodes[i:j])]
            i = j
        return out


def _lower(table: Spool, proposals: SortedRuns, into: Spool, chunk: int) -> int:
    """`table` with each label lowered to the smallest of its node's `proposals` (sorted by node), into
    `into`; returns how many labels fell."""
    props, buf = proposals.chunks(chunk), np.zeros(0, LABEL)
    changed = 0
    for t in table.chunks(chunk):
        label, last = t["l"].copy(), t["n"][-1]
        while True:
            if not len(buf):
                buf = next(props, None)
                if buf is None:
                    buf = np.zeros(0, LABEL)
                    break
            k = int(np.searchsorted(buf["n"], last, side="right"))
            np.minimum.at(label, np.searchsorted(t["n"], buf["n"][:k]), buf["l"][:k])
            buf = buf[k:]
            if len(buf):
                break
        changed += int(np.count_nonzero(label != t["l"]))
        out = t.copy()
        out["l"] = label
        into.add(out)
    table.close()
    proposals.close()
    return changed


def _nodes(ctx: _Streams, copies: list[Spool]) -> Spool:
    """The label table at the start: every local node of the edge copies, labelled with itself."""
    seen = ctx.runs("nodes")
    for copy in copies:
        for e in copy.chunks(ctx.chunk):
            n = np.unique(e["u"])
            rec = np.empty(len(n), dtype=LABEL)
            rec["n"] = rec["l"] = n
            seen.add(rec)
    table, last = ctx.spool("labels"), -1
    for rec in seen.chunks(ctx.chunk):
        fresh = np.ones(len(rec), dtype=bool)
        fresh[1:] = rec["n"][1:] != rec["n"][:-1]
        fresh[0] = rec["n"][0] != last
        last = int(rec["n"][-1])
        table.add(rec[fresh])
    seen.close()
    return table


def _reverse(ctx: _Streams, links: Spool, dtype: np.dtype) -> Spool:
    """The reverse copies (v, u) of this rank's links, at v's rank, sorted by (v, u)."""
    runs = SortedRuns(ctx.spill, f"back-{ctx.comm.rank:05d}", dtype, ctx.share)
    for e in aligned(ctx.comm, links, ctx.chunk):
        rev = np.empty(len(e), dtype=dtype)
        rev["u"], rev["v"] = e["v"], e["u"]
        runs.add(np.concatenate(route(ctx.comm, owners(ctx.bounds, rev["u"]), rev)))
    back = ctx.spool("back", dtype)
    for rec in runs.chunks(ctx.chunk):
        back.add(rec)
    runs.close()
    return back


def components(
    comm: Comm, bounds: np.ndarray, links: Spool, chunk: int, spill: Path, budget: int
) -> tuple[Spool, int]:
    """Edges (u, v) of `links`, every u owned by this rank (`bounds`: the ranks' first indices), sorted by
    (u, v). Returns this rank's label table, (node, label of its component: the smallest index in it) sorted
    by node, and the number of rounds. What the rank holds at once is bounded by `budget`."""
    ctx = _Streams(comm, bounds, spill, budget, chunk)
    back = _reverse(ctx, links, links.dtype)
    copies = [links, back]
    table = _nodes(ctx, copies)
    rounds = 0
    try:
        while True:
            rounds += 1
            proposals = ctx.runs("proposals")
            for copy in copies:  # (1) every edge copy carries its node's label to the partner
                label_of = _Cursor(table, chunk)
                for e in aligned(ctx.comm, copy, ctx.chunk):
                    ctx.send(e["v"], label_of(e["u"]), proposals)
            lowered = ctx.spool("labels")
            changed = _lower(table, proposals, lowered, chunk)
            asks = ctx.runs("asks")  # (2) pointer jumping: (the label's node, the asking node)
            for t in aligned(ctx.comm, lowered, ctx.chunk):
                moved = t[t["l"] != t["n"]]
                ctx.send(moved["l"], moved["n"], asks)
            answers = ctx.runs("answers")
            label_of = _Cursor(lowered, chunk)
            for a in aligned(ctx.comm, asks, ctx.chunk):
                ctx.send(a["l"], label_of(a["n"]), answers)
            asks.close()
            table = ctx.spool("labels")
            changed += _lower(lowered, answers, table, chunk)
            if int(comm.allreduce(np.array([changed]), "sum")[0]) == 0:
                return table, rounds
    finally:
        back.close()
