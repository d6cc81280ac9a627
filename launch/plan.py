"""Which parallel layout to use: per-GPU memory and expected speed of every (tp, pp, dp, ZeRO) layout.

    python launch/plan.py --config configs/gpt2-1.5b.yaml --gpus 16 [--gpu-mem 80GB] [key.sub=value ...]

Prints, for each valid layout, the weights, gradients, optimizer states and activations (without and with
activation checkpointing) one GPU of the busiest pipeline stage holds, whether it fits, and the expected
tokens/s; then the suggested layout as config overrides. The estimates and the ranking heuristic are
described in `gptforge.parallel.planner`.
"""

from __future__ import annotations

import argparse
import json
import os

from gptforge.cli import parse_args_anywhere, run_cli
from gptforge.config import load_config
from gptforge.errors import ConfigError
from gptforge.model.size import count_parameters


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", required=True, help="YAML config (model shape, micro/global batch, precision)"
    )
    parser.add_argument("--gpus", type=int, required=True, help="total GPUs of the run")
    parser.add_argument(
        "--gpu-mem", default="80GB", help="memory per GPU, e.g. 80GB, 40GB, 24GiB (default 80GB)"
    )
    parser.add_argument("--gpus-per-node", type=int, default=None, help="default: min(gpus, 8)")
    parser.add_argument(
        "--peak-tflops", type=float, default=312.0, help="per GPU, dense 16-bit (A100 312, H100 989)"
    )
    parser.add_argument(
        "--fs-bandwidth",
        default="10GB",
        help="checkpoint write bandwidth of the filesystem, all ranks (per s)",
    )
    parser.add_argument(
        "--save-timeout",
        type=float,
        default=float(os.environ.get("SAVE_TIMEOUT_S", 100)),
        help="seconds slurm/pretrain_8node.sh leaves to save at preemption (default: $SAVE_TIMEOUT_S or 100)",
    )
    parser.add_argument(
        "--json", action="store_true", help="one JSON object: every layout and the suggestion"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value (anywhere)")
    return parse_args_anywhere(parser, argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # Planning touches no device: telling DeepSpeed so keeps its accelerator probe (a warning on stdout on
    # GPU-less login nodes) out of the output, which --json promises to be one JSON object.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from gptforge.parallel.planner import GB, Hardware, best, format_plans, parse_bytes, plan, save_warnings

    if args.gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {args.gpus}")
    cfg = load_config(args.config, args.overrides)
    hw = Hardware(
        gpus=args.gpus,
        gpu_mem=parse_bytes(args.gpu_mem),
        gpus_per_node=args.gpus_per_node or min(args.gpus, 8),
        peak_flops=args.peak_tflops * 1e12,
        fs_bandwidth=parse_bytes(args.fs_bandwidth.upper().removesuffix("/S")) * 1e9 / GB,  # decimal GB/s
    )
    plans = plan(cfg, hw)
    if args.json:
        choice = best(plans)
        rows = [
            {
                "layout": p.layout.name,
                "tp": p.layout.tp,
                "pp": p.layout.pp,
                "dp": p.layout.dp,
                "zero_stage": p.layout.zero,
                "offload_optimizer": p.layout.offload_optimizer,
                "offload_params": p.layout.offload_params,
                "micro_batches": p.micro_batches,
                "weights_gb": p.memory.weights / GB,
                "grads_gb": p.memory.grads / GB,
                "optimizer_gb": p.memory.optimizer / GB,
                "activations_gb": p.memory.activations / GB,
                "activations_ckpt_gb": p.memory.activations_ckpt / GB,
                "fits": p.fits,
                "fits_ckpt": p.fits_ckpt,
                "tokens_per_s": p.tokens_per_s if p.fits or p.fits_ckpt else None,
                "checkpoint_gb_per_rank": p.checkpoint_per_rank / GB,
                "save_s": p.save_s,
            }
            for p in plans
        ]
        print(
            json.dumps(
                {
                    "layouts": rows,
                    "suggested": choice.layout.name if choice else None,
                    "activation_checkpointing": choice.checkpointing if choice else None,
                    "warnings": save_warnings(plans, args.save_timeout),
                }
            )
        )
    else:
        print(format_plans(plans, hw, count_parameters(cfg.model)))
        for line in save_warnings(plans, args.save_timeout):
            print(line)
    return 0


if __name__ == "__main__":
    run_cli(main)
