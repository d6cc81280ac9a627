"""What one kind of run brings to the `Trainer`: pretraining, classification, instruction tuning, ...

The `Trainer` (`gptforge.train.loop`) owns everything every run shares: process start-up, the batch plan,
the DeepSpeed engine, the loop, when to evaluate, sample and save, checkpoints and resuming, metrics and
the logs. A task says only what differs: its data and model, its evaluation and its metrics, what its
checkpoints record beyond the trainer's own, and how it counts tokens. A new kind of run (a preference-
tuning task, say) is one new subclass; no loop code changes.

Every hook runs on every rank (setup_lines on rank 0 only), in this order:

    prepare(cfg)             before any process group: read and check the inputs (a bad one fails at once)
    setup(run)               data and model: returns this rank's module and the config as resolved;
                             by its end train_batches, val_batches, tokenizer_info, data_source and
                             data_sha256 are set
    check_resume(run, meta)  refuse a checkpoint this task cannot continue
    resumed(run, meta)       after the engine loaded a checkpoint
    flops_per_token(m)       training FLOPs per token of model config `m` (for MFU)
    setup_lines(run)         what the start-of-run log says about the model and the data
    begin(run) ... end(run)  around the loop (end only after a run that reached train.max_steps)
    evaluate(run)            the val metrics (`val_loss` at least), at each evaluation
    sample(run)              at each `train.sample_interval`
    tokens(consumed)         tokens trained on after `consumed` samples (tokens/s, MFU, metrics)
    step_metrics(consumed)   more fields for a training metrics line
    checkpoint_meta(run, m)  what a checkpoint's metadata `m` records beyond the trainer's own

`run` is the Trainer: its `cfg`, `model_cfg`, `dist` (ranks, collectives, `topology`), `plan` (the batch
plan), `engine`, `state` (step, samples consumed) and `metrics` are there for the hooks to read.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from gptforge.config import Config, ModelConfig

if TYPE_CHECKING:
    from gptforge.train.loop import Trainer

Batch = tuple[Tensor, Tensor]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Task:
    """The hooks, with what a task that needs nothing there does (see the module docstring)."""

    name = "task"
    log = logging.getLogger("train")
    # The model has tensor/pipeline-parallel variants and gathers ZeRO-3 weights where it needs them: any
    # layout runs, and a checkpoint resumes under another layout (from its universal/ files). Otherwise
    # the run is data parallel with ZeRO 0 or 1 only (the module is used as is).
    model_parallel = False

    train_batches: Any  # `.step(consumed)`: this rank's micro-batches of the next global batch
    val_batches: list[Batch]  # this rank's share of the fixed validation set ([] = no evaluation)
    tokenizer_info: dict[str, Any]  # the tokenizer's description, as a checkpoint records it
    data_source: str  # what the run trains on, as a checkpoint names it
    data_sha256: str  # the data's fingerprint: resuming on other data is refused unless allowed

    def prepare(self, cfg: Config) -> None:
        """Before any process group: read and check what can be checked alone."""

    def setup(self, run: Trainer) -> tuple[nn.Module, Config]:
        """The data and model: this rank's module for DeepSpeed, and the run's config as resolved."""
        raise NotImplementedError

    def check_resume(self, run: Trainer, meta: dict[str, Any]) -> None:
        """Refuse a checkpoint this task cannot continue (the trainer checks shape, data and layout)."""

    def resumed(self, run: Trainer, meta: dict[str, Any]) -> None:
        """After the engine loaded the checkpoint whose metadata is `meta`."""

    def setup_lines(self, run: Trainer) -> tuple[list[str], list[str]]:
        """The start-of-run log: (lines before the layout line, lines after it)."""
        return [], []

    def begin(self, run: Trainer) -> None:
        """Before the first step of this process (also on resume)."""

    def end(self, run: Trainer) -> None:
        """After the last step, when the run reached train.max_steps (not after a preemption)."""

    def evaluate(self, run: Trainer) -> dict[str, Any]:
        """The metrics of one evaluation over `val_batches`: `val_loss`, and any others."""
        raise NotImplementedError

    def sample(self, run: Trainer) -> None:
        """At each train.sample_interval: show what the model does now (nothing by default)."""

    def tokens(self, consumed: int) -> int:
        """Tokens trained on after `consumed` samples: a function of the position, so exact on resume."""
        raise NotImplementedError

    def step_metrics(self, consumed: int) -> dict[str, Any]:
        """More fields for the training metrics line after `consumed` samples (none by default)."""
        return {}

    def flops_per_token(self, model_cfg: ModelConfig) -> float:
        """Training FLOPs per token, for MFU."""
        raise NotImplementedError

    def checkpoint_meta(self, run: Trainer, meta: dict[str, Any]) -> None:
        """Add to a checkpoint's metadata what the trainer's (model, tokenizer, data, layout, config) lacks."""
