"""Connected components of a graph whose edges are spread over the ranks, without any rank holding them all:
min-label propagation with pointer jumping over `alltoallv` rounds.

Every node (a global survivor index) lives on the rank that read it, with a label, at first itself. A round:
each edge (u, v), held by u's rank, takes the smaller of the two labels to both ends; then every node whose
label is another node takes that node's label (pointer jumping, which halves the distance to the root). Labels
only fall and always name a member of the component, so when a round changes nothing anywhere each label is
its component's smallest index: today's rule, the group's first document in input order is kept. The edges are
read from their spool (in memory, or a file once they outgrow their budget) a chunk at a time in every round;
a label lowered by one chunk is seen by the next, which only hastens the fall to the same fixed point.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from data_pipeline.distributed import Comm, fetch, owners, route
from data_pipeline.spill import Spool

PROPOSAL = np.dtype([("n", "<i8"), ("l", "<i8")])


def components(
    comm: Comm, bounds: np.ndarray, links: Spool, chunk: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Edges (u, v) of `links`, every u owned by this rank (`bounds`: the ranks' first indices), read
    `chunk` edges at a time: no rank holds its edges at once, only its nodes' labels. Returns this rank's
    nodes, their component labels (the smallest index in the component) and the number of rounds."""
    n_chunks = int(comm.allreduce(np.array([-(-links.count // chunk)]), "max")[0])

    def edges() -> Iterator[np.ndarray]:
        """This rank's edges a chunk at a time, as many chunks on every rank (the exchanges are collective)."""
        it, empty = links.chunks(chunk), np.zeros(0, links.dtype)
        for _ in range(n_chunks):
            yield next(it, empty)

    nodes = np.zeros(0, np.int64)
    for e in edges():  # the nodes: every u here, and every v this rank owns, registered by the u's rank
        v = np.unique(e["v"])
        nodes = np.union1d(nodes, np.concatenate([e["u"], *route(comm, owners(bounds, v), v)]))
    label = nodes.copy()

    def lookup(keys: np.ndarray) -> np.ndarray:
        return label[np.searchsorted(nodes, keys)]

    rounds = 0
    while True:
        rounds += 1
        before = label.copy()
        for e in edges():
            u, v = e["u"], e["v"]
            ui = np.searchsorted(nodes, u)
            low = np.minimum(label[ui], fetch(comm, bounds, v, lookup))
            np.minimum.at(label, ui, low)
            prop = np.empty(len(v), dtype=PROPOSAL)
            prop["n"], prop["l"] = v, low
            for got in route(comm, owners(bounds, v), prop):
                np.minimum.at(label, np.searchsorted(nodes, got["n"]), got["l"])
        moved = np.flatnonzero(label != nodes)
        label[moved] = np.minimum(label[moved], fetch(comm, bounds, label[moved], lookup))
        changed = int(np.count_nonzero(label != before))
        if int(comm.allreduce(np.array([changed]), "sum")[0]) == 0:
            return nodes, label, rounds
