"""Tensor parallelism on CPU: a tp=2 training step (2 gloo processes, 1 thread each) vs the serial GPT.

    python bench/tensor_parallel.py [--reps 10] [--layers 4] [--d-model 256] [--batch 8]

Runs itself under `torchrun --nproc_per_node=2`. Every repetition times, one after another in a rotating
order so that load from other processes hits each alike: the serial model on rank 0 with 1 thread (the
other rank idle), the serial model with 2 threads (both cores, the fair single-process peer), and the
tp=2 model (forward + backward + SGD on each rank's shards). All start from the same weights and see the
same batch; the script checks that the tp loss equals the serial one. Reported: median tokens/s, the
median per-repetition ratio against each serial peer, and the payload bytes the tp all-reduces move per step.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from gptforge.config import ModelConfig
from gptforge.model import GPT
from gptforge.model import tensor_parallel as tpl
from gptforge.parallel.topology import Topology


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def step(model: GPT, opt: torch.optim.Optimizer, idx: torch.Tensor, targets: torch.Tensor) -> float:
    opt.zero_grad(set_to_none=True)
    loss = model(idx, targets)[1]
    loss.backward()
    opt.step()
    return loss.item()


def make_models(
    args: argparse.Namespace, topo: Topology
) -> tuple[GPT, torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The serial GPT and its tp=2 copy, from the same seeded weights, and one random batch for both."""
    cfg = ModelConfig(
        n_layer=args.layers,
        n_head=args.heads,
        d_model=args.d_model,
        context_length=args.context,
        vocab_size=50257,
    )
    torch.manual_seed(0)
    serial = GPT(cfg)
    par = tpl.parallelize_tensor(copy.deepcopy(serial), topo)
    idx = torch.randint(0, 50257, (args.batch, args.context))
    targets = torch.randint(0, 50257, (args.batch, args.context))
    return serial, par, idx, targets


def make_runner(
    rank: int, serial: GPT, par: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor
) -> Callable[[str], float]:
    """A function timing one step of a variant between barriers: tp2 on both ranks, serial on rank 0 only."""
    opts = {
        "serial": torch.optim.SGD(serial.parameters(), lr=1e-4),
        "tp2": torch.optim.SGD(par.parameters(), lr=1e-4),
    }

    def run(variant: str) -> float:
        dist.barrier()
        start = time.perf_counter()
        if variant == "tp2":
            step(par, opts["tp2"], idx, targets)
        elif rank == 0:
            torch.set_num_threads(1 if variant == "serial-1thread" else 2)
            step(serial, opts["serial"], idx, targets)
            torch.set_num_threads(1)
        elapsed = time.perf_counter() - start
        dist.barrier()
        return elapsed

    return run


def all_reduce_bytes(run: Callable[[str], float]) -> int:
    """The payload bytes one tp2 step's all-reduces move, counted by wrapping `dist.all_reduce` for the step."""
    sent = {"bytes": 0}
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *a, **kw):
        sent["bytes"] += tensor.numel() * tensor.element_size()
        return real_all_reduce(tensor, *a, **kw)

    dist.all_reduce = counting_all_reduce
    run("tp2")
    dist.all_reduce = real_all_reduce
    return sent["bytes"]


def time_variants(run: Callable[[str], float], variants: list[str], reps: int) -> dict[str, list[float]]:
    """Time every variant once per repetition, in a rotating order so other processes' load hits each alike."""
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(reps):
        for v in variants[r % 3 :] + variants[: r % 3]:
            times[v].append(run(v))
    return times


def print_report(args: argparse.Namespace, check: float, times: dict[str, list[float]], sent: int) -> None:
    """Print the machine and shape header and the markdown table of tokens/s and tp2 speed-ups."""
    tokens = args.batch * args.context
    print(
        f"# {datetime.date.today()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}"
    )
    print(
        f"# GPT {args.layers} layers, d_model {args.d_model}, {args.heads} heads, context {args.context}, "
        f"vocab 50257, batch {args.batch}; fp32; {args.reps} reps; |loss tp2 - serial| = {check:.2e}"
    )
    print("| variant | tokens/s (median) | tp2 speed-up vs it (median of per-rep ratios) |")
    print("| --- | ---: | ---: |")
    for v in times:
        ratio = statistics.median(a / b for a, b in zip(times[v], times["tp2"], strict=True))
        print(f"| {v} | {tokens / statistics.median(times[v]):,.0f} | {ratio:.2f}x |")
    print(f"tp all-reduce payload per step (rank 0): {sent / 1e6:.2f} MB")


def worker(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    topo = Topology(tp=2).init_process_groups()
    serial, par, idx, targets = make_models(args, topo)
    with torch.no_grad():
        check = abs(par(idx, targets)[1].item() - serial(idx, targets)[1].item())
    run = make_runner(rank, serial, par, idx, targets)
    variants = ["serial-1thread", "serial-2threads", "tp2"]
    for v in variants:  # warm-up
        run(v)
    sent = all_reduce_bytes(run)
    times = time_variants(run, variants, args.reps)
    if rank == 0:
        print_report(args, check, times, sent)
    dist.destroy_process_group()


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        __file__,
        "--worker",
        *argv,
    ]
    sys.exit(subprocess.call(cmd, env=env))


if __name__ == "__main__":
    main(sys.argv[1:])
