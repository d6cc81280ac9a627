"""Bounded memory: a build whose dedup state is >= 4x `--memory-per-rank` stays under the cap plus the fixed
base of a build that holds almost nothing, and gives the same bytes as an unbounded one (peak RSS measured)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from build_helpers import BUILD, ROOT, output_bytes, synthetic_corpus
from conftest import subprocess_env

from data_pipeline.dedup_minhash import lsh_params

pytestmark = pytest.mark.slow
CAP = 10 << 20


def build_peak_rss(src: Path, out: Path, *args: str) -> tuple[int, str]:
    """Peak resident bytes of a real build process (its own VmHWM, which it logs: a forking parent's memory
    does not count, as it would in getrusage's maximum) and its stderr."""
    cmd = [sys.executable, str(BUILD), "--input", str(src), "--output", str(out), "--workers", "1",
           "--filters", "none", "--no-progress", *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (mb,) = re.findall(r"peak RSS ([\d.]+) MB", proc.stderr)
    return int(float(mb) * 1e6), proc.stderr


def test_state_four_times_the_cap_stays_under_cap_plus_base_with_identical_output(tmp_path):
    small = synthetic_corpus(tmp_path / "small.jsonl", 10_000, seed=1)
    big = synthetic_corpus(tmp_path / "big.jsonl", 64_000, seed=2)
    base, _ = build_peak_rss(small, tmp_path / "small", "--memory-per-rank", str(CAP))
    scratch = tmp_path / "scratch"  # spill and temporary files away from the output, as on a cluster
    capped, err = build_peak_rss(
        big, tmp_path / "capped", "--memory-per-rank", str(CAP), "--tmp-dir", str(scratch)
    )
    free, _ = build_peak_rss(big, tmp_path / "free", "--memory-per-rank", "4G")
    survivors = json.loads((tmp_path / "free" / "manifest.json").read_text())["stats"]["steps"]["exact_dedup"]
    # the dedup state per survivor: 16-byte hash + 128 x 4-byte signature + 12 bands x (8-byte key + 8-byte index)
    assert survivors["docs_in"] * (16 + 128 * 4 + 12 * 16) >= 4 * CAP
    assert "spilled" in err
    assert capped <= base + CAP, (capped / 2**20, base / 2**20)
    assert free > base + CAP, (
        "the unbounded build should need more than the cap (else this test shows nothing)"
    )
    assert output_bytes(tmp_path / "capped") == output_bytes(tmp_path / "free")
    assert list(scratch.iterdir()) == []  # the build's temporary directory is gone


def stages_peak(root: Path, docs: int, cap: int) -> tuple[int, dict[str, bytes]]:
    """Peak bytes the global stages allocate over `docs` documents under `cap` (measured in a fresh
    interpreter, so that its own tables start from the same state every time), and the output's files."""
    worker = ROOT / "tests" / "workers" / "build_stages_memory.py"
    proc = subprocess.run(
        [sys.executable, str(worker), str(root), str(docs), str(cap)],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = root / "out"
    return int(proc.stdout.split()[-1]), {
        p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()
    }


def test_global_stages_hold_no_per_document_state(tmp_path):
    """The stages after the scan hold a bounded number of bytes whatever the number of documents: their
    per-document state (duplicate targets, kept and val flags, shard pieces) stays in the rank's files and is
    read a block at a time. Measured with tracemalloc at 100,000 and 400,000 documents under an 8 MB cap (the
    dedup state at 400,000 documents is 10 times the cap), and the same bytes as an unbounded run. Holding 8
    bytes per document would add 2.4 MB from one size to the other; the allowance, 1 MB, is for the
    interpreter's own tables (its interned strings) and the names of the extra shards."""
    cap = 8 << 20
    small, _ = stages_peak(tmp_path / "small", 100_000, cap)
    big, out = stages_peak(tmp_path / "big", 400_000, cap)
    free, free_out = stages_peak(tmp_path / "free", 400_000, 4 << 30)
    assert 380_000 * (16 + 32 * 4 + 16 * lsh_params(0.8, 32)[0]) >= 10 * cap
    assert big <= cap * 3 // 4, big / 2**20  # their budget, half the cap (the rest: the scan's), and a margin
    assert big - small <= 1 << 20, (small / 2**20, big / 2**20)
    assert free > 4 * cap  # the same stages, unbounded, hold the state in memory
    assert out == free_out
