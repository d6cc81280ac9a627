"""The GPT-2 model: shapes, initialisation, loss, the pieces parallel wrappers use, KV cache and padding,
and the size arithmetic (checked against real modules)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptforge.config import ModelConfig, load_config
from gptforge.errors import ConfigError
from gptforge.model import (
    GPT,
    KVCache,
    chunked_cross_entropy,
    count_parameters,
    flops_per_token,
    memory_report,
    state_bytes,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(n_layer=2, n_head=4, d_model=64, context_length=32, vocab_size=101)


def tiny(**changes) -> GPT:
    torch.manual_seed(0)
    return GPT(dataclasses.replace(TINY, **changes)).eval()


def reference_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """GPT-2 written out with explicit softmax attention, to check the SDPA model against."""
    cfg = model.cfg
    B, T = idx.shape
    x = model.transformer.wte.weight[idx] + model.transformer.wpe.weight[:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for block in model.transformer.h:
        h = F.layer_norm(x, (cfg.d_model,), block.ln_1.weight, block.ln_1.bias, cfg.layer_norm_eps)
        q, k, v = F.linear(h, block.attn.c_attn.weight, block.attn.c_attn.bias).chunk(3, dim=-1)
        q, k, v = (t.view(B, T, cfg.n_head, -1).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, cfg.d_model)
        x = x + F.linear(y, block.attn.c_proj.weight, block.attn.c_proj.bias)
        h = F.layer_norm(x, (cfg.d_model,), block.ln_2.weight, block.ln_2.bias, cfg.layer_norm_eps)
        u = F.linear(h, block.mlp.c_fc.weight, block.mlp.c_fc.bias)
        u = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
        x = x + F.linear(u, block.mlp.c_proj.weight, block.mlp.c_proj.bias)
    x = F.layer_norm(
        x, (cfg.d_model,), model.transformer.ln_f.weight, model.transformer.ln_f.bias, cfg.layer_norm_eps
    )
    return x @ model.lm_head.weight.t()


def randomise_norms_and_biases(model: GPT) -> None:
    """GPT-2's init makes these 1 and 0; tests must see them used."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or "ln_f" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("changes", [{}, {"bias": False}, {"tie_embeddings": False}])
def test_forward_matches_explicit_attention(changes):
    model = tiny(**changes)
    randomise_norms_and_biases(model)
    idx = torch.randint(0, 101, (3, 32))
    logits, loss = model(idx)
    assert loss is None
    assert logits.shape == (3, 32, 101)
    assert (logits - reference_forward(model, idx)).abs().max().item() <= 1e-5


def test_loss_is_mean_cross_entropy_ignoring_minus_100():
    model = tiny()
    idx = torch.randint(0, 101, (2, 16))
    targets = torch.randint(0, 101, (2, 16))
    targets[0, :5] = -100
    logits, loss = model(idx, targets)
    keep = targets != -100
    expected = -logits.log_softmax(-1)[keep].gather(-1, targets[keep][:, None]).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_criterion_is_swappable():
    model = tiny()
    seen = {}

    class Recording(torch.nn.Module):
        def forward(self, logits, targets):
            seen["shapes"] = (tuple(logits.shape), tuple(targets.shape))
            return logits.sum() * 0 + 7.0

    model.criterion = Recording()
    _, loss = model(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))
    assert loss.item() == 7.0
    assert seen["shapes"] == ((2, 8, 101), (2, 8))


def test_pieces_compose_to_forward():
    """embed -> each block -> ln_f -> lm_head, as pipeline parallelism calls them."""
    model = tiny()
    idx = torch.randint(0, 101, (2, 20))
    x = model.embed(idx)
    for block in model.transformer.h:
        x = block(x)
    logits = model.lm_head(model.transformer.ln_f(x))
    assert torch.equal(logits, model(idx)[0])


def test_attention_takes_its_width_from_c_attn_and_n_head():
    """A tensor-parallel shard: half the heads (their Q, K, V columns), local n_head = 2. Its output plus
    the other half's equals the full attention (row-parallel c_proj without bias, summed)."""
    model = tiny(bias=False)
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 10, 64)
    full = attn(x)
    hd = attn.head_dim
    shards = []
    for part in range(2):
        heads = slice(part * 2 * hd, (part + 1) * 2 * hd)
        shard = GPT(dataclasses.replace(TINY, bias=False)).transformer.h[0].attn
        with torch.no_grad():
            q, k, v = attn.c_attn.weight.chunk(3, dim=0)
            shard.c_attn = torch.nn.Linear(64, 6 * hd, bias=False)
            shard.c_attn.weight.copy_(torch.cat([q[heads], k[heads], v[heads]]))
            shard.c_proj = torch.nn.Linear(2 * hd, 64, bias=False)
            shard.c_proj.weight.copy_(attn.c_proj.weight[:, heads])
        shard.n_head = 2
        shards.append(shard.eval()(x))
    assert (shards[0] + shards[1] - full).abs().max().item() <= 1e-6


def test_gpt2_initialisation():
    cfg = ModelConfig(n_layer=6, n_head=4, d_model=256, context_length=64, vocab_size=1000)
    torch.manual_seed(0)
    model = GPT(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    residual_std = 0.02 / math.sqrt(2 * 6)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(residual_std, rel=0.03), name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.03), name
        elif name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif ".ln_" in name or "ln_f" in name:
            assert torch.all(p == 1), name
    untied = GPT(dataclasses.replace(cfg, tie_embeddings=False))
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert not any(
        name.endswith("bias") for name, _ in GPT(dataclasses.replace(cfg, bias=False)).named_parameters()
    )


def test_dropout_only_in_training():
    model = tiny(dropout=0.5)
    idx = torch.randint(0, 101, (2, 16))
    model.train()
    torch.manual_seed(1)
    a = model(idx)[0]
    b = model(idx)[0]
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


def test_backward_reaches_every_parameter():
    model = tiny(tie_embeddings=False).train()
    idx = torch.randint(0, 101, (2, 16))
    model(idx, idx)[1].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_vocab_size_must_be_set():
    with pytest.raises(ConfigError, match="model.vocab_size"):
        GPT(dataclasses.replace(TINY, vocab_size=None))


def test_sequence_longer_than_context_is_an_error():
    with pytest.raises(ValueError, match="context_length=32"):
        tiny()(torch.zeros(1, 33, dtype=torch.long))


def test_kv_cache_matches_full_forward():
    model = tiny()
    idx = torch.randint(0, 101, (2, 24))
    full = model(idx)[0]
    cache = KVCache(model.cfg.n_layer, 32)
    pieces = [model(idx[:, :10], cache=cache)[0]]
    for t in range(10, 24):
        pieces.append(model(idx[:, t : t + 1], cache=cache)[0])
    assert cache.length == 24
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-5


def test_left_padding_gives_each_row_its_own_result():
    model = tiny()
    rows = [torch.randint(0, 101, (n,)) for n in (12, 5, 9)]
    width = 12
    idx = torch.zeros(3, width, dtype=torch.long)
    pad = torch.tensor([width - len(r) for r in rows])
    for i, r in enumerate(rows):
        idx[i, width - len(r) :] = r
    batched = model(idx, pad=pad)[0]
    for i, r in enumerate(rows):
        alone = model(r[None])[0][0]
        assert (batched[i, width - len(r) :] - alone).abs().max().item() <= 1e-5
    assert torch.isfinite(batched).all()  # padding rows attend to themselves: no NaN


def test_last_only_logits():
    model = tiny()
    idx = torch.randint(0, 101, (2, 16))
    assert torch.allclose(model(idx, last_only=True)[0][:, 0], model(idx)[0][:, -1], atol=1e-6)


@pytest.mark.parametrize(
    "changes", [{}, {"bias": False}, {"tie_embeddings": False}, {"bias": False, "tie_embeddings": False}]
)
def test_count_parameters_equals_the_real_model(changes):
    cfg = dataclasses.replace(TINY, **changes)
    assert count_parameters(cfg) == sum(p.numel() for p in GPT(cfg).parameters())


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("gpt2-124m", 124_439_808),
        ("gpt2-350m", 354_823_168),
        ("gpt2-774m", 774_030_080),
        ("gpt2-1.5b", 1_557_611_200),
    ],
)
def test_openai_shapes(name, expected):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml").model
    assert count_parameters(cfg) == expected
    if name == "gpt2-124m":
        with torch.device("meta"):
            assert sum(p.numel() for p in GPT(cfg).parameters()) == expected


def test_memory_report_bytes_per_parameter():
    n = count_parameters(TINY)
    report = memory_report(TINY)
    assert report["fp32"] == state_bytes(n, "fp32")
    assert (report["fp32"].weights, report["fp32"].grads, report["fp32"].master_weights) == (4 * n, 4 * n, 0)
    assert (report["bf16"].weights, report["bf16"].grads, report["bf16"].master_weights) == (
        2 * n,
        2 * n,
        4 * n,
    )
    assert report["fp16"] == report["bf16"]
    assert all(r.optimizer == 8 * n and r.total == 16 * n for r in report.values())
    with pytest.raises(ConfigError, match="precision"):
        state_bytes(n, "fp8")


def test_flops_per_token_counts_matmuls():
    """6 FLOPs per matmul weight per token plus attention, checked against the model's Linear layers."""
    model = tiny(tie_embeddings=False)
    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = 12 * TINY.n_layer * TINY.d_model * 16
    assert flops_per_token(TINY, seq_len=16) == 6 * linear_weights + attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_equals_f_cross_entropy(monkeypatch, dtype):
    """Value and gradient, with ignored targets, chunks that do not divide the rows, fp32 and bf16 logits."""
    import gptforge.model.loss as loss_module

    monkeypatch.setattr(loss_module, "_rows_per_chunk", lambda logits: 7)  # 50 rows: 7 chunks, a partial one
    logits = (3 * torch.randn(50, 101)).to(dtype).requires_grad_()
    targets = torch.randint(0, 101, (50,))
    targets[[0, 13, 49]] = -100
    got = chunked_cross_entropy(logits, targets)
    (grad_got,) = torch.autograd.grad(2.5 * got, logits)
    reference = logits.detach().float().requires_grad_()
    expected = F.cross_entropy(reference, targets, ignore_index=-100)
    (grad_expected,) = torch.autograd.grad(2.5 * expected, reference)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)
    assert grad_got.dtype == dtype
    tolerance = 1e-7 if dtype == torch.float32 else 4e-3 * grad_expected.abs().max().item()
    assert (grad_got.float() - grad_expected).abs().max().item() <= tolerance


def test_chunked_cross_entropy_gradcheck():
    logits = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 1, 2, 3, 4, -100, 1, 2, 3])
    assert torch.autograd.gradcheck(chunked_cross_entropy, (logits, targets))
