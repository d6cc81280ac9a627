"""Hugging Face GPT-2 format, both ways.

Our modules carry OpenAI/nanoGPT names, so the conversion is: add or strip the `transformer.` prefix,
transpose the four Conv1D weights (HF stores them (in, out), `nn.Linear` (out, in)), store a tied LM head
once, and map the config keys. Weights are read from safetensors only (a pickle file can run code).
Writing a directory needs no `transformers`; `to_hf` (an in-memory `GPT2LMHeadModel`) does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from gptforge.config import ModelConfig
from gptforge.errors import CheckpointError
from gptforge.model import GPT

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Activations that are GPT-2's tanh-approximated GELU under another name.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# Buffers some GPT-2 checkpoints (OpenAI's `gpt2` on the Hub) carry: the causal mask, not weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
GPT2_EOT = 50256
GPT2_TOKENIZER = {"name": "gpt2", "vocab_size": 50257, "eot_id": GPT2_EOT}


# ---------------------------------------------------------------------------------------------- config


def hf_config_dict(cfg: ModelConfig, eot_id: int | None = None) -> dict[str, Any]:
    """The config.json `transformers.GPT2Config` reads for our shape. `eot_id` (bos = eos, as GPT-2)
    defaults to GPT-2's end-of-text when the vocabulary has it."""
    eot = (
        eot_id if eot_id is not None else (GPT2_EOT if cfg.vocab_size and cfg.vocab_size > GPT2_EOT else None)
    )
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": cfg.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def model_config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    """Our ModelConfig for a GPT-2 config.json; anything GPT-2-like we cannot represent is an error."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"{source}: model_type {hf.get('model_type')!r} is not gpt2")
    try:
        d, n_layer, n_head = int(hf["n_embd"]), int(hf["n_layer"]), int(hf["n_head"])
        vocab, ctx = int(hf["vocab_size"]), int(hf["n_positions"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: missing or invalid GPT-2 config key {exc}") from None
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new") not in TANH_GELUS, "gelu_new"),
        "n_inner": (hf.get("n_inner") not in (None, 4 * d), f"null or {4 * d}"),
        "scale_attn_weights": (hf.get("scale_attn_weights", True) is not True, "true"),
        "scale_attn_by_inverse_layer_idx": (bool(hf.get("scale_attn_by_inverse_layer_idx")), "false"),
        "add_cross_attention": (bool(hf.get("add_cross_attention")), "false"),
    }
    for key, (bad, want) in unsupported.items():
        if bad:
            raise CheckpointError(
                f"{source}: {key}={hf.get(key)!r} is not supported (gptforge's GPT-2 needs {want})"
            )
    if d % n_head:
        raise CheckpointError(f"{source}: n_embd={d} is not divisible by n_head={n_head}")
    return ModelConfig(
        n_layer=n_layer,
        n_head=n_head,
        d_model=d,
        context_length=ctx,
        vocab_size=vocab,
        dropout=float(hf.get("resid_pdrop", 0.0)),
        bias=True,  # HF GPT-2 always has biases
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


# ---------------------------------------------------------------------------------------------- weights


def hf_state_dict(model: GPT, cfg: ModelConfig) -> dict[str, Tensor]:
    """Our weights under GPT2LMHeadModel's names and layouts (contiguous, ready for safetensors).

    A tied LM head is stored once (as `transformer.wte.weight`), as transformers does; a model without
    biases gets zero biases, which computes the same function in HF's always-biased GPT-2.
    """
    out: dict[str, Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        out[name] = (tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor).detach().contiguous()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is None and name != "lm_head":
            out[f"{name}.bias"] = torch.zeros(module.weight.shape[0], dtype=module.weight.dtype)
    return out


def state_dict_from_hf(tensors: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """HF GPT-2 tensors (with or without the `transformer.` prefix, with or without the attention-mask
    buffers OpenAI's checkpoint carries) -> our state dict names and layouts."""
    out: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if name != "lm_head.weight" and not name.startswith("transformer."):
            name = "transformer." + name
        out[name] = tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)  # the same tensor as wte
    return out


# ---------------------------------------------------------------------------------------------- directories


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file, or a CheckpointError that says which file is unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({exc})") from None


def read_hf_weights(directory: Path) -> dict[str, Tensor]:
    """model.safetensors, or the shards a model.safetensors.index.json names."""
    if (directory / WEIGHTS_FILE).is_file():
        return read_safetensors(directory / WEIGHTS_FILE)
    if (directory / WEIGHTS_INDEX_FILE).is_file():
        index = _read_json(directory / WEIGHTS_INDEX_FILE)
        tensors: dict[str, Tensor] = {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            tensors.update(read_safetensors(directory / shard))
        return tensors
    pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
    if pickles:
        raise CheckpointError(
            f"{directory} has {', '.join(sorted(pickles))} but no {WEIGHTS_FILE}: gptforge reads safetensors only "
            "(pickle files can run code). Convert once with transformers: "
            "GPT2LMHeadModel.from_pretrained(DIR).save_pretrained(DIR)"
        )
    raise CheckpointError(f"{directory}: no {WEIGHTS_FILE} (expected a Hugging Face GPT-2 directory)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def is_hf_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def read_hf_config(directory: Path) -> ModelConfig:
    return model_config_from_hf(_read_json(directory / CONFIG_FILE), str(directory / CONFIG_FILE))


def tokenizer_info(directory: Path) -> dict[str, Any]:
    """The tokenizer of a HF directory: the one gptforge.json records if we wrote it, else GPT-2 BPE
    (checked against vocab.json when the directory has one)."""
    if (directory / "gptforge.json").is_file():
        info = _read_json(directory / "gptforge.json").get("tokenizer")
        if isinstance(info, dict):
            return info
    vocab_file = directory / "vocab.json"
    if vocab_file.is_file() and _read_json(vocab_file) != gpt2_vocab():
        raise CheckpointError(
            f"{vocab_file}: unknown tokenizer (not GPT-2's BPE vocabulary); gptforge reads GPT-2 BPE or SentencePiece"
        )
    return dict(GPT2_TOKENIZER)


def from_hf(directory: str | Path) -> tuple[GPT, ModelConfig]:
    """Our GPT from a Hugging Face GPT-2 directory (config.json + model.safetensors), e.g. OpenAI's `gpt2`."""
    from gptforge.weights import load_state_dict_checked

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"Hugging Face model directory not found: {directory}")
    cfg = read_hf_config(directory)
    model = GPT(cfg)
    load_state_dict_checked(
        model, state_dict_from_hf(read_hf_weights(directory), cfg), str(directory / WEIGHTS_FILE)
    )
    return model, cfg


def save_hf(
    model: GPT, cfg: ModelConfig, out_dir: str | Path, tokenizer_info: dict[str, Any] | None = None
) -> Path:
    """Write a directory `GPT2LMHeadModel.from_pretrained` loads (config.json + model.safetensors).

    With the GPT-2 tokenizer, vocab.json/merges.txt (derived offline from the shipped BPE ranks) and
    tokenizer_config.json are written too, so `AutoTokenizer.from_pretrained` works. `gptforge.json`
    records our config and tokenizer, so a SentencePiece model survives the round trip.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_info = tokenizer_info or dict(GPT2_TOKENIZER)
    (out / CONFIG_FILE).write_text(
        json.dumps(hf_config_dict(cfg, tokenizer_info.get("eot_id")), indent=2) + "\n"
    )
    save_file(hf_state_dict(model, cfg), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / "gptforge.json").write_text(
        json.dumps({"model": dataclasses.asdict(cfg), "tokenizer": tokenizer_info}, indent=2) + "\n"
    )
    if tokenizer_info.get("name") == "gpt2":
        write_gpt2_tokenizer_files(out, cfg.context_length)
    else:
        log.info(
            "tokenizer %s has no Hugging Face form here: only gptforge.json records it",
            tokenizer_info.get("name"),
        )
    return out


def to_hf(model: GPT, cfg: ModelConfig) -> GPT2LMHeadModel:
    """An in-memory `transformers.GPT2LMHeadModel` with our weights (needs `transformers`)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(
        **{k: v for k, v in hf_config_dict(cfg).items() if k not in ("architectures", "model_type")}
    )
    hf = GPT2LMHeadModel(hf_cfg)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model, cfg), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not cfg.tie_embeddings]
    if missing or unexpected:
        raise CheckpointError(f"GPT-2 conversion: missing {missing}, unexpected {unexpected}")
    return hf.train(model.training)


# ---------------------------------------------------------------------------------------------- tokenizer


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (as in OpenAI's encoder.py)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-pair-encode `token` using only merges ranked below `max_rank`: for a vocabulary token this
    leaves exactly the two halves whose merge created it."""
    parts = [bytes([b]) for b in token]
    while True:
        best: tuple[int, int] | None = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[1]):
                best = (i, rank)
        if best is None:
            return parts
        i = best[0]
        parts = [*parts[:i], parts[i] + parts[i + 1], *parts[i + 2 :]]


@lru_cache(maxsize=1)
def _gpt2_ranks() -> dict[bytes, int]:
    from importlib import resources

    from tiktoken.load import load_tiktoken_bpe

    from gptforge.tokenizer import GPT2_BPE_SHA256

    return load_tiktoken_bpe(
        str(resources.files("gptforge") / "assets" / "gpt2.tiktoken"), expected_hash=GPT2_BPE_SHA256
    )


def _as_text(token: bytes) -> str:
    to_text = _byte_to_unicode()
    return "".join(to_text[b] for b in token)


def gpt2_vocab() -> dict[str, int]:
    """vocab.json of GPT-2, recovered from the tiktoken ranks file we ship."""
    from gptforge.tokenizer import ENDOFTEXT

    vocab = {_as_text(token): rank for token, rank in _gpt2_ranks().items()}
    vocab[ENDOFTEXT] = GPT2_EOT
    return vocab


def gpt2_merges() -> list[str]:
    """merges.txt of GPT-2: each multi-byte token in rank order, as the two parts its merge joined."""
    ranks = _gpt2_ranks()
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = _bpe_split(ranks, token, rank)
            merges.append(f"{_as_text(left)} {_as_text(right)}")
    return merges


def write_gpt2_tokenizer_files(out: Path, context_length: int) -> None:
    (out / "vocab.json").write_text(json.dumps(gpt2_vocab(), ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(gpt2_merges()) + "\n", encoding="utf-8")
    special = "<|endoftext|>"
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "GPT2Tokenizer",
                "model_max_length": context_length,
                "bos_token": special,
                "eos_token": special,
                "unk_token": special,
                "add_prefix_space": False,
                "add_bos_token": False,
            },
            indent=2,
        )
        + "\n"
    )
