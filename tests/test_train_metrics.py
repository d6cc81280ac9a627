"""Metrics records and files, MFU's peak, throughput, and the preemption flag."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from gptforge.train.metrics import (
    EVAL_KEYS,
    TRAIN_KEYS,
    MetricsWriter,
    Throughput,
    eval_record,
    format_train,
    measure_matmul_peak,
    peak_flops,
    train_record,
)
from gptforge.train.preemption import EXIT_PREEMPTED, Preemption


def test_records_have_exactly_the_contract_keys():
    r = train_record(3, 2.5, 1e-3, 0.7, 3072, 1000.0, 0.25)
    assert tuple(r) == TRAIN_KEYS == ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu")
    e = eval_record(3, 2.0)
    assert tuple(e) == EVAL_KEYS == ("step", "val_loss", "val_ppl") and e["val_ppl"] == pytest.approx(
        7.389056, rel=1e-6
    )
    line = format_train(r, 300, 0.25)
    assert (
        line
        == "step   3/300 | loss 2.5000 | lr 1.00e-03 | gnorm 0.700 | 1,000 tok/s | mfu 25.0% | 250 ms/step"
    )


def test_resume_drops_lines_after_the_checkpoint(tmp_path):
    w = MetricsWriter(tmp_path, enabled=True, tensorboard=False, resume_step=None)
    for step in range(1, 7):
        w.write(train_record(step, 1.0, 1e-3, 1.0, step, 1.0, 0.1), "train")
    w.write(eval_record(4, 1.0), "val")
    MetricsWriter(tmp_path, enabled=True, tensorboard=False, resume_step=4)
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 4]
    MetricsWriter(tmp_path, enabled=True, tensorboard=False, resume_step=None)  # a fresh run starts empty
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    MetricsWriter(tmp_path / "other", enabled=False, tensorboard=True, resume_step=None).write(
        {"step": 1}, "x"
    )
    assert not (tmp_path / "other").exists()  # non-zero ranks write nothing


def test_peak_flops_sources():
    cpu = torch.device("cpu")
    assert peak_flops(123e12, cpu, "bf16") == (123e12, "train.peak_flops")
    value, source = peak_flops(None, cpu, "fp32")
    assert value > 1e9 and source.startswith("measured")
    state = torch.get_rng_state()
    measure_matmul_peak(cpu, torch.float32, seconds=0.05, n=128)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG (training's stream) is untouched


def test_throughput():
    t = Throughput(tokens=100, step=10)
    assert t.measure(100, 10) == (0.0, 0.0)
    t.start_time -= 2.0  # as if two seconds had passed
    rate, step_time = t.measure(500, 14)
    assert rate == pytest.approx(200, rel=0.05) and step_time == pytest.approx(0.5, rel=0.05)


def test_preemption_signals_set_a_flag_instead_of_killing():
    before = signal.getsignal(signal.SIGTERM)
    p = Preemption().install()
    try:
        assert not p.received
        os.kill(os.getpid(), signal.SIGUSR1)
        assert p.received and p.signum == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGTERM)
        assert p.signum == signal.SIGTERM
    finally:
        p.uninstall()
    assert signal.getsignal(signal.SIGTERM) == before  # the previous handler is back
    assert EXIT_PREEMPTED == 75
