"""The fine-tuning run: the trainer's machinery around a task.

`Finetuner` is a `gptforge.train.loop.Trainer` with its own set-up: the process group, batch plan and
DeepSpeed engine come from `gptforge.train.engine` as for pretraining, and the loop (steps, logging,
evaluation cadence, checkpoints, preemption) is the trainer's. A task (classify or instruct) reads its
JSONL files into examples, builds the model from the starting GPT, evaluates, and says what its
checkpoints record. So ZeRO, data parallelism and precision apply as they do to pretraining, and a
fine-tuning run writes the same run directory (config.yaml, metrics.jsonl, tensorboard/, checkpoints/)
and resumes the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from gptforge.config import config_to_dict
from gptforge.errors import CheckpointError
from gptforge.finetune import classify, instruct
from gptforge.finetune.config import FinetuneConfig, FinetuneRunConfig, validate_finetune
from gptforge.finetune.data import (
    ExampleOrder,
    FinetuneBatches,
    balanced_weights,
    eval_batches,
    files_sha256,
    read_rows,
)
from gptforge.finetune.saved import FINETUNE_KEY
from gptforge.finetune.trainable import count_parameters, select_trainable
from gptforge.model import GPT, flops_per_token
from gptforge.tokenizer import Tokenizer, tokenizer_from_manifest
from gptforge.train import checkpoint
from gptforge.train.engine import (
    build_engine,
)
from gptforge.train.loop import Trainer, seed_everything, train
from gptforge.train.metrics import eval_record

log = logging.getLogger("finetune")

RESPONSES_FILE = "responses.jsonl"


# ---------------------------------------------------------------------------------------------- tasks


class ClassifyTask:
    """Rows {"text", "label"}; the LM head replaced by a classifier; val loss and accuracy."""

    name = "classify"

    def __init__(self, ft: FinetuneConfig, tok: Tokenizer, context: int) -> None:
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

    def evaluate(self, engine: Any, batches: list, dist_ctx: Any) -> dict[str, float]:
        loss, self.confusion = classify.confusion_matrix(engine, batches, len(self.labels), dist_ctx)
        return {"val_loss": loss, "val_accuracy": classify.accuracy(self.confusion)}

    def meta(self) -> dict[str, Any]:
        return {"task": self.name, "labels": self.labels}

    def finish(self, run: Finetuner) -> None:
        if run.dist.is_main and self.confusion is not None:
            log.info(
                "val confusion matrix (rows: true label):\n%s",
                classify.format_confusion(self.confusion, self.labels),
            )


class InstructTask:
    """Alpaca rows {"instruction", "input", "output"}; the LM itself; val loss per response token, and
    responses to the val prompts at the end."""

    name = "instruct"

    def __init__(self, ft: FinetuneConfig, tok: Tokenizer, context: int) -> None:
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

    def sample_weights(self) -> np.ndarray | None:
        return None

    def build(self, base: GPT) -> tuple[nn.Module, nn.Module | None]:
        """The LM itself. Its head trains with the selected layers only if it is not the token embedding
        (tied, which stays frozen with the embeddings) and LoRA is off."""
        untied_head = None if base.cfg.tie_embeddings or self.ft.lora_rank else base.lm_head
        return base, untied_head

    def evaluate(self, engine: Any, batches: list, dist_ctx: Any) -> dict[str, float]:
        return {"val_loss": instruct.token_loss(engine, batches, dist_ctx)}

    def meta(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "template": self.template.to_dict(),
            "train_on_prompt": self.ft.train_on_prompt,
        }

    def finish(self, run: Finetuner) -> None:
        """responses.jsonl: each rank answers its share of the val prompts; rank 0 writes them in order."""
        count = len(self.val_rows) if self.ft.responses < 0 else min(self.ft.responses, len(self.val_rows))
        if count == 0:
            return
        d = run.dist
        mine = np.array_split(np.arange(count), d.dp_size)[d.dp_rank]
        records = instruct.generate_responses(
            run.engine.module,
            [self.val_rows[i] for i in mine],
            self.template,
            run.tok,
            run.plan.micro_batch,
            self.ft.response_max_tokens,
            self.ft.response_temperature,
            self.ft.response_top_k,
            run.cfg.train.seed + int(mine[0]) if len(mine) else 0,
            d.is_main,
        )
        gathered = [r for part in d.gather(records) for r in part]
        if d.is_main:
            instruct.write_jsonl(run.run_dir / RESPONSES_FILE, gathered)
            log.info("wrote %d val responses to %s", len(gathered), run.run_dir / RESPONSES_FILE)


TASKS = {"classify": ClassifyTask, "instruct": InstructTask}


# ---------------------------------------------------------------------------------------------- run


class Finetuner(Trainer):
    """A fine-tuning run: its own set-up (JSONL examples, the task's model, what is frozen), then the
    trainer's loop (`Trainer.run`: steps, logging, evaluation, checkpoints, preemption) with the task's
    evaluation and checkpoint contents."""

    def __init__(self, cfg: FinetuneRunConfig, resume: str = "auto", allow_new_data: bool = False) -> None:
        validate_finetune(cfg)
        resume_meta = self._start(cfg, resume, model_parallel=False)
        seed_everything(cfg.train.seed)

        from gptforge.weights import init_model

        base, model_cfg, tokenizer_info = init_model(cfg.model)
        assert tokenizer_info is not None  # validate_finetune refuses init_from=scratch
        self.tok = tokenizer_from_manifest(tokenizer_info)
        ft = cfg.finetune
        self.task = TASKS[ft.task](ft, self.tok, model_cfg.context_length)
        self.data_sha256 = files_sha256(ft.train, ft.val)
        t = cfg.train
        if ft.epochs is not None:
            t = dataclasses.replace(
                t, max_steps=math.ceil(ft.epochs * len(self.task.train) / self.plan.global_batch)
            )
        self.cfg = dataclasses.replace(cfg, model=model_cfg, train=t)
        self.model_cfg = model_cfg

        model, head = self.task.build(base)
        self.trainable_desc = select_trainable(model, ft, head)
        self.trainable, self.total = count_parameters(model)
        model.to(self.dist.device)
        self.lora = (
            {"rank": ft.lora_rank, "alpha": ft.lora_alpha, "targets": ft.lora_targets}
            if ft.lora_rank
            else None
        )
        self.layout = {
            "world_size": self.dist.world_size,
            "dp": self.plan.dp,
            "tp": cfg.parallel.tp,
            "pp": cfg.parallel.pp,
            "zero_stage": cfg.parallel.zero_stage,
            "precision_mode": self.mode,
        }
        if resume_meta is not None:
            assert self.resume_dir is not None
            checkpoint.check_resume(
                resume_meta, self.resume_dir, model_cfg, self.data_sha256, self.layout, allow_new_data
            )
            self._check_same_task(resume_meta)

        pad_id = self.tok.eot_id
        order = ExampleOrder(len(self.task.train), t.seed, self.task.sample_weights())
        self.batches = FinetuneBatches(
            self.task.train,
            order,
            self.plan.micro_batch,
            self.plan.grad_accum,
            self.dist.dp_rank,
            self.plan.dp,
            pad_id,
        )
        self.val_batches = eval_batches(
            self.task.val, self.plan.micro_batch, self.dist.dp_rank, self.plan.dp, pad_id
        )

        self.engine = build_engine(self.cfg, model, self.plan, self.mode, self.dist)
        self.state = checkpoint.TrainState()
        if resume_meta is not None:
            self.state = self._load(resume_meta)
        self._counted = self._token_count = 0
        peak_source = self._open_run(resume_meta)
        # attention over the examples' mean length; a classifier computes no LM head
        mean_len = max(1, round(float(self.task.train.lengths.mean())))
        no_lm_head = (
            6 * model_cfg.vocab_size * model_cfg.d_model if isinstance(self.task, ClassifyTask) else 0
        )
        self.flops_per_token = flops_per_token(model_cfg, mean_len) - no_lm_head
        self._log_finetune_setup(peak_source)

    # ------------------------------------------------------------------------------------------ setup

    def _check_same_task(self, meta: dict[str, Any]) -> None:
        """A checkpoint of another task, label set or LoRA shape cannot continue as this run."""
        saved = meta.get(FINETUNE_KEY) or {}
        now = {**self.task.meta(), "lora": self.lora}
        for key in ("task", "labels", "lora"):
            if saved.get(key) != now.get(key):
                raise CheckpointError(
                    f"{self.resume_dir} was fine-tuned with {key}={saved.get(key)!r}, this run has "
                    f"{key}={now.get(key)!r}; use another run.dir (or --resume none in a new one)"
                )

    def _log_finetune_setup(self, peak_source: str) -> None:
        if not self.dist.is_main:
            return
        t, p, m, ft = self.cfg.train, self.plan, self.model_cfg, self.cfg.finetune
        train, val = self.task.train, self.task.val
        log.info(
            "fine-tuning (%s) from %s: %d layers, d_model %d, %d heads, context %d, vocab %d",
            ft.task,
            m.init_from,
            m.n_layer,
            m.d_model,
            m.n_head,
            m.context_length,
            m.vocab_size,
        )
        log.info(
            "trainable parameters: %s of %s (%.2f%%): %s",
            f"{self.trainable:,}",
            f"{self.total:,}",
            100 * self.trainable / self.total,
            self.trainable_desc,
        )
        self._log_layout()
        log.info(
            "batch: %d examples per step (micro batch %d x %d accumulation x %d data-parallel)",
            p.global_batch,
            p.micro_batch,
            p.grad_accum,
            p.dp,
        )
        log.info(
            "data: %d train examples (%s tokens, %d truncated), %d val (%d truncated); %d steps = %.2f epochs",
            len(train),
            f"{int(train.lengths.sum()):,}",
            train.truncated,
            len(val),
            val.truncated,
            t.max_steps,
            t.max_steps * p.global_batch / len(train),
        )
        if isinstance(self.task, ClassifyTask):
            assert train.labels is not None
            counts = np.bincount(train.labels, minlength=len(self.task.labels))
            log.info(
                "labels: %s%s",
                ", ".join(f"{lab!r} ({n})" for lab, n in zip(self.task.labels, counts, strict=True)),
                "; class-balanced sampling" if ft.balance_classes else "",
            )
        log.info("MFU peak: %.0f GFLOP/s per rank (%s)", self.peak / 1e9, peak_source)

    # ------------------------------------------------------------------------------------------ loop hooks

    def run(self) -> int:
        """The trainer's loop, with the data record before it and the task's ending after it."""
        if self.state.step == 0:
            self._write_data_record()
        code = super().run()
        if code == 0:
            self.task.finish(self)
        return code

    def _write_data_record(self) -> None:
        """Step 0: what the run trains on (truncated counts, parameters), in metrics.jsonl and TensorBoard."""
        train, val = self.task.train, self.task.val
        self.metrics.write(
            {
                "step": 0,
                "train_examples": len(train),
                "val_examples": len(val),
                "train_truncated": train.truncated,
                "val_truncated": val.truncated,
                "trainable_params": self.trainable,
                "total_params": self.total,
            },
            "data",
        )

    def _tokens(self) -> int:
        """Real tokens of the samples consumed so far: a function of the position, so exact on resume."""
        consumed = self.state.consumed_samples
        if consumed != self._counted:
            self._token_count += self.batches.tokens(self._counted, consumed - self._counted)
            self._counted = consumed
        return self._token_count

    def _evaluate(self) -> None:
        values = self.task.evaluate(self.engine, self.val_batches, self.dist)
        record = {**eval_record(self.state.step, values.pop("val_loss")), **values}
        if self.dist.is_main:
            extra = "".join(
                f" | {k.removeprefix('val_').replace('_', ' ')} {v:.4f}" for k, v in values.items()
            )
            log.info(
                "step %d | val loss %.4f | val ppl %.2f%s",
                record["step"],
                record["val_loss"],
                record["val_ppl"],
                extra,
            )
        self.metrics.write(record, "val")

    def _sample(self) -> None:
        """No periodic samples: an instruct run writes responses to the val prompts at the end."""

    def _save(self) -> Path:
        ft = self.cfg.finetune
        meta = checkpoint.checkpoint_meta(
            self.model_cfg,
            self.tok.describe(),
            f"{ft.train},{ft.val}",
            self.data_sha256,
            self.layout,
            config_to_dict(self.cfg),
        )
        meta[FINETUNE_KEY] = {**self.task.meta(), "lora": self.lora}
        path = checkpoint.save(
            self.engine, self.run_dir, self.state, meta, self.dist, self.cfg.train.keep_last
        )
        if self.dist.is_main:
            log.info("saved %s", path)
        return path


def finetune(cfg: FinetuneRunConfig, resume: str = "auto", allow_new_data: bool = False) -> int:
    """Run fine-tuning to the end; returns 0, or EXIT_PREEMPTED after a signal-triggered save."""
    return train(cfg, resume, allow_new_data, trainer=Finetuner)
