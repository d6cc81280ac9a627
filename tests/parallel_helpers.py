"""The training runs the parallelism tests share: one serial reference and every layout, trained once per
session on the same tiny model and data, saved at step 3, then resumed from there in the same layout and
in others. Real processes throughout: launch/train.py for one process, and torchrun running
tests/workers/parallel_runs.py (several trainer runs in the same processes) for 2 and 4.

Run directory of each run: ROOT/<name>. Same-layout resumes are ROOT/<name>.resumed; resumes under
another layout are ROOT/<source>-to-<target>.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from train_helpers import ROOT, TRAIN, sentencepiece_data, write_config

STEPS, SAVED = 5, 3

# 3 blocks (so stages can be uneven), 2 heads (1 per tp rank), a 400-token vocabulary (padded to 512 at
# tp 2: padding on the second rank); dropout 0; clipping at 0.5, below every step's norm, so the global
# gradient norm must be right for the weights to match. Adam's eps at 1e-5, not 1e-8: Adam divides each
# gradient element by its own RMS, so an element whose gradient is near 0 moves by up to lr / eps times
# its rounding error, and tp's split sums round differently from one process's on some CPUs: at 1e-8 one
# such element put a 4096-weight matrix 3e-5 off (AVX2 kernels), at 1e-5 the worst tensor is 4e-7 off
# (AVX2) and 1.7e-6 (SSE4.2 kernels). A real layout bug moves whole tensors by far more than 1e-5.
COMMON = [
    "model.n_layer=3",
    "model.dropout=0.0",
    "optim.grad_clip=0.5",
    "optim.eps=1e-5",
    f"train.max_steps={STEPS}",
    f"train.save_interval={SAVED}",
    "train.eval_interval=5",
]

# name -> (processes, overrides): the layouts of issue 6, each against one process
LAYOUTS: dict[str, tuple[int, list[str]]] = {
    "dp2": (2, []),
    "zero1": (2, ["parallel.zero_stage=1"]),
    "zero2": (2, ["parallel.zero_stage=2"]),
    "zero3": (2, ["parallel.zero_stage=3"]),
    "zero3_offload": (2, ["parallel.zero_stage=3", "parallel.offload_optimizer=cpu"]),
    "zero3_offload_all": (
        2,
        ["parallel.zero_stage=3", "parallel.offload_optimizer=cpu", "parallel.offload_params=true"],
    ),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2", "parallel.pp_partition=0-0,1-2"]),
    "tp2xpp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
    # and the combinations with ZeRO that DeepSpeed supports (ZeRO-2/3 with pp > 1 are refused up front)
    "tp2_zero1": (2, ["parallel.tp=2", "parallel.zero_stage=1"]),
    "tp2_zero3": (2, ["parallel.tp=2", "parallel.zero_stage=3"]),
    "pp2_zero1": (2, ["parallel.pp=2", "parallel.zero_stage=1"]),
}
# dropout on, with and without recomputing the blocks: the recomputed forward must draw the same masks
DROPOUT = {
    "tp2_dropout": (2, ["parallel.tp=2", "model.dropout=0.2"]),
    "tp2_dropout_ckpt": (2, ["parallel.tp=2", "model.dropout=0.2", "parallel.activation_checkpointing=true"]),
}
# sources of layout changes only (not compared with one process on their own)
SOURCES: dict[str, tuple[int, list[str]]] = {
    "zero3_dp4": (4, ["parallel.zero_stage=3", "train.micro_batch_size=2"]),
}
# (source layout, target name, processes, overrides of the target): issue 7's layout changes, and issue 13's
CHANGES: list[tuple[str, str, int, list[str]]] = [
    ("tp2", "one", 1, []),
    ("pp2", "dp2", 2, []),
    ("zero3", "zero1_one", 1, ["parallel.zero_stage=1"]),
    ("tp2xpp2", "dp4", 4, ["train.micro_batch_size=2"]),
    ("zero3_dp4", "tp2xpp2", 4, ["parallel.tp=2", "parallel.pp=2"]),
    ("dp2", "zero2_dp4", 4, ["parallel.zero_stage=2", "train.micro_batch_size=2"]),
]


@dataclass
class Runs:
    root: Path
    data: Path
    logs: dict[int, str]  # processes -> the combined output of that launch

    def dir(self, name: str) -> Path:
        return self.root / name


def _launch(cmd: list[str], timeout: int = 600) -> str:
    """Run a command (killed with its whole process group on timeout); its output, or a failure."""
    from conftest import run_group

    result = run_group(cmd, timeout, PYTHONPATH=str(ROOT / "tests"))
    out = result.stdout + result.stderr
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}:\n{out[-6000:]}")
    return out


def _worker(root: Path, config: Path, nproc: int, runs: list[tuple[list[str], str]]) -> str:
    spec = root / f"spec{nproc}.json"
    spec.write_text(
        json.dumps({"config": str(config), "runs": [{"overrides": o, "resume": r} for o, r in runs]})
    )
    worker = str(ROOT / "tests" / "workers" / "parallel_runs.py")
    return _launch(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            worker,
            str(spec),
        ]
    )


def _truncated_copy(src: Path, dst: Path, step: int) -> Path:
    """A copy of a run directory as if it had stopped after saving `step` (for --resume auto)."""
    shutil.copytree(src, dst)
    ckpts = dst / "checkpoints"
    for p in ckpts.glob("step_*"):
        if int(p.name.split("_")[1]) > step:
            shutil.rmtree(p)
    (ckpts / "latest").write_text(f"step_{step}\n")
    return dst


def build_runs(
    root: Path,
    common: list[str] = COMMON,
    layouts: dict[str, tuple[int, list[str]]] = LAYOUTS,
    others: dict[str, tuple[int, list[str]]] | None = None,
    changes: list[tuple[str, str, int, list[str]]] = CHANGES,
) -> Runs:
    """Train `layouts` (each also resumed from step SAVED), `others` (default DROPOUT and SOURCES) and the
    layout `changes` on one model (`common` overrides), and the serial reference."""
    others = {**DROPOUT, **SOURCES} if others is None else others
    data = sentencepiece_data(root / "sp", vocab_size=400, chars=100_000)
    config = write_config(root / "base.yaml", data, root / "unused", *common)
    logs: dict[int, str] = {}

    def runs_for(nproc: int) -> list[tuple[list[str], str]]:
        todo = []
        for name, (n, overrides) in {**layouts, **others}.items():
            if n == nproc:
                todo.append(([*overrides, f"run.dir={root / name}"], "none"))
        for name, (n, overrides) in layouts.items():  # the same layout, resumed from step 3
            if n == nproc:
                todo.append(
                    (
                        [*overrides, f"run.dir={root / name}.resumed"],
                        str(root / name / "checkpoints" / f"step_{SAVED}"),
                    )
                )
        for source, target, n, overrides in changes:
            if n == nproc:  # a source of fewer processes was trained by an earlier launch
                todo.append(
                    (
                        [*overrides, f"run.dir={root / f'{source}-to-{target}'}"],
                        str(root / source / "checkpoints" / f"step_{SAVED}"),
                    )
                )
        return todo

    logs[2] = _worker(root, config, 2, runs_for(2))
    logs[4] = _worker(root, config, 4, runs_for(4))
    one = [sys.executable, TRAIN, "--config", str(config)]
    logs[1] = _launch([*one, f"run.dir={root / 'serial'}", "--resume", "none"])
    for source, target, n, overrides in changes:  # one process, through launch/train.py --resume auto
        if n == 1:
            run_dir = _truncated_copy(root / source, root / f"{source}-to-{target}", SAVED)
            logs[1] += _launch([*one, *overrides, f"run.dir={run_dir}", "--resume", "auto"])
    return Runs(root, data, logs)


_RUNS: Runs | None = None


def shared_runs(tmp_path_factory) -> Runs:
    """The runs, made once per test session whichever test module asks first."""
    global _RUNS
    if _RUNS is None:
        _RUNS = build_runs(tmp_path_factory.mktemp("parallel"))
    return _RUNS


# ---------------------------------------------------------------------------------------------- reading


def train_lines(run_dir: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if "loss" in r}


def val_lines(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in lines if "val_loss" in r}


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def weights(run_dir: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    from gptforge.checkpoint_format import load_checkpoint_weights

    return load_checkpoint_weights(run_dir / "checkpoints" / f"step_{step}")[1]


def weight_errors(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor ||got - ref|| / ||ref||, except attention's key bias, compared absolutely (see
    `key_bias_noise`)."""
    assert got.keys() == ref.keys(), sorted(set(got) ^ set(ref))
    errors = {}
    for name, r in ref.items():
        g = got[name]
        assert g.shape == r.shape, (name, g.shape, r.shape)
        if name.endswith("attn.c_attn.bias"):
            q_g, k_g, v_g = g.chunk(3)
            q_r, k_r, v_r = r.chunk(3)
            g, r = torch.cat([q_g, v_g]), torch.cat([q_r, v_r])
            errors[name + "[k]"] = float((k_g - k_r).abs().max())
        errors[name] = float((g - r).norm() / r.norm())
    return errors


def check_weights(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    """Every weight within `tol` relative. Attention's key bias has a gradient that is zero in exact
    arithmetic (softmax(q.(k + b)) = softmax(q.k) row by row), so its values are rounding noise, which
    Adam scales up to steps of about lr: in every run it stays below `tol` in absolute value, compared so."""
    errors = weight_errors(got, ref)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, f"{worst}: {errors[worst]:.2e} (all: {errors})"
