"""The sharded build under real `mpirun`: buffer collectives cut into rounds, distributed connected components,
and a rank killed with SIGKILL ending every rank without a manifest."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from build_helpers import BUILD, ROOT, chunk_documents, shared_text, write_jsonl
from conftest import run_group, subprocess_env

pytestmark = pytest.mark.slow
MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")


def test_buffer_collectives_and_components_match_one_process_references():
    assert MPIRUN, "mpirun not found (pip install mpich)"
    proc = run_group(
        [MPIRUN, "-n", "3", sys.executable, str(ROOT / "tests" / "workers" / "build_comm.py")], 300
    )
    assert proc.returncode == 0, proc.stderr
    assert "comm ok: 3 ranks" in proc.stdout


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_kill_9_of_one_rank_ends_every_rank_without_manifest(tmp_path):
    assert MPIRUN, "mpirun not found (pip install mpich)"
    docs = chunk_documents(shared_text("tinyshakespeare.txt"), words=300)
    for f in range(2):
        write_jsonl(
            tmp_path / f"in{f}.jsonl", [{"text": f"Copy {f}.{c}.\n{t}"} for c in range(6) for t in docs]
        )
    out = tmp_path / "out"
    log = tmp_path / "stderr.log"
    cmd = [
        MPIRUN,
        "-n",
        "2",
        sys.executable,
        str(BUILD),
        "--input",
        str(tmp_path / "in0.jsonl"),
        str(tmp_path / "in1.jsonl"),
        "--output",
        str(out),
        "--workers",
        "1",
        "--filters",
        "none",
        "--no-progress",
    ]
    with open(log, "w") as err:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )
    try:
        pids: dict[int, int] = {}
        marker = out / ".build" / "tokens-00001.bin"
        deadline = time.monotonic() + 240
        while len(pids) < 2 or not (marker.is_file() and marker.stat().st_size > 0):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the ranks never started scanning"
            pids = {int(r): int(p) for r, p in re.findall(r"rank (\d)/2 \(pid (\d+)\)", log.read_text())}
            time.sleep(0.01)
        os.kill(pids[1], signal.SIGKILL)
        rc = proc.wait(timeout=60)  # the requirement: every rank gone within a minute
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc != 0
    assert not any(_alive(p) for p in pids.values()), "a rank outlived the job"
    assert not (out / "manifest.json").exists()
