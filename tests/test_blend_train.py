"""Training on a blend through launch/train.py: per-source metrics (metrics.jsonl and TensorBoard), the
start-up lines, exact resume, resume with other weights (a curriculum) and under another layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from train_helpers import losses, metrics, run, train_cmd, write_build, write_config

from gptforge.config import load_config
from gptforge.data.blend import BlendSchedule, PretrainData
from gptforge.train.checkpoint import read_meta

TOK = {"name": "synthetic", "vocab_size": 256, "eot_id": 255}
T = 32  # train_helpers.TINY's context
pytestmark = pytest.mark.slow  # every test here trains real processes (~20 s each)
COMMON = ["optim.decay_steps=8", "model.dropout=0.1", "train.save_interval=4", "train.eval_interval=4"]


@pytest.fixture(scope="module")
def blend(tmp_path_factory) -> dict[str, Path]:
    """Two builds of different size and dtype: web (large, uint16) and books (small, int32)."""
    root = tmp_path_factory.mktemp("blend")
    out = {}
    for name, seed, n, dtype in (("web", 0, 80, "uint16"), ("books", 1, 16, "int32")):
        rng = np.random.default_rng(seed)

        def docs(k: int, rng: np.random.Generator = rng) -> list[np.ndarray]:
            return [np.append(rng.integers(0, 255, rng.integers(20, 200)), 255) for _ in range(k)]

        out[name] = write_build(
            root / name, {"train": docs(n), "val": docs(4)}, TOK, dtype=dtype, shard_docs=6
        ).root
    return out


def _override(blend, weights: dict[str, float]) -> str:
    return "data.blend=" + ",".join(f"{blend[n]}:{w}" for n, w in weights.items())


def _ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _train(
    tmp: Path, name: str, blend, weights, steps: int, *extra: str, resume: str = "none", nproc: int = 1
):
    cfg = write_config(
        tmp / f"{name}.yaml", blend["web"], tmp / name, f"train.max_steps={steps}", *COMMON, *extra
    )
    return _ok(run(train_cmd(cfg, _override(blend, weights), resume=resume, nproc=nproc)))


@pytest.fixture(scope="module")
def runs(blend, tmp_path_factory):
    """`straight`: 8 steps at web 0.7 / books 0.3. `stopped`: the same stopped after 4 steps."""
    tmp = tmp_path_factory.mktemp("runs")
    out = {"tmp": tmp}
    out["straight"] = _train(
        tmp, "straight", blend, {"web": 0.7, "books": 0.3}, 8, "run.tensorboard=true"
    ).stderr
    out["stopped"] = _train(tmp, "stopped", blend, {"web": 0.7, "books": 0.3}, 4).stderr
    return out


def _expected_counts(weights: list[float], samples: int) -> list[int]:
    return BlendSchedule(weights).counts(samples)


def test_per_source_metrics_and_start_up_lines(runs, blend):
    tmp = runs["tmp"]
    train, evals = metrics(tmp / "straight")
    data = PretrainData(load_config(None, [_override(blend, {"web": 0.7, "books": 0.3})]).data)
    mix = data.train(T, seed=1337)
    for r in train:
        web, books = _expected_counts([0.7, 0.3], r["step"] * 8)
        assert r["tokens_by_source"] == {"web": web * T, "books": books * T}
        assert r["epochs_by_source"] == pytest.approx(
            {"web": web / len(mix.datasets[0]), "books": books / len(mix.datasets[1])}, rel=1e-12
        )
        assert sum(r["tokens_by_source"].values()) == r["tokens"]
    assert [e["step"] for e in evals] == [0, 4, 8]
    for e in evals:  # each source's fixed val windows; the blend's loss is their mean over all windows
        by = e["val_loss_by_source"]
        assert set(by) == {"web", "books"} and min(by.values()) <= e["val_loss"] <= max(by.values())

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(tmp / "straight" / "tensorboard"))
    tb.Reload()
    for tag, records, key in [
        ("train/tokens_by_source/books", train, ("tokens_by_source", "books")),
        ("train/epochs_by_source/web", train, ("epochs_by_source", "web")),
        ("val/val_loss_by_source/books", evals, ("val_loss_by_source", "books")),
    ]:
        events = tb.Scalars(tag)
        assert [e.value for e in events] == pytest.approx([r[key[0]][key[1]] for r in records], rel=1e-6)

    log = runs["straight"]
    assert f"data: blend of 2 sources (data.path {blend['web']} is not used); 8 steps = 64 samples" in log
    web_windows, books_windows = len(mix.datasets[0]), len(mix.datasets[1])
    assert f"weight 0.700, {mix.datasets[0].stream.tokens:,} train tokens = {web_windows:,} windows; " in log
    assert f"8 steps = {64 * 0.3 / books_windows:.2f} epochs" in log
    for name in ("web", "books"):  # every source's shards verified (sha256) once and remembered
        assert (blend[name] / ".gptforge-verified.json").is_file()
    meta = read_meta(tmp / "stopped" / "checkpoints" / "step_4")
    assert meta["data"]["blend"]["counts"] == _expected_counts([0.7, 0.3], 32)
    assert meta["data"]["manifest_sha256"] == data.sha256


def test_exact_resume_with_a_blend(runs, blend):
    tmp = runs["tmp"]
    shutil.copytree(tmp / "stopped", tmp / "resumed")
    _train(tmp, "resumed", blend, {"web": 0.7, "books": 0.3}, 8, resume="auto")
    la, lb = losses(tmp / "straight"), losses(tmp / "resumed")
    assert list(la) == list(range(1, 9)) and la == lb  # bitwise
    assert metrics(tmp / "straight")[1] == metrics(tmp / "resumed")[1]
    assert [r["tokens_by_source"] for r in metrics(tmp / "straight")[0]] == [
        r["tokens_by_source"] for r in metrics(tmp / "resumed")[0]
    ]


def test_weights_changed_on_resume_continue_from_the_per_source_positions(runs, blend):
    tmp = runs["tmp"]
    shutil.copytree(tmp / "stopped", tmp / "curriculum")
    result = _train(tmp, "curriculum", blend, {"web": 0.2, "books": 0.8}, 8, resume="auto")
    web4, books4 = _expected_counts([0.7, 0.3], 32)
    assert (
        f"data: blend changed at sample 32: web 0.700 -> 0.200, books 0.300 -> 0.800; every source continues "
        f"from its position (web {web4} samples, books {books4} samples)"
    ) in result.stderr
    train = metrics(tmp / "curriculum")[0]
    for r in train:
        if r["step"] <= 4:
            continue
        web, books = _expected_counts([0.2, 0.8], (r["step"] - 4) * 8)
        assert r["tokens_by_source"] == {"web": (web4 + web) * T, "books": (books4 + books) * T}
    meta = read_meta(tmp / "curriculum" / "checkpoints" / "step_8")["data"]["blend"]
    assert (meta["weights"], meta["segment_start"], meta["segment_base"]) == ([0.2, 0.8], 32, [web4, books4])
    # the new mixture's steps are not the old one's
    assert losses(tmp / "curriculum")[4] == losses(tmp / "straight")[4]
    assert losses(tmp / "curriculum")[8] != losses(tmp / "straight")[8]


def test_resume_under_another_layout_keeps_the_data_position(runs, blend):
    tmp = runs["tmp"]
    shutil.copytree(tmp / "stopped", tmp / "dp2")
    result = _train(
        tmp, "dp2", blend, {"web": 0.7, "books": 0.3}, 8, "train.micro_batch_size=2", resume="auto", nproc=2
    )
    assert "resumed from" in result.stderr
    straight, dp2 = metrics(tmp / "straight")[0], metrics(tmp / "dp2")[0]
    assert [r["step"] for r in dp2] == list(range(1, 9))
    assert [r["tokens_by_source"] for r in dp2] == [r["tokens_by_source"] for r in straight]
    assert (
        read_meta(tmp / "dp2" / "checkpoints" / "step_8")["data"]["blend"]
        == read_meta(tmp / "resumed" / "checkpoints" / "step_8")["data"]["blend"]
    )
