"""Evaluation of a saved model: loss and perplexity over a build output, classification accuracy with a
confusion matrix, and multiple-choice accuracy on HellaSwag-style rows. Each runs data parallel: every
rank takes its share and the sums meet on all ranks.

The loss over a build output is the trainer's own: the same windows (`gptforge.data.loader.eval_batches`,
cut into micro-batches as the training run's data-parallel ranks cut them), the same function (`mean_loss`,
which the trainer's evaluation calls too) and the same precision, so for a checkpoint it is exactly the
val_loss that run logged. Classification reuses the fine-tuning run's examples and confusion matrix.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gptforge.errors import DataError
from gptforge.finetune.data import Examples, Row, check_text, read_rows
from gptforge.model.loss import IGNORE_INDEX
from gptforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CHOICE_HINT = '{"context": "...", "endings": ["...", "..."], "label": 0}'


class Autocast(nn.Module):
    """A model run under torch.autocast, as DeepSpeed's `torch_autocast` runs the trainer's forward."""

    def __init__(self, model: nn.Module, device_type: str, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.model = model
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.model(*args, **kwargs)


def in_precision(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """The model as the trainer runs it in `mode` (see gptforge.train.precision.precision_mode)."""
    if mode == "autocast":
        return Autocast(model, device.type)
    if mode in ("bf16", "fp16"):
        return model.to(torch.bfloat16 if mode == "bf16" else torch.float16)
    return model


def _progress(items: Sequence, desc: str, show: bool) -> Iterable:
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="batch", disable=not show or len(items) < 2)


# ---------------------------------------------------------------------------------------------- loss


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], dist_ctx: Any) -> float:
    """Mean loss per sequence over `batches` (each rank its share, summed over ranks); `model(x, y)`
    returns (logits, mean loss of the batch), as a GPT or a DeepSpeed engine around one does."""
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=dist_ctx.device), 0
    for x, y in batches:
        _, loss = model(x.to(dist_ctx.device), y.to(dist_ctx.device))
        total += loss.double() * x.size(0)
        count += x.size(0)
    model.train()
    loss_sum, n = dist_ctx.sum([float(total), float(count)])
    return loss_sum / n


@torch.no_grad()
def engine_loss(engine: Any, batches: list[tuple[Tensor, Tensor]], dist_ctx: Any) -> float:
    """The trainer's evaluation: `mean_loss` through a DeepSpeed engine, or through a pipeline engine's
    own schedule (pp > 1)."""
    from gptforge.train.engine import is_pipeline

    if is_pipeline(engine):
        return _pipeline_loss(engine, batches, dist_ctx)
    return mean_loss(engine, batches, dist_ctx)


def _pipeline_loss(engine: Any, batches: list[tuple[Tensor, Tensor]], dist_ctx: Any) -> float:
    """`mean_loss` through the pipeline: one `eval_batch` over this rank's windows (the last micro-batch
    may be smaller: shapes are sent with each), the losses weighted by micro-batch size on the last stage."""
    if dist_ctx.any(not batches):  # eval_batch is collective; fewer windows than dp ranks: nothing to run
        return float("nan")
    engine.dynamic_shape = True
    engine.reset_activation_shape()
    try:
        losses = engine.eval_batch(
            iter(batches), num_micro_batches=len(batches), reduce_output=None, bcast_loss=False
        )
    finally:
        engine.dynamic_shape = False
        engine.reset_activation_shape()  # training's micro-batches announce their shape again
    total = count = 0.0
    if engine.is_last_stage():
        total = sum(float(loss) * x.size(0) for loss, (x, _) in zip(losses, batches, strict=True))
        count = float(sum(x.size(0) for x, _ in batches))
    loss_sum, n = dist_ctx.sum([total, count])
    return loss_sum / n


@dataclass(frozen=True)
class LossSettings:
    """Which windows and how they are batched: `eval_iters` x `micro_batch` windows spread over the split
    (0 = every window), grouped as a run with `train_dp` data-parallel ranks groups them."""

    eval_iters: int
    micro_batch: int
    train_dp: int = 1


def lm_loss(
    model: nn.Module,
    manifest: Any,
    split: str,
    context: int,
    settings: LossSettings,
    dist_ctx: Any,
    show_progress: bool = False,
) -> tuple[float, int]:
    """(mean loss, windows) over `split` of a build output, computed as the trainer's eval computes it."""
    from gptforge.data.loader import WindowDataset, eval_batches

    data = WindowDataset(manifest, split, context, seed=0)  # eval windows do not depend on the seed
    if len(data) == 0:
        raise DataError(
            f"{manifest.root}: the '{split}' split has {data.stream.tokens} tokens, not one window of "
            f"{context + 1}; evaluate a longer split"
        )
    s = settings
    n = s.eval_iters * s.micro_batch if s.eval_iters > 0 else len(data)
    batches = [b for r in range(s.train_dp) for b in eval_batches(data, n, s.micro_batch, r, s.train_dp)]
    mine = batches[dist_ctx.dp_rank :: dist_ctx.dp_size]
    progress = _progress(mine, f"eval {split}", dist_ctx.is_main and show_progress)
    return mean_loss(model, progress, dist_ctx), sum(len(x) for x, _ in batches)


# ---------------------------------------------------------------------------------------------- classify


def classify_eval(
    model: nn.Module, labels: Sequence[str], tok: Tokenizer, path: str, micro_batch: int, dist_ctx: Any
) -> tuple[float, Tensor]:
    """(mean loss, true x predicted counts) of a classifier over a {"text", "label"} JSONL file."""
    from gptforge.finetune import classify
    from gptforge.finetune.data import example_eval_batches

    rows = read_rows(path, ("text", "label"), classify.ROW_HINT)
    examples = classify.classify_examples(rows, labels, tok, model_context(model), "eval")
    batches = example_eval_batches(examples, micro_batch, dist_ctx.dp_rank, dist_ctx.dp_size, tok.eot_id)
    return classify.confusion_matrix(model, batches, len(labels), dist_ctx)


def model_context(model: nn.Module) -> int:
    inner = model.model if isinstance(model, Autocast) else model
    return inner.cfg.context_length


# ---------------------------------------------------------------------------------------------- choice


def join(context: str, ending: str) -> str:
    """The ending's text as it follows the context: one space between them unless either side has one
    (HellaSwag's endings carry no leading space; GPT-2's BPE marks a word start by its space)."""
    if context and ending and not context[-1].isspace() and not ending[0].isspace():
        return " " + ending
    return ending


def choice_examples(
    rows: Sequence[Row], tok: Tokenizer, context: int
) -> tuple[Examples, list[int], list[int]]:
    """One example per (row, ending): inputs = context + ending minus the last token, targets = the
    ending's tokens (the context's positions at -100). Returns the examples, each row's ending count
    and label. A context too long for the window loses its start."""
    inputs, targets, counts, labels, truncated = [], [], [], [], 0
    for row in rows:
        text = check_text(row, "context")
        endings, label = row.values["endings"], row.values["label"]
        if (
            not isinstance(endings, list)
            or len(endings) < 2
            or not all(isinstance(e, str) and e for e in endings)
        ):
            raise DataError(f"{row.where}: 'endings' must be a list of at least two non-empty strings")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
            raise DataError(
                f"{row.where}: 'label' must be the index of the right ending, 0..{len(endings) - 1}; got {label!r}"
            )
        ctx = tok.encode(text) or [
            tok.eot_id
        ]  # an empty context: condition on end-of-text, as GPT-2 samples do
        for ending in endings:
            end = tok.encode(join(text, ending))
            if len(end) > context:
                raise DataError(
                    f"{row.where}: an ending of {len(end)} tokens is longer than the model's context ({context})"
                )
            keep = min(len(ctx), context + 1 - len(end))
            truncated += keep < len(ctx)
            sequence = ctx[len(ctx) - keep :] + end
            inputs.append(sequence[:-1])
            targets.append([IGNORE_INDEX] * (keep - 1) + end)
        counts.append(len(endings))
        labels.append(label)
    if truncated:
        log.warning(
            "%d context+ending sequences were longer than the context (%d tokens): kept the end",
            truncated,
            context,
        )
    return Examples(inputs, targets), counts, labels


@torch.no_grad()
def mean_log_likelihood(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Per row: the mean log-probability of the target tokens (those != -100)."""
    logits, _ = model(x)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    mask = y != IGNORE_INDEX
    picked = log_probs.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1) / mask.sum(-1)


def choice_eval(
    model: nn.Module, tok: Tokenizer, path: str, micro_batch: int, dist_ctx: Any, show_progress: bool = False
) -> tuple[int, int]:
    """(correct, rows) of HellaSwag-style rows: the prediction is the ending with the highest mean
    log-likelihood given the context."""
    rows = read_rows(path, ("context", "endings", "label"), CHOICE_HINT)
    mine = [rows[i] for i in np.array_split(np.arange(len(rows)), dist_ctx.dp_size)[dist_ctx.dp_rank]]
    correct = 0
    if mine:
        examples, counts, labels = choice_examples(mine, tok, model_context(model))
        device = dist_ctx.device
        starts = range(0, len(examples), micro_batch)
        scores = []
        model.eval()
        for i in _progress(starts, "multiple choice", dist_ctx.is_main and show_progress):
            x, y = examples.batch(range(i, min(i + micro_batch, len(examples))), tok.eot_id)
            scores.append(mean_log_likelihood(model, x.to(device), y.to(device)).cpu())
        per_ending = torch.cat(scores).split(counts)
        correct = sum(int(s.argmax()) == label for s, label in zip(per_ending, labels, strict=True))
    total_correct, total = dist_ctx.sum([float(correct), float(len(mine))])
    return int(total_correct), int(total)
