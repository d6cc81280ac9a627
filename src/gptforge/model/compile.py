"""`train.compile: true`: each transformer block through `torch.compile`, where that works.

Blocks, not the whole model: every block has the same code, so one compiled graph serves all of them (and
every pipeline stage), the embedding, head and loss (already chunked, `model/loss.py`) stay eager, and the
parallel wrappers see the same modules. `nn.Module.compile` compiles in place, so parameter names, state
dicts and checkpoints are unchanged. Where compiling cannot work the run goes on eagerly and says why once.
"""

from __future__ import annotations

import logging
import shutil

from torch import nn

from gptforge.config import ParallelConfig
from gptforge.model.gpt import Block

log = logging.getLogger("train")


def why_not_compile(parallel: ParallelConfig, device_type: str) -> str | None:
    """Why `torch.compile` cannot run this layout, or None."""
    if parallel.zero_stage == 3:
        return "ZeRO-3 gathers each block's weights in module hooks that a compiled block would skip"
    if parallel.activation_checkpointing:
        return "activation checkpointing replaces each block's forward with DeepSpeed's recompute"
    if device_type == "cpu" and shutil.which("g++") is None and shutil.which("c++") is None:
        return "torch.compile on CPU needs a C++ compiler (g++) and there is none on PATH"
    return None


def compile_blocks(model: nn.Module, parallel: ParallelConfig) -> int:
    """Compile every `Block` of `model` (a GPT, tensor-parallel or not, or a pipeline stage) in place;
    the number compiled (0 after a logged fallback to eager)."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    device = next(model.parameters()).device.type
    reason = why_not_compile(parallel, device)
    if reason is not None:
        log.warning("train.compile: not compiling (%s); training eagerly", reason)
        return 0
    for block in blocks:
        block.compile()
    log.info("train.compile: %d blocks compiled with torch.compile (compiled on the first step)", len(blocks))
    return len(blocks)
