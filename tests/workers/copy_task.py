"""python tests/workers/copy_task.py RUN_DIR MAX_STEPS

A kind of run the trainer has never seen, written only as a `Task` (no loop code): a tiny GPT learns to
continue fixed random sequences; its evaluation adds a metric of its own and its checkpoints a block of
their own. `tests/test_trainer_tasks.py` runs it, stops, resumes and reads what it wrote.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from gptforge.cli import quiet_deepspeed, setup_rank_logging
from gptforge.config import Config, ModelConfig, load_config
from gptforge.evaluate import mean_loss
from gptforge.model import GPT, flops_per_token
from gptforge.train.task import Task

VOCAB, SEQUENCES = 16, 32


class Batches:
    """The global batch at position c: sequences [c, c + G) modulo the set, this rank's micro-batches."""

    def __init__(self, data: Tensor, micro: int, accum: int) -> None:
        self.data, self.micro, self.accum = data, micro, accum

    def step(self, consumed: int) -> Iterator[tuple[Tensor, Tensor]]:
        for m in range(self.accum):
            rows = [(consumed + m * self.micro + i) % len(self.data) for i in range(self.micro)]
            seq = self.data[rows]
            yield seq[:, :-1], seq[:, 1:]


class CopyTask(Task):
    name = "copy"

    def prepare(self, cfg: Config) -> None:
        self.tokenizer_info = {"name": "none", "vocab_size": VOCAB, "eot_id": 0}
        self.data_source, self.data_sha256 = "random sequences", "0" * 64

    def setup(self, run: Any) -> tuple[nn.Module, Config]:
        model_cfg = dataclasses.replace(run.cfg.model, vocab_size=VOCAB)
        self.context = model_cfg.context_length
        data = torch.randint(
            1, VOCAB, (SEQUENCES, self.context + 1), generator=torch.Generator().manual_seed(0)
        )
        self.train_batches = Batches(data, run.plan.micro_batch, run.plan.grad_accum)
        self.val_batches = [(data[:8, :-1], data[:8, 1:])]
        return GPT(model_cfg).to(run.dist.device), dataclasses.replace(run.cfg, model=model_cfg)

    def evaluate(self, run: Any) -> dict[str, Any]:
        x, y = self.val_batches[0]
        with torch.no_grad():
            logits, _ = run.engine(x, y)
        return {
            "val_loss": mean_loss(run.engine, self.val_batches, run.dist),
            "val_copy_accuracy": float((logits.argmax(-1) == y).float().mean()),
        }

    def tokens(self, consumed: int) -> int:
        return consumed * self.context

    def flops_per_token(self, model_cfg: ModelConfig) -> float:
        return flops_per_token(model_cfg)

    def checkpoint_meta(self, run: Any, meta: dict[str, Any]) -> None:
        meta["copy"] = {"sequences": SEQUENCES}


def main() -> int:
    run_dir, steps = sys.argv[1], int(sys.argv[2])
    setup_rank_logging()
    quiet_deepspeed()
    from gptforge.train.loop import train

    overrides = [
        "model.n_layer=1",
        "model.n_head=2",
        "model.d_model=16",
        "model.context_length=8",
        "train.micro_batch_size=4",
        "train.global_batch_size=8",
        f"train.max_steps={steps}",
        "train.eval_interval=2",
        "train.save_interval=2",
        "train.sample_interval=0",
        "optim.warmup_steps=1",
        "optim.decay_steps=6",  # the same schedule for a run stopped at 4 and resumed to 6
        "train.log_interval=1",
        "optim.lr=1e-2",
        "run.tensorboard=false",
        f"run.dir={run_dir}",
    ]
    return train(load_config(None, overrides), resume="auto", task=CopyTask())


if __name__ == "__main__":
    sys.exit(main())
