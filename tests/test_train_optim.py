"""AdamW groups and guard, the LR schedule, batch arithmetic, DeepSpeed config, layout and precision checks."""

from __future__ import annotations

import math

import pytest
import torch

from gptforge.config import Config, ModelConfig, OptimConfig, load_config
from gptforge.errors import ConfigError
from gptforge.model import GPT
from gptforge.train.batch import plan_batch
from gptforge.train.distributed import check_layout
from gptforge.train.engine import deepspeed_config
from gptforge.train.optim import AdamW, lr_at, param_groups
from gptforge.train.precision import precision_mode

CFG = ModelConfig(n_layer=2, n_head=2, d_model=16, context_length=8, vocab_size=50)


def test_no_weight_decay_on_biases_norms_and_embeddings():
    model = GPT(CFG)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}  # tied head appears once, as wte
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed == {
        n for n in names.values() if n.endswith("weight") and (".attn.c_" in n or ".mlp.c_" in n)
    }
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"} <= kept
    assert all(n.endswith(".bias") or "ln_" in n or n.startswith("transformer.w") for n in kept)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def _model_with_grads(scale: float = 1.0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    a = GPT(CFG)
    b = GPT(CFG)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 50, (3, 8))
    for m in (a, b):
        _, loss = m(x, x)
        (loss * scale).backward()
    return a, b


def test_guard_clips_like_torch_and_reports_the_norm():
    ours_model, ref_model = _model_with_grads(scale=50.0)
    ours = AdamW(param_groups(ours_model, 0.1), lr=1e-2, guard=True, max_grad_norm=1.0)
    ref = torch.optim.AdamW(param_groups(ref_model, 0.1), lr=1e-2)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 1.0)
    ours.step()
    ref.step()
    assert ref_norm > 1.0  # clipping happened
    torch.testing.assert_close(ours._global_grad_norm, ref_norm, rtol=1e-6, atol=0)
    assert not ours.overflow
    for p, q in zip(ours_model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_guard_skips_a_non_finite_step(bad):
    model, _ = _model_with_grads()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    next(model.parameters()).grad[0, 0] = bad
    opt = AdamW(param_groups(model, 0.1), lr=1e-2, guard=True, max_grad_norm=1.0)
    opt.step()
    assert opt.overflow and not math.isfinite(float(opt._global_grad_norm))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert opt.state == {} or all(len(s) == 0 for s in opt.state.values())


def test_unguarded_step_is_plain_adamw():
    ours_model, ref_model = _model_with_grads()
    AdamW(ours_model.parameters(), lr=1e-2).step()
    torch.optim.AdamW(ref_model.parameters(), lr=1e-2).step()
    for p, q in zip(ours_model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_lr_schedules():
    o = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, o, 110) == pytest.approx(0.1)
    assert lr_at(9, o, 110) == pytest.approx(1.0)
    assert lr_at(10, o, 110) == pytest.approx(1.0)
    assert lr_at(60, o, 110) == pytest.approx(0.55)  # halfway: (lr + min_lr) / 2
    assert lr_at(110, o, 110) == pytest.approx(0.1) and lr_at(500, o, 110) == pytest.approx(0.1)
    lin = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, schedule="linear", decay_steps=100)
    assert [lr_at(s, lin, 999) for s in (0, 25, 100)] == pytest.approx([1.0, 0.75, 0.0])
    const = OptimConfig(lr=0.5, warmup_steps=4, schedule="constant")
    assert [lr_at(s, const, 10) for s in (1, 3, 4, 1000)] == pytest.approx([0.25, 0.5, 0.5, 0.5])


def _cfg(*overrides: str) -> Config:
    return load_config(None, ["model.vocab_size=50", *overrides])


def test_batch_plan():
    p = plan_batch(_cfg("train.micro_batch_size=4", "train.global_batch_size=32"), 2)
    assert (p.micro_batch, p.grad_accum, p.dp, p.global_batch) == (4, 4, 2, 32)
    p = plan_batch(
        _cfg("train.micro_batch_size=2", "train.global_batch_tokens=8192", "model.context_length=512"), 4
    )
    assert (p.grad_accum, p.global_batch) == (2, 16)
    assert plan_batch(_cfg("train.micro_batch_size=3"), 2).global_batch == 6
    with pytest.raises(ConfigError, match=r"global_batch_size=8 is not divisible by .* = 8 x 2 = 16"):
        plan_batch(_cfg("train.micro_batch_size=8", "train.global_batch_size=8"), 2)
    with pytest.raises(ConfigError, match="not a multiple of model.context_length"):
        plan_batch(_cfg("train.global_batch_tokens=1000", "model.context_length=512"), 1)


def test_deepspeed_config_follows_ours():
    cfg = _cfg("train.micro_batch_size=2", "train.global_batch_size=8", "optim.grad_clip=0.5")
    ds = deepspeed_config(cfg, plan_batch(cfg, 2), "fp32")
    assert (
        ds["train_batch_size"],
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
    ) == (8, 2, 2)
    assert ds["gradient_clipping"] == 0.0  # ZeRO-0 fp32: our AdamW clips (and reports the norm)
    assert ds["timers"]["throughput"]["enabled"] is False
    cfg1 = _cfg("parallel.zero_stage=1", "optim.grad_clip=0.5")
    ds1 = deepspeed_config(cfg1, plan_batch(cfg1, 1), "fp32")
    assert ds1["zero_optimization"]["stage"] == 1 and ds1["gradient_clipping"] == 0.5
    auto = deepspeed_config(cfg, plan_batch(cfg, 2), "autocast")["torch_autocast"]
    assert auto["enabled"] and auto["dtype"] == "bfloat16" and auto["lower_precision_safe_modules"] == []
    assert deepspeed_config(cfg, plan_batch(cfg, 2), "bf16")["bf16"] == {"enabled": True}


@pytest.mark.parametrize(
    "override,match",
    [
        ("parallel.tp=2", "tensor parallelism"),
        ("parallel.pp=2", "pipeline parallelism"),
        ("parallel.zero_stage=2", "parallel.zero_stage=2"),
        ("parallel.zero_stage=3", "not supported for fine-tuning"),
    ],
)
def test_unsupported_layouts_are_refused(override, match):
    with pytest.raises(ConfigError, match=match):
        check_layout(_cfg("model.n_head=4", "model.d_model=32", override), 4)


def test_precision_checks():
    cpu = torch.device("cpu")
    assert precision_mode("fp32", cpu) == "fp32"
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        precision_mode("fp16", cpu)
    assert precision_mode("bf16", cpu) == "autocast"  # on every CPU: emulated where not native


def test_bf16_on_a_cpu_without_native_bf16_runs_with_a_warning(monkeypatch, caplog):
    """Refuse nothing a user could run: a CPU without avx512_bf16/AMX gets autocast and a warning."""
    import gptforge.train.precision as precision

    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    with caplog.at_level("WARNING", logger=precision.log.name):
        assert precision.precision_mode("bf16", torch.device("cpu")) == "autocast"
    assert any("no native bf16" in r.getMessage() and "slow" in r.getMessage() for r in caplog.records)
