"""One training step (forward + backward + AdamW) of our GPT vs `transformers.GPT2LMHeadModel`, side by side.

    python bench/model_step.py                      # fp32 and bf16 autocast, the issue's shape, CPU
    python bench/model_step.py --reps 5 --precisions bf16
    python bench/model_step.py --shape gpt2-124m    # 124M at context 1024 (meant for a GPU)

Both models start from the same weights (the peer is our model converted with `gptforge.hf.to_hf`, and
the script checks they compute the same loss) and see the same batch. Steps are interleaved, variant
after variant in a rotating order, so load from other processes hits every variant alike. Figures are
from each variant's fastest step (the least disturbed one: the estimate `timeit` recommends on a shared
machine); the median of per-repetition ratios against the peer is reported beside it as a check. The
rows between the peer and our full setup add one change at a time, so each win is measured on its own.
The machine's matmul peak (a square matmul, best sample) is measured in the same run, and achieved
FLOP/s (6 * matmul parameters * tokens + attention, PaLM's convention) is reported against it.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptforge.config import ModelConfig
from gptforge.hf import to_hf
from gptforge.model import GPT, flops_per_token

SHAPES = {
    # the shape: 6 layers, d_model 384, 6 heads, context 256, GPT-2 vocabulary, batch 8
    "small": (ModelConfig(n_layer=6, n_head=6, d_model=384, context_length=256, vocab_size=50257), 8),
    "gpt2-124m": (ModelConfig(n_layer=12, n_head=12, d_model=768, context_length=1024, vocab_size=50257), 8),
}


class PythonGELU(nn.Module):
    """GPT-2's tanh GELU written as HF's `gelu_new` is: seven elementwise kernels instead of one."""

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class PlainCrossEntropy(nn.Module):
    """`F.cross_entropy` on the full logits: an fp32 log-softmax tensor as large as the logits."""

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=-100)


def matmul_flops(dtype: torch.dtype, device: str, clock: Callable[[], float], n: int = 2048) -> float:
    """FLOP/s of one n x n x n matmul (best of three)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(3):
        _sync(device)
        start = clock()
        torch.mm(a, b)
        _sync(device)
        best = min(best, clock() - start)
    return 2 * n**3 / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_variants(
    ours: GPT, cfg: ModelConfig, device: str
) -> dict[str, tuple[nn.Module, torch.optim.Optimizer, str]]:
    """Name -> (model, optimizer, kind). Our rows are cumulative: each adds one change to the row above."""
    fused = {"fused": True}

    def ours_with(
        gelu: bool, chunked_loss: bool, optimizer_kwargs: dict
    ) -> tuple[nn.Module, torch.optim.Optimizer, str]:
        model = copy.deepcopy(ours)
        if not gelu:
            for block in model.transformer.h:
                block.mlp.gelu = PythonGELU()
        if not chunked_loss:
            model.criterion = PlainCrossEntropy()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4, **optimizer_kwargs), "ours"

    peer = to_hf(ours, cfg).to(device).train()
    peer.loss_type = "ForCausalLM"  # what it uses anyway; silences transformers' notice
    return {
        "transformers GPT2LMHeadModel, AdamW": (peer, torch.optim.AdamW(peer.parameters(), lr=1e-4), "peer"),
        "gptforge GPT, python GELU + F.cross_entropy, AdamW": ours_with(False, False, {}),
        "+ fused tanh GELU": ours_with(True, False, {}),
        "+ chunked cross-entropy (= our model), AdamW": ours_with(True, True, {}),
        "+ fused AdamW (= our training step)": ours_with(True, True, fused),
    }


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, kind: str, x: Tensor, y: Tensor,
              precision: str, device: str) -> Callable[[], float]:  # fmt: skip
    device_type = device.split(":")[0]

    def step() -> float:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            # the peer shifts its labels internally: the same targets as ours
            loss = model(input_ids=x, labels=x).loss if kind == "peer" else model(x, y)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def run(
    shape: str, precision: str, reps: int, warmup: int, device: str, clock: Callable[[], float]
) -> list[dict]:
    cfg, batch = SHAPES[shape]
    torch.manual_seed(0)
    ours = GPT(cfg).to(device).train()
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length + 1), device=device)
    x = tokens[:, :-1]
    y = tokens[:, 1:].clone()
    y[:, -1] = -100  # the peer has no target for the last position; ignore it in ours too
    variants = make_variants(ours, cfg, device)
    steps = {name: make_step(m, o, kind, x, y, precision, device) for name, (m, o, kind) in variants.items()}

    first_losses = {name: step() for name, step in steps.items()}
    spread = max(first_losses.values()) - min(first_losses.values())
    assert spread < 2e-2, f"variants disagree on the loss of the same batch: {first_losses}"
    for _ in range(warmup - 1):
        for step in steps.values():
            step()

    names = list(steps)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    peak: list[float] = []
    mm_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            _sync(device)
            start = clock()
            steps[name]()
            _sync(device)
            seconds[name].append(clock() - start)
        peak.append(matmul_flops(mm_dtype, device, clock))

    flops_per_step = flops_per_token(cfg, cfg.context_length) * batch * cfg.context_length
    peer = names[0]
    rows = []
    for name in names:
        best = min(seconds[name])
        ratios = [p / s for p, s in zip(seconds[peer], seconds[name], strict=True)]
        rows.append(
            {
                "precision": precision,
                "variant": name,
                "tokens_per_s": batch * cfg.context_length / best,
                "vs_peer": min(seconds[peer]) / best,
                "vs_peer_median": statistics.median(ratios),
                "achieved": flops_per_step / best,
                "peak": max(peak),
                "first_loss": first_losses[name],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=list(SHAPES), default="small")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--reps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: all cores)"
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time. cpu: this process's CPU time, which time slices taken by other processes "
        "do not inflate; use it with --threads 1 on a shared CPU (with more threads, idle-waiting counts)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    cfg, batch = SHAPES[args.shape]
    print(
        f"# model_step: {args.shape} (n_layer={cfg.n_layer}, d_model={cfg.d_model}, n_head={cfg.n_head}, "
        f"context={cfg.context_length}, vocab={cfg.vocab_size}, batch={batch}); {args.reps} interleaved reps\n"
        f"# {datetime.date.today()}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"device {args.device}, {torch.get_num_threads()} threads, {args.clock} clock"
    )
    print(
        "| precision | variant | tokens/s | vs peer | (median of ratios) | achieved TFLOP/s | % of matmul peak |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for precision in args.precisions.split(","):
        rows = run(args.shape, precision, args.reps, args.warmup, args.device, clock)
        for r in rows:
            print(
                f"| {r['precision']} | {r['variant']} | {r['tokens_per_s']:,.0f} | {r['vs_peer']:.2f}x | "
                f"{r['vs_peer_median']:.2f}x | {r['achieved'] / 1e12:.3f} | {100 * r['achieved'] / r['peak']:.0f}% |"
            )
        print(
            f"| {precision} | matmul peak (2048^3 mm, best sample) | | | | {rows[0]['peak'] / 1e12:.3f} | 100% |"
        )


if __name__ == "__main__":
    main()
