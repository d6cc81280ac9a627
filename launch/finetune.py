"""Fine-tune a pretrained GPT: classification or instruction following, full or LoRA.

    python launch/finetune.py --task classify --config configs/finetune-classify.yaml \
        --train examples/finetune/sentiment_train.jsonl --val examples/finetune/sentiment_val.jsonl
    torchrun --nproc_per_node=2 launch/finetune.py --task instruct --config configs/finetune-instruct.yaml \
        --train alpaca_train.jsonl --val alpaca_val.jsonl finetune.lora_rank=8 model.init_from=hf:gpt2

Overrides may stand anywhere on the command line; `--dry-run [--world-size N] [--gpus-per-node G]` checks
the config, files, batch plan, layout and memory for that shape and exits (see launch/train.py).
The model starts from `model.init_from` (hf:DIR = a Hugging Face GPT-2 directory, checkpoint:DIR = a
gptforge run or checkpoint). `classify` rows: {"text": ..., "label": ...}; `instruct` rows (Alpaca):
{"instruction": ..., "input": ..., "output": ...}. Writes a run directory like launch/train.py (metrics.jsonl,
with val_accuracy for classify; tensorboard/; checkpoints/), plus responses.jsonl for instruct.
`--resume` and the exit codes are launch/train.py's.
"""

from __future__ import annotations

import argparse
import dataclasses

from gptforge.cli import parse_args_anywhere, quiet_deepspeed, run_cli, setup_rank_logging
from gptforge.train.dry_run import add_dry_run_args


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--task", choices=("classify", "instruct"), help="default: finetune.task of the config"
    )
    parser.add_argument("--config", required=True, help="YAML config (configs/finetune-*.yaml)")
    parser.add_argument("--train", metavar="FILE.jsonl", help="training rows (default: finetune.train)")
    parser.add_argument("--val", metavar="FILE.jsonl", help="validation rows (default: finetune.val)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    parser.add_argument("--resume", default="auto", metavar="auto|none|PATH", help="default: auto")
    parser.add_argument(
        "--allow-new-data",
        action="store_true",
        help="resume a checkpoint on other train/val files than it was trained on",
    )
    add_dry_run_args(parser)
    return parse_args_anywhere(parser, argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    setup_rank_logging()
    from gptforge.config import load_config
    from gptforge.finetune.config import FinetuneRunConfig

    cfg = load_config(args.config, args.overrides, cls=FinetuneRunConfig)
    flags = {key: value for key in ("task", "train", "val") if (value := getattr(args, key))}
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, **flags))
    if args.dry_run:
        from gptforge.finetune.config import validate_finetune
        from gptforge.train.dry_run import dry_run, files_exist, resolve_shape

        validate_finetune(cfg)
        inputs = files_exist(cfg.finetune.train, cfg.finetune.val)
        shape = resolve_shape(args.world_size, args.gpus_per_node)
        print(dry_run(cfg, shape, args.gpu_mem, model_parallel=False, extra=inputs))
        return 0

    quiet_deepspeed()
    from gptforge.finetune.tasks import finetune

    return finetune(cfg, resume=args.resume, allow_new_data=args.allow_new_data)


if __name__ == "__main__":
    run_cli(main)
