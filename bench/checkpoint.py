"""Checkpoint save: the training loop's stall, the full save time and each rank's write rate of
`gptforge.train.checkpoint` (dp 2, ZeRO-1, fp32, every rank writing its own part), beside `torch.save` of
the same state dict (fp32 weights and both AdamW moments, consolidated) from one process: the peer.

    python bench/checkpoint.py [--n-layer 8] [--d-model 768] [--keep DIR]

Starts itself under torchrun with 2 processes (gloo, CPU). Each rank builds the trainer as
launch/train.py does (on a random-token build, GPT-2's vocabulary), takes two optimizer steps, then saves:
in the background (`train.async_save`, the default: the stall is the time until the loop may continue;
the full time until the files are durable and `latest` has moved), and synchronously. Then rank 0
writes the same state with `torch.save` + fsync. Every write is fsynced, so the figures are the disk's,
not the page cache's. Prints a markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from gptforge.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 50257


def make_data(root: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from train_helpers import write_build

    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(0, VOCAB - 1, 2000), VOCAB - 1) for _ in range(40)]
    tok = {"name": "gpt2", "vocab_size": VOCAB, "eot_id": VOCAB - 1}
    return write_build(root / "data", {"train": docs[:-4], "val": docs[-4:]}, tok).root


def trainer_overrides(args: argparse.Namespace) -> list[str]:
    """Config overrides for configs/tiny.yaml: the benchmark's shape, dp 2 with ZeRO-1 in fp32, no pruning."""
    return [
        f"model.n_layer={args.n_layer}",
        f"model.d_model={args.d_model}",
        f"model.n_head={args.d_model // 64}",
        "model.context_length=64",
        "model.dropout=0.0",
        "train.micro_batch_size=1",
        "train.global_batch_size=2",
        "parallel.zero_stage=1",
        "train.precision=fp32",
        "run.tensorboard=false",
        "train.keep_last=0",
        f"data.path={args.data}",
        f"run.dir={args.root / 'run'}",
    ]


def take_steps(trainer: Trainer, count: int) -> None:
    """Take optimizer steps on random tokens (seeded by rank) so the AdamW moments exist before saving."""
    import torch
    import torch.distributed as dist

    engine = trainer.engine
    gen = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(count):
        x = torch.randint(0, VOCAB, (1, 64), generator=gen)
        _, loss = engine(x, x)
        engine.backward(loss)
        engine.step()
        trainer.state.step += 1


def timed_save(trainer: Trainer, meta: dict[str, Any], background: bool) -> dict[str, float]:
    """Save once, to a new step directory: the loop's stall, the time until durable, and this rank's bytes."""
    import torch.distributed as dist

    ckpts = trainer.checkpoints
    ckpts.async_save = background
    trainer.state.step += 1  # a new step directory each time
    dist.barrier()
    t0 = time.perf_counter()
    ckpts.save(trainer.engine, trainer.state, meta, trainer.model_cfg, trainer.dist.topology)
    stall = time.perf_counter() - t0
    ckpts.wait()
    full = time.perf_counter() - t0
    return {"stall_s": stall, "save_s": full, "bytes": ckpts.last["bytes"]}


def peer_save(latest: Path, path: Path) -> tuple[int, dict[str, float]]:
    """The peer: `torch.save` + fsync of the checkpoint's state, consolidated, from one process.

    Returns the parameter count and the peer's save time and bytes.
    """
    import torch

    from gptforge.checkpoint_format import MOMENTS, WEIGHTS, Checkpoint

    with Checkpoint(latest) as ckpt:  # the same state, consolidated, in one process
        state = {n: ckpt.tensor(WEIGHTS + n) for n in ckpt.names(WEIGHTS)}
        parameters = sum(t.numel() for t in state.values())
        state.update({f"{k}.{n}": ckpt.tensor(f"{k}/{n}") for k in MOMENTS for n in ckpt.names(f"{k}/")})
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    return parameters, {"save_s": time.perf_counter() - t0, "bytes": nbytes}


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from gptforge.cli import quiet_deepspeed, setup_rank_logging
    from gptforge.config import config_to_dict, load_config
    from gptforge.train import checkpoint

    setup_rank_logging(quiet=True)
    quiet_deepspeed()
    from gptforge.train.loop import Trainer

    trainer = Trainer(load_config(ROOT / "configs" / "tiny.yaml", trainer_overrides(args)), "none")
    cfg, ckpts = trainer.cfg, trainer.checkpoints
    take_steps(trainer, 2)
    layout = trainer.layout() if callable(trainer.layout) else trainer.layout
    meta = checkpoint.checkpoint_meta(cfg.model, {}, "", "", layout, config_to_dict(cfg))
    ours = {"async": timed_save(trainer, meta, True), "sync": timed_save(trainer, meta, False)}
    reports: list = [None] * dist.get_world_size()
    dist.all_gather_object(reports, ours)
    result = {"ranks": reports}
    if dist.get_rank() == 0:
        result["parameters"], result["peer"] = peer_save(ckpts.latest, args.root / "peer.pt")
        (args.root / "result.json").write_text(json.dumps(result))
    ckpts.close()
    dist.destroy_process_group()


def report(result: dict, args: argparse.Namespace) -> str:
    peer = result["peer"]
    ranks = result["ranks"]
    n = len(ranks)
    stall = max(r["async"]["stall_s"] for r in ranks)
    full = max(r["async"]["save_s"] for r in ranks)
    sync = max(r["sync"]["save_s"] for r in ranks)
    per_rank = max(r["async"]["bytes"] for r in ranks)
    rows = [
        "| what | seconds | bytes per rank | MB/s per rank |",
        "| --- | ---: | ---: | ---: |",
        f"| gptforge async save: loop stall (staging copy) | {stall:.2f} | {per_rank / 1e6:,.0f} MB | - |",
        f"| gptforge async save: full (written, fsynced, `latest` moved) | {full:.2f} | {per_rank / 1e6:,.0f} MB | "
        f"{per_rank / 1e6 / full:.0f} |",
        f"| gptforge sync save (`train.async_save=false`) | {sync:.2f} | {per_rank / 1e6:,.0f} MB | "
        f"{per_rank / 1e6 / sync:.0f} |",
        f"| peer: `torch.save` of the consolidated state, 1 process, fsync | {peer['save_s']:.2f} | "
        f"{peer['bytes'] / 1e6:,.0f} MB | {peer['bytes'] / 1e6 / peer['save_s']:.0f} |",
    ]
    targets = (
        f"stall / peer = {stall / peer['save_s']:.1%} (target <= 20 %); full save / (peer / {n} ranks) = "
        f"{full / (peer['save_s'] / n):.2f} (target <= 1.5)"
    )
    head = (
        f"{args.n_layer} layers, d_model {args.d_model}, vocabulary {VOCAB} ({result['parameters'] / 1e6:.1f} M "
        f"parameters, fp32 weights + AdamW = {peer['bytes'] / 1e6:,.0f} MB); dp {n}, ZeRO-1, gloo on CPU; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {datetime.date.today()}"
    )
    return "\n".join([head, "", *rows, "", targets])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--keep", type=Path, help="work directory to keep (default: a temporary one)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    root = args.keep or Path(tempfile.mkdtemp(prefix="gptforge-bench-ckpt-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        data = make_data(root)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
        cmd += ["--worker", "--root", str(root), "--data", str(data)]
        cmd += ["--n-layer", str(args.n_layer), "--d-model", str(args.d_model)]
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        print(report(json.loads((root / "result.json").read_text()), args))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
