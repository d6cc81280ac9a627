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
