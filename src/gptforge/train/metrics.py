"""What a run reports: metrics.jsonl, TensorBoard, one console line per log step, throughput and MFU.

MFU = model FLOPs per token (`gptforge.model.flops_per_token`: 6 x matmul weights + attention, forward and
backward) x tokens/s / peak FLOP/s of all ranks. The peak is `train.peak_flops` (per rank) if set, else a
known figure for the GPU model, else measured once at start with a short matmul loop (CPUs and unknown GPUs).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

METRICS_FILE = "metrics.jsonl"
TRAIN_KEYS = ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu")
EVAL_KEYS = ("step", "val_loss", "val_ppl")

# Dense peak FLOP/s per GPU from the vendors' data sheets: (bf16/fp16 tensor core, fp32 incl. TF32).
GPU_PEAKS: dict[str, tuple[float, float]] = {
    "H200": (989e12, 494e12),
    "H100": (989e12, 494e12),  # SXM; the PCIe card is lower: set train.peak_flops
    "A100": (312e12, 156e12),
    "A10G": (70e12, 35e12),
    "L40S": (362e12, 183e12),
    "L4": (121e12, 60e12),
    "V100": (125e12, 15.7e12),
}


def measure_matmul_peak(
    device: torch.device, dtype: torch.dtype, seconds: float = 0.3, n: int = 1024
) -> float:
    """FLOP/s of a square matmul on this device and dtype: the best of many single-matmul samples over
    `seconds` (on a shared machine the least disturbed sample is the closest to the hardware's peak)."""
    gen = torch.Generator(device).manual_seed(0)  # its own generator: training's RNG stream is untouched
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    a @ b  # warm-up (kernel selection, caches)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(configured: float | None, device: torch.device, precision: str) -> tuple[float, str]:
    """Peak FLOP/s of one rank and where the figure comes from (for the log)."""
    if configured:
        return configured, "train.peak_flops"
    half = precision in ("bf16", "fp16")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half_peak, fp32_peak) in GPU_PEAKS.items():
            if key in name:
                return (half_peak if half else fp32_peak), f"data sheet of {name}"
    dtype = torch.bfloat16 if half else torch.float32
    peak = measure_matmul_peak(device, dtype)
    return peak, f"measured: 1024x1024 {dtype} matmul loop on {device} ({torch.get_num_threads()} threads)"


class Throughput:
    """Tokens per second and seconds per step since the last `reset` (time spent evaluating, sampling and
    saving is left out by resetting after them)."""

    def __init__(self, tokens: int = 0, step: int = 0) -> None:
        self.reset(tokens, step)

    def reset(self, tokens: int, step: int) -> None:
        self.start_time = time.perf_counter()
        self.start_tokens = tokens
        self.start_step = step

    def measure(self, tokens: int, step: int) -> tuple[float, float]:
        elapsed = time.perf_counter() - self.start_time
        if elapsed <= 0 or step <= self.start_step:
            return 0.0, 0.0
        return (tokens - self.start_tokens) / elapsed, elapsed / (step - self.start_step)


class MetricsWriter:
    """metrics.jsonl and TensorBoard (rank 0 only; other ranks get a writer that does nothing).

    On resume from step N, lines and events after N (written before the interruption) are dropped, so
    the files read as if the run had never stopped."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None) -> None:
        self.enabled = enabled
        self.path = run_dir / METRICS_FILE
        self.tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if _step(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(
                str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None
            )

    def write(self, record: dict[str, Any], prefix: str) -> None:
        """One metrics.jsonl line (JSON has no NaN/Infinity: a non-finite value is written as null) and
        the same scalars in TensorBoard under `prefix/`."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(_finite(record)) + "\n")
        if self.tb is not None:
            for key, value in _scalars(record):
                if key != "step" and value is not None:
                    self.tb.add_scalar(f"{prefix}/{key}", value, record["step"])
            self.tb.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _finite(value: Any) -> Any:
    """`value` with every non-finite float (also inside per-source objects) as None."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _scalars(record: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """A record's scalars for TensorBoard; per-source objects become `tokens_by_source/web` etc."""
    out = []
    for key, value in record.items():
        if isinstance(value, dict):
            out += _scalars(value, f"{prefix}{key}/")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1


def train_record(
    step: int, loss: float, lr: float, grad_norm: float, tokens: int, tokens_per_s: float, mfu: float
) -> dict[str, Any]:
    """A metrics.jsonl training line: exactly the keys the README's run directory promises (TRAIN_KEYS)."""
    return dict(zip(TRAIN_KEYS, (step, loss, lr, grad_norm, tokens, tokens_per_s, mfu), strict=True))


def eval_record(step: int, val_loss: float) -> dict[str, Any]:
    import math

    ppl = math.exp(val_loss) if val_loss < 700 else float("inf")
    return dict(zip(EVAL_KEYS, (step, val_loss, ppl), strict=True))


def format_train(record: dict[str, Any], max_steps: int, step_time: float) -> str:
    """One compact console line per log step."""
    return (
        f"step {record['step']:>{len(str(max_steps))}}/{max_steps} | loss {record['loss']:.4f} | "
        f"lr {record['lr']:.2e} | gnorm {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s | "
        f"mfu {100 * record['mfu']:.1f}% | {1000 * step_time:.0f} ms/step"
    )
