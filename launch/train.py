"""Train a GPT on a corpus built by data_pipeline/build.py.

    python launch/train.py --config configs/tiny.yaml [section.key=value ...] [--resume auto|none|PATH]
    torchrun --nproc_per_node=N launch/train.py --config configs/gpt2-124m.yaml data.path=data/owt
    python launch/train.py --config configs/gpt2-1.5b.yaml --dry-run --world-size 64 --gpus-per-node 8

Overrides may stand anywhere on the command line. `--dry-run` resolves the config, reads the data manifest,
plans the batch, checks the layout for the given shape (default: the launcher's: torchrun, a SLURM
allocation) and the planner's memory estimate against `--gpu-mem`, prints a summary and exits, without
starting processes, process groups or CUDA.

`--resume auto` (the default) continues from RUN_DIR/checkpoints/latest if there is one; `none` starts
fresh; PATH is a run directory, its checkpoints/ directory or one step_<N> directory. A checkpoint of
another model shape, or of other data (unless --allow-new-data), is refused.

Exit codes: 0 done; 2 a user error (one line on stderr: config, data, checkpoint, divergence); 75
preempted (SIGTERM/SIGUSR1: the step was finished and a checkpoint saved; run the same command again).
"""

from __future__ import annotations

import argparse

from gptforge.cli import parse_args_anywhere, quiet_deepspeed, run_cli, setup_rank_logging
from gptforge.train.dry_run import add_dry_run_args


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    parser.add_argument("--resume", default="auto", metavar="auto|none|PATH", help="default: auto")
    parser.add_argument(
        "--allow-new-data",
        action="store_true",
        help="resume a checkpoint on data other than it was trained on (same sample position)",
    )
    add_dry_run_args(parser)
    return parse_args_anywhere(parser, argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    setup_rank_logging()
    from gptforge.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from gptforge.train.dry_run import dry_run, resolve_shape

        print(dry_run(cfg, resolve_shape(args.world_size, args.gpus_per_node), args.gpu_mem))
        return 0

    quiet_deepspeed()
    from gptforge.train.loop import train

    return train(cfg, resume=args.resume, allow_new_data=args.allow_new_data)


if __name__ == "__main__":
    run_cli(main)
