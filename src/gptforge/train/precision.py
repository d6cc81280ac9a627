"""Precision: what `train.precision` means on this device, and what this CPU can do natively.

`precision_mode` maps the config's precision to how it runs (`fp32`, `autocast`, `bf16`, `fp16`); the
DeepSpeed config (`gptforge.train.engine`), evaluation (`gptforge.evaluate.in_precision`) and checkpoint
metadata all speak in these modes. `cpu_supports_bf16` reads the CPU's features from /proc/cpuinfo.
"""

from __future__ import annotations

import logging

import torch

from gptforge.errors import ConfigError

log = logging.getLogger(__name__)


def cpu_supports_bf16() -> bool:
    """Native bf16 matmuls (avx512_bf16 or AMX), read from /proc/cpuinfo (False where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def precision_mode(precision: str, device: torch.device) -> str:
    """How a precision runs here: `fp32`; `autocast` (bf16 matmuls under torch.autocast over fp32 weights:
    on CPU as fast as DeepSpeed's bf16, and weights, loss and gradient all-reduce stay fp32); `bf16` /
    `fp16` (DeepSpeed's mixed precision on GPU: half-precision weights, fp32 master copy, dynamic loss
    scaling for fp16)."""
    if precision == "fp32":
        return "fp32"
    if device.type == "cpu":
        if precision == "fp16":
            raise ConfigError("train.precision=fp16 needs a GPU (loss-scaled fp16); use bf16 or fp32 on CPU")
        if not cpu_supports_bf16():
            # Runs correctly (PyTorch emulates bf16 matmuls), only slowly: warn, refuse nothing.
            log.warning(
                "train.precision=bf16: this CPU has no native bf16 (avx512_bf16 or AMX), so bf16 matmuls are "
                "emulated and slow; train.precision=fp32 is faster here"
            )
        return "autocast"
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision=bf16: this GPU does not support bf16; use fp16 or fp32")
    return precision
