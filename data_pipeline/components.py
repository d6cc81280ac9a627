"""Connected components of a graph whose edges are spread over the ranks, without any rank holding them all:
min-label propagation with pointer jumping over `alltoallv` rounds.

Every node (a global survivor index) lives on the rank that read it, with a label, at first itself. A round:
each edge (u, v), held by u's rank, takes the smaller of the two labels to both ends; then every node whose
label is another node takes that node's label (pointer jumping, which halves the distance to the root). Labels
only fall and always name a member of the component, so when a round changes nothing anywhere each label is
its component's smallest index: today's rule, the group's first document in input order is kept.
"""

from __future__ import annotations

import numpy as np

from data_pipeline.distributed import Comm, fetch, owners, route

PROPOSAL = np.dtype([("n", "<i8"), ("l", "<i8")])


def components(
    comm: Comm, bounds: np.ndarray, u: np.ndarray, v: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int]:
    """Edges (u[i], v[i]), every u owned by this rank (`bounds`: the ranks' first indices). Returns this rank's
    nodes, their component labels (the smallest index in the component) and the number of rounds."""
    registered = route(comm, owners(bounds, np.unique(v)), np.unique(v))
    nodes = np.unique(np.concatenate([u, *registered]))
    label = nodes.copy()
    ui = np.searchsorted(nodes, u)

    def lookup(keys: np.ndarray) -> np.ndarray:
        return label[np.searchsorted(nodes, keys)]

    rounds = 0
    while True:
        rounds += 1
        before = label.copy()
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
