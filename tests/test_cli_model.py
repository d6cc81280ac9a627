"""The model CLIs as a user runs them (real subprocesses): `python -m gptforge.model`, launch/generate.py,
launch/export.py, and one clear error line for each kind of bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, ROOT, subprocess_env

from gptforge.config import ModelConfig
from gptforge.generate import generate
from gptforge.model import GPT
from gptforge.tokenizer import get_tokenizer
from gptforge.weights import save_model_dir

transformers = pytest.importorskip("transformers")

CFG = ModelConfig(n_layer=2, n_head=2, d_model=32, context_length=64, vocab_size=50257, init_std=0.1)
PROMPT = "ROMEO: what light"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, *args], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model")
    save_model_dir(GPT(CFG), CFG, get_tokenizer("gpt2").describe(), out)
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("hf")
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(out)
    return out


def broken_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------ size report


def test_size_report_for_gpt2_124m():
    proc = run("-m", "gptforge.model", "--config", "configs/gpt2-124m.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "parameters: 124,439,808" in proc.stdout
    lines = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.startswith("  ")}
    assert lines["fp32"][1:3] == ["474.7", "MiB"]  # 124,439,808 * 4 bytes
    assert lines["bf16"][-2:] == ["1.85", "GiB"]  # 16 bytes per parameter


def test_size_report_without_vocab_size_notes_the_assumption():
    proc = run("-m", "gptforge.model", "--config", "configs/tiny.yaml", "model.n_layer=3")
    assert proc.returncode == 0, proc.stderr
    assert "assuming GPT-2's 50257" in proc.stdout and "n_layer=3" in proc.stdout


def test_size_report_config_typo():
    assert_one_line_error(
        run("-m", "gptforge.model", "--config", "configs/tiny.yaml", "model.d_modle=64"),
        "did you mean 'model.d_model'",
    )


# ------------------------------------------------------------------------------------------ generate / export


def test_generate_json_matches_the_api(model_dir):
    proc = run("launch/generate.py", "--checkpoint", str(model_dir), "--prompt", PROMPT,
               "--max-new-tokens", "12", "--temperature", "0", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    tok = get_tokenizer("gpt2")
    torch.manual_seed(0)
    expected = generate(GPT(CFG).eval(), [tok.encode(PROMPT)], 12, temperature=0, eot_id=tok.eot_id)[0]
    assert out == {
        "prompt_tokens": tok.encode(PROMPT),
        "completion_tokens": expected,
        "text": tok.decode(expected),
    }


def test_generate_from_hf_directory_samples_reproducibly(hf_dir):
    args = ("launch/generate.py", "--hf", str(hf_dir), "--prompt", PROMPT, "--max-new-tokens", "8",
            "--top-k", "50", "--top-p", "0.95", "--seed", "3")  # fmt: skip
    first, second = run(*args), run(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.startswith(PROMPT)


def test_export_loads_in_transformers_with_the_same_logits(model_dir, tmp_path):
    out = tmp_path / "export"
    proc = run("launch/export.py", "--checkpoint", str(model_dir), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    exported = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    torch.manual_seed(0)
    ours = GPT(CFG).eval()
    idx = torch.randint(0, 50257, (2, 64))
    assert (exported(idx).logits - ours(idx)[0]).abs().max().item() <= 1e-5
    assert transformers.AutoTokenizer.from_pretrained(out)(PROMPT)["input_ids"] == get_tokenizer(
        "gpt2"
    ).encode(PROMPT)
    assert_one_line_error(
        run("launch/export.py", "--checkpoint", str(model_dir), "--output", str(out)), "--overwrite"
    )


# ------------------------------------------------------------------------------------------ bad input


def test_missing_model_directory(tmp_path):
    assert_one_line_error(
        run("launch/generate.py", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"),
        "not found",
        "nope",
    )


def test_directory_that_is_no_model(tmp_path):
    assert_one_line_error(run("launch/export.py", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "o")),
                          str(tmp_path))  # fmt: skip


def test_corrupt_weights(model_dir, tmp_path):
    broken = broken_copy(model_dir, tmp_path / "m")
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)
    assert_one_line_error(run("launch/generate.py", "--checkpoint", str(broken), "--prompt", "x"),
                          "model.safetensors", "corrupt")  # fmt: skip


def test_missing_weights(model_dir, tmp_path):
    broken = broken_copy(model_dir, tmp_path / "m")
    (broken / "model.safetensors").unlink()
    assert_one_line_error(run("launch/export.py", "--checkpoint", str(broken), "--output", str(tmp_path / "o")),
                          "weights file not found")  # fmt: skip


def test_weights_of_another_shape(model_dir, tmp_path):
    broken = broken_copy(model_dir, tmp_path / "m")
    meta = json.loads((broken / "gptforge.json").read_text())
    meta["model"]["n_layer"] = 3
    (broken / "gptforge.json").write_text(json.dumps(meta))
    assert_one_line_error(run("launch/generate.py", "--checkpoint", str(broken), "--prompt", "x"),
                          "'transformer.h.2.ln_1.weight' is missing")  # fmt: skip
    meta["model"]["n_layer"], meta["model"]["d_model"] = 2, 64
    (broken / "gptforge.json").write_text(json.dumps(meta))
    assert_one_line_error(run("launch/generate.py", "--checkpoint", str(broken), "--prompt", "x"),
                          "'transformer.wte.weight' has shape (50257, 32)", "(50257, 64)")  # fmt: skip


def test_config_typo_in_model_directory(model_dir, tmp_path):
    broken = broken_copy(model_dir, tmp_path / "m")
    meta = json.loads((broken / "gptforge.json").read_text())
    meta["model"]["n_layers"] = meta["model"].pop("n_layer")
    (broken / "gptforge.json").write_text(json.dumps(meta))
    assert_one_line_error(run("launch/generate.py", "--checkpoint", str(broken), "--prompt", "x"),
                          "gptforge.json", "did you mean 'model.n_layer'")  # fmt: skip


def test_unknown_tokenizer(model_dir, tmp_path):
    broken = broken_copy(model_dir, tmp_path / "m")
    meta = json.loads((broken / "gptforge.json").read_text())
    meta["tokenizer"]["name"] = "bpe-32k"
    (broken / "gptforge.json").write_text(json.dumps(meta))
    assert_one_line_error(run("launch/generate.py", "--checkpoint", str(broken), "--prompt", "x"),
                          "unknown tokenizer 'bpe-32k'")  # fmt: skip


def test_empty_prompt(model_dir):
    assert_one_line_error(run("launch/generate.py", "--checkpoint", str(model_dir), "--prompt", ""),
                          "--prompt is empty", "<|endoftext|>")  # fmt: skip


def test_pickle_only_hf_directory(hf_dir, tmp_path):
    broken = broken_copy(hf_dir, tmp_path / "hf")
    (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    assert_one_line_error(run("launch/generate.py", "--hf", str(broken), "--prompt", "x"), "safetensors only")


def test_debug_shows_the_traceback(tmp_path):
    proc = run("launch/generate.py", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "CheckpointError" in proc.stderr
