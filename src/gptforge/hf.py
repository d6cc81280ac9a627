"""Hugging Face formats, both ways: GPT-2 (`GPT2LMHeadModel`) and Llama (`LlamaForCausalLM`).

GPT-2: our modules carry OpenAI/nanoGPT names, so the conversion is: add or strip the `transformer.` prefix,
transpose the four Conv1D weights (HF stores them (in, out), `nn.Linear` (out, in)), store a tied LM head
once, and map the config keys. Llama (rope + rmsnorm + swiglu, no biases): rename, and split our fused QKV
into q/k/v_proj (our rotary uses HF's "rotate half" layout, so no permutation). A shape neither expresses
(sinusoidal positions, say, or rope with LayerNorm) is refused by export. Weights are read from safetensors
only (a pickle file can run code). Writing a directory needs no `transformers`; `to_hf` (an in-memory model)
does. GPT-2's tokenizer files come from `gptforge.tokenizer`; loading any saved form is `gptforge.weights`'.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from gptforge.config import ModelConfig
from gptforge.errors import CheckpointError
from gptforge.model import GPT
from gptforge.tokenizer import gpt2_vocab, write_gpt2_tokenizer_files

if TYPE_CHECKING:
    from transformers import PreTrainedModel

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


def architecture(cfg: ModelConfig) -> str:
    """ "gpt2" or "llama": the Hugging Face architecture that computes exactly our model, or a
    CheckpointError naming what neither can express."""
    gpt2 = cfg.position_embedding == "learned" and cfg.norm == "layernorm" and cfg.mlp == "gelu"
    if gpt2 and cfg.kv_heads == cfg.n_head:
        return "gpt2"
    llama = cfg.position_embedding == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu"
    if llama and not cfg.bias:
        return "llama"
    raise CheckpointError(
        f"model (position_embedding={cfg.position_embedding}, norm={cfg.norm}, mlp={cfg.mlp}, "
        f"n_kv_head={cfg.kv_heads}, bias={cfg.bias}) has no Hugging Face form: GPT-2 needs learned + "
        "layernorm + gelu with n_kv_head = n_head, Llama needs rope + rmsnorm + swiglu with bias false"
    )


def _eot(cfg: ModelConfig, eot_id: int | None) -> int | None:
    """`eot_id` (bos = eos, as GPT-2), by default GPT-2's end-of-text when the vocabulary has it."""
    return (
        eot_id if eot_id is not None else (GPT2_EOT if cfg.vocab_size and cfg.vocab_size > GPT2_EOT else None)
    )


def hf_config_dict(cfg: ModelConfig, eot_id: int | None = None) -> dict[str, Any]:
    """The config.json transformers reads for our shape (GPT2Config or LlamaConfig, by `architecture`)."""
    eot = _eot(cfg, eot_id)
    if architecture(cfg) == "llama":
        return _llama_config_dict(cfg, eot)
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None if cfg.ffn_dim == 4 * cfg.d_model else cfg.ffn_dim,
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


def _llama_config_dict(cfg: ModelConfig, eot: int | None) -> dict[str, Any]:
    """LlamaConfig's keys; the rope base is written both as transformers 5 (`rope_parameters`) and 4
    (`rope_theta`) read it."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.layer_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": cfg.dropout,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def model_config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    """Our ModelConfig for a GPT-2 or Llama config.json; anything we cannot represent is an error."""
    if hf.get("model_type", "gpt2") == "llama":
        return _model_config_from_llama(hf, source)
    if hf.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"{source}: model_type {hf.get('model_type')!r} is not gpt2 or llama")
    try:
        d, n_layer, n_head = int(hf["n_embd"]), int(hf["n_layer"]), int(hf["n_head"])
        vocab, ctx = int(hf["vocab_size"]), int(hf["n_positions"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: missing or invalid GPT-2 config key {exc}") from None
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new") not in TANH_GELUS, "gelu_new"),
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
        ffn_hidden=None if hf.get("n_inner") in (None, 4 * d) else int(hf["n_inner"]),
        bias=True,  # HF GPT-2 always has biases
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def _model_config_from_llama(hf: dict[str, Any], source: str) -> ModelConfig:
    try:
        d, n_layer, n_head = (
            int(hf["hidden_size"]),
            int(hf["num_hidden_layers"]),
            int(hf["num_attention_heads"]),
        )
        vocab, ctx, ffn = (
            int(hf["vocab_size"]),
            int(hf["max_position_embeddings"]),
            int(hf["intermediate_size"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: missing or invalid Llama config key {exc}") from None
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu") != "silu", "silu"),
        "attention_bias": (bool(hf.get("attention_bias")), "false"),
        "mlp_bias": (bool(hf.get("mlp_bias")), "false"),
        "head_dim": (
            hf.get("head_dim") not in (None, d // n_head),
            f"hidden_size / num_attention_heads = {d // n_head}",
        ),
        "rope type": (rope_type != "default", "default (no rope scaling)"),
    }
    for key, (bad, want) in unsupported.items():
        if bad:
            shown = rope_type if key == "rope type" else hf.get(key)
            raise CheckpointError(
                f"{source}: {key}={shown!r} is not supported (gptforge's Llama needs {want})"
            )
    return ModelConfig(
        n_layer=n_layer,
        n_head=n_head,
        d_model=d,
        context_length=ctx,
        vocab_size=vocab,
        dropout=float(hf.get("attention_dropout", 0.0)),
        bias=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        layer_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        init_std=float(hf.get("initializer_range", 0.02)),
        position_embedding="rope",
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm="rmsnorm",
        mlp="swiglu",
        ffn_hidden=ffn,
        n_kv_head=int(hf.get("num_key_value_heads") or n_head),
    )


# ---------------------------------------------------------------------------------------------- weights

# our name (after transformer.h.N.) -> Llama's (after model.layers.N.); c_attn is split into q/k/v_proj
LLAMA_BLOCK = {
    "ln_1.weight": "input_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "mlp.c_gate.weight": "mlp.gate_proj.weight",
    "mlp.c_fc.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
LLAMA_TOP = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
}
LLAMA_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")


def _llama_tensors(name: str, tensor: Tensor, cfg: ModelConfig) -> Iterator[tuple[str, Tensor]]:
    from gptforge.model.tensor_parallel import qkv_sizes

    if name == "lm_head.weight" or name in LLAMA_TOP:
        yield LLAMA_TOP.get(name, name), tensor.contiguous()
        return
    layer, _, rest = name.removeprefix("transformer.h.").partition(".")
    prefix = f"model.layers.{layer}."
    if rest == "attn.c_attn.weight":
        for part, hf_name in zip(tensor.split(list(qkv_sizes(cfg))), LLAMA_QKV, strict=True):
            yield prefix + hf_name, part.contiguous()
    else:
        yield prefix + LLAMA_BLOCK[rest], tensor.contiguous()


def _llama_from_hf(tensors: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    ours_top = {v: k for k, v in LLAMA_TOP.items()}
    ours_block = {v: k for k, v in LLAMA_BLOCK.items()}
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    for name, tensor in tensors.items():
        if name in ours_top or name == "lm_head.weight":
            out[ours_top.get(name, name)] = tensor
            continue
        layer, _, rest = name.removeprefix("model.layers.").partition(".")
        if rest in LLAMA_QKV:
            qkv.setdefault(layer, {})[rest] = tensor
        elif rest in ours_block:
            out[f"transformer.h.{layer}.{ours_block[rest]}"] = tensor
        elif not rest.endswith("rotary_emb.inv_freq"):  # a buffer older exports carry
            out[name] = tensor  # reported as unexpected by the checked load
    for layer, parts in qkv.items():
        if set(parts) != set(LLAMA_QKV):
            raise CheckpointError(f"layer {layer}: q/k/v_proj incomplete ({sorted(parts)})")
        out[f"transformer.h.{layer}.attn.c_attn.weight"] = torch.cat([parts[n] for n in LLAMA_QKV])
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def hf_tensors(
    names: Iterable[str], get: Callable[[str], Tensor], cfg: ModelConfig
) -> Iterator[tuple[str, Tensor]]:
    """Our tensors, fetched by `get(name)` one at a time, as HF's (name, tensor) pairs (contiguous, ready
    for safetensors), in order: a caller that reads each from disk holds about one tensor at a time. A tied
    LM head is stored once (as the token embedding), as transformers does, and not fetched."""
    llama = architecture(cfg) == "llama"
    for name in names:
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        tensor = get(name).detach()
        if llama:
            yield from _llama_tensors(name, tensor, cfg)
        else:
            yield name, (tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor).contiguous()


def hf_zero_biases(model: GPT, cfg: ModelConfig) -> dict[str, Tensor]:
    """The biases a GPT-2 without biases lacks, as zeros: the same function in HF's always-biased GPT-2
    (`model` may live on the meta device: only its modules' shapes are read)."""
    if architecture(cfg) == "llama":
        return {}
    return {
        f"{name}.bias": torch.zeros(module.weight.shape[0], dtype=module.weight.dtype, device="cpu")
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is None and name != "lm_head"
    }


def hf_state_dict(model: GPT, cfg: ModelConfig) -> dict[str, Tensor]:
    """Our weights under GPT2LMHeadModel's (or LlamaForCausalLM's) names and layouts (`hf_tensors`)."""
    state = model.state_dict()
    return {**dict(hf_tensors(state, state.__getitem__, cfg)), **hf_zero_biases(model, cfg)}


def state_dict_from_hf(tensors: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """HF GPT-2 tensors (with or without the `transformer.` prefix, with or without the attention-mask
    buffers OpenAI's checkpoint carries), or HF Llama tensors -> our state dict names and layouts."""
    if architecture(cfg) == "llama":
        return _llama_from_hf(tensors, cfg)
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
    raise CheckpointError(
        f"{directory}: no {WEIGHTS_FILE} (expected a Hugging Face GPT-2 or Llama directory)"
    )


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
    """Our GPT from a Hugging Face GPT-2 or Llama directory (config.json + model.safetensors), e.g.
    OpenAI's `gpt2`."""
    from gptforge.model.load import load_state_dict_checked

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
    """Write a directory `GPT2LMHeadModel` / `LlamaForCausalLM.from_pretrained` loads (config.json +
    model.safetensors); a shape neither can express is refused before anything is written.

    With the GPT-2 tokenizer, vocab.json/merges.txt (derived offline from the shipped BPE ranks) and
    tokenizer_config.json are written too, so `AutoTokenizer.from_pretrained` works. `gptforge.json`
    records our config and tokenizer, so a SentencePiece model survives the round trip.
    """
    from safetensors.torch import save_file

    architecture(cfg)
    out = write_hf_files(cfg, out_dir, tokenizer_info)
    save_file(hf_state_dict(model, cfg), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    return out


def write_hf_files(cfg: ModelConfig, out_dir: str | Path, tokenizer_info: dict[str, Any] | None) -> Path:
    """Everything of a Hugging Face directory but the weights: config.json, gptforge.json (our config and
    tokenizer) and, with the GPT-2 tokenizer, its files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_info = tokenizer_info or dict(GPT2_TOKENIZER)
    (out / CONFIG_FILE).write_text(
        json.dumps(hf_config_dict(cfg, tokenizer_info.get("eot_id")), indent=2) + "\n"
    )
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


def to_hf(model: GPT, cfg: ModelConfig) -> PreTrainedModel:
    """An in-memory `transformers.GPT2LMHeadModel` or `LlamaForCausalLM` with our weights (needs
    `transformers`)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    classes = {"gpt2": (GPT2Config, GPT2LMHeadModel), "llama": (LlamaConfig, LlamaForCausalLM)}
    config_cls, model_cls = classes[architecture(cfg)]
    skip = ("architectures", "model_type", "rope_theta", "rope_scaling")
    hf_cfg = config_cls(**{k: v for k, v in hf_config_dict(cfg).items() if k not in skip})
    hf = model_cls(hf_cfg)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model, cfg), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not cfg.tie_embeddings]
    if missing or unexpected:
        raise CheckpointError(f"Hugging Face conversion: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        hf.tie_weights()
    return hf.train(model.training)
