"""Which weights a fine-tuning run moves: all of them (the default), only the last N blocks + the final
LayerNorm + the head, or LoRA adapters (plus a classifier's new head, which has nothing to adapt)."""

from __future__ import annotations

from torch import nn

from gptforge.errors import ConfigError
from gptforge.finetune.config import FinetuneConfig
from gptforge.finetune.lora import apply_lora


def select_trainable(model: nn.Module, ft: FinetuneConfig, head: nn.Module | None) -> str:
    """Freeze what `ft` says stays fixed; returns a description for the log. `head`: the output layer
    trained along with the selected layers (a classifier's new head; an untied LM head outside LoRA; None
    for a tied LM head, which is the token embedding and stays frozen with it)."""
    blocks = model.transformer.h
    if ft.lora_rank:
        adapted = apply_lora(model, ft.lora_rank, ft.lora_alpha, ft.lora_dropout, ft.lora_targets)
        if head is not None:
            head.requires_grad_(True)
        extra = " + head" if head is not None else ""
        return f"LoRA rank {ft.lora_rank}, alpha {ft.lora_alpha:g} on {len(adapted)} modules ({ft.lora_targets}){extra}"
    if ft.train_layers:
        if ft.train_layers > len(blocks):
            raise ConfigError(
                f"finetune.train_layers={ft.train_layers} but the model has {len(blocks)} blocks"
            )
        model.requires_grad_(False)
        for module in (*blocks[len(blocks) - ft.train_layers :], model.transformer.ln_f, head):
            if module is not None:
                module.requires_grad_(True)
        return f"the last {ft.train_layers} of {len(blocks)} blocks + final LayerNorm" + (
            " + head" if head is not None else ""
        )
    return "all layers"


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, a tied weight counted once."""
    params = list(model.parameters())  # deduplicated
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
