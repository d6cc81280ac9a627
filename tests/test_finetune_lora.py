"""LoRA: zero-initialised B gives the base model's logits exactly, merging equals the adapted model, a
LoRA run trains only the adapters (count logged) and its export to Hugging Face has the adapted logits."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from finetune_helpers import (
    EXPORT,
    alpaca_rows,
    finetune_cmd,
    metric_lines,
    ok,
    sentiment_rows,
    tiny_hf,
    write_ft_config,
    write_jsonl,
)
from train_helpers import run

from gptforge.config import ModelConfig
from gptforge.errors import ConfigError
from gptforge.finetune.classify import GPTClassifier
from gptforge.finetune.lora import LoRALinear, apply_lora, merge_lora_weights
from gptforge.hf import from_hf
from gptforge.model import GPT
from gptforge.train.checkpoint import load_checkpoint_weights
from gptforge.weights import load_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CFG = ModelConfig(n_layer=2, n_head=2, d_model=32, context_length=16, vocab_size=97)


def base_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG).eval()


@pytest.mark.parametrize("targets", ["c_attn", "c_attn,c_proj,c_fc", "mlp.c_proj"])
def test_zero_init_b_gives_the_base_logits_exactly(targets):
    base = base_model()
    adapted = copy.deepcopy(base)
    names = apply_lora(adapted, rank=4, alpha=8.0, dropout=0.0, targets=targets)
    assert names and all(isinstance(adapted.get_submodule(n), LoRALinear) for n in names)
    idx = torch.randint(0, 97, (3, 16))
    with torch.no_grad():
        assert torch.equal(adapted(idx)[0], base(idx)[0])
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


def test_zero_init_b_classifier_equals_base_classifier():
    torch.manual_seed(0)
    base = GPTClassifier(CFG, 3).eval()
    adapted = copy.deepcopy(base)
    apply_lora(adapted, rank=2, alpha=4.0, dropout=0.0, targets="c_attn,c_fc")
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert torch.equal(adapted(idx)[0], base(idx)[0])


def test_merged_weights_equal_the_adapted_model():
    adapted = base_model()
    apply_lora(adapted, rank=4, alpha=16.0, dropout=0.0, targets="c_attn,c_proj,c_fc")
    with torch.no_grad():  # a trained adapter: B no longer zero
        for module in adapted.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(std=0.05)
    merged = GPT(CFG).eval()
    merged.load_state_dict(merge_lora_weights(adapted.state_dict(), 16.0 / 4))
    idx = torch.randint(0, 97, (3, 16))
    with torch.no_grad():
        a, m, b = adapted(idx)[0], merged(idx)[0], base_model()(idx)[0]
    assert (a - b).abs().max() > 1e-2  # the adapter changes the function ...
    assert torch.allclose(a, m, atol=2e-5, rtol=0)  # ... and merging keeps it


def test_bad_targets_are_named():
    with pytest.raises(ConfigError, match="q_proj is not a target; choose from c_attn, c_proj"):
        apply_lora(base_model(), 4, 8.0, 0.0, "c_attn,q_proj")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("lora")
    hf = tiny_hf(tmp / "hf")
    train = write_jsonl(tmp / "train.jsonl", alpaca_rows(64, seed=1))
    val = write_jsonl(tmp / "val.jsonl", alpaca_rows(4, seed=2))
    cfg = write_ft_config(
        tmp / "cfg.yaml",
        f"hf:{hf}",
        tmp / "run",
        "train.max_steps=6",
        "optim.lr=3e-2",
        "finetune.lora_rank=4",
        "finetune.lora_alpha=8",
        "finetune.lora_targets=c_attn,c_fc",
        "finetune.response_max_tokens=3",
    )
    result = ok(run(finetune_cmd("instruct", cfg, train, val)))
    return {"tmp": tmp, "run": tmp / "run", "hf": hf, "log": result.stderr}


def test_lora_run_trains_only_the_adapters(lora_run):
    _, saved, _ = load_checkpoint_weights(lora_run["run"])
    start = from_hf(lora_run["hf"])[0].state_dict()
    lora_keys = [k for k in saved if k.endswith(("lora_A", "lora_B"))]
    assert len(lora_keys) == 2 * 2 * 2  # 2 blocks x (c_attn, c_fc) x (A, B)
    assert all(torch.equal(saved[k], start[k]) for k in saved if k not in lora_keys)  # base frozen
    assert all(saved[k].abs().max() > 0 for k in lora_keys if k.endswith("lora_B"))  # B moved off zero
    expected = 2 * (4 * 32 + 96 * 4 + 4 * 32 + 128 * 4)
    assert metric_lines(lora_run["run"])[0]["trainable_params"] == expected
    assert (
        f"trainable parameters: {expected:,} of" in lora_run["log"]
        and "LoRA rank 4, alpha 8 on 4 modules" in lora_run["log"]
    )


def test_lora_export_equals_the_adapted_model(lora_run):
    _, saved, _ = load_checkpoint_weights(lora_run["run"])
    adapted = from_hf(lora_run["hf"])[0]
    apply_lora(adapted, rank=4, alpha=8.0, dropout=0.0, targets="c_attn,c_fc")
    adapted.load_state_dict(saved)
    out = lora_run["tmp"] / "export"
    ok(run([sys.executable, EXPORT, "--checkpoint", str(lora_run["run"]), "--output", str(out)]))
    exported = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    merged, _, _ = load_model(lora_run["run"])  # what generate.py and eval.py load
    idx = torch.randint(0, 50257, (2, 64))
    with torch.no_grad():
        reference = adapted.eval()(idx)[0]
        assert (reference - from_hf(lora_run["hf"])[0].eval()(idx)[0]).abs().max() > 1e-4
        assert torch.allclose(exported(idx).logits, reference, atol=1e-5, rtol=0)
        assert torch.allclose(merged(idx)[0], reference, atol=1e-5, rtol=0)


def test_lora_classifier_run_trains_the_new_head(tmp_path):
    hf = tiny_hf(tmp_path / "hf")
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(64, seed=1))
    val = write_jsonl(tmp_path / "val.jsonl", sentiment_rows(16, seed=2))
    cfg = write_ft_config(
        tmp_path / "cfg.yaml", f"hf:{hf}", tmp_path / "run", "train.max_steps=2", "finetune.lora_rank=2"
    )
    ok(run(finetune_cmd("classify", cfg, train, val)))
    meta = json.loads(next((tmp_path / "run" / "checkpoints").glob("step_*/checkpoint.json")).read_text())
    assert meta["finetune"]["lora"] == {"rank": 2, "alpha": 16.0, "targets": "c_attn"}
    expected = 2 * (2 * 32 + 96 * 2) + 2 * 32 + 2  # c_attn adapters + the head
    assert metric_lines(tmp_path / "run")[0]["trainable_params"] == expected
