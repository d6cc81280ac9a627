"""The memory/throughput planner: DeepSpeed's own estimates agree, the real modules agree, the CLI works."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from conftest import PYTHON, ROOT, subprocess_env
from deepspeed.runtime.zero.stage3 import (
    estimate_zero3_model_states_mem_needs,
    estimate_zero3_model_states_mem_needs_all_cold,
    model_to_params,
)
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from gptforge.config import ModelConfig, load_config
from gptforge.model import GPT, count_parameters
from gptforge.model import pipeline as pl
from gptforge.parallel import planner as pn

CONFIGS = ROOT / "configs"


def states(cfg: ModelConfig, layout: pn.Layout, precision: str = "bf16") -> int:
    params, largest = pn.stage_parameters(cfg, layout.tp, layout.pp)[0]
    return sum(pn.model_state_bytes(params, largest, layout, precision))


@pytest.mark.parametrize("name", ["gpt2-124m", "gpt2-1.5b"])
@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_zero2_and_zero3_agree_with_deepspeed_estimates(name, gpus):
    cfg = load_config(CONFIGS / f"{name}.yaml").model
    total, largest = count_parameters(cfg), cfg.vocab_size * cfg.d_model
    nodes, per_node = max(gpus // 8, 1), min(gpus, 8)
    for offload in (False, True):
        _, ds = estimate_zero2_model_states_mem_needs(total, per_node, nodes, cpu_offload=offload)
        ours = states(cfg, pn.Layout(1, 1, gpus, 2, offload_optimizer=offload))
        assert abs(ours - ds) <= 0.05 * ds, (offload, ours, ds)
    for off_opt, off_par in [(False, False), (True, False), (True, True)]:
        _, ds, _ = estimate_zero3_model_states_mem_needs(
            total, largest, per_node, nodes, cpu_offload=off_opt, cpu_offload_params=off_par
        )
        ours = states(cfg, pn.Layout(1, 1, gpus, 3, off_opt, off_par))
        assert abs(ours - ds) <= 0.05 * ds, (off_opt, off_par, ours, ds)


def test_zero3_agrees_with_deepspeeds_printed_table(capsys):
    cfg = load_config(CONFIGS / "gpt2-1.5b.yaml").model
    estimate_zero3_model_states_mem_needs_all_cold(count_parameters(cfg), cfg.vocab_size * cfg.d_model, 8, 2)
    rows = re.findall(
        r"\|\s*([\d.]+)GB \| offload_param=(\S+), offload_optimizer=(\S+), zero_init=1",
        capsys.readouterr().out,
    )
    assert len(rows) == 3
    for gpu_gb, off_par, off_opt in rows:
        layout = pn.Layout(
            1, 1, 16, 3, offload_optimizer="none" not in off_opt, offload_params="none" not in off_par
        )
        assert abs(states(cfg, layout) / pn.GB - float(gpu_gb)) <= 0.05 * float(gpu_gb) + 0.005


def test_parameter_counts_match_the_real_modules():
    cfg = ModelConfig(n_layer=5, n_head=4, d_model=64, context_length=32, vocab_size=1000)
    ((params, largest),) = pn.stage_parameters(cfg, 1, 1)
    assert (params, largest) == model_to_params(GPT(cfg)) and params == count_parameters(cfg)
    # two pipeline stages: what each stage's DeepSpeed layer specs hold (the tied head is a second copy)
    specs, parts = pl.layer_specs(cfg), pl.stage_parts(cfg, 2, "uniform")
    built = [
        sum(p.numel() for s in specs[parts[i] : parts[i + 1]] for p in s.build().parameters())
        for i in range(2)
    ]
    assert [p for p, _ in pn.stage_parameters(cfg, 1, 2)] == built


def test_tp_splits_the_big_matrices_and_pads_the_vocabulary():
    cfg = ModelConfig(n_layer=4, n_head=8, d_model=256, context_length=64, vocab_size=50257)
    ((p1, _),) = pn.stage_parameters(cfg, 1, 1)
    ((p4, l4),) = pn.stage_parameters(cfg, 4, 1)
    d = cfg.d_model
    replicated = 4 * (2 * d + 4 * d) + 2 * d + 64 * d  # per block: 2 row biases + 2 LNs; ln_f; wpe
    assert p4 == (p1 - cfg.vocab_size * d - replicated) // 4 + replicated + 50688 * d // 4
    assert l4 == 50688 * d // 4


def test_activations():
    cfg = load_config(CONFIGS / "gpt2-124m.yaml").model

    def act(tp=1, pp=1, stage=0, micro=8, ckpt=False, flash=True):
        return pn.activation_bytes(cfg, tp, pp, stage, 12, micro, "bf16", ckpt, flash)

    s, b, h = 1024, 12, 768
    logits = s * b * cfg.vocab_size * 6
    assert act() == 12 * s * b * h * 34 + logits
    assert act(flash=False) == act() + 12 * 5 * 12 * s * s * b
    assert act(ckpt=True) == 12 * 2 * s * b * h + s * b * h * 34 + logits
    assert act(tp=2) < act()
    # 1F1B: stage 0 of 4 keeps 4 micro-batches of its 3 blocks; the last stage 1 (plus the logits)
    assert act(pp=4, stage=0) == 4 * 3 * s * b * h * 34
    assert act(pp=4, stage=3) == 3 * s * b * h * 34 + logits


def test_plan_ranks_valid_layouts_and_suggests_one_that_fits():
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.vocab_size=50257", "train.global_batch_size=32"])
    plans = pn.plan(cfg, pn.Hardware(gpus=4, gpu_mem=80 * pn.GB))
    layouts = {(p.layout.tp, p.layout.pp, p.layout.zero) for p in plans}
    assert {(1, 1, 0), (2, 1, 3), (1, 2, 1), (2, 2, 0), (4, 1, 2), (1, 4, 1)} <= layouts
    assert not any(p.layout.pp > 1 and p.layout.zero >= 2 for p in plans)  # rejected like the trainer does
    choice = pn.best(plans)
    assert choice is plans[0] and choice.fits
    assert [p.tokens_per_s for p in plans] == sorted((p.tokens_per_s for p in plans), reverse=True)
    # too little memory: nothing fits, and the suggestion says so
    tight = pn.plan(load_config(CONFIGS / "gpt2-1.5b.yaml"), pn.Hardware(gpus=2, gpu_mem=1 * pn.GB))
    assert pn.best(tight) is None
    assert "no layout fits" in pn.format_plans(tight, pn.Hardware(gpus=2, gpu_mem=1 * pn.GB), 1)


def test_memory_pressure_pushes_to_sharding():
    cfg = load_config(CONFIGS / "gpt2-1.5b.yaml")
    roomy = pn.best(pn.plan(cfg, pn.Hardware(gpus=8, gpu_mem=80 * pn.GB)))
    tight = pn.best(pn.plan(cfg, pn.Hardware(gpus=8, gpu_mem=8 * pn.GB)))
    assert roomy.memory.total(roomy.checkpointing) <= 0.9 * 80 * pn.GB
    assert tight.memory.total(tight.checkpointing) <= 0.9 * 8 * pn.GB
    assert tight.memory.total(tight.checkpointing) < roomy.memory.total(roomy.checkpointing)


def plan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, str(ROOT / "launch/plan.py"), *args],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_plan_cli_prints_the_table_and_a_suggestion():
    proc = plan_cli("--config", str(CONFIGS / "gpt2-1.5b.yaml"), "--gpus", "16", "--gpu-mem", "80GB")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "weights" in out and "grads" in out and "optim" in out and "act+ckpt" in out
    assert re.search(r"^tp1 pp1 dp16 z3 ", out, re.M)
    assert re.search(r"^suggested: tp\d+ pp\d+ dp\d+ z\d", out, re.M)
    assert re.search(r"parallel\.tp=\d+ parallel\.pp=\d+ parallel\.zero_stage=\d", out)


def test_plan_cli_json_and_errors():
    proc = plan_cli(
        "--config", str(CONFIGS / "gpt2-124m.yaml"), "--gpus", "8", "--gpu-mem", "40GiB", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["suggested"] == data["layouts"][0]["layout"]
    assert all(r["tp"] * r["pp"] * r["dp"] == 8 for r in data["layouts"])
    bad = plan_cli("--config", str(CONFIGS / "gpt2-124m.yaml"), "--gpus", "8", "--gpu-mem", "lots")
    assert bad.returncode == 2 and "error: --gpu-mem 'lots': expected a size like 80GB" in bad.stderr
