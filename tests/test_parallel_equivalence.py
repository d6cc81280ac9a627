"""Every layout trains like one process (issue 6): the same losses, gradient norms, val losses and final
weights (gathered from the layout's checkpoint) within 1e-5 relative, for dp2, ZeRO-1/2/3 (dp2), ZeRO-3
with optimizer offload and with parameter offload too, tp2, pp2 and tp2 x pp2 (4 processes), and tp/pp with
the ZeRO stages DeepSpeed allows them; and each layout resumes its own checkpoint
exactly. Real processes (launch/train.py and torchrun), gloo on CPU, fp32, dropout 0, same seed and data;
the runs are made once (tests/parallel_helpers.py)."""

from __future__ import annotations

import pytest
from parallel_helpers import (
    DROPOUT,
    LAYOUTS,
    SAVED,
    STEPS,
    Runs,
    check_weights,
    rel,
    shared_runs,
    train_lines,
    val_lines,
    weight_errors,
    weights,
)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

TOL = 1e-5


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> Runs:
    return shared_runs(tmp_path_factory)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_losses_and_grad_norms_match_one_process(runs, layout):
    ref, got = train_lines(runs.dir("serial")), train_lines(runs.dir(layout))
    assert list(got) == list(ref) == list(range(1, STEPS + 1))
    for step in ref:
        assert rel(got[step]["loss"], ref[step]["loss"]) <= TOL, (step, got[step], ref[step])
        assert rel(got[step]["grad_norm"], ref[step]["grad_norm"]) <= TOL, (step, got[step], ref[step])
        assert got[step]["tokens"] == ref[step]["tokens"] == step * 8 * 32
    assert all(ref[s]["grad_norm"] > 0.5 for s in ref)  # optim.grad_clip=0.5 clipped every step
    ref_val, got_val = val_lines(runs.dir("serial")), val_lines(runs.dir(layout))
    assert list(got_val) == list(ref_val) == [0, STEPS]
    assert all(rel(got_val[s], ref_val[s]) <= TOL for s in ref_val)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_final_weights_match_one_process(runs, layout):
    ref = weights(runs.dir("serial"))
    check_weights(weights(runs.dir(layout)), ref, TOL)
    start = weights(runs.dir("serial"), SAVED)
    moved = weight_errors(ref, start)  # the comparison means something: training moved every weight
    assert min(v for k, v in moved.items() if not k.endswith("[k]")) > 100 * TOL


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resume_in_the_same_layout_is_exact(runs, layout):
    """Saved at step 3, resumed from it (DeepSpeed's own sharded files) in the same layout: steps 4 and 5
    repeat the uninterrupted run bit for bit, and so do the final weights."""
    full, resumed = train_lines(runs.dir(layout)), train_lines(runs.dir(f"{layout}.resumed"))
    assert list(resumed) == [4, 5]
    assert [resumed[s]["loss"] for s in resumed] == [full[s]["loss"] for s in resumed]
    assert [resumed[s]["grad_norm"] for s in resumed] == [full[s]["grad_norm"] for s in resumed]
    a, b = weights(runs.dir(layout)), weights(runs.dir(f"{layout}.resumed"))
    assert all(a[k].equal(b[k]) for k in a)


def test_recomputed_blocks_draw_the_same_dropout_masks(runs):
    """tp2 with dropout 0.2: recomputing each block in backward (DeepSpeed's checkpointing, which
    restores the default and the tensor-parallel RNG states) gives the same losses bit for bit."""
    plain, ckpt = train_lines(runs.dir("tp2_dropout")), train_lines(runs.dir("tp2_dropout_ckpt"))
    assert [plain[s]["loss"] for s in plain] == [ckpt[s]["loss"] for s in ckpt]
    no_dropout = train_lines(runs.dir("tp2"))
    assert all(plain[s]["loss"] != no_dropout[s]["loss"] for s in plain)  # dropout was on
    assert set(DROPOUT) == {"tp2_dropout", "tp2_dropout_ckpt"}


def test_layout_and_stages_are_logged(runs):
    log = runs.logs[2] + runs.logs[4]
    assert "layout: 2 ranks = dp 1 x pp 2 x tp 1" in log
    assert "stage 0: layers 0-0 (+ embedding, position embedding), ranks 0" in log  # pp_partition=0-0,1-2
    assert "stage 1: layers 1-2 (+ ln_f, head), ranks 1" in log
    assert "layout: 4 ranks = dp 1 x pp 2 x tp 2" in log
    assert "stage 0: layers 0-1 (+ embedding, position embedding), ranks 0,1" in log  # uniform: 2 + 1
    assert "stage 1: layers 2-2 (+ ln_f, head), ranks 2,3" in log


def test_checkpoints_hold_each_ranks_fragments_and_one_index(runs):
    """Every rank writes one fragment file (nothing of DeepSpeed's own format, no consolidated copy), and
    the index covers every element of every tensor exactly once, whatever the layout."""
    from gptforge.checkpoint_format import Checkpoint

    def files(layout: str) -> set[str]:
        step = runs.dir(layout) / "checkpoints" / f"step_{STEPS}"
        return {str(p.relative_to(step)) for p in step.rglob("*") if p.is_file()}

    for layout, (nproc, _) in LAYOUTS.items():
        ranks = {f"rank_{r:05d}.safetensors" for r in range(nproc)} | {
            f"rng_rank{r}.pt" for r in range(nproc)
        }
        assert files(layout) == ranks | {"checkpoint.json", "index.json"}, layout
        with Checkpoint(runs.dir(layout) / "checkpoints" / f"step_{STEPS}") as ckpt:
            for name, entry in ckpt.tensors.items():
                by_shard: dict[tuple[int, int], int] = {}
                for f in entry.fragments:
                    by_shard[(f.tp_rank, f.tp)] = by_shard.get((f.tp_rank, f.tp), 0) + f.stop - f.start
                tp = {t for _, t in by_shard}
                assert len(tp) == 1 and len(by_shard) == next(iter(tp)), (layout, name, by_shard)
                if tp == {1}:  # written once: ZeRO ranges or one replica, never twice
                    assert by_shard[(0, 1)] == entry.numel, (layout, name)
