"""A Llama-style tiny model (rope + rmsnorm + swiglu, 4 query heads sharing 2 key/value heads, no biases,
untied head) trains like one process in every layout (issue 16): dp2, ZeRO-3, tp2 (each rank holds 2 query
heads and their 1 KV head, half of SwiGLU's gate and input), pp2 and tp2 x pp2 give the same losses, gradient
norms and final weights within 1e-5; each layout resumes its own checkpoint exactly; and checkpoints resume
under another layout. Real processes through tests/parallel_helpers.py (its own session of runs)."""

from __future__ import annotations

import pytest
from parallel_helpers import (
    COMMON,
    SAVED,
    STEPS,
    Runs,
    build_runs,
    check_weights,
    rel,
    train_lines,
    val_lines,
    weight_errors,
    weights,
)
from train_helpers import TINY_LLAMA

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

TOL = 1e-5
LLAMA = [*COMMON, *TINY_LLAMA, "model.tie_embeddings=false"]
LAYOUTS: dict[str, tuple[int, list[str]]] = {
    "dp2": (2, []),
    "zero3": (2, ["parallel.zero_stage=3"]),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2", "parallel.pp_partition=0-0,1-2"]),
    "tp2xpp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
}
CHANGES: list[tuple[str, str, int, list[str]]] = [
    ("tp2", "one", 1, []),
    ("zero3", "tp2", 2, ["parallel.tp=2"]),
    ("pp2", "tp2xpp2", 4, ["parallel.tp=2", "parallel.pp=2"]),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return build_runs(tmp_path_factory.mktemp("llama_parallel"), LLAMA, LAYOUTS, {}, CHANGES)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_losses_grad_norms_and_weights_match_one_process(runs, layout):
    ref, got = train_lines(runs.dir("serial")), train_lines(runs.dir(layout))
    assert list(got) == list(ref) == list(range(1, STEPS + 1))
    for step in ref:
        assert rel(got[step]["loss"], ref[step]["loss"]) <= TOL, (step, got[step], ref[step])
        assert rel(got[step]["grad_norm"], ref[step]["grad_norm"]) <= TOL, (step, got[step], ref[step])
    assert all(ref[s]["grad_norm"] > 0.5 for s in ref)  # optim.grad_clip=0.5 clipped every step
    ref_val, got_val = val_lines(runs.dir("serial")), val_lines(runs.dir(layout))
    assert all(rel(got_val[s], ref_val[s]) <= TOL for s in ref_val)
    final = weights(runs.dir("serial"))
    assert any(name.endswith("mlp.c_gate.weight") for name in final) and "transformer.wpe.weight" not in final
    check_weights(weights(runs.dir(layout)), final, TOL)
    moved = weight_errors(final, weights(runs.dir("serial"), SAVED))
    assert min(moved.values()) > 100 * TOL  # training moved every weight: the comparison means something


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resume_in_the_same_layout_is_exact(runs, layout):
    full, resumed = train_lines(runs.dir(layout)), train_lines(runs.dir(f"{layout}.resumed"))
    assert list(resumed) == [4, 5]
    assert [resumed[s]["loss"] for s in resumed] == [full[s]["loss"] for s in resumed]
    assert [resumed[s]["grad_norm"] for s in resumed] == [full[s]["grad_norm"] for s in resumed]
    a, b = weights(runs.dir(layout)), weights(runs.dir(f"{layout}.resumed"))
    assert all(a[k].equal(b[k]) for k in a)


@pytest.mark.parametrize(
    ("source", "target", "nproc", "overrides"), CHANGES, ids=[f"{s}-to-{t}" for s, t, _, _ in CHANGES]
)
def test_resume_under_another_layout(runs, source, target, nproc, overrides):
    original, changed = train_lines(runs.dir(source)), train_lines(runs.dir(f"{source}-to-{target}"))
    assert [s for s in changed if s > SAVED] == [4, 5]
    for step in (4, 5):
        assert rel(changed[step]["loss"], original[step]["loss"]) <= TOL, (
            step,
            changed[step],
            original[step],
        )
        assert rel(changed[step]["grad_norm"], original[step]["grad_norm"]) <= TOL
    check_weights(weights(runs.dir(f"{source}-to-{target}")), weights(runs.dir(source)), TOL)
