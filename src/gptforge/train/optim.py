"""AdamW parameter groups, the step guard (norm, clip, skip non-finite), and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gptforge.config import OptimConfig
from gptforge.model.tensor_parallel import VocabParallelEmbedding


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weight decay on the matmul weights only; none on biases, LayerNorms and embeddings
    (decaying them only pulls positions, tokens and gains toward zero). A tied LM head is the token
    embedding, so it is not decayed either. Each parameter appears once."""
    no_decay_ids = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if isinstance(module, (nn.Embedding, VocabParallelEmbedding, nn.LayerNorm)) or p.ndim < 2:
                no_decay_ids.add(id(p))
    decay, no_decay = [], []
    for p in model.parameters():  # deduplicated: a tied weight is yielded once
        if p.requires_grad:
            (no_decay if id(p) in no_decay_ids else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class AdamW(torch.optim.AdamW):
    """torch's AdamW, plus (when `guard`) what DeepSpeed's ZeRO and mixed-precision optimizers do around
    their step but leave undone with a plain optimizer: the global gradient norm, clipping to
    `max_grad_norm`, and skipping a step whose gradients are not finite. `_global_grad_norm` and
    `overflow` are the attributes DeepSpeed's engine reads after each step (an overflow counts as a
    skipped step and the LR scheduler does not advance), so every layout reports the same way.

    Without `guard` (ZeRO >= 1, or DeepSpeed's bf16/fp16) DeepSpeed has done all three on its flat
    partitions before calling this step.

    Under tensor or pipeline parallelism each rank holds part of the model: `norm_counts(p)` says whether
    this rank's copy of `p` is counted (a weight replicated on several ranks is counted on one), and the
    squared norms are summed over `norm_group` (the model-parallel group), so every rank clips by the norm
    of the whole model, as one process would."""

    def __init__(
        self,
        params: Any,
        *,
        guard: bool = False,
        max_grad_norm: float = 0.0,
        norm_group: Any = None,
        norm_counts: Callable[[torch.Tensor], bool] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, **kwargs)
        self.guard = guard
        self.max_grad_norm = max_grad_norm
        self.norm_group = norm_group
        self.norm_counts = norm_counts
        self.overflow = False
        self._global_grad_norm: torch.Tensor | None = None

    def _grad_norm(self, params: list[torch.Tensor]) -> torch.Tensor:
        grads = [p.grad for p in params if self.norm_counts is None or self.norm_counts(p)]
        if self.norm_group is None:
            return torch.nn.utils.get_total_norm(grads, foreach=True)
        device = self.param_groups[0]["params"][0].device  # a stage may count no gradient of its own
        norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros((), device=device)
        squared = norm.double().square()
        torch.distributed.all_reduce(squared, group=self.norm_group)
        return squared.sqrt().to(norm.dtype)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if self.guard:
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            norm = self._grad_norm(params)
            self._global_grad_norm = norm
            self.overflow = not bool(torch.isfinite(norm))
            if self.overflow:
                return None
            if self.max_grad_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, norm, foreach=True)
        return super().step(closure)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from lr/warmup to lr over
    `warmup_steps`, then cosine / linear decay to `min_lr` at `decay_steps` (default max_steps), or
    constant; `min_lr` after the decay. A pure function of the step, so resuming needs no scheduler state."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = cfg.decay_steps if cfg.decay_steps is not None else max_steps
    span = decay_steps - cfg.warmup_steps
    if span <= 0 or step >= decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / span
    factor = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return cfg.min_lr + factor * (cfg.lr - cfg.min_lr)


def set_lr(optimizer: Any, lr: float) -> None:
    """Set every group's learning rate (DeepSpeed's wrappers expose the inner optimizer's groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
