"""Shared test fixtures: paths to ../shared, a clean environment for subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CORPORA = SHARED / "corpora"
PYTHON = sys.executable


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"../shared not found beside the repository ({SHARED}); CI provides it")
    return SHARED


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: CPU only, no network lookups, small thread counts."""
    env = dict(os.environ)
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "CUDA_VISIBLE_DEVICES": "",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    env.update(extra)
    return env


def run_group(cmd: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    """Run `cmd` (output captured) from the repository root; on timeout every process it started is
    killed, so no orphaned rank outlives a hung multi-process test and holds its output pipes open.

    torchrun starts each worker in a session of its own (and a dead launcher leaves them to init), so the
    process group alone does not reach them: every descendant carries a marker in its environment."""
    marker = uuid.uuid4().hex
    proc = subprocess.Popen(
        cmd,
        env=subprocess_env(**env, GPTFORGE_TEST_RUN=marker),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_marked(marker)
        out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_marked(marker: str) -> None:
    """SIGKILL every process whose environment has GPTFORGE_TEST_RUN=marker."""
    import psutil

    for p in psutil.process_iter():
        try:
            if p.environ().get("GPTFORGE_TEST_RUN") == marker:
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


def torchrun(script: str, nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a tests/workers script under torchrun with `nproc` processes."""
    cmd = [
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(ROOT / "tests" / "workers" / script),
        *args,
    ]
    return run_group(cmd, timeout, PYTHONPATH=str(ROOT))
