"""The GPT as DeepSpeed pipeline layer specs: equal to the serial model, partitioned as configured."""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import torchrun
from deepspeed.runtime.pipe.module import TiedLayerSpec
from torch import nn

from gptforge.config import ModelConfig
from gptforge.errors import CheckpointError
from gptforge.model import GPT
from gptforge.model import pipeline as pl
from gptforge.parallel.topology import Topology

TOL = 1e-5


def tiny(**kw) -> ModelConfig:
    base = dict(n_layer=3, n_head=4, d_model=32, context_length=16, vocab_size=300, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


class OneStage(nn.Module):
    """What PipelineModule builds for a single stage: specs by index, tied modules by key, run in order."""

    def __init__(self, specs):
        super().__init__()
        self.tied_modules = nn.ModuleDict()
        self.funcs = []
        for i, spec in enumerate(specs):
            if isinstance(spec, TiedLayerSpec):
                if spec.key not in self.tied_modules:
                    self.tied_modules[spec.key] = spec.build()
                module = self.tied_modules[spec.key]
                self.funcs.append(partial(spec.forward_fn, module) if spec.forward_fn else module)
            else:
                self.add_module(str(i), spec.build())
                self.funcs.append(getattr(self, str(i)))

    def forward(self, x):
        for f in self.funcs:
            x = f(x)
        return x


@pytest.mark.parametrize("tie", [True, False])
def test_one_stage_specs_equal_serial_forward(tie):
    cfg = tiny(tie_embeddings=tie)
    torch.manual_seed(0)
    serial = GPT(cfg)
    stage = OneStage(pl.layer_specs(cfg))
    pl.load_serial_state_dict(stage, serial.state_dict(), cfg)
    idx, targets = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    targets[0, :5] = -100
    logits_ref, loss_ref = serial(idx, targets)
    logits = stage(idx)
    loss = pl.loss_fn(cfg)(logits, targets)
    assert torch.allclose(logits, logits_ref, rtol=0, atol=1e-6)
    assert abs(loss.item() - loss_ref.item()) <= TOL * abs(loss_ref.item())
    params = sum(p.numel() for p in stage.parameters())
    assert params == sum(p.numel() for p in serial.parameters())  # tied: the embedding is held once


def test_every_serial_weight_has_a_pipeline_name():
    cfg = tiny(tie_embeddings=False)
    stage = OneStage(pl.layer_specs(cfg))
    mapped = {pl.pipeline_to_serial_name(n, cfg) for n in stage.state_dict()}
    assert mapped == set(GPT(cfg).state_dict())
    assert pl.pipeline_to_serial_name("4.attn.c_attn.weight", cfg) == "transformer.h.2.attn.c_attn.weight"
    assert pl.pipeline_to_serial_name("tied_modules.embed.wte.weight", cfg) == "transformer.wte.weight"
    with pytest.raises(KeyError, match="not a GPT pipeline parameter"):
        pl.pipeline_to_serial_name("9.weight", cfg)
    partial_sd = {k: v for k, v in GPT(cfg).state_dict().items() if k != "transformer.ln_f.weight"}
    with pytest.raises(
        CheckpointError, match=r"no transformer.ln_f.weight \(needed for pipeline weight 5.weight\)"
    ):
        pl.load_serial_state_dict(stage, partial_sd, cfg)


def test_serial_spec_index_inverts_the_pipeline_names():
    """Every weight's spec index, as offline re-sharding places it on a stage: the index its pipeline name
    carries (the tied embedding's module is spec 0)."""
    cfg = tiny(tie_embeddings=False)
    for name in OneStage(pl.layer_specs(cfg)).state_dict():
        index = 0 if name.startswith("tied_modules.") else int(name.split(".")[0])
        assert pl.serial_spec_index(pl.pipeline_to_serial_name(name, cfg), cfg) == index, name
    assert pl.serial_spec_index("lm_head.weight", tiny()) == 0  # tied: stored with the embedding


def test_partition_weights_are_what_deepspeed_balances():
    """uniform = DeepSpeed's `type:BlockPipe` (1 per block); parameters = its per-spec parameter counts."""
    cfg = tiny(n_layer=4)
    specs = pl.layer_specs(cfg)
    assert pl._spec_weights(cfg, "uniform") == [
        int(bool(re.search("BlockPipe", s.typename.__name__, re.I))) for s in specs
    ]
    counted = [sum(p.numel() for p in s.build().parameters() if p.requires_grad) for s in specs]
    assert pl._spec_weights(cfg, "parameters") == counted


def test_stage_layout_for_each_partition_method():
    cfg = tiny(n_layer=12)
    topo = Topology(pp=2, dp=2)
    assert pl.stage_parts(cfg, 2, "uniform") == [0, 8, 16]
    assert pl.stage_parts(cfg, 2, "0-3,4-11") == [0, 6, 16]
    assert pl.describe_stages(cfg, topo, "0-3,4-11") == [
        "stage 0: layers 0-3 (+ embedding, position embedding), ranks 0,1",
        "stage 1: layers 4-11 (+ ln_f, head), ranks 2,3",
    ]
    assert pl.describe_stages(cfg, Topology(pp=3), "0-0,1-10,11-11")[1] == "stage 1: layers 1-10, ranks 1"
    # a big vocabulary makes `parameters` give the embedding a stage of its own: said, not hidden
    big_vocab = tiny(n_layer=12, vocab_size=50257)
    lines = pl.describe_stages(big_vocab, Topology(pp=4), "parameters")
    assert lines[0] == "stage 0: no layers (+ embedding), ranks 0"
    assert lines[-1] == "stage 3: no layers (+ head), ranks 3"


def run_pipeline(tmp_path: Path, nproc: int, tp: int, pp: int, partition: str) -> dict:
    out = tmp_path / "pp.json"
    proc = torchrun("pp_equivalence.py", nproc, str(out), str(tp), str(pp), partition)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("nproc", "tp", "pp", "partition", "stages"),
    [
        (
            2,
            1,
            2,
            "uniform",
            [
                "stage 0: layers 0-1 (+ embedding, position embedding), ranks 0",
                "stage 1: layers 2-3 (+ ln_f, head), ranks 1",
            ],
        ),
        (
            4,
            2,
            2,
            "0-0,1-3",
            [
                "stage 0: layers 0-0 (+ embedding, position embedding), ranks 0,1",
                "stage 1: layers 1-3 (+ ln_f, head), ranks 2,3",
            ],
        ),
    ],
    ids=["pp2", "tp2xpp2"],
)
def test_deepspeed_pipeline_equals_serial(tmp_path, nproc, tp, pp, partition, stages):
    r = run_pipeline(tmp_path, nproc, tp, pp, partition)
    assert r["start_state_dict"] == 0.0  # loaded from the serial init, gathered back exactly
    assert r["eval_loss"] < TOL and r["train_loss"] < TOL, r
    # one SGD step with gradient clipping active (norm > 1): the norm spans both stages, the tied
    # embedding's gradient is summed over first and last stage and counted once
    assert r["grad_norm"] > 1.0 and r["moved"] > 1e-3
    assert r["weights_after_step"] < TOL, r
    assert r["keys_equal"] and r["grid_matches_topology"]
    assert r["stages"] == stages
