"""One job per run directory (issue 13 req 7), with real processes: a second trainer started on the run
directory of a running one is refused with one error line before it writes anything; once the first is
killed (-9, its lock left behind), the next start takes the stale lock over with a warning and trains."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from train_helpers import ROOT, metrics, run, sentencepiece_data, train_cmd, write_config

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def test_a_second_job_on_a_running_run_directory_is_refused(tmp_path):
    from conftest import subprocess_env

    data = sentencepiece_data(tmp_path / "sp")
    run_dir = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml", data, run_dir, "train.max_steps=100000", "train.eval_interval=100000"
    )
    log = tmp_path / "first.log"
    first = subprocess.Popen(
        train_cmd(cfg, resume="none"),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=subprocess_env(),
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "metrics.jsonl").is_file() or not metrics(run_dir)[0]:
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        second = run(train_cmd(cfg, "train.max_steps=2", resume="auto"), timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert "error: " in second.stderr and "is in use by another job (pid" in second.stderr
        assert first.poll() is None  # the first run goes on
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    assert (run_dir / ".lock").is_file()  # a kill -9 leaves it
    third = run(train_cmd(cfg, "train.max_steps=1", resume="auto"), timeout=300)  # already there: stops
    assert third.returncode == 0, third.stderr[-3000:]
    assert "taking over the stale lock" in third.stderr
    assert not (run_dir / ".lock").exists()  # released at the end
