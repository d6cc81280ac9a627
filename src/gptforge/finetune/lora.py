"""LoRA (Hu et al., 2021): a frozen linear layer W plus a trainable low-rank update (alpha / r) B A.

A (r x in) starts like a linear layer's weight and B (out x r) at zero, so the adapted model starts as
the base model, exactly. The adapter keeps the base layer's parameter names (`weight`, `bias`) and adds
`lora_A` / `lora_B`, so a checkpoint of an adapted model holds the base weights under their usual names;
`merge_lora_weights` (in `gptforge.weights`, which reads saved models) folds the update into them
(W + (alpha / r) B A) for generation and export.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptforge.errors import ConfigError
from gptforge.weights import merge_lora_weights as merge_lora_weights

TARGETS = ("c_attn", "c_proj", "attn.c_proj", "c_fc", "mlp.c_proj")


class LoRALinear(nn.Linear):
    """`base(x) + (alpha / r) * B(A(dropout(x)))` with `base` frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
        self.rank = rank
        self.scale = alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own initialisation
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        update = self.lora_dropout(x) @ self.lora_A.t() @ self.lora_B.t()
        return F.linear(x, self.weight, self.bias) + update * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}"


def parse_targets(spec: str) -> list[str]:
    targets = [t.strip() for t in spec.split(",") if t.strip()]
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ConfigError(
            f"finetune.lora_targets={spec!r}: {', '.join(bad) or 'empty'} is not a target; choose from "
            f"{', '.join(TARGETS)} (comma-separated; c_proj = both attention and MLP output projections)"
        )
    return targets


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: str) -> list[str]:
    """Replace the blocks' linear layers named by `targets` with LoRA adapters; freeze every other
    parameter. Returns the adapted module names."""
    wanted = parse_targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = []
    for name, module in list(model.named_modules()):
        if (
            ".h." in f".{name}"
            and isinstance(module, nn.Linear)
            and any(name.endswith("." + t) for t in wanted)
        ):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, LoRALinear(module, rank, alpha, dropout))
            adapted.append(name)
    return adapted
