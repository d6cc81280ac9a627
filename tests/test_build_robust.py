"""Robustness: re-runs, refused outputs, kill -9 mid-build, empty and fully filtered corpora."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from build_helpers import (
    BUILD,
    ROOT,
    chunk_documents,
    output_bytes,
    run_build,
    shared_text,
    synthetic_corpus,
    write_jsonl,
)
from conftest import subprocess_env


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("robust")
    docs = chunk_documents(shared_text("grimm_tales.txt"), words=300, limit=60)
    return write_jsonl(tmp / "docs.jsonl", [{"text": t} for t in docs])


def test_rerun_is_a_noop_and_manifest_is_written_last(small, tmp_path):
    out = tmp_path / "out"
    run_build("--input", str(small), "--output", str(out), "--workers", "1")
    files = sorted(out.iterdir())
    mtimes = {p.name: p.stat().st_mtime_ns for p in files}
    assert max(mtimes.values()) == mtimes["manifest.json"]
    assert not list(out.glob("*.tmp"))
    time.sleep(0.05)
    proc = run_build("--input", str(small), "--output", str(out), "--workers", "2")  # workers: same build
    assert "nothing to do" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in sorted(out.iterdir())} == mtimes


def test_other_options_refused_without_overwrite(small, tmp_path):
    out = tmp_path / "out"
    run_build("--input", str(small), "--output", str(out), "--workers", "1")
    before = output_bytes(out)
    proc = run_build("--input", str(small), "--output", str(out), "--dedup", "exact", check=False)
    assert proc.returncode == 2
    assert "holds a build made with other options (dedup:" in proc.stderr and "--overwrite" in proc.stderr
    assert output_bytes(out) == before
    run_build(
        "--input", str(small), "--output", str(out), "--dedup", "exact", "--overwrite", "--workers", "1"
    )
    assert json.loads((out / "manifest.json").read_text())["config"]["dedup"] == ["exact"]


def test_foreign_directory_refused_and_kept_with_overwrite(small, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = run_build("--input", str(small), "--output", str(out), check=False)
    assert (
        proc.returncode == 2 and "is not empty and is not a build output (it holds notes.txt)" in proc.stderr
    )
    run_build("--input", str(small), "--output", str(out), "--overwrite", "--workers", "1")
    assert (out / "notes.txt").read_text() == "mine" and (out / "manifest.json").is_file()


def test_damaged_output_is_rebuilt(small, tmp_path):
    out = tmp_path / "out"
    run_build("--input", str(small), "--output", str(out), "--workers", "1")
    before = output_bytes(out)
    (out / "train-00000.bin").unlink()
    proc = run_build("--input", str(small), "--output", str(out), "--workers", "1")
    assert "rebuilding" in proc.stderr
    assert output_bytes(out) == before


def test_empty_corpus_is_an_error_without_manifest(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    proc = run_build("--input", str(tmp_path / "empty.jsonl"), "--output", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "error: the corpus is empty" in proc.stderr
    assert not (tmp_path / "out" / "manifest.json").exists() and not (tmp_path / "out" / ".build").exists()


def test_everything_filtered_is_an_error_without_manifest(tmp_path):
    src = write_jsonl(tmp_path / "short.jsonl", [{"text": f"tiny document number {i}."} for i in range(3)])
    out = tmp_path / "out"
    proc = run_build("--input", str(src), "--output", str(out), check=False)
    assert proc.returncode == 2
    assert "all 3 documents were removed (filter:gopher.min_words: 3)" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["removed.jsonl"]  # it says why; nothing else is left
    assert len((out / "removed.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("phase", ["tokens-00000.bin", "stage-scan-00000.json"])
def test_kill_9_then_rerun_gives_identical_bytes(tmp_path, phase):
    """SIGKILL a real build while it scans / tokenizes; the re-run's output equals an uninterrupted build."""
    docs = chunk_documents(shared_text("tinyshakespeare.txt"), words=300)
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"Copy {c}.\n{t}"} for c in range(6) for t in docs])
    args = [
        "--input",
        str(src),
        "--workers",
        "1",
        "--dedup",
        "none",
        "--filters",
        "none",
        "--shard-tokens",
        "50000",
        "--no-progress",
    ]
    ref = tmp_path / "ref"
    run_build(*args, "--output", str(ref))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, str(BUILD), *args, "--output", str(out)],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = out / ".build" / phase
    deadline = time.monotonic() + 120
    while not (marker.is_file() and marker.stat().st_size > 0) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the build finished before it could be killed"
    assert not (out / "manifest.json").exists()
    run_build(*args, "--output", str(out))
    assert output_bytes(out) == output_bytes(ref)


def test_killed_late_in_the_scan_resumes_from_its_last_commit(tmp_path):
    """SIGKILL at ~80% of the scan: the re-run keeps the committed batches, scans only the rest, and gives the
    bytes of an uninterrupted build."""
    src = synthetic_corpus(tmp_path / "docs.jsonl", 40_000)
    args = ["--input", str(src), "--workers", "1", "--filters", "none", "--no-progress"]
    ref = tmp_path / "ref"
    run_build(*args, "--output", str(ref))
    batches = json.loads((ref / "manifest.json").read_text())["stats"]["input_documents"] / 2000  # BATCH_DOCS
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, str(BUILD), *args, "--output", str(out)],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    commit = out / ".build" / "scan-00000.json"
    deadline = time.monotonic() + 240
    while proc.poll() is None:
        assert time.monotonic() < deadline
        try:
            if json.loads(commit.read_text())["batches"] >= 0.7 * batches:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the build finished before it could be killed"
    done = json.loads(commit.read_text())
    assert not done["done"] and done["batches"] >= 0.7 * batches
    rerun = run_build(*args, "--output", str(out))
    assert f"resuming the scan after {done['batches']} committed batches" in rerun.stderr
    assert output_bytes(out) == output_bytes(ref)
