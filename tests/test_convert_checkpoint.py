"""launch/convert_checkpoint.py (issue 7): checkpoints of any layout (tp x pp, ZeRO-3, pipeline) to one
consolidated safetensors model and to Hugging Face GPT-2, on CPU, in a process that never starts
DeepSpeed; generation reads those checkpoints directly too. Uses the runs of tests/parallel_helpers.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from parallel_helpers import STEPS, Runs, check_weights, shared_runs, weights
from train_helpers import ROOT, run

from gptforge.weights import load_model

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

CONVERT = str(ROOT / "launch" / "convert_checkpoint.py")
GENERATE = str(ROOT / "launch" / "generate.py")


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> Runs:
    return shared_runs(tmp_path_factory)


def convert(*args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, CONVERT, *args], timeout=120)


@pytest.mark.parametrize("layout", ["tp2xpp2", "zero3", "pp2"])
def test_any_layout_to_one_consolidated_model(runs, layout, tmp_path):
    out = tmp_path / "model"
    result = convert("--checkpoint", str(runs.dir(layout)), "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert f"step {STEPS} of a" in result.stderr and "vocabulary 400" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["gptforge.json", "model.safetensors"]
    model, cfg, tok = load_model(out)
    assert cfg.vocab_size == 400 and model.transformer.wte.weight.shape == (400, 32)  # tp padding dropped
    assert tok.vocab_size == 400
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights(runs.dir(layout)).items())
    check_weights(state, weights(runs.dir("serial")))  # = what one process trained


def test_to_hugging_face_gives_the_same_logits(runs, tmp_path):
    from transformers import GPT2LMHeadModel

    out = tmp_path / "hf"
    result = convert(
        "--checkpoint",
        str(runs.dir("tp2xpp2") / "checkpoints" / f"step_{STEPS}"),
        "--to",
        "hf",
        "--output",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    ours, _, _ = load_model(runs.dir("tp2xpp2"))
    theirs = GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.randint(0, 400, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, _ = ours(idx)
        got = theirs(idx).logits
    assert got.shape == (2, 32, 400)
    assert torch.allclose(got, expected, rtol=0, atol=1e-5)


def test_generate_reads_a_tensor_and_pipeline_parallel_checkpoint(runs, tmp_path):
    out = tmp_path / "model"
    assert convert("--checkpoint", str(runs.dir("tp2xpp2")), "--output", str(out)).returncode == 0

    def greedy(source: str) -> list[int]:
        cmd = [
            sys.executable,
            GENERATE,
            "--checkpoint",
            source,
            "--prompt",
            "ROMEO:",
            "--temperature",
            "0",
            "--max-new-tokens",
            "12",
            "--json",
        ]
        result = run(cmd, timeout=120)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["completion_tokens"]

    tokens = greedy(str(runs.dir("tp2xpp2")))
    assert len(tokens) == 12 and tokens == greedy(str(out))


def test_refusals(runs, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "x").write_text("x")
    result = convert("--checkpoint", str(runs.dir("tp2")), "--output", str(out))
    assert result.returncode == 2 and "exists and is not empty" in result.stderr
    # a checkpoint missing one rank's fragments: said so, nothing written
    bare = tmp_path / "bare"
    shutil.copytree(runs.dir("tp2") / "checkpoints" / f"step_{STEPS}", bare)
    (bare / "rank_00001.safetensors").unlink()
    result = convert("--checkpoint", str(bare), "--output", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "rank_00001.safetensors: No such file or directory (an incomplete checkpoint?)" in result.stderr
    assert not (tmp_path / "o").exists()
