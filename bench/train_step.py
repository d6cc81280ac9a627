"""Our trainer's step (the DeepSpeed engine exactly as launch/train.py builds it) vs a plain loop around
`transformers.GPT2LMHeadModel` (or `LlamaForCausalLM` for the Llama shapes), side by side in one run.

    python bench/train_step.py                       # fp32 and bf16, bench/model_step.py's shape, CPU
    python bench/train_step.py --reps 6 --precisions bf16
    python bench/train_step.py --shape llama-small --precisions fp32 --compile
    python bench/train_step.py --shape gpt2-124m     # 124M at context 1024 (meant for a GPU)

Rows:
- peer: `GPT2LMHeadModel` / `LlamaForCausalLM` (our initial weights converted with `gptforge.hf.to_hf`),
  `torch.optim.AdamW`, `clip_grad_norm_`, bf16 through `torch.autocast` -- the plain loop a user would write;
- our model in the same plain loop with the optimizer our trainer uses (fused AdamW): what the engine
  must not lose;
- our trainer: `gptforge.train.engine.build_engine` (DeepSpeed `initialize` with our config, AdamW groups,
  norm/clip/skip guard) driven by `gptforge.train.loop.train_step`, the loop's own step function;
- with `--compile`, the same trainer with `train.compile=true` (its blocks through `torch.compile`).

Same batch, same precision, gradient clipping in all three. Steps are interleaved in a rotating order so
load from other processes hits every row alike; each row's fastest step is reported (the least disturbed
one), with the median of per-repetition ratios beside it as a check. MFU is against the matmul peak
measured in the same run (2048^3, best sample, by the trainer's `measure_matmul_peak`), with FLOPs/token
from `gptforge.model.flops_per_token`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gptforge.config import ModelConfig
    from gptforge.model import GPT

LLAMA = [
    "model.position_embedding=rope",
    "model.norm=rmsnorm",
    "model.mlp=swiglu",
    "model.bias=false",
    "model.tie_embeddings=false",
]
SHAPES = {
    "small": dict(n_layer=6, n_head=6, d_model=384, context_length=256, batch=8, model=[]),
    "gpt2-124m": dict(n_layer=12, n_head=12, d_model=768, context_length=1024, batch=8, model=[]),
    # the small shape, Llama-style: 6 query heads sharing 2 KV heads, SwiGLU 1024 (8/3 x 384 rounded to 256)
    "llama-small": dict(
        n_layer=6, n_head=6, d_model=384, context_length=256, batch=8, model=[*LLAMA, "model.n_kv_head=2"]
    ),
    # configs/llama-1b.yaml's shape (meant for a GPU)
    "llama-1b": dict(
        n_layer=16,
        n_head=32,
        d_model=2048,
        context_length=2048,
        batch=4,
        model=[*LLAMA, "model.n_kv_head=8", "model.ffn_hidden=8192", "model.rope_theta=500000"],
    ),
}
VOCAB = 50257


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shape_overrides(shape: str, precision: str) -> list[str]:
    """Config overrides for a benchmark shape at a precision: lr 1e-4, weight decay 0.1, clip 1.0, no dropout."""
    s = SHAPES[shape]
    return [
        f"model.n_layer={s['n_layer']}",
        f"model.n_head={s['n_head']}",
        f"model.d_model={s['d_model']}",
        f"model.context_length={s['context_length']}",
        f"model.vocab_size={VOCAB}",
        "model.dropout=0.0",
        f"train.micro_batch_size={s['batch']}",
        f"train.precision={precision}",
        "optim.lr=1e-4",
        "optim.weight_decay=0.1",
        "optim.grad_clip=1.0",
        *s["model"],
    ]


def plain_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    peer: bool,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    precision: str,
) -> Callable[[], float]:
    """The plain loop a user would write (autocast for bf16, clipping): one step of it, returning the loss."""

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision != "fp32"):
            loss = model(input_ids=x, labels=x).loss if peer else model(x, y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def copy_of(reference: GPT, model_cfg: ModelConfig, device: torch.device) -> GPT:
    """A fresh GPT on `device`, in train mode, holding the reference's weights, so every row starts alike."""
    from gptforge.model import GPT

    model = GPT(model_cfg).to(device).train()
    model.load_state_dict(reference.state_dict())
    return model


def build(
    shape: str, precision: str, device: torch.device, compile: bool = False
) -> tuple[dict[str, Callable[[], float]], float]:
    """The three (four with `compile`) steps (name -> callable returning the loss) and the FLOPs of one step."""
    from gptforge.config import load_config
    from gptforge.hf import to_hf
    from gptforge.model import GPT, flops_per_token
    from gptforge.train.batch import plan_batch
    from gptforge.train.distributed import init_distributed
    from gptforge.train.engine import build_engine
    from gptforge.train.loop import train_step
    from gptforge.train.precision import precision_mode

    s = SHAPES[shape]
    cfg = load_config(None, shape_overrides(shape, precision))
    dist_ctx = init_distributed(cfg)
    mode = precision_mode(precision, device)
    torch.manual_seed(0)
    reference = GPT(cfg.model)
    tokens = torch.randint(0, VOCAB, (s["batch"], s["context_length"] + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:].clone()
    y[:, -1] = -100  # the peer has no target for the last position: ignore it in ours too

    peer = to_hf(reference, cfg.model).to(device).train()
    ours = copy_of(reference, cfg.model, device)
    engine = build_engine(cfg, copy_of(reference, cfg.model, device), plan_batch(cfg, 1), mode, dist_ctx)

    peer_opt = torch.optim.AdamW(peer.parameters(), lr=1e-4, weight_decay=0.1)
    ours_opt = torch.optim.AdamW(ours.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    steps = {
        f"transformers {type(peer).__name__}, torch AdamW (peer)": plain_step(
            peer, peer_opt, True, x, y, device, precision
        ),
        "gptforge GPT, plain loop, fused AdamW": plain_step(ours, ours_opt, False, x, y, device, precision),
        "gptforge trainer (DeepSpeed engine)": lambda: float(train_step(engine, [(x, y)], device)),
    }
    if compile:
        compiled_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=True))
        compiled_model = copy_of(reference, cfg.model, device)
        compiled = build_engine(compiled_cfg, compiled_model, plan_batch(cfg, 1), mode, dist_ctx)
        steps["gptforge trainer, train.compile=true"] = lambda: float(train_step(compiled, [(x, y)], device))
    return steps, flops_per_token(cfg.model) * s["batch"] * s["context_length"]


def run(
    shape: str, precision: str, reps: int, warmup: int, device: torch.device, compile: bool = False
) -> list[dict]:
    from gptforge.train.metrics import measure_matmul_peak

    steps, flops_per_step = build(shape, precision, device, compile)
    first = {name: step() for name, step in steps.items()}
    assert max(first.values()) - min(first.values()) < 2e-2, f"rows disagree on the first loss: {first}"
    for _ in range(warmup - 1):
        for step in steps.values():
            step()
    names = list(steps)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    peak = []
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            _sync(device)
            start = time.perf_counter()
            steps[name]()
            _sync(device)
            seconds[name].append(time.perf_counter() - start)
        dtype = torch.bfloat16 if precision != "fp32" else torch.float32
        peak.append(measure_matmul_peak(device, dtype, seconds=0.5, n=2048))
    tokens = SHAPES[shape]["batch"] * SHAPES[shape]["context_length"]
    peer, plain_ours = names[0], names[1]
    rows = []
    for name in names:
        best = min(seconds[name])
        rows.append(
            {
                "precision": precision,
                "row": name,
                "tokens_per_s": tokens / best,
                "vs_peer": min(seconds[peer]) / best,
                "vs_peer_median": statistics.median(
                    p / s for p, s in zip(seconds[peer], seconds[name], strict=True)
                ),
                "vs_plain": min(seconds[plain_ours]) / best,
                "mfu": flops_per_step / best / max(peak),
                "peak": max(peak),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=list(SHAPES), default="small")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--reps", type=int, default=8, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="add the trainer with train.compile=true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)

    s = SHAPES[args.shape]
    print(
        f"# train_step: {args.shape} ({s['n_layer']} layers, d_model {s['d_model']}, {s['n_head']} heads, "
        f"context {s['context_length']}, vocab {VOCAB}, batch {s['batch']}; {' '.join(s['model']) or 'GPT-2'}); "
        f"{args.reps} interleaved reps\n"
        f"# {datetime.date.today()}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{device}, {torch.get_num_threads()} threads"
    )
    print(
        "| precision | row | tokens/s | vs peer | (median of ratios) | vs our plain loop | MFU (of matmul peak) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for precision in args.precisions.split(","):
        rows = run(args.shape, precision, args.reps, args.warmup, device, args.compile)
        for r in rows:
            print(
                f"| {precision} | {r['row']} | {r['tokens_per_s']:,.0f} | {r['vs_peer']:.2f}x | "
                f"{r['vs_peer_median']:.2f}x | {r['vs_plain']:.2f}x | {100 * r['mfu']:.0f}% |"
            )
        print(
            f"| {precision} | matmul peak (2048^3, best sample) | {rows[0]['peak'] / 1e9:,.0f} GFLOP/s | | | | |"
        )


if __name__ == "__main__":
    main()
