"""The model family beyond GPT-2 (issue 16): config keys and their errors, every option's size arithmetic
against the real module, rope + GQA generation with a sliding KV cache, and Hugging Face Llama interop."""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT as REPO

from gptforge import hf
from gptforge.config import ModelConfig, ParallelConfig, load_config
from gptforge.errors import CheckpointError, ConfigError
from gptforge.generate import generate
from gptforge.model import GPT, KVCache, count_parameters, flops_per_token, memory_report, state_bytes
from gptforge.model import tensor_parallel as tpl
from gptforge.model.size import matmul_parameters
from gptforge.parallel import planner as pn
from gptforge.parallel.topology import validate_layout

# init_std 0.2 spreads the logits, so greedy choices are far from ties and comparisons are exact.
LLAMA = ModelConfig(
    n_layer=2,
    n_head=4,
    n_kv_head=2,
    d_model=64,
    context_length=32,
    vocab_size=101,
    init_std=0.2,
    position_embedding="rope",
    rope_theta=500.0,
    norm="rmsnorm",
    mlp="swiglu",
    ffn_hidden=96,
    bias=False,
    tie_embeddings=False,
)
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [42], list(range(40, 60))]
OPTIONS = list(
    itertools.product(
        ("learned", "sinusoidal", "rope"), ("layernorm", "rmsnorm"), ("gelu", "swiglu"), (4, 2, 1)
    )
)


def build(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


# ---------------------------------------------------------------------------------------------- config


def test_defaults_are_gpt2():
    m = ModelConfig()
    assert (m.position_embedding, m.norm, m.mlp, m.kv_heads, m.ffn_dim) == (
        "learned",
        "layernorm",
        "gelu",
        12,
        3072,
    )
    assert ModelConfig(d_model=2048, mlp="swiglu").ffn_dim == 5632  # Llama: 8/3 x d rounded up to 256
    assert ModelConfig(d_model=64, mlp="swiglu", ffn_hidden=96).ffn_dim == 96


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.n_kv_head=5"], "model.n_kv_head=5: model.n_head (12) must be a multiple of it"),
        (["model.n_kv_head=0"], "model.n_kv_head=0"),
        (["model.position_embedding=rope", "model.n_head=4", "model.d_model=36"], "even head size"),
        (["model.position_embedding=rotary"], "'rotary' is not one of learned, sinusoidal, rope"),
        (["model.norm=batchnorm"], "is not one of layernorm, rmsnorm"),
        (["model.mlp=relu"], "is not one of gelu, swiglu"),
        (["model.rope_theta=0"], "model.rope_theta must be > 0"),
        (["model.ffn_hidden=0"], "model.ffn_hidden must be >= 1"),
    ],
)
def test_bad_model_options_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_tp_never_splits_a_kv_head():
    model = dataclasses.replace(LLAMA, n_head=8, n_kv_head=2, ffn_hidden=128)
    assert validate_layout(2, ParallelConfig(tp=2), model) == 1
    with pytest.raises(
        ConfigError, match=r"n_kv_head=2 .* parallel.tp=4: .*whole key/value heads .*tp in \[1, 2\]"
    ):
        validate_layout(4, ParallelConfig(tp=4), model)


def test_llama_configs_load():
    tiny = load_config(REPO / "configs/llama-tiny.yaml").model
    assert (tiny.position_embedding, tiny.norm, tiny.mlp, tiny.kv_heads, tiny.bias) == (
        "rope",
        "rmsnorm",
        "swiglu",
        2,
        False,
    )
    big = load_config(REPO / "configs/llama-1b.yaml").model
    assert count_parameters(big) == 1_076_072_448
    assert (big.n_layer, big.d_model, big.n_head, big.kv_heads, big.ffn_dim) == (16, 2048, 32, 8, 8192)


# ---------------------------------------------------------------------------------------------- size


@pytest.mark.parametrize("position, norm, mlp, kv", OPTIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_size_arithmetic_equals_the_real_module(position, norm, mlp, kv, bias):
    cfg = dataclasses.replace(LLAMA, position_embedding=position, norm=norm, mlp=mlp, n_kv_head=kv, bias=bias)
    model = GPT(cfg)
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_parameters(cfg) == linear + (cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0)
    assert (
        flops_per_token(cfg)
        == 6 * matmul_parameters(cfg) + 12 * cfg.n_layer * cfg.d_model * cfg.context_length
    )
    assert memory_report(cfg)["bf16"] == state_bytes(count_parameters(cfg), "bf16")
    ((params, _),) = pn.stage_parameters(cfg, 1, 1)
    assert params == count_parameters(cfg)


def test_planner_splits_kv_heads_and_both_swiglu_inputs_over_tp():
    cfg = dataclasses.replace(
        LLAMA, n_head=8, n_kv_head=2, ffn_hidden=128, vocab_size=256, tie_embeddings=True
    )
    ((p1, _),) = pn.stage_parameters(cfg, 1, 1)
    ((p2, _),) = pn.stage_parameters(cfg, 2, 1)
    d = cfg.d_model
    replicated = cfg.n_layer * 2 * d + d  # RMSNorm gains; nothing else is replicated without biases
    assert p2 == (p1 - 256 * d - replicated) // 2 + replicated + 256 * d // 2
    assert pn.activation_bytes(cfg, 2, 1, 0, 1, 1, "bf16", False) < pn.activation_bytes(
        cfg, 1, 1, 0, 1, 1, "bf16", False
    )


def test_gqa_qkv_shards_hold_whole_kv_heads():
    """n_head 4, n_kv_head 2, head_dim 2, tp 2: rank r has q heads 2r, 2r+1 and kv head r (rows q | k | v)."""
    full = torch.arange(16).float().unsqueeze(1).expand(16, 8)  # q 8 rows, k 4, v 4
    bias = torch.arange(16).float()
    qkv = (8, 4, 4)
    rows = [tpl.shard_tensor("h.0.attn.c_attn.weight", full, r, 2, qkv)[:, 0].tolist() for r in range(2)]
    assert rows == [[0, 1, 2, 3, 8, 9, 12, 13], [4, 5, 6, 7, 10, 11, 14, 15]]
    assert (
        tpl.shard_tensor("h.0.attn.c_attn.weight", full, 1, 2)[:, 0].tolist() == rows[1]
    )  # sizes from the shape
    bias_shards = [tpl.shard_tensor("h.0.attn.c_attn.bias", bias, r, 2, qkv) for r in range(2)]
    assert [b.tolist() for b in bias_shards] == rows
    assert torch.equal(tpl.merge_shards("h.0.attn.c_attn.bias", bias_shards, qkv=qkv), bias)
    shards = [tpl.shard_tensor("h.0.attn.c_attn.weight", full, r, 2, qkv) for r in range(2)]
    assert torch.equal(tpl.merge_shards("h.0.attn.c_attn.weight", shards), full)
    assert tpl.tp_rule("transformer.h.0.mlp.c_gate.weight") == ("column", 0)


# ---------------------------------------------------------------------------------------------- forward


def test_rope_gqa_attention_equals_explicit_attention():
    """Rotary q/k ("rotate half"), each kv head shared by its group of query heads, causal softmax."""
    model = build(LLAMA)
    attn, x = model.transformer.h[0].attn, torch.randn(2, 10, 64)
    B, T, hd = 2, 10, 16
    q, k, v = attn.c_attn(x).split([64, 32, 32], dim=2)
    q, k, v = (t.view(B, T, -1, hd).transpose(1, 2) for t in (q, k, v))
    inv = 1.0 / 500.0 ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.arange(T).float()[:, None] * inv
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rot(t):
        return t * cos + torch.cat([-t[..., hd // 2 :], t[..., : hd // 2]], -1) * sin

    q, k = rot(q), rot(k).repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-1, -2)) / hd**0.5
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    y = (scores.softmax(-1) @ v.repeat_interleave(2, dim=1)).transpose(1, 2).reshape(B, T, 64)
    torch.testing.assert_close(attn(x), attn.c_proj(y), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rope"])
def test_kv_cache_matches_full_forward_and_holds_only_kv_heads(position):
    cfg = dataclasses.replace(LLAMA, position_embedding=position, n_kv_head=1)
    model, idx = build(cfg), torch.randint(0, 101, (2, 12))
    full, _ = model(idx)
    cache = KVCache(cfg.n_layer, cfg.context_length)
    first, _ = model(idx[:, :7], cache=cache)
    rest = [model(idx[:, t : t + 1], cache=cache)[0] for t in range(7, 12)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.layers[0].k.shape == (2, 1, 32, 16)  # n_kv_head heads, not n_head


@pytest.mark.parametrize("position, kv", [("rope", 2), ("rope", 1), ("sinusoidal", 2)])
def test_cached_and_uncached_generation_agree_past_the_context(position, kv):
    """50 new tokens on a 32-token context. rope: the cache slides (nothing recomputed) and the uncached
    path reads the whole sequence with the same sliding-window attention; sinusoidal recomputes."""
    model = build(dataclasses.replace(LLAMA, n_kv_head=kv, position_embedding=position))
    for kwargs in ({"temperature": 0}, {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 7}):
        with_cache = generate(model, PROMPTS, 50, use_cache=True, **kwargs)
        assert with_cache == generate(model, PROMPTS, 50, use_cache=False, **kwargs)
        assert all(len(row) == 50 for row in with_cache)
    greedy = generate(model, PROMPTS, 50, temperature=0)
    assert greedy == [generate(model, [p], 50, temperature=0)[0] for p in PROMPTS]  # padding is invisible


def test_sliding_rope_cache_is_sliding_window_attention():
    """After the cache slides, the next token's logits equal a full forward over the whole sequence in
    which every token attends to the context_length tokens up to itself."""
    model, seq = build(LLAMA), torch.randint(0, 101, (1, 41))
    cache = KVCache(LLAMA.n_layer, LLAMA.context_length)
    model(seq[:, :32], cache=cache)
    for t in range(32, 41):
        cache.shift(1)
        step, _ = model(seq[:, t : t + 1], cache=cache)
    assert cache.offset == 9 and cache.length == 32
    full, _ = model(seq)  # 41 > context: sliding-window attention for a rotary model
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="longer than model.context_length=32"):
        build(dataclasses.replace(LLAMA, position_embedding="learned"))(seq)


# ---------------------------------------------------------------------------------------------- Hugging Face


@pytest.fixture(scope="module")
def llama():
    return build(LLAMA)


def test_llama_logits_equal_transformers(llama):
    reference = hf.to_hf(llama, LLAMA).eval()
    assert type(reference).__name__ == "LlamaForCausalLM"
    idx = torch.randint(0, 101, (3, 32))
    with torch.no_grad():
        assert (llama(idx)[0] - reference(idx).logits).abs().max().item() <= 1e-5


def test_llama_greedy_generation_equals_transformers(llama):
    reference = hf.to_hf(llama, LLAMA).eval()
    for prompt in PROMPTS:
        new = 32 - len(prompt)
        expected = reference.generate(
            torch.tensor([prompt]), max_new_tokens=new, do_sample=False, pad_token_id=0, attention_mask=None
        )[0, len(prompt) :].tolist()
        assert generate(llama, [prompt], new, temperature=0) == [expected]


def test_llama_export_loads_in_transformers_and_back(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = hf.save_hf(llama, LLAMA, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2
    reference = AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        assert (reference(idx).logits - llama(idx)[0]).abs().max().item() <= 1e-5
    back, cfg = hf.from_hf(out)
    assert dataclasses.replace(cfg, init_from="scratch") == dataclasses.replace(LLAMA, dropout=0.0)
    assert all(
        torch.equal(a, b)
        for a, b in zip(back.state_dict().values(), llama.state_dict().values(), strict=True)
    )


def test_llama_made_by_transformers_loads(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=48,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1234.0},
    )
    theirs = LlamaForCausalLM(config).eval()
    theirs.save_pretrained(tmp_path / "hf")
    ours, cfg = hf.from_hf(tmp_path / "hf")
    assert (cfg.kv_heads, cfg.ffn_dim, cfg.rope_theta, cfg.tie_embeddings) == (1, 80, 1234.0, True)
    idx = torch.randint(0, 300, (2, 48))
    with torch.no_grad():
        assert (theirs(idx).logits - ours(idx)[0]).abs().max().item() <= 1e-5


def test_llama3_rope_scaling_is_refused(tmp_path):
    config = hf._llama_config_dict(LLAMA, None)
    config["rope_parameters"] = {"rope_type": "llama3", "factor": 32.0, "rope_theta": 500000.0}
    with pytest.raises(CheckpointError, match="rope type='llama3' is not supported"):
        hf.model_config_from_hf(config, "config.json")


@pytest.mark.parametrize(
    "changes",
    [
        {"position_embedding": "sinusoidal"},
        {"norm": "layernorm"},
        {"bias": True},
        {"position_embedding": "learned", "norm": "layernorm", "mlp": "gelu"},  # GPT-2 but grouped-query
    ],
)
def test_export_refuses_what_neither_gpt2_nor_llama_expresses(changes, tmp_path):
    cfg = dataclasses.replace(LLAMA, **changes)
    with pytest.raises(CheckpointError, match="has no Hugging Face form"):
        hf.save_hf(GPT(cfg), cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_export_cli_refusal_is_one_error_line(tmp_path):
    from gptforge.weights import save_model_dir

    cfg = dataclasses.replace(LLAMA, position_embedding="sinusoidal", vocab_size=50257)
    save_model_dir(GPT(cfg), cfg, {"name": "gpt2", "vocab_size": 50257, "eot_id": 50256}, tmp_path / "m")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch/export.py"),
            "--checkpoint",
            str(tmp_path / "m"),
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "no Hugging Face form" in lines[0]
