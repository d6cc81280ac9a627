"""Saved models: every form a model reaches users in, turned into a `GPT` through one call.

Forms `load_model` resolves:
- our consolidated model directory: `model.safetensors` + `gptforge.json` ({"model": ModelConfig,
  "tokenizer": Tokenizer.describe()});
- a Hugging Face GPT-2 directory (config.json + model.safetensors), also spelled `hf:DIR`;
- a training run or one of its checkpoints (through `gptforge.train.checkpoint`), also `checkpoint:DIR`.
Every problem a user can fix (missing or corrupt files, weights of another shape) is one CheckpointError line.
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
from gptforge.config import ModelConfig, config_from_dict
from gptforge.errors import CheckpointError, GptforgeError
from gptforge.model import GPT
from gptforge.tokenizer import Tokenizer, tokenizer_from_manifest

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
META_FILE = "gptforge.json"


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
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_state_dict_checked(model: GPT, state_dict: dict[str, Tensor], source: str) -> None:
    """`model.load_state_dict` that names the first missing, extra or differently shaped tensor."""
    state_dict = dict(state_dict)
    if (
        model.cfg.tie_embeddings
        and "lm_head.weight" not in state_dict
        and "transformer.wte.weight" in state_dict
    ):
        state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"]
    for name, expected in model.state_dict().items():
        if name not in state_dict:
            raise CheckpointError(
                f"{source}: tensor '{name}' is missing (weights of another model or format?)"
            )
        got = state_dict[name]
        if tuple(got.shape) != tuple(expected.shape):
            raise CheckpointError(
                f"{source}: tensor '{name}' has shape {tuple(got.shape)} but the model config says "
                f"{tuple(expected.shape)} (weights and config of different models?)"
            )
    extra = sorted(set(state_dict) - set(model.state_dict()))
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise CheckpointError(f"{source}: unexpected tensor '{extra[0]}'{more} (weights of another model?)")
    model.load_state_dict(state_dict)


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
    try:
        from gptforge.train.checkpoint import load_checkpoint_weights
    except ModuleNotFoundError as exc:
        if exc.name not in ("gptforge.train", "gptforge.train.checkpoint"):
            raise
        raise CheckpointError(
            f"{path} is not a gptforge model directory, Hugging Face GPT-2 directory or checkpoint"
        ) from None
    return load_checkpoint_weights(path)


def read_weights(spec: str | Path) -> tuple[ModelConfig, dict[str, Tensor], dict[str, Any], str]:
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
    if (path / META_FILE).is_file():
        cfg, tokenizer_info = _read_meta(path / META_FILE)
        return cfg, hf.read_safetensors(path / WEIGHTS_FILE), tokenizer_info, str(path / WEIGHTS_FILE)
    cfg, state_dict, tokenizer_info = _read_checkpoint(path)
    from gptforge.finetune.saved import language_model_weights  # fine-tuned: LoRA merged, classifier refused

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
    cfg, state_dict, tokenizer_info, source = read_weights(spec)
    tok = _tokenizer(tokenizer_info, cfg, source)
    model = _build(cfg, state_dict, source)
    return model.to(device).eval(), cfg, tok


SHAPE_KEYS = ("n_layer", "n_head", "d_model", "context_length", "vocab_size", "bias", "tie_embeddings")


def init_model(cfg: ModelConfig) -> tuple[GPT, ModelConfig, dict[str, Any] | None]:
    """The model a run starts from, per `model.init_from`, with the config it really has and the
    tokenizer its weights were trained with (None from scratch).

    `scratch` builds GPT-2's initialisation. `hf:DIR` / `checkpoint:DIR` load those weights; as in
    nanoGPT's `init_from`, the shape comes from the weights (a differing config key is logged) and only
    `dropout` is taken from the config, since it is a training choice.
    """
    if cfg.init_from == "scratch":
        return GPT(cfg), cfg, None
    loaded, state_dict, tokenizer_info, source = read_weights(cfg.init_from)
    for key in SHAPE_KEYS:
        mine, theirs = getattr(cfg, key), getattr(loaded, key)
        if mine is not None and mine != theirs:
            log.info(
                "model.%s: the config says %s, %s has %s; using the weights' value", key, mine, source, theirs
            )
    resolved = dataclasses.replace(loaded, dropout=cfg.dropout, init_from=cfg.init_from)
    return _build(resolved, state_dict, source), resolved, tokenizer_info
