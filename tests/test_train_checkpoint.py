"""Checkpoint pieces: RNG states, finding and resolving checkpoints, pruning, resume checks, the fragment
format (regions of any tp shard read from the byte ranges that hold them), and the hardening of issue 13
(paths from metadata stay inside the run, a re-saved step is never lost, one job per run directory)."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gptforge import checkpoint_format as fmt
from gptforge.config import ModelConfig
from gptforge.errors import CheckpointError
from gptforge.train import checkpoint as ck

MODEL = ModelConfig(n_layer=2, n_head=2, d_model=16, context_length=8, vocab_size=50)
LAYOUT = {"world_size": 2, "dp": 2, "tp": 1, "pp": 1, "zero_stage": 1, "precision_mode": "fp32"}


def _fake(root: Path, step: int, version: int = fmt.FORMAT_VERSION) -> Path:
    d = root / f"step_{step}"
    d.mkdir(parents=True)
    meta = {
        "format": fmt.FORMAT,
        "version": version,
        "step": step,
        "consumed_samples": 8 * step,
        **ck.checkpoint_meta(MODEL, {"name": "gpt2"}, "data/x", "abc" * 20, LAYOUT, {}),
    }
    (d / fmt.META_FILE).write_text(json.dumps(meta))
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


@pytest.mark.parametrize("name", ["../../elsewhere/step_1", "/etc/step_1", "..", "step_1/../../x", "other"])
def test_latest_must_name_a_checkpoint_inside_the_run(tmp_path, name):
    root = tmp_path / "run" / ck.CHECKPOINTS
    _fake(root, 1)
    _fake(tmp_path / "elsewhere", 1)
    (root / ck.LATEST).write_text(name + "\n")
    with pytest.raises(CheckpointError, match="plain name inside|not a step_<N> checkpoint name"):
        ck.latest_in(root)


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


def test_saving_a_step_again_never_loses_the_only_checkpoint(tmp_path):
    """The same step saved again (a run resumed, then preempted before its next step): the old directory
    is moved aside, not deleted, until the new one is in place and `latest` is durable; a crash between
    the two renames resumes from the moved one."""
    root = tmp_path / ck.CHECKPOINTS
    _fake(root, 5)
    (root / ck.LATEST).write_text("step_5\n")
    new = root / "step_5.tmp"
    new.mkdir()
    (new / fmt.META_FILE).write_text((root / "step_5" / fmt.META_FILE).read_text())
    (new / "marker").write_text("new")
    (root / "step_5").rename(root / "step_5.old")  # where a crash inside `_commit` can leave it
    assert ck.latest_in(root) == root / "step_5.old"
    ck.remove_incomplete(root)  # the moved checkpoint is not a leftover while step_5 is missing
    assert (root / "step_5.old" / fmt.META_FILE).is_file() and not new.exists()
    new.mkdir()
    (new / fmt.META_FILE).write_text((root / "step_5.old" / fmt.META_FILE).read_text())
    (new / "marker").write_text("new")
    (root / "step_5.old").rename(root / "step_5")
    assert ck._commit(root, new, "step_5", keep_last=3) == root / "step_5"
    assert (root / "step_5" / "marker").read_text() == "new"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_5"]


def test_resume_checks(tmp_path):
    meta = fmt.read_meta(_fake(tmp_path, 5))
    assert ck.check_resume(meta, tmp_path, MODEL, "abc" * 20, LAYOUT, allow_new_data=False) == []
    other = ModelConfig(n_layer=3, n_head=2, d_model=16, context_length=8, vocab_size=50)
    with pytest.raises(CheckpointError, match=r"another model shape \(model.n_layer: checkpoint 2, now 3\)"):
        ck.check_resume(meta, tmp_path, other, "abc" * 20, LAYOUT, False)
    with pytest.raises(CheckpointError, match="other data"):
        ck.check_resume(meta, tmp_path, MODEL, "def" * 20, LAYOUT, False)
    ck.check_resume(meta, tmp_path, MODEL, "def" * 20, LAYOUT, True)
    # any layout loads: the change is returned (and logged by the trainer)
    assert ck.check_resume(
        meta, tmp_path, MODEL, "abc" * 20, {**LAYOUT, "dp": 4, "world_size": 4}, False
    ) == ["dp 2 -> 4 with ZeRO"]
    assert ck.check_resume(
        meta, tmp_path, MODEL, "abc" * 20, {**LAYOUT, "precision_mode": "autocast"}, False
    ) == ["precision_mode fp32 -> autocast"]
    old = fmt.read_meta(_fake(tmp_path / "old", 5, version=1))
    with pytest.raises(CheckpointError, match="format-1 checkpoint"):
        ck.check_resume(old, tmp_path, MODEL, "abc" * 20, LAYOUT, False)


def test_read_meta_errors(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        fmt.read_meta(tmp_path)
    (tmp_path / fmt.META_FILE).write_text("{nope")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        fmt.read_meta(tmp_path)
    meta = json.loads((_fake(tmp_path / "run", 3) / fmt.META_FILE).read_text())
    for key in ("model", "tokenizer"):  # an outside review found generate.py's KeyError here
        broken = _fake(tmp_path / f"no_{key}", 3)
        (broken / fmt.META_FILE).write_text(json.dumps({k: v for k, v in meta.items() if k != key}))
        with pytest.raises(CheckpointError, match=f"no '{key}' object; the file is damaged"):
            fmt.read_meta(broken)


def test_load_checkpoint_weights_errors(tmp_path):
    d = _fake(tmp_path / "new" / ck.CHECKPOINTS, 1)
    with pytest.raises(CheckpointError, match="index.json missing"):
        ck.load_checkpoint_weights(d)
    (d / fmt.INDEX_FILE).write_text(
        json.dumps(
            {
                "tensors": {
                    "model/x": {
                        "shape": [2],
                        "fragments": [
                            {"file": "../../../etc/passwd", "offset": 0, "shard": [0, 1], "flat": [0, 2]}
                        ],
                    }
                }
            }
        )
    )
    with pytest.raises(CheckpointError, match="plain name inside"):
        ck.load_checkpoint_weights(d)
    legacy = _fake(tmp_path / "old" / ck.CHECKPOINTS, 1, version=1)  # format 1: DeepSpeed's files
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt missing"):
        ck.load_checkpoint_weights(legacy)
    (legacy / "mp_rank_00_model_states.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot load"):
        ck.load_checkpoint_weights(legacy)


# ---------------------------------------------------------------------------------------------- fragments

SHARDED = ModelConfig(n_layer=1, n_head=4, d_model=16, context_length=8, vocab_size=50, bias=True)


def _stored_as_tp2_with_zero_dp2(step_dir: Path, full: dict[str, torch.Tensor]) -> None:
    """A checkpoint as 4 ranks of tp 2 x ZeRO dp 2 write it: each tp shard's flat range split in two."""
    from gptforge.model.tensor_parallel import qkv_sizes, shard_tensor, tp_rule

    step_dir.mkdir(parents=True)
    meta = {
        "format": fmt.FORMAT,
        "version": fmt.FORMAT_VERSION,
        "step": 1,
        "consumed_samples": 8,
        **ck.checkpoint_meta(SHARDED, {"name": "gpt2"}, "d", "x", LAYOUT, {}),
    }
    (step_dir / fmt.META_FILE).write_text(json.dumps(meta))
    per_rank: dict[int, dict[str, torch.Tensor]] = {r: {} for r in range(4)}
    where: dict[str, list] = {}
    for name, t in full.items():
        tp = 2 if tp_rule(name) is not None else 1
        for tp_rank in range(tp):
            shard = shard_tensor(name, t, tp_rank, tp, qkv=qkv_sizes(SHARDED)).reshape(-1)
            cut = shard.numel() // 2
            for dp_rank, (a, b) in enumerate([(0, cut), (cut, shard.numel())]):
                rank = 2 * dp_rank + tp_rank
                per_rank[rank][f"{name}@{tp_rank}.{a}"] = shard[a:b].clone()
                where.setdefault(name, []).append((rank, f"{name}@{tp_rank}.{a}", tp_rank, tp, a, b))
    offsets = {r: fmt.write_fragments(step_dir / fmt.rank_file(r), ts) for r, ts in per_rank.items()}
    index = {
        "tensors": {
            fmt.WEIGHTS + name: {
                "shape": list(full[name].shape),
                "fragments": [
                    {"file": fmt.rank_file(r), "offset": offsets[r][key], "shard": [tr, tp], "flat": [a, b]}
                    for r, key, tr, tp, a, b in frags
                ],
            }
            for name, frags in where.items()
        }
    }
    (step_dir / fmt.INDEX_FILE).write_text(json.dumps(index))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_any_region_of_any_shard_reads_only_its_bytes(tmp_path, tp):
    """Stored by tp 2 x ZeRO dp 2, read as tp 1, 2 or 4 shards and flat ranges inside them: the values
    are `shard_tensor` of the full tensor, and the bytes read are exactly the region's (vocabulary padding
    is not stored: it reads as zeros)."""
    from gptforge.model import GPT
    from gptforge.model.tensor_parallel import qkv_sizes, shard_tensor

    torch.manual_seed(0)
    full = {n: p.detach().clone() for n, p in GPT(SHARDED).named_parameters()}
    _stored_as_tp2_with_zero_dp2(tmp_path / "step_1", full)
    with fmt.Checkpoint(tmp_path / "step_1") as ckpt:
        for name, t in full.items():
            for rank in range(tp):
                want = shard_tensor(name, t, rank, tp, qkv=qkv_sizes(SHARDED)).reshape(-1)
                lo, hi = want.numel() // 5, want.numel() - want.numel() // 7
                before = ckpt.bytes_read
                got = ckpt.read(fmt.WEIGHTS + name, rank, tp, lo, hi)
                assert torch.equal(got, want[lo:hi]), (name, rank, tp)
                padding = int((want[lo:hi] == 0).sum()) if "wte" in name and tp == 4 else 0
                assert ckpt.bytes_read - before <= 4 * (hi - lo) and ckpt.bytes_read - before >= 4 * (
                    hi - lo - padding
                )
            assert torch.equal(ckpt.tensor(fmt.WEIGHTS + name), t)  # consolidated: shards merged


def test_a_truncated_fragment_file_is_one_clear_error(tmp_path):
    from gptforge.model import GPT

    full = {n: p.detach().clone() for n, p in GPT(SHARDED).named_parameters()}
    _stored_as_tp2_with_zero_dp2(tmp_path / "step_1", full)
    path = tmp_path / "step_1" / fmt.rank_file(3)
    path.write_bytes(path.read_bytes()[:200])
    with fmt.Checkpoint(tmp_path / "step_1") as ckpt, pytest.raises(CheckpointError, match="truncated"):
        for name in ckpt.names():
            ckpt.tensor(fmt.WEIGHTS + name)


def test_fragment_files_are_safetensors(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a": torch.arange(5, dtype=torch.float32), "b": torch.ones(0), "c": torch.randn(3)}
    offsets = fmt.write_fragments(tmp_path / "f.safetensors", tensors)
    loaded = load_file(str(tmp_path / "f.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    raw = (tmp_path / "f.safetensors").read_bytes()
    assert np.frombuffer(raw[offsets["c"] : offsets["c"] + 12], np.float32).tolist() == tensors["c"].tolist()


# ---------------------------------------------------------------------------------------------- one job


def test_a_second_job_on_one_run_directory_is_refused(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    lock = ck.RunLock(run)
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        (run / ck.LOCK_FILE).write_text(
            json.dumps({"host": socket.gethostname(), "pid": other.pid, "job": None})
        )
        with pytest.raises(CheckpointError, match=rf"in use by another job \(pid {other.pid} on"):
            lock.acquire()
    finally:
        other.communicate(b"")
    with caplog.at_level(logging.WARNING):
        lock.acquire()  # that process has ended: a stale lock, taken over with a warning
    assert "taking over the stale lock" in caplog.text
    assert json.loads((run / ck.LOCK_FILE).read_text())["pid"] == lock.mine["pid"]
    lock.release()
    assert not (run / ck.LOCK_FILE).exists()
    (run / ck.LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "job": None}))
    with pytest.raises(CheckpointError, match="in use by another job"):
        lock.acquire()  # another host: cannot tell, refused


def test_the_same_slurm_job_requeued_takes_its_lock_over(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    run = tmp_path / "run"
    run.mkdir()
    (run / ck.LOCK_FILE).write_text(json.dumps({"host": "node-a", "pid": 1, "job": "4242"}))
    ck.RunLock(run).acquire()
    assert json.loads((run / ck.LOCK_FILE).read_text())["job"] == "4242"


def test_checkpoint_meta_records_the_model():
    meta = ck.checkpoint_meta(MODEL, {"name": "gpt2"}, "d", "x", LAYOUT, {})
    assert meta["model"] == dataclasses.asdict(MODEL) and meta["layout"] == LAYOUT


def test_generate_on_a_checkpoint_without_model_is_one_error_line(tmp_path):
    step = _fake(tmp_path / "run" / ck.CHECKPOINTS, 2)
    meta = json.loads((step / fmt.META_FILE).read_text())
    del meta["model"]
    (step / fmt.META_FILE).write_text(json.dumps(meta))
    generate = Path(__file__).resolve().parents[1] / "launch" / "generate.py"
    result = subprocess.run(
        [sys.executable, str(generate), "--checkpoint", str(step), "--prompt", "hi"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "no 'model' object" in lines[0]
