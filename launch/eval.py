"""Evaluate a model: loss and perplexity over a build output, classification accuracy, multiple choice.

    python launch/eval.py --checkpoint runs/tiny --data demo/data [--split val] [--json]
    python launch/eval.py --checkpoint runs/sentiment --task classify --data examples/finetune/sentiment_val.jsonl
    python launch/eval.py --hf path/to/gpt2 --task choice --data hellaswag_val.jsonl --json
    torchrun --nproc_per_node=4 launch/eval.py --checkpoint runs/gpt2 --data data/owt --eval-iters 0

`--data DIR` (a data_pipeline/build.py output): the mean next-token loss over the split's windows and its
exp, the perplexity. For a training checkpoint the windows, micro-batches and precision default to those of
the run's own evaluation, so the loss is exactly the val_loss it logged at that step; `--eval-iters 0`
takes every window of the split.
`--task classify`: a checkpoint of `launch/finetune.py --task classify` on {"text", "label"} rows: accuracy
and the confusion matrix. `--task choice`: {"context", "endings": [...], "label": index} rows (HellaSwag
style): the prediction is the ending with the highest mean log-likelihood per token given the context.
Under torchrun each rank evaluates a share. `--json` prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from gptforge.cli import quiet_deepspeed, run_cli, setup_rank_logging
from gptforge.errors import GptforgeError

log = logging.getLogger("eval")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint", metavar="DIR", help="run directory, checkpoint or gptforge model directory"
    )
    source.add_argument("--hf", metavar="DIR", help="Hugging Face GPT-2 directory")
    parser.add_argument("--data", required=True, metavar="BUILD_DIR|FILE.jsonl")
    parser.add_argument(
        "--task",
        choices=("lm", "classify", "choice"),
        help="lm (default for a build output directory), classify or choice (JSONL rows)",
    )
    parser.add_argument("--split", default="val", help="split of the build output (default: val)")
    parser.add_argument(
        "--eval-iters",
        type=int,
        default=None,
        help="lm: eval_iters x micro batch windows (default: the run's train.eval_iters, else 0 = all)",
    )
    parser.add_argument(
        "--micro-batch-size",
        type=int,
        default=None,
        help="sequences per forward (default: the run's train.micro_batch_size, else 8)",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default=None,
        help="default: the run's train.precision, else fp32",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(argv)


def choose_task(args: argparse.Namespace) -> str:
    is_dir = Path(args.data).is_dir()
    task = args.task or ("lm" if is_dir else None)
    if task is None:
        raise GptforgeError(
            f"--data {args.data} is not a build output directory: for JSONL rows pass --task classify or --task choice"
        )
    if task == "lm" and not is_dir:
        raise GptforgeError(
            f"--data {args.data}: the loss and perplexity need a data_pipeline/build.py output directory"
        )
    if task != "lm" and is_dir:
        raise GptforgeError(f"--task {task} reads a JSONL file, but --data {args.data} is a directory")
    return task


def evaluate(args: argparse.Namespace, task: str, dist_ctx: Any) -> dict[str, Any]:
    from gptforge.evaluate import LossSettings, choice_eval, classify_eval, in_precision, lm_loss
    from gptforge.finetune.saved import load_classifier
    from gptforge.train.precision import precision_mode
    from gptforge.weights import load_model, run_meta

    spec = f"hf:{args.hf}" if args.hf else args.checkpoint
    meta = run_meta(spec)
    saved_train = meta["config"]["train"] if meta else {}
    mode = precision_mode(args.precision or saved_train.get("precision", "fp32"), dist_ctx.device)
    micro_batch = args.micro_batch_size or saved_train.get("micro_batch_size", 8)
    if micro_batch < 1:
        raise GptforgeError(f"--micro-batch-size must be >= 1, got {micro_batch}")
    device = dist_ctx.device
    show = not args.json

    if task == "classify":
        if args.hf:
            raise GptforgeError(
                "--task classify needs a classification checkpoint of launch/finetune.py, not --hf"
            )
        model, labels, tok = load_classifier(spec, device)
        loss, matrix = classify_eval(
            in_precision(model, mode, device), labels, tok, args.data, micro_batch, dist_ctx
        )
        n = int(matrix.sum())
        return {
            "accuracy": float(matrix.diag().sum()) / max(n, 1),
            "loss": loss,
            "examples": n,
            "labels": labels,
            "confusion_matrix": matrix.tolist(),
        }

    model, cfg, tok = load_model(spec, device)
    if task == "choice":
        correct, n = choice_eval(
            in_precision(model, mode, device), tok, args.data, micro_batch, dist_ctx, show
        )
        return {"accuracy": correct / max(n, 1), "correct": correct, "examples": n}

    from gptforge.data.format import read_manifest
    from gptforge.data.loader import check_tokenizer
    from gptforge.train.metrics import eval_record

    manifest = read_manifest(args.data)
    check_tokenizer(manifest, cfg.vocab_size, tok.describe())
    eval_iters = args.eval_iters if args.eval_iters is not None else saved_train.get("eval_iters", 0)
    settings = LossSettings(eval_iters, micro_batch, meta["layout"]["dp"] if meta else 1)
    loss, windows = lm_loss(
        in_precision(model, mode, device), manifest, args.split, cfg.context_length, settings, dist_ctx, show
    )
    record = eval_record(meta["step"] if meta else 0, loss)
    return {
        "loss": record["val_loss"],
        "ppl": record["val_ppl"],
        "split": args.split,
        "windows": windows,
        "tokens": windows * cfg.context_length,
    }


def report(result: dict[str, Any], task: str) -> str:
    if task == "lm":
        return (
            f"{result['split']} loss {result['loss']:.4f} | ppl {result['ppl']:.2f} | "
            f"{result['windows']} windows ({result['tokens']:,} tokens)"
        )
    if task == "choice":
        return f"accuracy {result['accuracy']:.4f} ({result['correct']}/{result['examples']} rows)"
    import torch

    from gptforge.finetune.classify import format_confusion

    correct = sum(result["confusion_matrix"][i][i] for i in range(len(result["labels"])))
    table = format_confusion(torch.tensor(result["confusion_matrix"]), result["labels"])
    return (
        f"accuracy {result['accuracy']:.4f} ({correct}/{result['examples']}) | loss {result['loss']:.4f}\n"
        f"confusion matrix (rows: true label, columns: predicted):\n{table}"
    )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    setup_rank_logging(quiet=args.json)
    task = choose_task(args)
    if args.eval_iters is not None and args.eval_iters < 0:
        raise GptforgeError(f"--eval-iters must be >= 0 (0 = every window), got {args.eval_iters}")

    import torch.distributed as dist

    quiet_deepspeed()
    from gptforge.config import Config
    from gptforge.train.distributed import init_distributed

    dist_ctx = init_distributed(Config())
    try:
        result = evaluate(args, task, dist_ctx)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if dist_ctx.is_main:
        print(json.dumps(result) if args.json else report(result, task))
    return 0


if __name__ == "__main__":
    run_cli(main)
