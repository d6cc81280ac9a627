"""python tests/workers/build_stages_memory.py ROOT DOCS CAP

The corpus build's global stages (exact and near dedup, decide, write) over one rank's scan output of DOCS
synthetic documents, written under ROOT/out/.build without a scan; prints the peak bytes they allocate
(tracemalloc: numpy buffers and Python objects alike) under --memory-per-rank CAP. The output is left in
ROOT/out (tests/test_build_memory.py).
"""

from __future__ import annotations

import sys
import tracemalloc
from pathlib import Path

import numpy as np

from data_pipeline.context import BuildContext, rank_file, run_stages
from data_pipeline.dedup_exact import ExactDedup
from data_pipeline.dedup_minhash import NearDedup
from data_pipeline.distributed import Comm
from data_pipeline.options import BuildOptions
from data_pipeline.removed import Decide
from data_pipeline.writer import WriteShards

EOT = 50256


def rank_files(tmp: Path, docs: int, num_perm: int) -> dict:
    """One rank's scan output for `docs` documents, written as scan.FILES describes (no scan: it is the
    global stages that are measured): every 20th document removed by a filter, 5% of the survivors exact
    copies and 5% near copies (two signature values changed) of earlier ones, 3 tokens and end-of-text each.
    Returns the values the scan would leave."""
    rng = np.random.default_rng(docs)
    ids = [f"doc-{i:07d}" for i in range(docs)]
    tmp.mkdir(parents=True)
    rank_file(tmp, "ids", 0).write_bytes("".join(ids).encode())
    np.cumsum([len(i) for i in ids]).astype("<i8").tofile(rank_file(tmp, "idend", 0))
    reason = np.where(np.arange(docs) % 20 == 19, 1, 0).astype("<i2")
    reason.tofile(rank_file(tmp, "reason", 0))
    rng.integers(100, 1000, docs).astype("<i8").tofile(rank_file(tmp, "nbytes", 0))
    surv = np.flatnonzero(reason == 0).astype("<i8")
    surv.tofile(rank_file(tmp, "surv", 0))
    n = len(surv)
    hashes = rng.integers(0, 2**63, (n, 2), dtype=np.int64).astype("<u8")
    sigs = rng.integers(0, 2**32, (n, num_perm), dtype=np.uint32)
    copied = rng.choice(np.arange(n // 2, n), n // 10, replace=False)  # copies of earlier survivors
    exact, near = copied[: n // 20], copied[n // 20 :]
    hashes[exact] = hashes[exact - n // 2]
    sigs[copied] = sigs[copied - n // 2]
    sigs[near, :2] += 1
    hashes.tofile(rank_file(tmp, "hash", 0))
    sigs.astype("<u4").tofile(rank_file(tmp, "sig", 0))
    np.full(n, 40, "<i8").tofile(rank_file(tmp, "textlen", 0))
    tokens = np.tile(np.array([11, 12, 13, EOT], "<u2"), n)
    tokens.tofile(rank_file(tmp, "tokens", 0))
    (4 * np.arange(1, n + 1)).astype("<i8").tofile(rank_file(tmp, "tokend", 0))
    return {
        "scan": {"docs": docs, "survivors": n, "reasons": ["filtered"], "tokenize_seconds": 0.0},
        "doc_bounds": [0, docs],
        "survivor_bounds": [0, n],
        "dtype": "uint16",
        "eot": EOT,
    }


def global_stages(root: Path, docs: int, cap: int) -> int:
    """Peak bytes allocated while the global stages run over one rank's scan output of `docs` documents."""
    num_perm = 32
    opts = BuildOptions(
        inputs=["-"], output=str(root / "out"), num_perm=num_perm, memory_per_rank=cap, val_fraction=0.05,
        shard_tokens=50_000, progress=False, workers=1,
    )  # fmt: skip
    out = Path(opts.output)
    values = rank_files(out / ".build", docs, num_perm)
    ctx = BuildContext(opts, Comm(), out, out / ".build", budget=cap // 2, show=False, values=values)
    plan = [ExactDedup(), NearDedup(0.8, num_perm), Decide(), WriteShards()]
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        run_stages(ctx, plan)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    n = values["scan"]["survivors"]
    assert ctx.values["removed"] == {
        "exact_duplicate": n // 20, "filtered": docs // 20, "near_duplicate": n // 10 - n // 20
    }  # fmt: skip
    return peak


if __name__ == "__main__":
    print(global_stages(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
