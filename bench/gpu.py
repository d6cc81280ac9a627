"""The GPU measurements `bench/gpu.sh` runs (one GPU, bf16, a few minutes); results as one JSON object.

    python bench/gpu.py --out gpu.json            # on a CUDA machine (bench/gpu.sh checks for one first)
    python bench/gpu.py --smoke --out /tmp/g.json # every section at toy sizes, on CPU too: the code runs

Sections (each one's failure is recorded in the JSON as {"error": ...}, and the others still run):
- `throughput`: 124M GPT-2 (context 1024) and configs/llama-1b.yaml's shape (context 2048), bf16: our
  trainer's step (the DeepSpeed engine as launch/train.py builds it, driven by the loop's `train_step`),
  with `train.compile` off and on, beside transformers' GPT2LMHeadModel / LlamaForCausalLM (same weights,
  SDPA attention, fused AdamW, bf16 autocast) in a plain loop. tokens/s, and MFU against the GPU's dense bf16
  peak looked up by device name (`PEAK_BF16`; else the matmul peak measured here), FLOPs/token from
  `gptforge.model.flops_per_token`.
- `zero`: ZeRO stages 0-3 on one GPU: peak allocated memory over a few steps vs the planner's estimate.
- `checkpoint`: our Checkpointer saving the 124M engine (weights + AdamW moments, fp32): MB/s.
- `allreduce`: NCCL all-reduce at world size 1 (a device copy: the floor of a collective's cost).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 125e12,
    "RTX 4090": 165e12,
}
VOCAB = 50257
LLAMA = [
    "model.position_embedding=rope",
    "model.norm=rmsnorm",
    "model.mlp=swiglu",
    "model.bias=false",
    "model.n_kv_head=8",
    "model.ffn_hidden=8192",
    "model.rope_theta=500000",
]
# name -> (overrides, micro batch); smoke: the same options at toy sizes
SHAPES = {
    "gpt2-124m": (
        ["model.n_layer=12", "model.n_head=12", "model.d_model=768", "model.context_length=1024"],
        16,
    ),
    "llama-1b": (
        [
            "model.n_layer=16",
            "model.n_head=32",
            "model.d_model=2048",
            "model.context_length=2048",
            *LLAMA,
        ],
        4,
    ),
}
SMOKE = {
    "gpt2-124m": (["model.n_layer=2", "model.n_head=2", "model.d_model=64", "model.context_length=64"], 2),
    "llama-1b": (
        [
            "model.n_layer=2",
            "model.n_head=4",
            "model.d_model=64",
            "model.context_length=64",
            *LLAMA[:4],
            "model.n_kv_head=2",
            "model.ffn_hidden=128",
        ],
        2,
    ),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: torch.device) -> tuple[float, str]:
    """(FLOP/s, where the figure comes from): the table for a known GPU, else a measured matmul peak."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_BF16.items():
            if key in name:
                return flops, f"{name}: dense bf16 peak {flops / 1e12:.0f} TFLOP/s (datasheet)"
    from gptforge.train.metrics import measure_matmul_peak

    measured = measure_matmul_peak(
        device, torch.bfloat16, seconds=0.5, n=4096 if device.type == "cuda" else 512
    )
    return measured, "measured: bf16 matmul loop"


def make_config(overrides: list[str], micro_batch: int, extra: list[str] = ()) -> Any:
    from gptforge.config import load_config

    return load_config(
        None,
        [
            *overrides,
            f"model.vocab_size={VOCAB}",
            "model.dropout=0.0",
            f"train.micro_batch_size={micro_batch}",
            "train.precision=bf16",
            "optim.lr=1e-4",
            "optim.grad_clip=1.0",
            "train.async_save=false",
            *extra,
        ],
    )


def _batch(cfg: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    tokens = torch.randint(
        0, VOCAB, (cfg.train.micro_batch_size, cfg.model.context_length + 1), device=device
    )
    y = tokens[:, 1:].clone()
    y[:, -1] = -100  # the peer has no target for the last position
    return tokens[:, :-1], y


def _engine(cfg: Any, dist_ctx: Any, device: torch.device, state: dict | None = None) -> Any:
    from gptforge.model import GPT
    from gptforge.train.batch import plan_batch
    from gptforge.train.engine import build_engine
    from gptforge.train.precision import precision_mode

    torch.manual_seed(0)
    model = GPT(cfg.model)
    if state is not None:
        model.load_state_dict(state)
    mode = precision_mode(cfg.train.precision, device)
    return build_engine(cfg, model.to(device).train(), plan_batch(cfg, 1), mode, dist_ctx)


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per step, after `warmup` steps (compilation happens there)."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def throughput(
    shape: str, shapes: dict, dist_ctx: Any, device: torch.device, peak: float, steps: int
) -> list:
    from gptforge.hf import to_hf
    from gptforge.model import GPT, flops_per_token
    from gptforge.train.loop import train_step

    overrides, micro = shapes[shape]
    cfg = make_config(overrides, micro)
    x, y = _batch(cfg, device)
    tokens = x.numel()
    flops = flops_per_token(cfg.model) * tokens
    rows = []

    def row(name: str, seconds: float, **more: Any) -> None:
        rows.append(
            {
                "shape": shape,
                "row": name,
                "tokens_per_s": tokens / seconds,
                "step_s": seconds,
                "mfu": flops / seconds / peak,
                **more,
            }
        )
        print(
            f"  {shape:10s} {name:42s} {tokens / seconds:12,.0f} tok/s  MFU {100 * flops / seconds / peak:5.1f}%"
        )

    torch.manual_seed(0)
    reference = GPT(cfg.model)
    state = reference.state_dict()
    peer_s, peer_name = _peer_seconds(to_hf(reference, cfg.model), x, device, steps)
    del reference
    row(f"transformers {peer_name} (peer)", peer_s, vs_peer=1.0)
    _free(device)
    for compiled in (False, True):
        run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=compiled))
        engine = _engine(run_cfg, dist_ctx, device, state)
        seconds = time_steps(lambda e=engine: train_step(e, [(x, y)], device), device, 3, steps)
        row(f"gptforge trainer, train.compile={str(compiled).lower()}", seconds, vs_peer=peer_s / seconds)
        del engine
        _free(device)
    return rows


def _peer_seconds(
    peer: torch.nn.Module, x: torch.Tensor, device: torch.device, steps: int
) -> tuple[float, str]:
    """The plain loop a user writes around a transformers model: bf16 autocast, clipping, fused AdamW."""
    peer = peer.to(device).train()
    optimizer = torch.optim.AdamW(peer.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = peer(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peer.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return time_steps(step, device, 3, steps), type(peer).__name__


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def zero_memory(shapes: dict, dist_ctx: Any, device: torch.device) -> list:
    """Peak allocated bytes over 3 steps of each ZeRO stage vs the planner's estimate for 1 GPU."""
    from gptforge.parallel import planner as pn
    from gptforge.train.loop import train_step

    overrides, micro = shapes["gpt2-124m"]
    rows = []
    for stage in range(4):
        cfg = make_config(overrides, micro, [f"parallel.zero_stage={stage}"])
        x, y = _batch(cfg, device)
        _free(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        engine = _engine(cfg, dist_ctx, device)
        for _ in range(3):
            train_step(engine, [(x, y)], device)
        _sync(device)
        measured = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        layout = pn.Layout(tp=1, pp=1, dp=1, zero=stage)
        mem = pn.layout_memory(cfg, layout, micro_batches=1)
        estimate = mem.total(False)
        rows.append(
            {
                "zero_stage": stage,
                "measured_peak_bytes": measured,
                "planner_bytes": int(estimate),
                "planner_states_bytes": int(mem.weights + mem.grads + mem.optimizer),
                "measured_vs_planner": measured / estimate if measured else None,
            }
        )
        print(f"  ZeRO-{stage}: measured {measured} bytes, planner {int(estimate)} bytes")
        del engine
    return rows


def checkpoint_save(shapes: dict, dist_ctx: Any, device: torch.device) -> dict:
    """One synchronous save of the 124M engine (after a step, so the AdamW moments exist) by our
    Checkpointer: bytes written / seconds."""
    from gptforge.train.checkpoint import Checkpointer, TrainState
    from gptforge.train.loop import train_step

    overrides, micro = shapes["gpt2-124m"]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_config(overrides, micro, [f"run.dir={tmp}"])
        x, y = _batch(cfg, device)
        engine = _engine(cfg, dist_ctx, device)
        train_step(engine, [(x, y)], device)
        ckpt = Checkpointer(tmp, dist_ctx, cfg.train)
        ckpt.open()
        try:
            start = time.perf_counter()
            ckpt.save(engine, TrainState(step=1, consumed_samples=micro), {}, cfg.model, dist_ctx.topology)
            ckpt.wait()
            seconds = time.perf_counter() - start
        finally:
            ckpt.close()
        written = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
    print(f"  checkpoint: {written / 1e6:,.0f} MB in {seconds:.2f} s = {written / 1e6 / seconds:,.0f} MB/s")
    return {"bytes": written, "seconds": seconds, "mb_per_s": written / 1e6 / seconds}


def allreduce(device: torch.device, smoke: bool) -> dict:
    """all_reduce of a bf16 buffer on the run's process group (NCCL on a GPU), world size 1."""
    import torch.distributed as dist

    numel = 2**20 if smoke else 2**28  # 512 MiB in bf16
    buf = torch.ones(numel, dtype=torch.bfloat16, device=device)
    seconds = time_steps(lambda: dist.all_reduce(buf), device, 3, 5 if smoke else 20)
    size = buf.numel() * buf.element_size()
    out = {
        "backend": dist.get_backend(),
        "world_size": dist.get_world_size(),
        "bytes": size,
        "seconds": seconds,
        "algbw_gb_per_s": size / seconds / 1e9,
    }
    print(f"  all_reduce ({out['backend']}, world {out['world_size']}): {out['algbw_gb_per_s']:.1f} GB/s")
    return out


def _section(results: dict, name: str, fn: Callable[[], Any], out: Path) -> None:
    """Run one section; record its result or its error; write the JSON after each (a later hang or
    timeout keeps what was measured)."""
    print(f"== {name}", flush=True)
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as exc:  # noqa: BLE001 -- one section's failure must not lose the others
        traceback.print_exc()
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    results.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)
    out.write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--smoke", action="store_true", help="toy sizes, any device: check the code runs")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per throughput row")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    from gptforge.train.distributed import init_distributed

    ds_logger.setLevel("WARNING")
    shapes = SMOKE if args.smoke else SHAPES
    steps = 2 if args.smoke else args.steps
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dist_ctx = init_distributed(make_config(shapes["gpt2-124m"][0], 1))
    peak, peak_source = peak_flops(device)
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "cuda": torch.version.cuda,
        "smoke": args.smoke,
        "peak_bf16_flops": peak,
        "peak_source": peak_source,
        "flash_sdp_enabled": torch.backends.cuda.flash_sdp_enabled(),
    }
    try:
        import transformers

        results["transformers"] = transformers.__version__
    except ImportError:
        results["transformers"] = None
    print(f"# bench/gpu.py: {results['device']}, {peak_source}", flush=True)
    for shape in ("gpt2-124m", "llama-1b"):
        _section(
            results,
            f"throughput_{shape}",
            lambda s=shape: throughput(s, shapes, dist_ctx, device, peak, steps),
            out,
        )
    _section(results, "zero", lambda: zero_memory(shapes, dist_ctx, device), out)
    _section(results, "checkpoint", lambda: checkpoint_save(shapes, dist_ctx, device), out)
    _section(results, "allreduce", lambda: allreduce(device, args.smoke), out)
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        dist.destroy_process_group()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
