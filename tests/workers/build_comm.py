"""Run under `mpirun -n N`: the corpus build's buffer collectives and distributed connected components,
checked against one-process references (tests/test_build_mpi.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from data_pipeline.components import components
from data_pipeline.dedup_minhash import PAIR
from data_pipeline.distributed import MpiComm, fetch, owners, route
from data_pipeline.spill import Spool


def main() -> None:
    comm = MpiComm(max_bytes=1000)  # tiny rounds: every exchange below is cut into many
    rank, size = comm.rank, comm.size
    rng = np.random.default_rng(rank)
    # alltoallv: part d of rank r is arange(r * 1000 + d, ...) of varying length, as structured records
    rec = np.dtype([("a", "<i8"), ("b", "<u4")])
    parts = []
    for d in range(size):
        p = np.zeros(50 * (rank + 1) + 7 * d, dtype=rec)
        p["a"], p["b"] = np.arange(len(p)) + 1000 * rank + 100000 * d, d
        parts.append(p)
    got = comm.alltoallv(parts)
    for s, g in enumerate(got):
        assert len(g) == 50 * (s + 1) + 7 * rank and (g["b"] == rank).all()
        assert (g["a"] == np.arange(len(g)) + 1000 * s + 100000 * rank).all()
    whole = comm.allgatherv(np.arange(rank * 300, rank * 300 + 300 + rank, dtype=np.int64))
    assert whole.tolist() == [x for r in range(size) for x in range(r * 300, r * 300 + 300 + r)]
    assert comm.exscan(rank + 1) == sum(range(1, rank + 1))
    # a random graph over 3000 nodes held in contiguous ranges; edges held by the owner of u (u < v)
    n = 3000
    bounds = np.array([n * r // size for r in range(size + 1)])
    g = np.random.default_rng(7)
    u_all = g.integers(0, n, 2500)
    v_all = g.integers(0, n, 2500)
    chain = np.arange(100, 400)  # a long path, to need many rounds
    u_all, v_all = np.concatenate([u_all, chain]), np.concatenate([v_all, chain + 1])
    lo, hi = np.minimum(u_all, v_all), np.maximum(u_all, v_all)
    keep = lo != hi
    lo, hi = lo[keep], hi[keep]
    mine = owners(bounds, lo) == rank
    edges = np.empty(int(mine.sum()), dtype=PAIR)
    edges["u"], edges["v"] = lo[mine], hi[mine]
    edges = edges[np.lexsort((edges["v"], edges["u"]))]  # as near dedup confirms them: in (u, v) order
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(lo.tolist(), hi.tolist(), strict=True):
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    smallest = {}
    for x in range(n):
        smallest.setdefault(find(x), x)
    with tempfile.TemporaryDirectory() as tmp:
        # the links in memory, one chunk; then spooled to a file (a budget of 100 edges) and read 37 at a
        # time, so the ranks (with different edge counts) take part in different numbers of real chunks
        for budget, chunk in ((1 << 30, 1 << 20), (100 * PAIR.itemsize, 37)):
            links = Spool(Path(tmp), f"links-{rank}", PAIR, budget)
            for part in np.array_split(edges, 5):
                links.add(part)
            assert (links.spilled > 0) == (chunk == 37)
            table, rounds = components(comm, bounds, links, chunk, Path(tmp), budget)
            assert (table.spilled > 0) == (chunk == 37)
            labels = np.concatenate([*table.chunks(chunk), np.zeros(0, table.dtype)])
            table.close()
            links.close()
            nodes = labels["n"].tolist()
            ends = set(lo[mine].tolist()) | {b for b in hi.tolist() if bounds[rank] <= b < bounds[rank + 1]}
            assert nodes == sorted(ends)  # every node at a local end of an edge, once, in order
            assert [smallest[find(x)] for x in nodes] == labels["l"].tolist()
        assert list(Path(tmp).iterdir()) == []
    # fetch: values from the owners, in the order asked
    keys = rng.integers(0, n, 500)
    assert (fetch(comm, bounds, keys, lambda k: k * 3) == keys * 3).all()
    sent = route(comm, owners(bounds, keys), keys)
    assert all(((bounds[rank] <= s) & (s < bounds[rank + 1])).all() for s in sent)
    if rank == 0:
        print(
            f"comm ok: {size} ranks, components in {rounds} rounds, {comm.bytes_sent} bytes sent", flush=True
        )


if __name__ == "__main__":
    main()
