"""Every parallel layout of the trainer against one process, side by side in one run: tokens/s and the
bytes each rank hands to collectives per step.

    python bench/parallel.py                          # configs/tiny.yaml's model on the demo corpus, CPU
    python bench/parallel.py --reps 5 --steps 16 --layouts serial,dp2,tp2,pp2

Each layout is the real trainer (`gptforge.train.loop.Trainer`, as launch/train.py runs it) in its own
torchrun launch (gloo, one thread per process), `--steps` optimizer steps of the same global batch; its
speed is the median step time after `--warmup` steps. Repetitions launch the layouts in a rotating order so
background load hits them alike; each layout's figure is the median over repetitions of its tokens/s
divided by the one-process run's in the same repetition. On this 2-core machine a layout of N processes
can at best be min(N, 2)x one single-threaded process; `serial-2threads` (one process using both cores)
is the fair peer for 2-process layouts.

Bytes: inside the worker, torch.distributed's collectives are wrapped (before DeepSpeed is imported) and
count, during training steps only, the payload each rank passes: the tensor of an all-reduce, broadcast,
send or receive, the gathered output of an all-gather, the input of a reduce-scatter (NCCL-tests'
"size"; a ring all-reduce moves about twice that over the wire). Reported per step, as the mean over ranks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# name -> (processes, threads per process, overrides)
LAYOUTS: dict[str, tuple[int, int, list[str]]] = {
    "serial": (1, 1, []),
    "serial-2threads": (1, 2, []),
    "dp2": (2, 1, []),
    "zero1-dp2": (2, 1, ["parallel.zero_stage=1"]),
    "zero2-dp2": (2, 1, ["parallel.zero_stage=2"]),
    "zero3-dp2": (2, 1, ["parallel.zero_stage=3"]),
    "zero3-offload-dp2": (2, 1, ["parallel.zero_stage=3", "parallel.offload_optimizer=cpu"]),
    "tp2": (2, 1, ["parallel.tp=2"]),
    "pp2": (2, 1, ["parallel.pp=2"]),
    "tp2xpp2": (4, 1, ["parallel.tp=2", "parallel.pp=2"]),
    "dp4": (4, 1, []),
}

COLLECTIVES = {  # name -> which argument holds the payload, and how to size it
    "all_reduce": "first",
    "broadcast": "first",
    "send": "first",
    "recv": "first",
    "isend": "first",
    "irecv": "first",
    "reduce": "first",
    "all_gather": "output_list",
    "all_gather_into_tensor": "first",
    "_all_gather_base": "first",
    "reduce_scatter_tensor": "input",
    "_reduce_scatter_base": "input",
    "reduce_scatter": "input_list",
}


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size()


def count_collectives() -> tuple[dict[str, int], dict[str, bool]]:
    """Wrap torch.distributed's collectives; returns (bytes per op, {"on": counting?})."""
    import torch.distributed as dist

    counts: dict[str, int] = defaultdict(int)
    state = {"on": False, "inside": False}

    def wrap(name: str, how: str) -> None:
        real = getattr(dist, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            if state["on"] and not state["inside"]:
                if how == "first":
                    t = args[0] if args else next(iter(kwargs.values()))
                    counts[name] += _nbytes(t)
                elif how == "output_list":
                    counts[name] += sum(_nbytes(t) for t in (args[0] if args else kwargs["tensor_list"]))
                elif how == "input":
                    counts[name] += _nbytes(args[1] if len(args) > 1 else kwargs["input"])
                else:
                    counts[name] += sum(
                        _nbytes(t) for t in (args[1] if len(args) > 1 else kwargs["input_list"])
                    )
            outer, state["inside"] = state["inside"], True
            try:
                return real(*args, **kwargs)
            finally:
                state["inside"] = outer

        setattr(dist, name, counted)

    for name, how in COLLECTIVES.items():
        if hasattr(dist, name):
            wrap(name, how)
    return counts, state


def worker(spec_path: str) -> None:
    """Under torchrun: one trainer run, every step timed and its collectives counted; rank 0 writes JSON."""
    counts, counting = count_collectives()
    import logging
    import warnings

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.ERROR)
    from gptforge.config import load_config
    from gptforge.train import loop

    times: list[float] = []
    per_step: list[dict[str, int]] = []
    real_step = loop.train_step

    def timed_step(*args: Any, **kwargs: Any) -> Any:
        before = dict(counts)
        counting["on"] = True
        start = time.perf_counter()
        loss = real_step(*args, **kwargs)
        float(loss)  # the step is done (CPU ops are eager; this also waits on a GPU)
        times.append(time.perf_counter() - start)
        counting["on"] = False
        per_step.append({k: v - before.get(k, 0) for k, v in counts.items()})
        return loss

    loop.train_step = timed_step
    cfg = load_config(spec["config"], spec["overrides"])
    trainer = loop.Trainer(cfg, "none")
    trainer.run()
    warm = spec["warmup"]
    mine = {"times": times[warm:], "bytes": per_step[warm:]}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        Path(spec["out"]).write_text(
            json.dumps(
                {
                    "ranks": everyone,
                    "global_batch": trainer.plan.global_batch,
                    "context": trainer.model_cfg.context_length,
                }
            )
        )
    dist.destroy_process_group()


def launch(name: str, work: Path, args: argparse.Namespace, data: Path, rep: int) -> dict[str, Any]:
    nproc, threads, overrides = LAYOUTS[name]
    out = work / f"{name}-{rep}.json"
    spec = {
        "config": str(ROOT / "configs" / "tiny.yaml"),
        "overrides": [
            f"data.path={data}",
            f"run.dir={work / 'runs' / f'{name}-{rep}'}",
            f"train.max_steps={args.steps}",
            f"train.micro_batch_size={args.micro_batch}",
            f"train.global_batch_size={args.global_batch}",
            "train.log_interval=1000000",
            "train.eval_interval=1000000",
            "train.save_interval=1000000",
            "train.sample_interval=0",
            "train.eval_iters=0",
            "run.tensorboard=false",
            "data.verify_checksums=false",
            *overrides,
        ],
        "threads": threads,
        "warmup": args.warmup,
        "out": str(out),
    }
    spec_path = work / f"{name}-{rep}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        CUDA_VISIBLE_DEVICES="",
        DS_ACCELERATOR="cpu",
        PYTHONWARNINGS="ignore",
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        __file__,
        "--worker",
        str(spec_path),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0 and not out.is_file():
        raise SystemExit(f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    if result.returncode != 0:  # the measurements were written: a crash while the processes exit
        print(f"note: {name} exited {result.returncode} after writing its results", file=sys.stderr)
    return json.loads(out.read_text())


def build_data(work: Path) -> Path:
    data = work / "data"
    if not (data / "manifest.json").is_file():
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "data_pipeline" / "build.py"),
                "--input",
                str(ROOT / "corpus" / "demo" / "tinyshakespeare.txt.gz"),
                "--output",
                str(data),
                "--val-fraction",
                "0.1",
                "--no-progress",
            ],
            check=True,
            cwd=ROOT,
            capture_output=True,
        )
    return data


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated (default: all)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per launch")
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the timing")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument(
        "--data", type=Path, help="a build output directory (default: the demo corpus, built)"
    )
    parser.add_argument("--work", type=Path, help="where runs go (default: a temporary directory)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    names = args.layouts.split(",")
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown or "serial" not in names:
        raise SystemExit(f"--layouts: unknown {unknown}; 'serial' (the reference) must be included")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = args.data or build_data(work)
        results: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for rep in range(args.reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                results[name].append(launch(name, work, args, data, rep))
                print(f"rep {rep + 1}/{args.reps}: {name} done", file=sys.stderr, flush=True)
        report(names, results, args)


def report(names: list[str], results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    import torch

    def tokens_per_s(r: dict[str, Any]) -> float:
        step = statistics.median(statistics.median(rank["times"]) for rank in r["ranks"][:1])
        return r["global_batch"] * r["context"] / step

    first = results["serial"][0]
    print(
        f"# {datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}; configs/tiny.yaml model, demo corpus; global batch {args.global_batch} x "
        f"{first['context']} tokens, micro batch {args.micro_batch}, fp32; {args.reps} reps x {args.steps} "
        f"steps ({args.warmup} warm-up)"
    )
    print(
        "| layout | processes | tokens/s (median) | vs 1 process (median of per-rep ratios) | "
        "collective payload per step per rank (mean over ranks) | by op |"
    )
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name in names:
        runs = results[name]
        ratio = statistics.median(
            tokens_per_s(r) / tokens_per_s(s) for r, s in zip(runs, results["serial"], strict=True)
        )
        ops: dict[str, float] = defaultdict(float)
        for rank in runs[0]["ranks"]:
            for step in rank["bytes"]:
                for op, b in step.items():
                    ops[op] += b / len(rank["bytes"]) / len(runs[0]["ranks"])
        total = sum(ops.values())
        by_op = ", ".join(
            f"{op} {b / 1e6:.2f} MB" for op, b in sorted(ops.items(), key=lambda kv: -kv[1]) if b
        )
        print(
            f"| {name} | {LAYOUTS[name][0]} | {statistics.median(tokens_per_s(r) for r in runs):,.0f} | "
            f"{ratio:.2f}x | {total / 1e6:.2f} MB | {by_op or '-'} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
