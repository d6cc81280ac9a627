"""The one trainer and its tasks: a new kind of run is a `Task` and nothing else; the batch plan is a pure
function of (config, world size) whose errors name batches that would work; the tokenizer a run samples
with loads at start-up."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import ROOT, metrics, run, train_cmd, write_build, write_config

from gptforge.config import load_config
from gptforge.errors import ConfigError
from gptforge.train.batch import plan_batch

COPY_TASK = str(ROOT / "tests" / "workers" / "copy_task.py")


def _copy_run(run_dir: Path, steps: int) -> None:
    result = run([sys.executable, COPY_TASK, str(run_dir), str(steps)], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_new_task_is_trained_saved_and_resumed_by_the_unchanged_trainer(tmp_path):
    _copy_run(tmp_path / "whole", 6)
    _copy_run(tmp_path / "stopped", 4)
    _copy_run(tmp_path / "stopped", 6)  # --resume auto: continues from step_4

    whole_train, whole_val = metrics(tmp_path / "whole")
    stopped_train, stopped_val = metrics(tmp_path / "stopped")
    assert [r["loss"] for r in stopped_train] == [r["loss"] for r in whole_train]  # exact resume
    assert [r["val_loss"] for r in stopped_val] == [r["val_loss"] for r in whole_val]
    assert [r["step"] for r in whole_val] == [0, 2, 4, 6]
    assert all(0.0 <= r["val_copy_accuracy"] <= 1.0 for r in whole_val)  # the task's own metric
    meta = json.loads((tmp_path / "whole" / "checkpoints" / "step_6" / "checkpoint.json").read_text())
    assert meta["copy"] == {"sequences": 32}  # the task's own checkpoint block
    assert meta["data"]["path"] == "random sequences" and meta["tokenizer"]["name"] == "none"


def _cfg(*overrides: str):
    return load_config(None, ["model.vocab_size=50", *overrides])


def test_batch_plan_errors_name_global_and_micro_batches_that_fit():
    with pytest.raises(ConfigError) as err:  # slurm/pretrain_8node.sh's shape: 8 nodes x 8 GPUs
        plan_batch(_cfg("train.global_batch_size=480", "train.micro_batch_size=2"), 64)
    message = str(err.value)
    assert "2 x 64 = 128; use a global batch that is a multiple of 128 (e.g. 384 or 512)" in message
    assert "no train.micro_batch_size fits 480 sequences on 64 data-parallel ranks" in message

    with pytest.raises(
        ConfigError,
        match=r"multiple of 192 \(e\.g\. 384 or 576\), or a train\.micro_batch_size "
        r"that divides 512/64 = 8 \(1, 2, 4 or 8\)",
    ):
        plan_batch(_cfg("train.global_batch_size=512", "train.micro_batch_size=3"), 64)

    # tp x pp take their share of the world first: 64 GPUs at tp 2 x pp 2 are 16 data-parallel ranks
    plan = plan_batch(
        _cfg(
            "train.global_batch_size=512",
            "train.micro_batch_size=4",
            "parallel.tp=2",
            "parallel.pp=2",
            "model.n_head=4",
            "model.d_model=32",
        ),
        64,
    )
    assert (plan.dp, plan.micro_batch, plan.grad_accum, plan.global_batch) == (16, 4, 8, 512)
    assert not torch.distributed.is_initialized()  # pure: no process group was needed


def test_a_tokenizer_that_cannot_load_fails_at_start_up_not_at_the_first_sample(tmp_path):
    tokenizer = {
        "name": "sentencepiece",
        "model": str(tmp_path / "gone.model"),
        "vocab_size": 64,
        "eot_id": 0,
    }
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 64, 200).astype(np.uint16) for _ in range(6)]
    data = tmp_path / "data"
    write_build(data, {"train": docs[:5], "val": docs[5:]}, tokenizer)
    config = write_config(
        tmp_path / "c.yaml", data, tmp_path / "run", "train.max_steps=8", "train.sample_interval=4"
    )
    result = run(train_cmd(config))
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "gone.model" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "step 1" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
