"""launch/convert_checkpoint.py offline (issue 13 req 6): a checkpoint consolidated into one model directory
or a Hugging Face one, holding about one tensor at a time (the converting process's peak RSS, measured, beside a process that only
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
    aliases = {"lm_head.weight": "transformer.wte.weight"} if cfg.tie_embeddings else {}
    index: dict = {"aliases": aliases, "tensors": {}}
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


def _convert(step: Path, out: Path, to: str) -> list[str]:
    return ["convert", "--checkpoint", str(step), "--output", str(out), "--to", to]


def _hf_reference(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What export writes for these weights: `hf_state_dict` of the model holding them."""
    from gptforge.hf import hf_state_dict

    model = GPT(cfg)
    model.load_state_dict(weights, strict=False)
    return hf_state_dict(model, cfg)


@pytest.mark.parametrize("to", ["gptforge", "hf"])
def test_consolidation_holds_about_one_tensor(tmp_path, to):
    step = tmp_path / "run" / "checkpoints" / "step_1"
    weights = _checkpoint(step, BIG)
    largest = max(t.numel() * 4 for t in weights.values())
    total = sum(t.numel() * 4 for t in weights.values())
    assert total > 8 * largest
    out = tmp_path / "model"
    convert = _peak_rss(
        f"sys.argv = {_convert(step, out, to)!r}\n"
        "try:\n    runpy.run_path(" + repr(CONVERT) + ", run_name='__main__')\nexcept SystemExit as e:\n"
        "    assert not e.code, e.code"
    )
    opened = _peak_rss(  # the same imports and the index, no tensor
        f"sys.path.insert(0, {str(ROOT / 'launch')!r})\nimport convert_checkpoint\n"
        "from gptforge.weights import load_model\nfrom gptforge import checkpoint_format as fmt\n"
        "from gptforge import hf\n"
        f"fmt.Checkpoint({str(step)!r}).close()"
    )
    assert convert - opened <= 3 * largest, (convert - opened, largest, total)
    from safetensors.torch import load_file

    saved = load_file(str(out / "model.safetensors"))
    assert json.loads((out / "gptforge.json").read_text())["model"] == dataclasses.asdict(BIG)
    expected = weights if to == "gptforge" else _hf_reference(BIG, weights)
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], v) for k, v in expected.items())
    if to == "hf":
        assert json.loads((out / "config.json").read_text())["n_layer"] == BIG.n_layer


def test_hf_streaming_of_a_llama_without_tied_head(tmp_path):
    """Llama (fused QKV split into q/k/v_proj, an untied head, no biases): the streamed directory holds
    what export writes, tensor for tensor."""
    cfg = ModelConfig(
        n_layer=2, n_head=4, n_kv_head=2, d_model=32, context_length=16, vocab_size=300,
        position_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False,
    )  # fmt: skip
    step = tmp_path / "run" / "checkpoints" / "step_1"
    weights = _checkpoint(step, cfg)
    out = tmp_path / "hf"
    result = subprocess.run(
        [sys.executable, CONVERT, *_convert(step, out, "hf")[1:]], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors.torch import load_file

    saved, expected = load_file(str(out / "model.safetensors")), _hf_reference(cfg, weights)
    assert "model.layers.1.self_attn.k_proj.weight" in saved and "lm_head.weight" in saved
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], v) for k, v in expected.items())


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


def test_reshard_offline_into_pipeline_stages(tmp_path):
    """--pp 2 --tp 2 (4 ranks, rank order pipe, data, model): each rank file holds only its stage's
    tensors (embedding and block 0 on stage 0 with ranges 0-0,1-2; blocks 1-2, ln_f on stage 1), the
    stage boundaries are recorded as the trainer records them, and every tensor reads back equal."""
    from gptforge.config import ParallelConfig
    from gptforge.parallel.parallelize import pp_parts

    cfg = ModelConfig(n_layer=3, n_head=4, d_model=32, context_length=16, vocab_size=300)
    step = tmp_path / "run" / "checkpoints" / "step_1"
    _checkpoint(step, cfg, dp=2)
    out = tmp_path / "pp2" / "checkpoints" / "step_1"
    cmd = [sys.executable, CONVERT, "--checkpoint", str(step), "--to", "checkpoint", "--tp", "2", "--pp", "2"]
    cmd += ["--pp-partition", "0-0,1-2", "--workers", "2", "--output", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(4 ranks: dp 1 x tp 2 x pp 2)" in result.stderr
    layout = fmt.read_meta(out)["layout"]
    assert (layout["pp"], layout["tp"], layout["dp"], layout["world_size"]) == (2, 2, 1, 4)
    assert layout["pp_parts"] == pp_parts(cfg, ParallelConfig(pp=2, pp_partition="0-0,1-2"))
    with fmt.Checkpoint(step) as a, fmt.Checkpoint(out) as b:
        files = {name: {f.file for f in e.fragments} for name, e in b.tensors.items()}
        stage0 = {fmt.rank_file(0), fmt.rank_file(1)}
        for name, used in files.items():
            first = name.endswith(("wte.weight", "wpe.weight")) or ".h.0." in name
            assert used <= stage0 if first else not used & stage0, (name, used)
        for name in a.tensors:
            assert torch.equal(a.tensor(name), b.tensor(name)), name
    bad = subprocess.run([*cmd[:-1], str(tmp_path / "bad"), "--pp", "4"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "pp" in bad.stderr, bad.stderr
