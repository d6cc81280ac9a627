"""Fine-tuned checkpoints as saved: `checkpoint.json` carries a `finetune` block (task, label set, prompt
template, LoRA settings) beside the trainer's own, and the weights are DeepSpeed's module state as for
pretraining. Here a checkpoint is turned back into a model: an instruction-tuned one (LoRA merged) is a
plain GPT for generation, export and evaluation; a classifier is rebuilt with its labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gptforge import hf
from gptforge.errors import CheckpointError
from gptforge.finetune.classify import GPTClassifier
from gptforge.finetune.instruct import ALPACA, PromptTemplate, load_template, template_from_dict
from gptforge.finetune.lora import merge_lora_weights
from gptforge.tokenizer import Tokenizer, tokenizer_from_manifest

FINETUNE_KEY = "finetune"


def run_meta(spec: str | Path) -> dict[str, Any] | None:
    """checkpoint.json of a gptforge run, checkpoints directory or step directory (`checkpoint:` prefix
    allowed); None for anything else (a Hugging Face or consolidated model directory, a missing path)."""
    from gptforge.train import checkpoint
    from gptforge.weights import META_FILE

    spec = str(spec)
    if spec.startswith("hf:"):
        return None
    path = Path(spec.removeprefix("checkpoint:"))
    if not path.is_dir() or hf.is_hf_dir(path) or (path / META_FILE).is_file():
        return None
    try:
        return checkpoint.read_meta(checkpoint.resolve(path))
    except CheckpointError:
        return None


def finetune_info(spec: str | Path) -> dict[str, Any] | None:
    """The `finetune` block of a fine-tuning run's checkpoint; None for any other model."""
    meta = run_meta(spec)
    return meta.get(FINETUNE_KEY) if meta else None


def instruction_template(spec: str | Path, override: str | None = None) -> PromptTemplate:
    """`override` (alpaca or a YAML file) if given, else the template an instruction-tuned checkpoint was
    trained with, else Alpaca's."""
    if override:
        return load_template(override)
    info = finetune_info(spec)
    if info and info.get("task") == "instruct":
        return template_from_dict(info["template"], f"{spec}: checkpoint.json finetune.template")
    return ALPACA


def lora_scale(info: dict[str, Any]) -> float | None:
    lora = info.get("lora")
    return lora["alpha"] / lora["rank"] if lora else None


def language_model_weights(path: str | Path, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A checkpoint's weights as a plain GPT's: LoRA adapters merged; a classifier refused (it has no
    language-model head). Other checkpoints pass through unchanged."""
    info = finetune_info(path)
    if info is None:
        return state_dict
    if info["task"] == "classify":
        raise CheckpointError(
            f"{path} is a classification model (launch/finetune.py --task classify; labels "
            f"{', '.join(map(repr, info['labels']))}): its LM head was replaced by a classifier, so it cannot "
            f"generate text or be exported as a GPT-2 LM; evaluate it with launch/eval.py --checkpoint {path} "
            "--task classify --data FILE.jsonl"
        )
    scale = lora_scale(info)
    return merge_lora_weights(state_dict, scale) if scale is not None else state_dict


def load_classifier(
    spec: str | Path, device: str | torch.device = "cpu"
) -> tuple[GPTClassifier, list[str], Tokenizer]:
    """A classification checkpoint as a ready model (eval mode, LoRA merged), its labels (in class index
    order) and tokenizer."""
    from gptforge.train.checkpoint import load_checkpoint_weights

    info = finetune_info(spec)
    if info is None or info.get("task") != "classify":
        what = "an instruction-tuned model" if info else "not a fine-tuned classification checkpoint"
        raise CheckpointError(
            f"{spec}: {what}; --task classify needs a run of launch/finetune.py --task classify (its run "
            "directory or one of its checkpoints)"
        )
    cfg, state_dict, tokenizer_info = load_checkpoint_weights(str(spec).removeprefix("checkpoint:"))
    scale = lora_scale(info)
    if scale is not None:
        state_dict = merge_lora_weights(state_dict, scale)
    labels = list(info["labels"])
    model = GPTClassifier(cfg, len(labels))
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{spec}: weights do not fit a {len(labels)}-class classifier ({str(exc).splitlines()[0]})"
        ) from None
    return model.to(device).eval(), labels, tokenizer_from_manifest(tokenizer_info)
