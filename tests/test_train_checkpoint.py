"""Checkpoint pieces: RNG states, finding and resolving checkpoints, pruning, resume checks, safe loading."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from gptforge.config import ModelConfig
from gptforge.errors import CheckpointError
from gptforge.train import checkpoint as ck

MODEL = ModelConfig(n_layer=2, n_head=2, d_model=16, context_length=8, vocab_size=50)
LAYOUT = {"world_size": 2, "dp": 2, "tp": 1, "pp": 1, "zero_stage": 1, "precision_mode": "fp32"}


def _fake(root: Path, step: int) -> Path:
    d = root / f"step_{step}"
    d.mkdir(parents=True)
    meta = {
        "format": ck.FORMAT,
        "version": ck.FORMAT_VERSION,
        "step": step,
        "consumed_samples": 8 * step,
        **ck.checkpoint_meta(MODEL, {"name": "gpt2"}, "data/x", "abc" * 20, LAYOUT, {}),
    }
    (d / ck.META_FILE).write_text(json.dumps(meta))
    return d


def test_rng_states_round_trip_through_weights_only_load(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    torch.save(ck.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.normal(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ck.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.normal(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_resolve_run_checkpoints_and_step_directories(tmp_path):
    root = tmp_path / "run" / ck.CHECKPOINTS
    _fake(root, 2)
    four = _fake(root, 4)
    (root / ck.LATEST).write_text("step_4\n")
    assert ck.resolve(tmp_path / "run") == four
    assert ck.resolve(root) == four
    assert ck.resolve(root / "step_2") == root / "step_2"
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        ck.resolve(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        ck.resolve(tmp_path)
    (root / ck.LATEST).write_text("step_9\n")
    with pytest.raises(CheckpointError, match="names 'step_9'"):
        ck.resolve(root)


def test_find_resume(tmp_path):
    run = tmp_path / "run"
    assert ck.find_resume("auto", run) is None and ck.find_resume("none", run) is None
    root = run / ck.CHECKPOINTS
    _fake(root, 3)
    (root / "step_7.tmp").mkdir()  # an interrupted save is never resumed from
    assert ck.find_resume("auto", run) == root / "step_3"  # no `latest` yet (crash right after the rename)
    _fake(root, 5)
    (root / ck.LATEST).write_text("step_3")
    assert ck.find_resume("auto", run) == root / "step_3"  # `latest` decides when it exists
    with pytest.raises(CheckpointError, match="already has checkpoints"):
        ck.find_resume("none", run)


def test_prune_keeps_newest_and_latest_and_ignores_temporaries(tmp_path):
    root = tmp_path / ck.CHECKPOINTS
    for s in (1, 2, 10, 20):
        _fake(root, s)
    (root / "step_30.tmp").mkdir()
    (root / ck.LATEST).write_text("step_2")  # e.g. a run resumed from an older checkpoint
    ck.prune(root, 2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_10", "step_2", "step_20", "step_30.tmp"]
    ck.remove_incomplete(root)
    assert not (root / "step_30.tmp").exists()
    assert [p.name for p in ck.complete_checkpoints(root)] == ["step_2", "step_10", "step_20"]


def test_resume_checks(tmp_path):
    meta = ck.read_meta(_fake(tmp_path, 5))
    ck.check_resume(meta, tmp_path, MODEL, "abc" * 20, LAYOUT, allow_new_data=False)
    other = ModelConfig(n_layer=3, n_head=2, d_model=16, context_length=8, vocab_size=50)
    with pytest.raises(CheckpointError, match=r"another model shape \(model.n_layer: checkpoint 2, now 3\)"):
        ck.check_resume(meta, tmp_path, other, "abc" * 20, LAYOUT, False)
    with pytest.raises(CheckpointError, match="other data"):
        ck.check_resume(meta, tmp_path, MODEL, "def" * 20, LAYOUT, False)
    ck.check_resume(meta, tmp_path, MODEL, "def" * 20, LAYOUT, True)
    with pytest.raises(CheckpointError, match=r"has no universal/ files .*: resume on 2 data-parallel ranks"):
        ck.check_resume(meta, tmp_path, MODEL, "abc" * 20, {**LAYOUT, "dp": 4, "world_size": 4}, False)
    with pytest.raises(CheckpointError, match="precision_mode=fp32, this run has precision_mode=autocast"):
        ck.check_resume(meta, tmp_path, MODEL, "abc" * 20, {**LAYOUT, "precision_mode": "autocast"}, False)
    zero0 = {**LAYOUT, "zero_stage": 0}
    meta["layout"] = zero0
    ck.check_resume(
        meta, tmp_path, MODEL, "abc" * 20, {**zero0, "dp": 1, "world_size": 1}, False
    )  # ZeRO-0: fine


def test_read_meta_errors(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        ck.read_meta(tmp_path)
    (tmp_path / ck.META_FILE).write_text("{nope")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        ck.read_meta(tmp_path)


class _Evil:
    def __reduce__(self):
        return (exec, ("raise SystemExit('code ran')",))


def test_deepspeed_files_load_weights_only(tmp_path):
    """The engine DeepSpeed loads through refuses a pickle that would run code."""
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": _Evil()}, f, protocol=2)
    engine = ck.SafeCheckpointEngine(inner=object())
    with pytest.raises(CheckpointError, match="cannot load"):
        engine.load(str(path))
    torch.save({"module": {"w": torch.ones(2)}}, tmp_path / "ok.pt")
    assert torch.equal(engine.load(str(tmp_path / "ok.pt"))["module"]["w"], torch.ones(2))


def test_load_checkpoint_weights_errors(tmp_path):
    d = _fake(tmp_path / ck.CHECKPOINTS, 1)
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt missing"):
        ck.load_checkpoint_weights(d)
    (d / ck.MODEL_STATES).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot load"):
        ck.load_checkpoint_weights(d)
