"""Fine-tuning as `Task`s of the one trainer: classification and instruction tuning.

`finetune(cfg)` runs one: the `gptforge.train.loop.Trainer` with a `ClassifyTask` or `InstructTask`. So
ZeRO, data parallelism and precision apply as they do to pretraining, and a fine-tuning run writes the
same run directory (config.yaml, metrics.jsonl, tensorboard/, checkpoints/) and resumes the same way.
`FinetuneTask` holds what both share: the starting GPT (`model.init_from`) and its tokenizer, JSONL
examples and their batches, what trains (the last layers, or LoRA adapters), `finetune.epochs`, and the
`finetune` block of a checkpoint; each task adds its rows, model, evaluation and ending.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor, nn

from gptforge.config import Config, ModelConfig
from gptforge.data.order import RankBatches, SampleOrder
from gptforge.errors import CheckpointError
from gptforge.finetune import classify, instruct
from gptforge.finetune.config import FinetuneConfig, FinetuneRunConfig, validate_finetune
from gptforge.finetune.data import (
    Examples,
    ExampleSet,
    balanced_weights,
    example_eval_batches,
    files_sha256,
    read_rows,
)
from gptforge.finetune.trainable import select_trainable, trainable_counts
from gptforge.model import GPT, flops_per_token
from gptforge.tokenizer import Tokenizer, tokenizer_from_manifest
from gptforge.train.loop import train
from gptforge.train.task import Task
from gptforge.weights import FINETUNE_KEY

if TYPE_CHECKING:
    from gptforge.train.loop import Trainer

log = logging.getLogger("finetune")

RESPONSES_FILE = "responses.jsonl"


class FinetuneTask(Task):
    """A pretrained GPT trained further on JSONL examples (a subclass reads them and builds the model)."""

    log = log
    train: Examples
    val: Examples

    # ------------------------------------------------------------------------------ what a task adds

    def read_examples(self, ft: FinetuneConfig, tok: Tokenizer, context: int) -> None:
        """Set `self.train` and `self.val` from the JSONL files."""
        raise NotImplementedError

    def build(self, base: GPT) -> tuple[nn.Module, nn.Module | None]:
        """The model to train from the starting GPT, and its new head (trained whatever is frozen)."""
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        """The `finetune` block of a checkpoint (with `lora` added): what a model needs to be rebuilt."""
        raise NotImplementedError

    def sample_weights(self) -> np.ndarray | None:
        return None

    # ------------------------------------------------------------------------------ the hooks

    def prepare(self, cfg: Config) -> None:
        assert isinstance(cfg, FinetuneRunConfig)
        validate_finetune(cfg)

    def setup(self, run: Trainer) -> tuple[nn.Module, Config]:
        from gptforge.weights import init_model

        cfg, dist, p = run.cfg, run.dist, run.plan
        ft = cfg.finetune
        base, model_cfg, tokenizer_info = init_model(cfg.model)
        assert tokenizer_info is not None  # validate_finetune refuses init_from=scratch
        self.tok = tokenizer_from_manifest(tokenizer_info)
        self.tokenizer_info = self.tok.describe()
        self.read_examples(ft, self.tok, model_cfg.context_length)
        self.data_source, self.data_sha256 = f"{ft.train},{ft.val}", files_sha256(ft.train, ft.val)
        t = cfg.train
        if ft.epochs is not None:
            t = dataclasses.replace(t, max_steps=math.ceil(ft.epochs * len(self.train) / p.global_batch))

        model, head = self.build(base)
        self.trainable_desc = select_trainable(model, ft, head)
        self.trainable, self.total = trainable_counts(model)
        model.to(dist.device)
        self.lora = (
            {"rank": ft.lora_rank, "alpha": ft.lora_alpha, "targets": ft.lora_targets}
            if ft.lora_rank
            else None
        )
        pad_id = self.tok.eot_id
        self.examples = ExampleSet(
            self.train, SampleOrder(len(self.train), t.seed, weights=self.sample_weights()), pad_id
        )
        self.train_batches = RankBatches(self.examples, p.micro_batch, p.grad_accum, dist.dp_rank, p.dp)
        self.val_batches = example_eval_batches(self.val, p.micro_batch, dist.dp_rank, p.dp, pad_id)
        self._counted = self._token_count = 0
        return model, dataclasses.replace(cfg, model=model_cfg, train=t)

    def check_resume(self, run: Trainer, meta: dict[str, Any]) -> None:
        """A checkpoint of another task, label set or LoRA shape cannot continue as this run."""
        saved = meta.get(FINETUNE_KEY) or {}
        now = {**self.meta(), "lora": self.lora}
        for key in ("task", "labels", "lora"):
            if saved.get(key) != now.get(key):
                raise CheckpointError(
                    f"{run.resume_dir} was fine-tuned with {key}={saved.get(key)!r}, this run has "
                    f"{key}={now.get(key)!r}; use another run.dir (or --resume none in a new one)"
                )

    def setup_lines(self, run: Trainer) -> tuple[list[str], list[str]]:
        t, p, m = run.cfg.train, run.plan, run.model_cfg
        train, val = self.train, self.val
        model = [
            f"fine-tuning ({self.name}) from {m.init_from}: {m.n_layer} layers, d_model {m.d_model}, "
            f"{m.n_head} heads, context {m.context_length}, vocab {m.vocab_size}",
            f"trainable parameters: {self.trainable:,} of {self.total:,} "
            f"({100 * self.trainable / self.total:.2f}%): {self.trainable_desc}",
        ]
        data = [
            f"batch: {p.global_batch} examples per step (micro batch {p.micro_batch} x {p.grad_accum} "
            f"accumulation x {p.dp} data-parallel)",
            f"data: {len(train)} train examples ({int(train.lengths.sum()):,} tokens, {train.truncated} "
            f"truncated), {len(val)} val ({val.truncated} truncated); {t.max_steps} steps = "
            f"{t.max_steps * p.global_batch / len(train):.2f} epochs",
        ]
        return model, data

    def begin(self, run: Trainer) -> None:
        """Step 0: what the run trains on (truncated counts, parameters), in metrics.jsonl and TensorBoard."""
        if run.state.step == 0:
            run.metrics.write(
                {
                    "step": 0,
                    "train_examples": len(self.train),
                    "val_examples": len(self.val),
                    "train_truncated": self.train.truncated,
                    "val_truncated": self.val.truncated,
                    "trainable_params": self.trainable,
                    "total_params": self.total,
                },
                "data",
            )

    def tokens(self, consumed: int) -> int:
        """Real tokens of the samples consumed so far (counted on from the last call)."""
        if consumed != self._counted:
            self._token_count += self.examples.tokens(self._counted, consumed - self._counted)
            self._counted = consumed
        return self._token_count

    def flops_per_token(self, model_cfg: ModelConfig) -> float:
        """Attention over the examples' mean length."""
        return flops_per_token(model_cfg, max(1, round(float(self.train.lengths.mean()))))

    def checkpoint_meta(self, run: Trainer, meta: dict[str, Any]) -> None:
        meta[FINETUNE_KEY] = {**self.meta(), "lora": self.lora}


class ClassifyTask(FinetuneTask):
    """Rows {"text", "label"}; the LM head replaced by a classifier; val loss and accuracy."""

    name = "classify"

    def read_examples(self, ft: FinetuneConfig, tok: Tokenizer, context: int) -> None:
        train_rows = read_rows(ft.train, ("text", "label"), classify.ROW_HINT)
        val_rows = read_rows(ft.val, ("text", "label"), classify.ROW_HINT)
        self.labels = classify.label_set(train_rows, ft.train)
        self.train = classify.classify_examples(train_rows, self.labels, tok, context, "train")
        self.val = classify.classify_examples(val_rows, self.labels, tok, context, "val")
        self.balance = ft.balance_classes
        self.confusion: Tensor | None = None  # of the latest evaluation

    def sample_weights(self) -> np.ndarray | None:
        assert self.train.labels is not None
        return balanced_weights(self.train.labels) if self.balance else None

    def build(self, base: GPT) -> tuple[nn.Module, nn.Module | None]:
        model = classify.GPTClassifier(base.cfg, len(self.labels), body=base)
        return model, model.score

    def meta(self) -> dict[str, Any]:
        return {"task": self.name, "labels": self.labels}

    def setup_lines(self, run: Trainer) -> tuple[list[str], list[str]]:
        model, data = super().setup_lines(run)
        assert self.train.labels is not None
        counts = np.bincount(self.train.labels, minlength=len(self.labels))
        labels = ", ".join(f"{lab!r} ({n})" for lab, n in zip(self.labels, counts, strict=True))
        return model, [*data, f"labels: {labels}{'; class-balanced sampling' if self.balance else ''}"]

    def evaluate(self, run: Trainer) -> dict[str, Any]:
        loss, self.confusion = classify.confusion_matrix(
            run.engine, self.val_batches, len(self.labels), run.dist
        )
        return {"val_loss": loss, "val_accuracy": classify.accuracy(self.confusion)}

    def flops_per_token(self, model_cfg: ModelConfig) -> float:
        """A classifier computes no LM head."""
        return super().flops_per_token(model_cfg) - 6 * model_cfg.vocab_size * model_cfg.d_model

    def end(self, run: Trainer) -> None:
        if run.dist.is_main and self.confusion is not None:
            log.info(
                "val confusion matrix (rows: true label):\n%s",
                classify.format_confusion(self.confusion, self.labels),
            )


class InstructTask(FinetuneTask):
    """Alpaca rows {"instruction", "input", "output"}; the LM itself; val loss per response token, and
    responses to the val prompts at the end."""

    name = "instruct"

    def read_examples(self, ft: FinetuneConfig, tok: Tokenizer, context: int) -> None:
        self.ft = ft
        self.template = instruct.load_template(ft.template)
        train_rows = read_rows(ft.train, ("instruction", "output"), instruct.ROW_HINT, optional=("input",))
        self.val_rows = read_rows(ft.val, ("instruction", "output"), instruct.ROW_HINT, optional=("input",))
        self.train = instruct.instruct_examples(
            train_rows, self.template, tok, context, ft.train_on_prompt, "train"
        )
        self.val = instruct.instruct_examples(
            self.val_rows, self.template, tok, context, ft.train_on_prompt, "val"
        )

    def build(self, base: GPT) -> tuple[nn.Module, nn.Module | None]:
        """The LM itself. Its head trains with the selected layers only if it is not the token embedding
        (tied, which stays frozen with the embeddings) and LoRA is off."""
        untied_head = None if base.cfg.tie_embeddings or self.ft.lora_rank else base.lm_head
        return base, untied_head

    def meta(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "template": self.template.to_dict(),
            "train_on_prompt": self.ft.train_on_prompt,
        }

    def evaluate(self, run: Trainer) -> dict[str, Any]:
        return {"val_loss": instruct.token_loss(run.engine, self.val_batches, run.dist)}

    def end(self, run: Trainer) -> None:
        """responses.jsonl: each rank answers its share of the val prompts; rank 0 writes them in order."""
        ft = self.ft
        count = len(self.val_rows) if ft.responses < 0 else min(ft.responses, len(self.val_rows))
        if count == 0:
            return
        d = run.dist
        mine = np.array_split(np.arange(count), d.dp_size)[d.dp_rank]
        records = instruct.generate_responses(
            run.engine.module,
            [self.val_rows[i] for i in mine],
            self.template,
            self.tok,
            run.plan.micro_batch,
            ft.response_max_tokens,
            ft.response_temperature,
            ft.response_top_k,
            run.cfg.train.seed + int(mine[0]) if len(mine) else 0,
            d.is_main,
        )
        gathered = [r for part in d.gather(records) for r in part]
        if d.is_main:
            instruct.write_jsonl(run.run_dir / RESPONSES_FILE, gathered)
            log.info("wrote %d val responses to %s", len(gathered), run.run_dir / RESPONSES_FILE)


TASK_TYPES: dict[str, type[FinetuneTask]] = {"classify": ClassifyTask, "instruct": InstructTask}


def finetune(cfg: FinetuneRunConfig, resume: str = "auto", allow_new_data: bool = False) -> int:
    """Run fine-tuning to the end; returns 0, or EXIT_PREEMPTED after a signal-triggered save."""
    return train(cfg, resume, allow_new_data, task=TASK_TYPES[cfg.finetune.task]())
