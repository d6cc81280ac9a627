"""Shared pieces of the fine-tuning and evaluation tests: tiny random Hugging Face GPT-2 directories (saved
by transformers, offline), small synthetic classification and Alpaca data, running the CLIs as real
processes."""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = str(ROOT / "launch" / "finetune.py")
EVAL = str(ROOT / "launch" / "eval.py")
GENERATE = str(ROOT / "launch" / "generate.py")
EXPORT = str(ROOT / "launch" / "export.py")

POSITIVE = ["great", "wonderful", "excellent", "lovely", "superb", "delightful"]
NEGATIVE = ["awful", "terrible", "horrible", "dreadful", "boring", "dull"]
FILLER = [
    "the",
    "a",
    "movie",
    "film",
    "plot",
    "actors",
    "story",
    "music",
    "scenes",
    "was",
    "and",
    "it",
    "with",
    "very",
    "quite",
    "really",
]
COLORS = {
    "apple": "red",
    "banana": "yellow",
    "grass": "green",
    "sky": "blue",
    "snow": "white",
    "coal": "black",
}

# A run of a few dozen steps: seconds on a 2-core CPU.
TINY_FT = [
    "optim.lr=3e-3",
    "optim.min_lr=3e-4",
    "optim.warmup_steps=5",
    "optim.weight_decay=0.0",
    "train.micro_batch_size=16",
    "train.global_batch_size=16",
    "train.log_interval=1",
    "train.eval_interval=20",
    "train.save_interval=1000",
    "run.tensorboard=false",
]


def tiny_hf(out: Path, seed: int = 0, n_layer: int = 2, d_model: int = 32, context: int = 64) -> Path:
    """A random GPT-2 (GPT-2's vocabulary, tiny width) written by transformers' save_pretrained."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=50257, n_positions=context, n_embd=d_model, n_layer=n_layer, n_head=2
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(out)
    return out


def sentiment_rows(n: int, seed: int) -> list[dict]:
    """Short 'reviews': filler words and one sentiment word at a random place; label pos/neg."""
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        label = r.choice(["pos", "neg"])
        words = [r.choice(FILLER) for _ in range(r.randint(3, 10))]
        words.insert(r.randint(0, len(words)), r.choice(POSITIVE if label == "pos" else NEGATIVE))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def alpaca_rows(n: int, seed: int) -> list[dict]:
    """Alpaca-format rows of three kinds (with and without input)."""
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        thing = r.choice(list(COLORS))
        kind = r.randrange(3)
        if kind == 0:
            rows.append(
                {
                    "instruction": "What color is this?",
                    "input": thing,
                    "output": f"The {thing} is {COLORS[thing]}.",
                }
            )
        elif kind == 1:
            rows.append(
                {"instruction": f"Repeat the word {thing} twice.", "input": "", "output": f"{thing} {thing}"}
            )
        else:
            a, b = r.randint(1, 9), r.randint(1, 9)
            rows.append(
                {"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": str(a + b)}
            )
    return rows


def write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_ft_config(path: Path, init_from: str, run_dir: Path, *extra: str) -> Path:
    """configs/tiny.yaml with TINY_FT, starting from `init_from`, writing to `run_dir`."""
    import yaml

    values: dict = {"base": str(ROOT / "configs" / "tiny.yaml")}
    for item in [*TINY_FT, f"model.init_from={init_from}", f"run.dir={run_dir}", *extra]:
        key, _, value = item.partition("=")
        section, name = key.split(".")
        values.setdefault(section, {})[name] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(values))
    return path


def launcher(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def finetune_cmd(
    task: str, config: Path, train: Path, val: Path, *overrides: str, nproc: int = 1, resume: str = "none"
) -> list[str]:
    return [
        *launcher(nproc),
        FINETUNE,
        "--task",
        task,
        "--config",
        str(config),
        "--train",
        str(train),
        "--val",
        str(val),
        *overrides,
        "--resume",
        resume,
    ]


def eval_cmd(*args: str, nproc: int = 1) -> list[str]:
    return [*launcher(nproc), EVAL, *args]


def metric_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def ok(result):
    assert result.returncode == 0, (
        f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    return result
