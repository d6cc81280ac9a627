"""Fine-tuning data: JSONL rows checked field by field, examples as (inputs, targets) token pairs, and
batches that follow the trainer's conventions.

Every example, of either task, is two token lists of the same length: `inputs` and `targets` with -100
(the model's ignore index) wherever no loss is wanted. A classification example carries its label at its
last real token; an instruction example its response tokens. Batches are right-padded: with causal
attention a real token never sees the padding after it, so no attention mask is needed and a padded row
computes what it would alone.

Order and batching are pre-training's (`gptforge.data.order`): epoch `e` visits the examples in a keyed
permutation (or, with class balancing, draws with replacement weighted 1 / class size); a global batch
is the next `G` positions of that order and data-parallel rank `r` takes the `r`-th slice
(`RankBatches`), so the position in the data is the number of samples consumed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gptforge.data.order import SampleOrder
from gptforge.errors import DataError
from gptforge.model.loss import IGNORE_INDEX


@dataclass
class Row:
    """One JSONL record and where it came from (for `file:line` messages)."""

    values: dict[str, Any]
    where: str


def read_rows(
    path: str | Path, required: Sequence[str], hint: str, optional: Sequence[str] = ()
) -> list[Row]:
    """The JSON objects of a JSONL file; a bad line, a missing field or a non-string field is an error
    that names `file:line`. `optional` fields default to "". Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                values = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); expected {hint}"
                ) from None
            if not isinstance(values, dict):
                raise DataError(f"{where}: expected a JSON object {hint}, got {type(values).__name__}")
            for key in required:
                if key not in values:
                    raise DataError(f"{where}: missing field '{key}'; rows must look like {hint}")
            for key in optional:
                values.setdefault(key, "")
            rows.append(Row(values, where))
    if not rows:
        raise DataError(f"{path} has no rows; expected one JSON object per line, {hint}")
    return rows


def check_text(row: Row, key: str) -> str:
    value = row.values[key]
    if not isinstance(value, str):
        raise DataError(f"{row.where}: field '{key}' must be a string, got {json.dumps(value)}")
    return value


def files_sha256(*paths: str | Path) -> str:
    """One digest over the fine-tuning files (recorded with checkpoints, checked on resume)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- examples


@dataclass
class Examples:
    """Token pairs of one split; `labels` (class index per example) for classification only;
    `truncated` counts examples cut to fit the context."""

    inputs: list[list[int]]
    targets: list[list[int]]
    labels: list[int] | None = None
    truncated: int = 0
    lengths: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = np.array([len(x) for x in self.inputs], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.inputs)

    def batch(self, indices: Sequence[int] | np.ndarray, pad_id: int) -> tuple[Tensor, Tensor]:
        """(B, L) inputs right-padded with `pad_id` and targets with -100, L = the longest row."""
        width = int(max(self.lengths[int(i)] for i in indices))
        x = torch.full((len(indices), width), pad_id, dtype=torch.long)
        y = torch.full((len(indices), width), IGNORE_INDEX, dtype=torch.long)
        for row, i in enumerate(indices):
            n = int(self.lengths[int(i)])
            x[row, :n] = torch.tensor(self.inputs[int(i)], dtype=torch.long)
            y[row, :n] = torch.tensor(self.targets[int(i)], dtype=torch.long)
        return x, y


# ---------------------------------------------------------------------------------------------- order


def balanced_weights(labels: Sequence[int]) -> np.ndarray:
    """Sampling weight 1 / (size of the example's class): every class is drawn equally often."""
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    return 1.0 / counts[labels]


class ExampleSet:
    """Examples in the trainer's sample order (`SampleOrder`: a permutation per epoch, or with weights
    draws with replacement), for `RankBatches`: position -> example -> padded tensors."""

    def __init__(self, examples: Examples, order: SampleOrder, pad_id: int) -> None:
        self.examples = examples
        self.order = order
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def positions(self, start: int, count: int) -> np.ndarray:
        return self.order.positions(start, count)

    def stack(self, samples: np.ndarray) -> tuple[Tensor, Tensor]:
        return self.examples.batch(samples, self.pad_id)

    def empty_error(self) -> str:
        return "no fine-tuning examples"

    def tokens(self, start: int, count: int) -> int:
        """Real (unpadded) input tokens of the samples at positions [start, start + count), all ranks'."""
        return int(self.examples.lengths[self.order.positions(start, count)].sum())


def example_eval_batches(
    examples: Examples, micro_batch: int, dp_rank: int, dp_size: int, pad_id: int
) -> list[tuple[Tensor, Tensor]]:
    """Every example once, this rank's contiguous share, in micro-batches (padded with `pad_id`)."""
    mine = np.array_split(np.arange(len(examples)), dp_size)[dp_rank]
    return [examples.batch(mine[i : i + micro_batch], pad_id) for i in range(0, len(mine), micro_batch)]
