"""Train a GPT on a corpus built by data_pipeline/build.py.

    python launch/train.py --config configs/tiny.yaml [section.key=value ...] [--resume auto|none|PATH]
    torchrun --nproc_per_node=N launch/train.py --config configs/gpt2-124m.yaml data.path=data/owt

`--resume auto` (the default) continues from RUN_DIR/checkpoints/latest if there is one; `none` starts
fresh; PATH is a run directory, its checkpoints/ directory or one step_<N> directory. A checkpoint of
another model shape, or of other data (unless --allow-new-data), is refused.

Exit codes: 0 done; 2 a user error (one line on stderr: config, data, checkpoint, divergence); 75
preempted (SIGTERM/SIGUSR1: the step was finished and a checkpoint saved; run the same command again).
"""

from __future__ import annotations

import argparse

from gptforge.cli import quiet_deepspeed, run_cli, setup_rank_logging


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
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    setup_rank_logging()
    from gptforge.config import load_config

    cfg = load_config(args.config, args.overrides)

    quiet_deepspeed()
    from gptforge.train.loop import train

    return train(cfg, resume=args.resume, allow_new_data=args.allow_new_data)


if __name__ == "__main__":
    run_cli(main)
