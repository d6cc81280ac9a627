"""Sequence classification: GPT-2's body with the LM head replaced by a linear layer over the hidden state
of each row's last real token (the only position that has seen the whole text under causal attention).

The targets keep the language model's shape and ignore index: (B, T), -100 everywhere except the label at
the row's last real token. So the trainer's step and evaluation code run a classifier unchanged, and the
pooling position needs no extra input.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptforge.config import ModelConfig
from gptforge.errors import DataError
from gptforge.finetune.data import Examples, Row, check_text
from gptforge.model import GPT
from gptforge.model.loss import IGNORE_INDEX
from gptforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

ROW_HINT = '{"text": "...", "label": "..."}'
HEAD = "score"  # the classifier's head: its weight's name tells a classification checkpoint apart


class GPTClassifier(nn.Module):
    """`transformer` (embeddings, blocks, final LayerNorm: the same modules and names as `GPT`) + `score`."""

    def __init__(self, cfg: ModelConfig, n_classes: int, body: GPT | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.transformer = (body if body is not None else GPT(cfg)).transformer
        self.score = nn.Linear(cfg.d_model, n_classes, bias=True)
        nn.init.normal_(self.score.weight, std=cfg.init_std)
        nn.init.zeros_(self.score.bias)

    def hidden(self, idx: Tensor) -> Tensor:
        """Final-LayerNorm hidden states (B, T, d_model): `GPT.forward` without the LM head."""
        if idx.size(1) > self.cfg.context_length:
            raise ValueError(
                f"sequence of {idx.size(1)} tokens is longer than model.context_length={self.cfg.context_length}"
            )
        t = self.transformer
        positions = torch.arange(idx.size(1), device=idx.device)
        x = t.drop(t.wpe(t.wte(idx), positions))  # learned/sinusoidal positions added; rope: in attention
        for block in t.h:
            x = block(x)
        return t.ln_f(x)

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, *, lengths: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Class logits (B, C) and, with `targets` (B, T; one label per row at its last real token), the
        cross-entropy. Without targets the row's last real token is `lengths - 1` (default: the last)."""
        h = self.hidden(idx)
        if targets is not None:
            labelled = targets != IGNORE_INDEX
            logits = self.score(h[labelled])
            return logits, F.cross_entropy(logits.float(), targets[labelled])
        last = (
            lengths - 1
            if lengths is not None
            else torch.full((idx.size(0),), idx.size(1) - 1, device=idx.device)
        )
        return self.score(h[torch.arange(idx.size(0), device=idx.device), last]), None


def label_set(rows: Sequence[Row], source: str) -> list[str]:
    """The training labels, sorted (their order is the class index); fewer than two is an error."""
    labels = sorted({label_of(row) for row in rows})
    if len(labels) < 2:
        raise DataError(
            f"{source}: every training row has label {labels[0]!r}; a classifier needs at least two classes "
            "(add rows of the other classes)"
        )
    return labels


def label_of(row: Row) -> str:
    """Labels are strings; JSON integers are accepted and read as their decimal string (0 -> "0")."""
    value = row.values["label"]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{row.where}: field 'label' must be a string (or an integer), got {value!r}")
    return str(value)


def classify_examples(
    rows: Sequence[Row], labels: Sequence[str], tok: Tokenizer, context: int, split: str
) -> Examples:
    """Tokenize each text (cut to the first `context` tokens) and place its label at the last token.
    A label outside `labels` (the training set's) is an error naming the row."""
    index = {label: i for i, label in enumerate(labels)}
    texts = [check_text(row, "text") for row in rows]
    inputs, targets, classes, truncated = [], [], [], 0
    for row, ids in zip(rows, tok.encode_batch(texts), strict=True):
        label = label_of(row)
        if label not in index:
            raise DataError(
                f"{row.where}: label {label!r} does not occur in the training set (labels: "
                f"{', '.join(map(repr, labels))}); the classifier can only predict labels it was trained on"
            )
        if not ids:
            raise DataError(f"{row.where}: field 'text' is empty; a classifier needs at least one token")
        if len(ids) > context:
            ids, truncated = ids[:context], truncated + 1
        inputs.append(ids)
        targets.append([IGNORE_INDEX] * (len(ids) - 1) + [index[label]])
        classes.append(index[label])
    if truncated:
        log.warning(
            "%d of %d %s texts are longer than the context (%d tokens): kept their first %d tokens",
            truncated,
            len(rows),
            split,
            context,
            context,
        )
    return Examples(inputs, targets, classes, truncated)


@torch.no_grad()
def confusion_matrix(
    model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], n_classes: int, dist_ctx
) -> tuple[float, Tensor]:
    """Mean loss and the (true x predicted) count matrix over every rank's batches."""
    was_training = model.training
    model.eval()
    device = dist_ctx.device
    loss_sum, count = 0.0, 0
    confusion = torch.zeros(n_classes * n_classes, dtype=torch.float64)
    for x, y in batches:
        logits, loss = model(x.to(device), y.to(device))
        labels = y[y != IGNORE_INDEX]
        predicted = logits.argmax(-1).cpu()
        loss_sum += float(loss) * len(labels)
        count += len(labels)
        confusion += torch.bincount(labels * n_classes + predicted, minlength=n_classes**2).double()
    model.train(was_training)
    totals = dist_ctx.sum([loss_sum, float(count), *confusion.tolist()])
    matrix = torch.tensor(totals[2:], dtype=torch.long).view(n_classes, n_classes)
    return totals[0] / max(totals[1], 1.0), matrix


def accuracy(matrix: Tensor) -> float:
    return float(matrix.diag().sum()) / max(int(matrix.sum()), 1)


def format_confusion(matrix: Tensor, labels: Sequence[str]) -> str:
    """A text table: one row per true label, one column per predicted label."""
    names = [str(label) for label in labels]
    width = max(8, *(len(n) for n in names), *(len(str(int(v))) for v in matrix.flatten()))
    lines = [" " * width + " | " + " ".join(n.rjust(width) for n in names) + "   <- predicted"]
    for name, row in zip(names, matrix.tolist(), strict=True):
        lines.append(name.rjust(width) + " | " + " ".join(str(v).rjust(width) for v in row))
    return "\n".join(lines)
