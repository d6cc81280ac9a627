"""Resuming under another layout (issues 7 and 13): a checkpoint saved at step 3 by tp2, pp2, ZeRO-3 dp2,
tp2 x pp2, ZeRO-3 dp4 and dp2 resumes in 1 process, dp2, ZeRO-1 in 1 process, dp4, tp2 x pp2 and ZeRO-2
dp4; the change is detected from checkpoint.json's layout and every rank reads its part of the fragments
(and no more than 1.25x its part). Steps 4 and 5 equal what the original layout computed (so weights,
Adam moments and step count, and the data position all carried over), on the runs of
tests/parallel_helpers.py."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from parallel_helpers import (
    CHANGES,
    LAYOUTS,
    SAVED,
    STEPS,
    Runs,
    check_weights,
    rel,
    shared_runs,
    train_lines,
    weights,
)

from gptforge.config import ModelConfig
from gptforge.data.format import read_manifest
from gptforge.data.loader import WindowDataset
from gptforge.data.order import RankBatches
from gptforge.errors import CheckpointError
from gptforge.train import checkpoint as ck

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

TOL = 1e-5
IDS = [f"{source}-to-{target}" for source, target, _, _ in CHANGES]


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> Runs:
    return shared_runs(tmp_path_factory)


@pytest.mark.parametrize(("source", "target", "nproc", "overrides"), CHANGES, ids=IDS)
def test_resumed_steps_equal_the_original_layout(runs, source, target, nproc, overrides):
    original = train_lines(runs.dir(source))
    changed = train_lines(runs.dir(f"{source}-to-{target}"))
    assert [s for s in changed if s > SAVED] == [4, 5]
    for step in (4, 5):  # step 4: the weights; step 5: also the AdamW state the update at step 4 used
        assert rel(changed[step]["loss"], original[step]["loss"]) <= TOL, (
            step,
            changed[step],
            original[step],
        )
        assert rel(changed[step]["grad_norm"], original[step]["grad_norm"]) <= TOL
        assert changed[step]["tokens"] == original[step]["tokens"] == step * 8 * 32  # same data position
    check_weights(weights(runs.dir(f"{source}-to-{target}")), weights(runs.dir(source)), TOL)


@pytest.mark.parametrize(("source", "target", "nproc", "overrides"), CHANGES, ids=IDS)
def test_the_change_is_detected_and_recorded(runs, source, target, nproc, overrides):
    run_dir = runs.dir(f"{source}-to-{target}")
    meta = ck.read_meta(run_dir / "checkpoints" / f"step_{STEPS}")
    saved = ck.read_meta(runs.dir(source) / "checkpoints" / f"step_{SAVED}")["layout"]
    assert meta["layout"]["world_size"] == nproc and meta["consumed_samples"] == STEPS * 8
    changes = ck.layout_changes(saved, meta["layout"])
    assert changes
    assert (
        f"(step {SAVED}, {SAVED * 8} samples consumed) under another layout ({'; '.join(changes)})"
        in runs.logs[nproc]
    )


def test_adam_state_is_carried_over(runs):
    """Without the moments, the update at step 4 would be Adam's first (about lr per weight, sign-like):
    the resumed weights after step 5 would be far from the uninterrupted run's. With them they agree to
    1e-5; here also compared with AdamW's state in the fragments directly."""
    from gptforge.checkpoint_format import MOMENTS, Checkpoint

    for layout in ("tp2xpp2", "zero3_dp4"):
        with (
            Checkpoint(runs.dir(layout) / "checkpoints" / f"step_{SAVED}") as got,
            Checkpoint(runs.dir("serial") / "checkpoints" / f"step_{SAVED}") as ref,
        ):
            assert got.adam_step == ref.adam_step == SAVED
            names = [f"{k}/{n}" for k in MOMENTS for n in ref.names(f"{k}/")]
            assert names and sorted(names) == sorted(f"{k}/{n}" for k in MOMENTS for n in got.names(f"{k}/"))
            for name in names:  # tp shards merged, stages and ZeRO partitions joined: one process's AdamW
                a, b = got.tensor(name), ref.tensor(name)
                err = float((a - b).norm() / b.norm())
                assert err <= TOL, (layout, name, err)


def test_each_rank_reads_only_its_part(runs):
    """Every resume (same layout or not) logs the rank that read the most fragment bytes for the bytes of
    state it holds: at most 1.25x (tp changes read runs of rows, ZeRO ranks their flat ranges)."""
    logs = "".join(runs.logs.values())
    pattern = r"checkpoint: \d+ bytes of fragments read by \d+ rank\(s\); the most for its state: rank \d+, (\d+) of (\d+)"
    found = [(int(a), int(b)) for a, b in re.findall(pattern, logs)]
    assert len(found) == len(CHANGES) + len(LAYOUTS), found
    assert all(0 < read <= 1.25 * part for read, part in found), found


def test_data_position_is_kept_across_dp_sizes(runs):
    """At the same global batch, the windows of a step are the same set whatever the dp size and micro
    batch: step 4 of the 1-process run (micro 4 x 2 accumulation) is step 4 of dp4 (micro 2 x 1)."""
    data = WindowDataset(read_manifest(runs.data), "train", 32, seed=1337)  # train.seed
    one = np.concatenate([x.numpy() for x, _ in RankBatches(data, 4, 2, 0, 1).step(SAVED * 8)])
    four = np.concatenate(
        [x.numpy() for r in range(4) for x, _ in RankBatches(data, 2, 1, r, 4).step(SAVED * 8)]
    )
    assert np.array_equal(one, four)
    before = np.concatenate([x.numpy() for x, _ in RankBatches(data, 4, 2, 0, 1).step((SAVED - 1) * 8)])
    assert not any((row == before).all(1).any() for row in one)  # no window of step 3 is seen again


def test_any_layout_change_is_accepted_and_old_checkpoints_are_refused(tmp_path):
    """Every checkpoint of the fragment format loads into any layout; a format-1 one (DeepSpeed's files)
    is refused with what to do instead."""
    layout = {"world_size": 2, "dp": 1, "tp": 2, "pp": 1, "zero_stage": 0, "precision_mode": "fp32"}
    model = ModelConfig(n_layer=2, n_head=2, d_model=32, context_length=32, vocab_size=400)
    meta = {
        "version": ck.FORMAT_VERSION,
        "model": dataclasses.asdict(model),
        "data": {"manifest_sha256": "x", "path": "d"},
        "layout": layout,
    }
    now = {**layout, "world_size": 1, "tp": 1}
    assert ck.check_resume(meta, tmp_path, model, "x", now, False) == ["tp 2 -> 1"]
    assert ck.check_resume(meta, tmp_path, model, "x", layout, False) == []
    with pytest.raises(CheckpointError, match="format-1 checkpoint .* launch/convert_checkpoint.py"):
        ck.check_resume({**meta, "version": 1}, tmp_path, model, "x", layout, False)
    assert ck.layout_changes({**layout, "zero_stage": 1, "dp": 2}, {**layout, "zero_stage": 1, "dp": 4}) == [
        "dp 2 -> 4 with ZeRO"
    ]
    assert ck.layout_changes({**layout, "dp": 2}, {**layout, "dp": 4}) == []  # ZeRO-0: DeepSpeed's files fit
