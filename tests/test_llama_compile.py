"""`train.compile: true` (issue 16): the blocks go through torch.compile in the DeepSpeed engine, and 20
steps of a Llama-style tiny model on CPU give the eager losses within 1e-4; layouts where compiling cannot
work train eagerly after one logged line."""

from __future__ import annotations

import logging

import pytest
import torch
from train_helpers import TINY_LLAMA, losses, run, sentencepiece_data, train_cmd, write_config

from gptforge.config import ModelConfig, ParallelConfig
from gptforge.model import GPT
from gptforge.model.compile import compile_blocks, why_not_compile

LLAMA = [
    *TINY_LLAMA,
    "train.max_steps=20",
    "train.save_interval=1000",
    "train.eval_interval=1000",
]


@pytest.mark.slow
def test_compiled_training_equals_eager(tmp_path):
    data = sentencepiece_data(tmp_path / "sp", vocab_size=400, chars=100_000)
    config = write_config(tmp_path / "c.yaml", data, tmp_path / "unused", *LLAMA)
    eager = run(train_cmd(config, f"run.dir={tmp_path / 'eager'}"), timeout=600)
    assert eager.returncode == 0, eager.stderr[-3000:]
    compiled = run(train_cmd(config, f"run.dir={tmp_path / 'compiled'}", "train.compile=true"), timeout=900)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert "train.compile: 2 blocks compiled with torch.compile" in compiled.stderr
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert list(a) == list(b) == list(range(1, 21))
    assert max(abs(a[s] - b[s]) / a[s] for s in a) <= 1e-4, (a, b)
    assert a[20] < a[1]  # it trained


def test_layouts_that_cannot_compile_fall_back_with_a_reason(caplog):
    model = GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, context_length=16, vocab_size=64))
    with caplog.at_level(logging.WARNING, logger="train"):
        assert compile_blocks(model, ParallelConfig(zero_stage=3)) == 0
    assert "train.compile: not compiling (ZeRO-3 gathers" in caplog.text
    assert why_not_compile(ParallelConfig(activation_checkpointing=True), "cpu").startswith("activation")
    assert why_not_compile(ParallelConfig(tp=2, pp=2, zero_stage=1), "cuda") is None
    x = torch.randint(0, 64, (1, 8))
    assert torch.equal(model(x)[0], model(x)[0])  # still the eager module
