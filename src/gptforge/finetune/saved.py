"""Fine-tuned checkpoints back into models: an instruction-tuned run's prompt template, and a classifier
rebuilt with its labels. (An instruction-tuned checkpoint is a plain GPT for generation, export and
evaluation: `gptforge.weights.load_model` reads it, LoRA merged, from the `finetune` block its
`checkpoint.json` carries beside the trainer's own.)"""

from __future__ import annotations

from pathlib import Path

import torch

from gptforge.errors import CheckpointError
from gptforge.finetune.classify import GPTClassifier
from gptforge.finetune.instruct import ALPACA, PromptTemplate, load_template, template_from_dict
from gptforge.tokenizer import Tokenizer, tokenizer_from_manifest
from gptforge.weights import finetune_info, lora_scale, merge_lora_weights


def instruction_template(spec: str | Path, override: str | None = None) -> PromptTemplate:
    """`override` (alpaca or a YAML file) if given, else the template an instruction-tuned checkpoint was
    trained with, else Alpaca's."""
    if override:
        return load_template(override)
    info = finetune_info(spec)
    if info and info.get("task") == "instruct":
        return template_from_dict(info["template"], f"{spec}: checkpoint.json finetune.template")
    return ALPACA


def load_classifier(
    spec: str | Path, device: str | torch.device = "cpu"
) -> tuple[GPTClassifier, list[str], Tokenizer]:
    """A classification checkpoint as a ready model (eval mode, LoRA merged), its labels (in class index
    order) and tokenizer."""
    from gptforge.checkpoint_format import load_checkpoint_weights

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
