"""Faults a cluster job meets, with real processes and real `kill -9`: a rank dies mid-run (the job must
fail fast, not hang until a collective times out, and `--resume auto` must continue from the last
complete checkpoint), and the trainer dies while a checkpoint is being written (the half-written
checkpoint must be ignored on resume, and the previous one resume bit for bit)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from train_helpers import ROOT, losses, metrics, run, sentencepiece_data, train_cmd, write_config

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return sentencepiece_data(tmp_path_factory.mktemp("sp"))


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    from conftest import subprocess_env

    return subprocess.Popen(
        cmd,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=subprocess_env(),
        cwd=ROOT,
        start_new_session=True,
    )


def _wait_for(predicate, timeout: float, proc: subprocess.Popen, log: Path, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"training exited early ({proc.returncode}):\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"condition not reached in {timeout}s:\n{log.read_text()[-4000:]}")
        time.sleep(poll)


def _logged_steps(run_dir: Path) -> int:
    try:
        return len(metrics(run_dir)[0])
    except (FileNotFoundError, ValueError):  # not yet written, or a line being written
        return 0


def _saved_step(run_dir: Path) -> int | None:
    """The step `checkpoints/latest` names (moved only once a checkpoint is durable), or None."""
    try:
        return int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def _freeze_past_a_checkpoint(
    ranks: dict[int, psutil.Process], run_dir: Path, proc: subprocess.Popen, log: Path
) -> int:
    """Stop every rank (SIGSTOP) at a moment when a checkpoint is durable and steps past it are logged;
    returns its step. While stopped nothing moves, so a kill then leaves exactly that `latest` (a later save
    cannot complete without the killed rank) and steps to recompute. Polling alone races the async saves:
    a fast run can log the steps past one save before `latest` names it."""
    while True:
        _wait_for(lambda: _saved_step(run_dir) is not None and _logged_steps(run_dir) >= 5, 240, proc, log)
        for p in ranks.values():
            p.send_signal(signal.SIGSTOP)
        saved = _saved_step(run_dir)
        if saved is not None and _logged_steps(run_dir) > saved:
            return saved
        for p in ranks.values():
            p.send_signal(signal.SIGCONT)


def _trainer_ranks(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    """The `launch/train.py` worker processes under a torchrun, by their RANK."""
    ranks = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if any(a.endswith("launch/train.py") for a in child.cmdline()) and "-m" not in child.cmdline():
                ranks[int(child.environ()["RANK"])] = child
        except (psutil.NoSuchProcess, KeyError):
            continue
    return ranks


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_kill9_of_one_rank_fails_fast_then_resume_continues(data, tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml",
        data,
        run_dir,
        "train.max_steps=14",
        "train.save_interval=4",
        "train.eval_interval=100",
        "run.dist_timeout_s=60",
    )
    log = tmp_path / "first.log"
    proc = _start(train_cmd(cfg, resume="none", nproc=2), log)
    _wait_for(lambda: sorted(_trainer_ranks(proc)) == [0, 1], 240, proc, log)
    ranks = _trainer_ranks(proc)
    saved = _freeze_past_a_checkpoint(ranks, run_dir, proc, log)
    killed_at = time.monotonic()
    ranks[1].send_signal(signal.SIGKILL)
    ranks[0].send_signal(signal.SIGCONT)
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the job hung after rank 1 was killed:\n{log.read_text()[-4000:]}")
    elapsed = time.monotonic() - killed_at
    assert code != 0, log.read_text()[-3000:]
    # Well inside run.dist_timeout_s: the surviving rank does not wait for a collective to time out.
    assert elapsed < 45, f"took {elapsed:.1f}s to fail"
    assert not any(_alive(p) for p in ranks.values()), "a rank outlived the job"
    first = losses(run_dir)  # every step the killed job logged

    ckpts = run_dir / "checkpoints"
    last_complete = (ckpts / "latest").read_text().strip()
    assert last_complete == f"step_{saved}" and saved in {4, 8, 12}
    resumed_from = int(last_complete.split("_")[1])

    result = run(train_cmd(cfg, resume="auto", nproc=2), timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"resumed from {ckpts / last_complete} (step {resumed_from}," in result.stderr
    after = losses(run_dir)
    assert max(after) == 14
    # Steps recomputed after the resume give bitwise the losses the killed run logged for them.
    recomputed = [s for s in first if s > resumed_from]
    assert recomputed, "the kill came before any step past the last checkpoint"
    assert all(after[s] == first[s] for s in recomputed)
    # Every step is in the log exactly once after the resume (the log is truncated to the checkpoint).
    assert [r["step"] for r in metrics(run_dir)[0]] == list(range(1, 15))


@pytest.mark.parametrize("async_save", ["true", "false"])
def test_kill9_during_checkpoint_write_is_ignored_on_resume(data, tmp_path, async_save):
    """Killed while a checkpoint is written (in the background, or in the loop's time): `latest` still
    names the previous one, which resumes bit for bit; the half-written one is removed."""
    run_dir = tmp_path / "run"
    # A model whose checkpoint takes long enough to write that a poll catches it half-done.
    cfg = write_config(
        tmp_path / "c.yaml",
        data,
        run_dir,
        "model.n_layer=4",
        "model.d_model=256",
        "model.n_head=4",
        "train.max_steps=40",
        "train.save_interval=1",
        "train.keep_last=2",
        "train.eval_interval=100",
        f"train.async_save={async_save}",
    )
    log = tmp_path / "first.log"
    proc = _start(train_cmd(cfg, resume="none"), log)
    ckpts = run_dir / "checkpoints"

    def writing() -> list[Path]:
        if not (ckpts / "latest").is_file():
            return []
        return [p for p in ckpts.glob("step_*.tmp") if any(p.iterdir())]

    _wait_for(lambda: bool(writing()), 240, proc, log, poll=0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    half = writing()
    assert half, "the write finished before the kill; nothing half-written to test"
    half_step = int(half[0].name.split("_")[1].split(".")[0])
    latest = (ckpts / "latest").read_text().strip()
    assert latest != f"step_{half_step}" and int(latest.split("_")[1]) < half_step
    first = losses(run_dir)  # every step the killed run logged (the writer runs beside the steps)

    result = run(train_cmd(cfg, resume="auto"), timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"resumed from {ckpts / latest} (step" in result.stderr
    resumed_from = int(latest.split("_")[1])
    recomputed = [s for s in first if s > resumed_from]
    assert recomputed and all(losses(run_dir)[s] == first[s] for s in recomputed)  # bitwise
    assert not list(ckpts.glob("*.tmp")), "the half-written checkpoint was not cleaned up"
    assert (ckpts / "latest").read_text().strip() == "step_40"
    assert [r["step"] for r in metrics(run_dir)[0]] == list(range(1, 41))
