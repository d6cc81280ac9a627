"""Bad input to `launch/train.py`: one clear `error:` line, no traceback, exit code 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from train_helpers import run, sentencepiece_data, train_cmd, write_config


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return sentencepiece_data(tmp_path_factory.mktemp("sp"))


def _error(result, *fragments: str) -> str:
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _copy(data: Path, dest: Path) -> Path:
    return Path(shutil.copytree(data, dest, ignore=shutil.ignore_patterns(".gptforge-verified.json")))


def test_data_path_without_manifest(data, tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "empty", tmp_path / "run")
    _error(run(train_cmd(cfg)), "no manifest.json in", "data_pipeline/build.py")


def test_config_typo_in_file_and_override(data, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "run", "optim.warmup_stpes=3")
    _error(
        run(train_cmd(cfg)),
        str(tmp_path / "c.yaml"),
        "'optim.warmup_stpes'",
        "did you mean 'optim.warmup_steps'",
    )
    cfg = write_config(tmp_path / "d.yaml", data, tmp_path / "run")
    _error(run(train_cmd(cfg, "train.max_stepz=3")), "did you mean 'train.max_steps'")


@pytest.mark.slow
def test_world_size_that_does_not_divide_the_batch(data, tmp_path):
    cfg = write_config(
        tmp_path / "c.yaml", data, tmp_path / "run", "train.micro_batch_size=8", "train.global_batch_size=8"
    )
    result = run(train_cmd(cfg, nproc=2))
    # What the product promises: the job fails, and every rank that got to print (torchrun may stop one
    # before it does) said the same one line, without a traceback.
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    # (torchrun's own summary carries a traceback of torchrun; none may come from our ranks' code)
    assert errors and "src/gptforge/" not in result.stderr and 'train.py", line' not in result.stderr
    for line in errors:
        assert "error: train.global_batch_size=8 is not divisible" in line and "8 x 2 = 16" in line, line
        assert line.startswith(("[rank 0] ", "[rank 1] ")), line  # each line says which rank speaks
    assert len(errors) == len({line.split("]")[0] for line in errors})  # one line per rank at most


def test_resume_from_a_missing_path(data, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "run")
    _error(
        run(train_cmd(cfg, resume=str(tmp_path / "nope"))), "checkpoint not found:", str(tmp_path / "nope")
    )
    (tmp_path / "notackpt").mkdir()
    _error(run(train_cmd(cfg, resume=str(tmp_path / "notackpt"))), "is not a checkpoint")


def test_truncated_shard(data, tmp_path):
    bad = _copy(data, tmp_path / "data")
    shard = sorted(bad.glob("train*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    cfg = write_config(tmp_path / "c.yaml", bad, tmp_path / "run")
    _error(run(train_cmd(cfg)), str(shard), "truncated or corrupt", "rebuild")


def test_corrupted_shard(data, tmp_path):
    bad = _copy(data, tmp_path / "data")
    shard = sorted(bad.glob("val*.bin"))[0]
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0x01
    shard.write_bytes(bytes(raw))
    cfg = write_config(tmp_path / "c.yaml", bad, tmp_path / "run")
    _error(run(train_cmd(cfg)), str(shard), "is corrupt: sha256", "rebuild")


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("parallel.tp=2", "world size 1 is not divisible by parallel.tp x parallel.pp = 2 x 1 = 2"),
        ("train.precision=fp16", "fp16 needs a GPU"),
    ],
)
def test_unsupported_settings(data, tmp_path, override, fragment):
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "run", override)
    _error(run(train_cmd(cfg)), fragment)
