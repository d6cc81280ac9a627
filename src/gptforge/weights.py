"""Saved models: every form a model reaches users in, turned into a `GPT` through one call.

Forms `load_model` resolves:
- our consolidated model directory: `model.safetensors` + `gptforge.json` ({"model": ModelConfig,
  "tokenizer": Tokenizer.describe()});
- a Hugging Face GPT-2 directory (config.json + model.safetensors), also spelled `hf:DIR`;
- a training run or one of its checkpoints (through `gptforge.checkpoint_format`), also `checkpoint:DIR`;
  a fine-tuned one's `finetune` block is read here too (LoRA merged; a classifier is not a language model).
Every problem a user can fix (missing or corrupt files, weights of another shape) is one CheckpointError line.

This module sits below training and fine-tuning (they import it, never the other way round) and above the
readers it combines: `gptforge.hf` (conversion), checkpoint reading (`gptforge.checkpoint_format`),
`gptforge.model`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gptforge import hf
from gptforge.config import SHAPE_KEYS, ModelConfig, config_from_dict
from gptforge.errors import CheckpointError, GptforgeError
from gptforge.model import GPT
from gptforge.model.load import load_state_dict_checked
from gptforge.tokenizer import Tokenizer, tokenizer_from_manifest

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
MODEL_META_FILE = "gptforge.json"  # a model directory's config + tokenizer (a checkpoint has checkpoint.json)
FINETUNE_KEY = "finetune"  # the block of a fine-tuning run's checkpoint.json: task, labels, template, LoRA
LORA_A, LORA_B = "lora_A", "lora_B"  # a LoRA run's adapter tensors, beside each adapted `weight`


def save_model_dir(model: GPT, cfg: ModelConfig, tokenizer_info: dict[str, Any], out_dir: str | Path) -> Path:
    """Write a consolidated model directory (a tied LM head is stored once, as the token embedding)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: t.detach().contiguous()
        for name, t in model.state_dict().items()
        if not (name == "lm_head.weight" and cfg.tie_embeddings)
    }
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    meta = {"model": dataclasses.asdict(cfg), "tokenizer": tokenizer_info}
    (out / MODEL_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _read_meta(path: Path) -> tuple[ModelConfig, dict[str, Any]]:
    try:
        meta = json.loads(path.read_text())
        model_values, tokenizer_info = meta["model"], meta["tokenizer"]
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None
    except (KeyError, TypeError):
        raise CheckpointError(f"{path}: expected an object with 'model' and 'tokenizer'") from None
    cfg = config_from_dict({"model": model_values}, source=str(path)).model
    return cfg, tokenizer_info


def _read_checkpoint(path: Path) -> tuple[ModelConfig, dict[str, Tensor], dict[str, Any]]:
    from gptforge.checkpoint_format import load_checkpoint_weights

    return load_checkpoint_weights(path)


# ---------------------------------------------------------------------------------------------- fine-tuned


def run_meta(spec: str | Path) -> dict[str, Any] | None:
    """checkpoint.json of a gptforge run, checkpoints directory or step directory (`checkpoint:` prefix
    allowed); None for anything else (a Hugging Face or consolidated model directory, a missing path)."""
    from gptforge import checkpoint_format as checkpoint

    spec = str(spec)
    if spec.startswith("hf:"):
        return None
    path = Path(spec.removeprefix("checkpoint:"))
    if not path.is_dir() or hf.is_hf_dir(path) or (path / MODEL_META_FILE).is_file():
        return None
    try:
        return checkpoint.read_meta(checkpoint.resolve(path))
    except CheckpointError:
        return None


def finetune_info(spec: str | Path) -> dict[str, Any] | None:
    """The `finetune` block of a fine-tuning run's checkpoint; None for any other model."""
    meta = run_meta(spec)
    return meta.get(FINETUNE_KEY) if meta else None


def lora_scale(info: dict[str, Any]) -> float | None:
    """alpha / rank of a LoRA run's `finetune` block; None without LoRA."""
    lora = info.get("lora")
    return lora["alpha"] / lora["rank"] if lora else None


def merge_lora_weights(state_dict: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
    """A plain state dict from an adapted one: each `X.weight` += scale * `X.lora_B` @ `X.lora_A`
    (computed in fp32), the LoRA tensors dropped."""
    merged = {k: v for k, v in state_dict.items() if not k.endswith((f".{LORA_A}", f".{LORA_B}"))}
    for key, a in state_dict.items():
        if key.endswith(f".{LORA_A}"):
            prefix = key[: -len(LORA_A)]
            weight = merged[prefix + "weight"]
            update = state_dict[prefix + LORA_B].float() @ a.float()
            merged[prefix + "weight"] = (weight.float() + scale * update).to(weight.dtype)
    return merged


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


# ---------------------------------------------------------------------------------------------- any form


def read_saved(spec: str | Path) -> tuple[ModelConfig, dict[str, Tensor], dict[str, Any], str]:
    """(config, our-layout state dict, tokenizer info, source) for any form `load_model` accepts."""
    spec = str(spec)
    path = Path(spec[3:] if spec.startswith("hf:") else spec.removeprefix("checkpoint:"))
    if not path.exists():
        raise CheckpointError(f"model directory not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file: give the model directory that contains it")
    if spec.startswith("hf:") or hf.is_hf_dir(path):
        cfg = hf.read_hf_config(path)
        state_dict = hf.state_dict_from_hf(hf.read_hf_weights(path), cfg)
        return cfg, state_dict, hf.tokenizer_info(path), str(path)
    if (path / MODEL_META_FILE).is_file():
        cfg, tokenizer_info = _read_meta(path / MODEL_META_FILE)
        return cfg, hf.read_safetensors(path / WEIGHTS_FILE), tokenizer_info, str(path / WEIGHTS_FILE)
    cfg, state_dict, tokenizer_info = _read_checkpoint(path)
    return cfg, language_model_weights(path, state_dict), tokenizer_info, str(path)


def _build(cfg: ModelConfig, state_dict: dict[str, Tensor], source: str) -> GPT:
    model = GPT(cfg)
    load_state_dict_checked(model, state_dict, source)
    return model


def _tokenizer(info: dict[str, Any], cfg: ModelConfig, source: str) -> Tokenizer:
    try:
        tok = tokenizer_from_manifest(info)
    except GptforgeError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    if cfg.vocab_size is not None and tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(
            f"{source}: the model's vocabulary ({cfg.vocab_size}) is smaller than tokenizer "
            f"{tok.name}'s ({tok.vocab_size}): weights and tokenizer do not belong together"
        )
    return tok


def load_model(spec: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, ModelConfig, Tokenizer]:
    """A ready model (eval mode, on `device`), its config and its tokenizer, from any saved form."""
    cfg, state_dict, tokenizer_info, source = read_saved(spec)
    tok = _tokenizer(tokenizer_info, cfg, source)
    model = _build(cfg, state_dict, source)
    return model.to(device).eval(), cfg, tok


def init_model(cfg: ModelConfig) -> tuple[GPT, ModelConfig, dict[str, Any] | None]:
    """The model a run starts from, per `model.init_from`, with the config it really has and the
    tokenizer its weights were trained with (None from scratch).

    `scratch` builds GPT-2's initialisation. `hf:DIR` / `checkpoint:DIR` load those weights; as in
    nanoGPT's `init_from`, the shape comes from the weights (a differing config key is logged) and only
    `dropout` is taken from the config, since it is a training choice.
    """
    if cfg.init_from == "scratch":
        return GPT(cfg), cfg, None
    loaded, state_dict, tokenizer_info, source = read_saved(cfg.init_from)
    for key in SHAPE_KEYS:
        mine, theirs = getattr(cfg, key), getattr(loaded, key)
        if mine is not None and mine != theirs:
            log.info(
                "model.%s: the config says %s, %s has %s; using the weights' value", key, mine, source, theirs
            )
    resolved = dataclasses.replace(loaded, dropout=cfg.dropout, init_from=cfg.init_from)
    return _build(resolved, state_dict, source), resolved, tokenizer_info
