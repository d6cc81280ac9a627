"""Per-rank loader memory does not grow with the corpus: a build of 1,000 shards x 10^9 tokens each
(10^12 tokens, sparse files made here) starts and trains 3 steps under `ulimit -n 256` in bounded memory.

The old loader stat-ed and memory-mapped every shard at start-up (1,000 descriptors > 256) and built an
int64 permutation of all windows (3 x 10^10 windows: 250 GB); this one maps shards lazily through a
bounded LRU and computes the order on the fly."""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pytest
from train_helpers import TRAIN, metrics, write_build, write_config

from gptforge.data.format import MANIFEST, write_index

SHARDS = 1000
TOKENS_PER_SHARD = 10**9
MAX_RSS_BYTES = 1.5 * 2**30
FD_LIMIT = 256

# Runs launch/train.py in this process under RLIMIT_NOFILE and writes its own peak RSS at exit.
WRAPPER = """
import atexit, json, resource, runpy, sys
resource.setrlimit(resource.RLIMIT_NOFILE, ({fds}, {fds}))
def report():
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    open({out!r}, "w").write(json.dumps({{"max_rss_bytes": peak_kb * 1024}}))
atexit.register(report)
sys.argv = [{train!r}, *sys.argv[1:]]
runpy.run_path({train!r}, run_name="__main__")
"""


def sparse_build(root, vocab: int) -> None:
    """1,000 train shards of 10^9 uint16 tokens (2 GB each, sparse: zeros, no disk blocks) + a small
    real val split, with a manifest as data_pipeline/build.py writes it (checksums not computed)."""
    rng = np.random.default_rng(0)
    val = [np.append(rng.integers(0, vocab - 1, 200), vocab - 1) for _ in range(4)]
    write_build(root, {"val": val}, {"name": "synthetic", "vocab_size": vocab, "eot_id": vocab - 1})
    manifest = json.loads((root / MANIFEST).read_text())
    shards = []
    for k in range(SHARDS):
        stem = f"train_{k:05d}"
        with open(root / f"{stem}.bin", "wb") as f:
            f.truncate(TOKENS_PER_SHARD * 2)
        write_index(root / f"{stem}.idx", np.array([TOKENS_PER_SHARD], dtype=np.int32), "uint16")
        shards.append(
            {
                "bin": f"{stem}.bin",
                "idx": f"{stem}.idx",
                "tokens": TOKENS_PER_SHARD,
                "documents": 1,
                "sha256": "0" * 64,
            }
        )
    manifest["splits"]["train"] = {"tokens": SHARDS * TOKENS_PER_SHARD, "documents": SHARDS, "shards": shards}
    (root / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.slow
def test_thousand_shards_of_a_billion_tokens(tmp_path):
    from conftest import run_group

    sparse_build(tmp_path / "data", vocab=256)
    cfg = write_config(
        tmp_path / "cfg.yaml",
        tmp_path / "data",
        tmp_path / "run",
        "train.max_steps=3",
        "train.save_interval=3",
        "train.eval_interval=3",
        "data.verify_checksums=false",
        "data.max_open_shards=32",
    )
    wrapper = tmp_path / "wrapper.py"
    report = tmp_path / "rss.json"
    wrapper.write_text(WRAPPER.format(fds=FD_LIMIT, out=str(report), train=TRAIN))
    start = time.monotonic()
    result = run_group([sys.executable, str(wrapper), "--config", str(cfg)], timeout=600)
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1,000,000,000,000 train tokens = 31,249,999,999 windows" in result.stderr
    train, evals = metrics(tmp_path / "run")
    assert [r["step"] for r in train] == [1, 2, 3] and len(evals) == 2
    rss = json.loads(report.read_text())["max_rss_bytes"]
    print(f"1,000 shards x 10^9 tokens: 3 steps in {elapsed:.1f} s wall, peak RSS {rss / 2**20:.0f} MiB")
    assert rss <= MAX_RSS_BYTES
    assert (tmp_path / "run" / "checkpoints" / "step_3").is_dir()
    assert os.stat(tmp_path / "data" / "train_00000.bin").st_blocks == 0  # still sparse: nothing was written
