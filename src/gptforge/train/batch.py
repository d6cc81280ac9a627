"""Batch planning: how a global batch splits into micro-batches, accumulation steps and data-parallel ranks.

A pure function of (config, world size): no process, process group or device, so a dry run can plan the
batch of a 64-GPU job on a laptop. A plan that does not divide says which global batches and which micro
batches would, for the world size given.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptforge.config import Config
from gptforge.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """Sequences per micro-batch, accumulation steps, data-parallel ranks, and their product."""

    micro_batch: int
    grad_accum: int
    dp: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp


def data_parallel_size(cfg: Config, world_size: int) -> int:
    """dp = world size / (tp x pp)."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if tp < 1 or pp < 1 or world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp x parallel.pp = {tp} x {pp}; "
            f"launch a multiple of {tp * pp} processes or change tp/pp (dp = world size / (tp x pp))"
        )
    return world_size // (tp * pp)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _or_list(values: list[int]) -> str:
    shown = [str(v) for v in values[:6]] + (["..."] if len(values) > 6 else [])
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"


def batch_advice(global_batch: int, micro_batch: int, dp: int) -> str:
    """What would divide: the nearest global batches for this micro batch, and the micro batches that fit
    this global batch (if any does: it must be a multiple of dp)."""
    per_step = micro_batch * dp
    below = global_batch // per_step * per_step
    near = [g for g in (below, below + per_step) if g > 0]
    advice = f"use a global batch that is a multiple of {per_step} (e.g. {' or '.join(map(str, near))})"
    if global_batch % dp == 0:
        per_rank = global_batch // dp
        fits = _divisors(per_rank)
        return (
            f"{advice}, or a train.micro_batch_size that divides {global_batch}/{dp} = {per_rank} "
            f"({_or_list(fits)})"
        )
    return (
        f"{advice}; no train.micro_batch_size fits {global_batch} sequences on {dp} data-parallel ranks "
        f"({global_batch}/{dp} is not a whole number)"
    )


def plan_batch(cfg: Config, world_size: int) -> BatchPlan:
    """Gradient accumulation from the global batch (sequences or tokens), the micro batch and the
    data-parallel size that `world_size` processes give under the config's tp x pp."""
    dp = data_parallel_size(cfg, world_size)
    t, ctx = cfg.train, cfg.model.context_length
    if t.micro_batch_size < 1:
        raise ConfigError(f"train.micro_batch_size must be >= 1, got {t.micro_batch_size}")
    per_step = t.micro_batch_size * dp
    if t.global_batch_tokens is not None:
        if t.global_batch_size is not None:
            raise ConfigError(
                "set train.global_batch_size (sequences) or train.global_batch_tokens, not both"
            )
        if t.global_batch_tokens % ctx:
            raise ConfigError(
                f"train.global_batch_tokens={t.global_batch_tokens} is not a multiple of model.context_length={ctx}"
            )
        global_batch = t.global_batch_tokens // ctx
        given = f"train.global_batch_tokens={t.global_batch_tokens} ({global_batch} sequences)"
    elif t.global_batch_size is not None:
        global_batch, given = t.global_batch_size, f"train.global_batch_size={t.global_batch_size}"
    else:
        return BatchPlan(t.micro_batch_size, 1, dp)
    if global_batch < 1:
        raise ConfigError(f"{given}: a global batch needs at least one sequence")
    if global_batch % per_step:
        raise ConfigError(
            f"{given} is not divisible by train.micro_batch_size x data-parallel ranks = "
            f"{t.micro_batch_size} x {dp} = {per_step}; {batch_advice(global_batch, t.micro_batch_size, dp)}"
        )
    return BatchPlan(t.micro_batch_size, global_batch // per_step, dp)
