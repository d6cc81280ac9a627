"""bench/gpu.sh (issue 16): without CUDA it says so and exits 0; bench/gpu.py's every section runs (toy
sizes, `--smoke`) on this machine, so the GPU run has no untried code path but the device's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, subprocess_env


def test_gpu_sh_without_cuda_says_so_and_exits_0(tmp_path):
    """subprocess_env hides any GPU (CUDA_VISIBLE_DEVICES=""), so this holds on every machine."""
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), str(tmp_path / "gpu.json")],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device here" in proc.stdout
    assert not (tmp_path / "gpu.json").exists()


@pytest.mark.slow
def test_every_section_runs_at_toy_sizes(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=1500,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    for shape in ("gpt2-124m", "llama-1b"):
        rows = results[f"throughput_{shape}"]
        assert [r["row"].split(",")[-1].strip() for r in rows][1:] == [
            "train.compile=false",
            "train.compile=true",
        ]
        assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in rows), rows
    assert [r["zero_stage"] for r in results["zero"]] == [0, 1, 2, 3]
    assert all(r["planner_bytes"] > 0 for r in results["zero"])
    assert results["checkpoint"]["mb_per_s"] > 0 and results["allreduce"]["world_size"] == 1
