"""launch/convert_checkpoint.py offline (issue 13 req 6): a checkpoint consolidated into one model directory
holding about one tensor at a time (the converting process's peak RSS, measured, beside a process that only
opens the checkpoint), and re-sharded for another layout by a pool of processes, tensor for tensor equal."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import ROOT

from gptforge import checkpoint_format as fmt
from gptforge.config import ModelConfig
from gptforge.model import GPT

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

CONVERT = str(ROOT / "launch" / "convert_checkpoint.py")
BIG = ModelConfig(n_layer=12, n_head=8, d_model=512, context_length=64, vocab_size=8192)


def _checkpoint(step_dir: Path, cfg: ModelConfig, dp: int = 2) -> dict[str, torch.Tensor]:
    """A fragment-format checkpoint as `dp` ZeRO ranks write it (weights only, tp 1)."""
    torch.manual_seed(0)
    weights = {n: p.detach().clone() for n, p in GPT(cfg).named_parameters()}
    step_dir.mkdir(parents=True)
    meta = {
        "format": fmt.FORMAT,
        "version": fmt.FORMAT_VERSION,
        "step": 1,
        "consumed_samples": 8,
        "model": dataclasses.asdict(cfg),
        "tokenizer": {"name": "gpt2", "vocab_size": 50257, "eot_id": 50256},
        "layout": {"world_size": dp, "dp": dp, "tp": 1, "pp": 1, "zero_stage": 1, "precision_mode": "fp32"},
    }
    (step_dir / fmt.META_FILE).write_text(json.dumps(meta))
    index: dict = {"aliases": {"lm_head.weight": "transformer.wte.weight"}, "tensors": {}}
    for rank in range(dp):
        frags = {}
        for name, t in weights.items():
            part = -(-t.numel() // dp)
            a, b = min(rank * part, t.numel()), min((rank + 1) * part, t.numel())
            frags[f"{name}@0.{a}"] = (name, a, b, t.reshape(-1)[a:b].clone())
        offsets = fmt.write_fragments(step_dir / fmt.rank_file(rank), {k: v[3] for k, v in frags.items()})
        for key, (name, a, b, _) in frags.items():
            entry = index["tensors"].setdefault(
                fmt.WEIGHTS + name, {"shape": list(weights[name].shape), "fragments": []}
            )
            entry["fragments"].append(
                {"file": fmt.rank_file(rank), "offset": offsets[key], "shard": [0, 1], "flat": [a, b]}
            )
    (step_dir / fmt.INDEX_FILE).write_text(json.dumps(index))
    return weights


def _peak_rss(code: str) -> int:
    """Peak RSS in bytes of a fresh Python process running `code`."""
    wrapper = f"import resource, runpy, sys\n{code}\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    result = subprocess.run(
        [sys.executable, "-c", wrapper], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return int(result.stdout.split()[-1])


def test_consolidation_holds_about_one_tensor(tmp_path):
    step = tmp_path / "run" / "checkpoints" / "step_1"
    weights = _checkpoint(step, BIG)
    largest = max(t.numel() * 4 for t in weights.values())
    total = sum(t.numel() * 4 for t in weights.values())
    assert total > 8 * largest
    out = tmp_path / "model"
    convert = _peak_rss(
        f"sys.argv = ['convert', '--checkpoint', {str(step)!r}, '--output', {str(out)!r}]\n"
        "try:\n    runpy.run_path(" + repr(CONVERT) + ", run_name='__main__')\nexcept SystemExit as e:\n"
        "    assert not e.code, e.code"
    )
    opened = _peak_rss(  # the same imports and the index, no tensor
        f"sys.path.insert(0, {str(ROOT / 'launch')!r})\nimport convert_checkpoint\n"
        "from gptforge.weights import load_model\nfrom gptforge import checkpoint_format as fmt\n"
        f"fmt.Checkpoint({str(step)!r}).close()"
    )
    assert convert - opened <= 3 * largest, (convert - opened, largest, total)
    from safetensors.torch import load_file

    saved = load_file(str(out / "model.safetensors"))
    assert json.loads((out / "gptforge.json").read_text())["model"] == dataclasses.asdict(BIG)
    assert saved.keys() == weights.keys() and all(torch.equal(saved[k], v) for k, v in weights.items())


def test_reshard_offline_to_another_layout(tmp_path):
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=32, context_length=16, vocab_size=300)
    step = tmp_path / "run" / "checkpoints" / "step_1"
    _checkpoint(step, cfg, dp=3)
    out = tmp_path / "tp2" / "checkpoints" / "step_1"
    cmd = [
        sys.executable,
        CONVERT,
        "--checkpoint",
        str(tmp_path / "run"),
        "--to",
        "checkpoint",
        "--tp",
        "2",
        "--dp",
        "2",
        "--workers",
        "2",
        "--output",
        str(out),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(4 ranks: dp 2 x tp 2)" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["checkpoint.json", "index.json", *(fmt.rank_file(r) for r in range(4))]
    )
    meta = fmt.read_meta(out)
    assert (meta["layout"]["tp"], meta["layout"]["dp"], meta["resharded_from"]["dp"]) == (2, 2, 3)
    with fmt.Checkpoint(step) as a, fmt.Checkpoint(out) as b:
        assert {f.tp for e in b.tensors.values() for f in e.fragments} == {1, 2}  # tp shards written as such
        for name in a.tensors:
            assert torch.equal(a.tensor(name), b.tensor(name)), name
        # a rank of the new layout reads its own part only
        name = fmt.WEIGHTS + "transformer.h.0.mlp.c_fc.weight"
        before = b.bytes_read
        b.read(name, 1, 2)
        assert b.bytes_read - before == 4 * a.tensors[name].numel // 2
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr
