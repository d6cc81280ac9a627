"""Instruction tuning on Alpaca-format rows: the prompt template, examples whose prompt tokens carry no
loss, the token-weighted validation loss, and generated responses for the val set.

An example is `encode(prompt) + encode(output) + [eot]`: the model learns to answer and then stop. The
prompt and the output are tokenized separately, so the loss boundary is exact and generation (which
continues `encode(prompt)`) sees what training saw.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

from gptforge.errors import ConfigError
from gptforge.finetune.data import Examples, Row, check_text
from gptforge.model.loss import IGNORE_INDEX
from gptforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

ROW_HINT = '{"instruction": "...", "input": "...", "output": "..."}'


@dataclass(frozen=True)
class PromptTemplate:
    """`{instruction}` and `{input}` are replaced literally (other braces in a template are kept)."""

    prompt_input: str
    prompt_no_input: str

    def format(self, instruction: str, input: str = "") -> str:
        if input:
            return self.prompt_input.replace("{instruction}", instruction).replace("{input}", input)
        return self.prompt_no_input.replace("{instruction}", instruction)

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


# Stanford Alpaca's prompts (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
ALPACA = PromptTemplate(
    prompt_input=(
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    prompt_no_input=(
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n"
    ),
)


def load_template(spec: str) -> PromptTemplate:
    """`alpaca`, or a YAML/JSON file with `prompt_input` (containing {instruction} and {input}) and
    `prompt_no_input` (containing {instruction})."""
    if spec == "alpaca":
        return ALPACA
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"finetune.template={spec!r}: not 'alpaca' and no such file")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from None
    return template_from_dict(values, str(path))


def template_from_dict(values: object, source: str) -> PromptTemplate:
    keys = {"prompt_input": ("{instruction}", "{input}"), "prompt_no_input": ("{instruction}",)}
    if not isinstance(values, dict) or set(values) != set(keys):
        raise ConfigError(
            f"{source}: a template is a mapping with exactly the keys prompt_input and prompt_no_input"
        )
    for key, placeholders in keys.items():
        text = values[key]
        missing = [p for p in placeholders if not isinstance(text, str) or p not in text]
        if missing:
            raise ConfigError(f"{source}: {key} must be a string containing {' and '.join(missing)}")
    return PromptTemplate(values["prompt_input"], values["prompt_no_input"])


def prompt_of(row: Row, template: PromptTemplate) -> str:
    return template.format(check_text(row, "instruction"), check_text(row, "input"))


def fit(prompt: list[int], response: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Cut an example of more than `budget` tokens: the response keeps at least half the budget (or all
    of itself), the prompt loses its start (keeping the text next to the response), then the response
    loses its end."""
    if len(prompt) + len(response) <= budget:
        return prompt, response
    keep_response = min(len(response), max(budget - len(prompt), budget // 2))
    keep_prompt = budget - keep_response
    return prompt[len(prompt) - keep_prompt :] if keep_prompt else [], response[:keep_response]


def instruct_examples(
    rows: Sequence[Row],
    template: PromptTemplate,
    tok: Tokenizer,
    context: int,
    train_on_prompt: bool,
    split: str,
) -> Examples:
    """inputs = sequence[:-1], targets = sequence[1:] with the prompt's positions at -100 (unless
    `train_on_prompt`); sequences longer than context + 1 are cut by `fit` and counted."""
    prompts = tok.encode_batch([prompt_of(row, template) for row in rows])
    outputs = tok.encode_batch([check_text(row, "output") for row in rows])
    inputs, targets, truncated = [], [], 0
    for prompt, output in zip(prompts, outputs, strict=True):
        response = [*output, tok.eot_id]
        if len(prompt) + len(response) > context + 1:
            prompt, response = fit(prompt, response, context + 1)
            truncated += 1
        sequence = prompt + response
        masked = 0 if train_on_prompt else max(len(prompt) - 1, 0)
        inputs.append(sequence[:-1])
        targets.append([IGNORE_INDEX] * masked + sequence[1 + masked :])
    if truncated:
        log.warning(
            "%d of %d %s examples are longer than the context (%d tokens) and were truncated: prompts lose "
            "their start, responses their end (counted as %s_truncated in metrics.jsonl)",
            truncated,
            len(rows),
            split,
            context,
            split,
        )
    return Examples(inputs, targets, None, truncated)


@torch.no_grad()
def token_loss(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], dist_ctx) -> float:
    """Mean loss per response token over every rank's batches (each batch's mean weighted by its count
    of scored tokens, so the value does not depend on how examples are grouped)."""
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    for x, y in batches:
        _, loss = model(x.to(dist_ctx.device), y.to(dist_ctx.device))
        n = int((y != IGNORE_INDEX).sum())
        loss_sum += float(loss) * n
        count += n
    model.train(was_training)
    total, n = dist_ctx.sum([loss_sum, float(count)])
    return total / max(n, 1.0)


def generate_responses(
    model: nn.Module,
    rows: Sequence[Row],
    template: PromptTemplate,
    tok: Tokenizer,
    batch_size: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    show_progress: bool,
) -> list[dict[str, str]]:
    """`{"instruction", "input", "output", "response"}` per row, in row order."""
    from tqdm import tqdm

    from gptforge.generate import generate

    out = []
    with tqdm(total=len(rows), desc="val responses", unit="row", disable=not show_progress) as bar:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            prompts = [tok.encode(prompt_of(row, template)) for row in chunk]
            completions = generate(
                model,
                prompts,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                seed=seed + start,
                eot_id=tok.eot_id,
            )
            for row, completion in zip(chunk, completions, strict=True):
                values = {k: row.values[k] for k in ("instruction", "input", "output")}
                out.append({**values, "response": tok.decode(completion)})
            bar.update(len(chunk))
    return out


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    tmp.replace(path)
