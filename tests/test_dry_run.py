"""`--dry-run`: every shipped config at the shape each shipped script and README example runs it, checked
in seconds without processes, process groups or CUDA; bad shapes fail with the run's one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, subprocess_env
from finetune_helpers import tiny_hf
from train_helpers import TRAIN, write_build

from gptforge.config import load_config
from gptforge.errors import ConfigError, GptforgeError
from gptforge.finetune.config import FinetuneRunConfig
from gptforge.tokenizer import get_tokenizer
from gptforge.train.dry_run import Shape, dry_run, resolve_shape

CONFIGS = ROOT / "configs"
FINETUNE = str(ROOT / "launch" / "finetune.py")
EXAMPLES = ROOT / "examples" / "finetune"

# The layouts the README's parallelism section lists for GPT-2 774M on one node of 8 GPUs.
README_LAYOUTS = [
    ["parallel.zero_stage=0"],
    ["parallel.zero_stage=1"],
    ["parallel.zero_stage=2"],
    ["parallel.zero_stage=3", "parallel.offload_optimizer=cpu"],
    ["parallel.zero_stage=3", "parallel.offload_params=true"],
    ["parallel.tp=2", "parallel.zero_stage=1"],
    ["parallel.pp=2", "parallel.zero_stage=1", "parallel.pp_partition=0-17,18-35"],
    ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1"],
    ["parallel.tp=4", "parallel.activation_checkpointing=true"],
]

# (config, world size, GPUs per node, overrides): what each script and README example starts.
PRETRAIN_SHAPES = [
    ("tiny.yaml", 1, 1, []),  # slurm/debug_1gpu.sh, make demo, the README's one-process line
    ("tiny.yaml", 2, 1, []),  # the README's local two-node SLURM example (DEVICE=cpu GPUS_PER_NODE=1)
    ("gpt2-124m.yaml", 1, 1, []),  # CONFIG=configs/gpt2-124m.yaml bash slurm/debug_1gpu.sh
    ("gpt2-124m.yaml", 8, 8, ["parallel.zero_stage=1"]),  # README: torchrun --nproc_per_node=8
    ("gpt2-350m.yaml", 8, 8, []),
    ("gpt2-774m.yaml", 64, 8, []),
    ("gpt2-1.5b.yaml", 64, 8, []),  # sbatch slurm/pretrain_8node.sh, its default
    ("gpt2-350m.yaml", 16, 8, ["optim.lr=3e-4", "train.max_steps=20000"]),  # README: sbatch --nodes=2
    ("gpt2-1.5b.yaml", 16, 8, []),  # sbatch --nodes=2 slurm/pretrain_8node.sh (its default config)
    ("gpt2-774m.yaml", 64, 8, ["parallel.tp=2", "parallel.pp=4", "parallel.zero_stage=1"]),  # --nodes=8
    ("gpt2-774m.yaml", 32, 8, ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1"]),  # --nodes=4
    ("gpt2-1.5b.yaml", 16, 8, ["parallel.pp=2", "parallel.zero_stage=1"]),  # plan.py's suggestion at 16
    ("gpt2-1.5b.yaml", 1, 1, []),
    *[("gpt2-774m.yaml", 8, 8, layout) for layout in README_LAYOUTS],
    ("gpt2-1.5b.yaml", 8, 8, ["parallel.zero_stage=3", "parallel.offload_optimizer=cpu"]),
    ("llama-tiny.yaml", 1, 1, []),
    ("llama-1b.yaml", 8, 8, []),
    ("llama-1b.yaml", 64, 8, []),
]
FINETUNE_SHAPES = [
    (name, world, world, extra)
    for name in ("finetune-classify.yaml", "finetune-instruct.yaml")
    for world in (1, 8)
    for extra in ([], ["parallel.zero_stage=1"])
]
TASK_FILES = {"finetune-classify.yaml": "topics", "finetune-instruct.yaml": "alpaca"}


@pytest.fixture(scope="module")
def gpt2_data(tmp_path_factory) -> Path:
    """A build output in GPT-2 BPE ids (the vocabulary the shipped configs train on)."""
    tok = get_tokenizer("gpt2")
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(0, tok.vocab_size - 1, 2000), tok.eot_id) for _ in range(6)]
    out = tmp_path_factory.mktemp("gpt2") / "data"
    write_build(out, {"train": docs[:4], "val": docs[4:]}, tok.describe())
    return out


@pytest.fixture(scope="module")
def hf_start(tmp_path_factory) -> Path:
    return tiny_hf(tmp_path_factory.mktemp("hf") / "gpt2")


def test_every_shipped_config_is_in_the_matrix():
    shipped = {p.name for p in CONFIGS.glob("*.yaml")}
    covered = {row[0] for row in PRETRAIN_SHAPES + FINETUNE_SHAPES}
    assert shipped == covered, f"add a dry-run row for {sorted(shipped - covered)}"


@pytest.mark.parametrize(("name", "world", "per_node", "overrides"), PRETRAIN_SHAPES)
def test_pretraining_config_at_its_shape(gpt2_data, name, world, per_node, overrides):
    cfg = load_config(CONFIGS / name, [f"data.path={gpt2_data}", *overrides])
    summary = dry_run(cfg, Shape(world, per_node))
    assert summary.splitlines()[-1].startswith("dry run: OK")
    assert f"dry run: {world} process(es)" in summary
    assert not torch.distributed.is_initialized() and not torch.cuda.is_initialized()


@pytest.mark.parametrize(("name", "world", "per_node", "overrides"), FINETUNE_SHAPES)
def test_finetuning_config_at_its_shape(hf_start, name, world, per_node, overrides):
    stem = TASK_FILES[name]
    cfg = load_config(
        CONFIGS / name,
        [
            f"model.init_from=hf:{hf_start}",
            f"finetune.train={EXAMPLES / f'{stem}_train.jsonl'}",
            f"finetune.val={EXAMPLES / f'{stem}_val.jsonl'}",
            *overrides,
        ],
        cls=FinetuneRunConfig,
    )
    summary = dry_run(cfg, Shape(world, per_node), model_parallel=False)
    assert summary.splitlines()[-1].startswith("dry run: OK")


def test_the_batch_error_names_valid_batches_for_the_world_size_given(gpt2_data):
    """The first-wave bug: 480 sequences at 64 GPUs x micro batch 2 (= 128 per step)."""
    cfg = load_config(CONFIGS / "gpt2-1.5b.yaml", [f"data.path={gpt2_data}", "train.global_batch_size=480"])
    with pytest.raises(ConfigError) as err:
        dry_run(cfg, Shape(64, 8))
    message = str(err.value)
    assert "2 x 64 = 128" in message and "multiple of 128" in message, message
    assert "multiple of 64" not in message, message


def test_a_layout_that_does_not_fit_the_gpu_is_refused(gpt2_data):
    cfg = load_config(CONFIGS / "gpt2-1.5b.yaml", [f"data.path={gpt2_data}", "parallel.zero_stage=0"])
    with pytest.raises(ConfigError, match=r"needs ~\d+\.\d GiB per GPU, more than the 14\.4 GiB usable"):
        dry_run(cfg, Shape(8, 8), gpu_mem="16GB")
    assert dry_run(cfg, Shape(8, 8), gpu_mem="80GB").endswith(
        "dry run: OK (no process, process group or GPU was started)"
    )


def test_layouts_that_do_not_fit_the_world_or_the_node(gpt2_data):
    cfg = load_config(CONFIGS / "gpt2-1.5b.yaml", [f"data.path={gpt2_data}", "parallel.tp=2"])
    with pytest.raises(ConfigError, match=r"model.n_head=25 is not divisible by parallel.tp=2"):
        dry_run(cfg, Shape(64, 8))
    cfg = load_config(CONFIGS / "gpt2-774m.yaml", [f"data.path={gpt2_data}", "parallel.tp=5"])
    with pytest.raises(ConfigError, match=r"parallel.tp=5 does not divide the 8 GPUs per node"):
        dry_run(cfg, Shape(40, 8))
    with pytest.raises(ConfigError, match="not a multiple of --gpus-per-node 8"):
        resolve_shape(60, 8)


def test_the_shape_defaults_to_the_launchers(monkeypatch):
    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_JOB_NUM_NODES", "SLURM_NNODES", "PMI_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "8")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
    assert resolve_shape(None, None) == Shape(64, 8)  # a batch script before srun: the allocation
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_shape(None, None) == Shape(16, 4)  # under torchrun: what it announced


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, env=subprocess_env(), cwd=ROOT
    )


def test_train_cli_dry_run_with_overrides_anywhere(gpt2_data):
    result = _cli(
        TRAIN, f"data.path={gpt2_data}", "--config", str(CONFIGS / "gpt2-1.5b.yaml"), "--dry-run",
        "optim.lr=3e-4", "--world-size", "64", "--gpus-per-node", "8", "train.max_steps=10",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dry run: 64 process(es) = 8 node(s) x 8" in result.stdout
    assert "10 steps" in result.stdout


def test_train_cli_dry_run_error_is_one_line(gpt2_data):
    result = _cli(
        TRAIN, "--config", str(CONFIGS / "gpt2-1.5b.yaml"), f"data.path={gpt2_data}", "--dry-run",
        "--world-size", "64", "--gpus-per-node", "8", "train.global_batch_size=480",
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "multiple of 128" in lines[0]


def test_finetune_cli_takes_overrides_before_its_options(hf_start):
    result = _cli(
        FINETUNE, f"model.init_from=hf:{hf_start}", "--task", "classify", "train.max_steps=5",
        "--config", str(CONFIGS / "finetune-classify.yaml"), "--train", str(EXAMPLES / "topics_train.jsonl"),
        "optim.lr=1e-4", "--val", str(EXAMPLES / "topics_val.jsonl"), "--dry-run", "--world-size", "8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dry run: OK" in result.stdout and "topics_train.jsonl" in result.stdout


def test_plan_cli_takes_overrides_anywhere():
    result = _cli(
        str(ROOT / "launch" / "plan.py"), "model.vocab_size=50257", "--config", str(CONFIGS / "gpt2-1.5b.yaml"),
        "train.micro_batch_size=1", "--gpus", "16", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"suggested"' in result.stdout


def test_a_blend_is_checked_source_by_source(gpt2_data, tmp_path):
    other = tmp_path / "books"
    tok = get_tokenizer("gpt2")
    write_build(
        other,
        {"train": [np.array([1, 2, 3, tok.eot_id])], "val": [np.array([4, tok.eot_id])]},
        tok.describe(),
    )
    blend = f"data.blend={gpt2_data}:0.75,{other}:0.25"
    summary = dry_run(load_config(CONFIGS / "gpt2-1.5b.yaml", [blend]), Shape(16, 8))
    assert f"data: data = {gpt2_data} (weight 0.750; gpt2;" in summary
    assert f"data: books = {other} (weight 0.250; gpt2;" in summary
    foreign = tmp_path / "foreign"
    write_build(foreign, {"train": [np.array([1, 2, 0])]}, {**tok.describe(), "name": "other", "eot_id": 0})
    with pytest.raises(GptforgeError, match="tokenized differently"):
        dry_run(
            load_config(CONFIGS / "gpt2-1.5b.yaml", [f"data.blend={gpt2_data}:1,{foreign}:1"]), Shape(8, 8)
        )
