"""`launch/train.py` end to end, as real processes: outputs, exact resume, preemption, divergence,
Hugging Face starts, and the checkpoints generate/export read."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import ROOT, losses, metrics, run, sentencepiece_data, text_build, train_cmd, write_config

from gptforge.config import load_config
from gptforge.data.format import read_manifest
from gptforge.data.loader import WindowDataset, eval_batches
from gptforge.model import GPT
from gptforge.train import EXIT_PREEMPTED
from gptforge.train.checkpoint import load_checkpoint_weights, read_meta
from gptforge.train.metrics import EVAL_KEYS, TRAIN_KEYS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return sentencepiece_data(tmp_path_factory.mktemp("sp"))


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (
        f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    return result


def _model(run_dir: Path) -> GPT:
    cfg, state_dict, _ = load_checkpoint_weights(run_dir)
    model = GPT(cfg)
    model.load_state_dict(state_dict)
    return model.eval()


def _val_loss(model: GPT, data: Path, micro_batch: int, eval_iters: int) -> float:
    val = WindowDataset(read_manifest(data), "val", model.cfg.context_length, seed=0)
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in eval_batches(val, eval_iters * micro_batch, micro_batch, 0, 1):
            total += float(model(x, y)[1]) * len(x)
            n += len(x)
    return total / n


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory) -> Path:
    """8 steps: log every step, eval every 4, save every 2 keeping 2, a sample every 4."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = write_config(
        tmp / "cfg.yaml",
        data,
        tmp / "run",
        "train.max_steps=8",
        "train.save_interval=2",
        "train.keep_last=2",
        "train.sample_interval=4",
        "run.tensorboard=true",
    )
    result = _ok(run(train_cmd(cfg, resume="none")))
    (tmp / "stderr.txt").write_text(result.stderr)
    return tmp / "run"


def test_metrics_tensorboard_config_and_checkpoints(finished_run, data):
    train, evals = metrics(finished_run)
    assert [r["step"] for r in train] == list(range(1, 9))
    assert all(tuple(r) == TRAIN_KEYS for r in train) and all(tuple(r) == EVAL_KEYS for r in evals)
    assert [r["tokens"] for r in train] == [8 * 32 * s for s in range(1, 9)]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["grad_norm"] > 0 for r in train)
    assert [r["step"] for r in evals] == [0, 4, 8]
    assert all(math.isclose(r["val_ppl"], math.exp(r["val_loss"]), rel_tol=1e-12) for r in evals)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3  # it learns

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(finished_run / "tensorboard"))
    tb.Reload()
    for tag, records, key in [
        ("train/loss", train, "loss"),
        ("train/lr", train, "lr"),
        ("train/grad_norm", train, "grad_norm"),
        ("val/val_loss", evals, "val_loss"),
    ]:
        events = tb.Scalars(tag)
        assert [e.step for e in events] == [r["step"] for r in records]
        assert [e.value for e in events] == pytest.approx([r[key] for r in records], rel=1e-6)
    assert tb.Tags()["tensors"]  # the text samples

    stderr = (finished_run.parent / "stderr.txt").read_text()
    assert "sample at step 4:" in stderr and "step 8/8 | loss" in stderr

    ckpts = finished_run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_6", "step_8"]  # keep_last=2
    assert (ckpts / "latest").read_text().strip() == "step_8"
    step8 = ckpts / "step_8"
    assert {p.name for p in step8.iterdir()} == {
        "checkpoint.json",
        "index.json",
        "rank_00000.safetensors",
        "rng_rank0.pt",
    }
    meta = read_meta(step8)
    assert (meta["step"], meta["consumed_samples"]) == (8, 64)
    assert meta["data"]["manifest_sha256"] == read_manifest(data).sha256
    saved = load_config(finished_run / "config.yaml")
    assert saved.model.vocab_size == 384 and meta["config"]["model"] == saved.__dict__["model"].__dict__

    # the checkpoint holds the final weights: its val loss is the one logged at step 8
    model = _model(finished_run)
    assert _val_loss(model, data, 4, 2) == pytest.approx(evals[-1]["val_loss"], abs=1e-6)


def _exact_resume(data: Path, tmp: Path, nproc: int, *extra: str) -> None:
    common = ["optim.decay_steps=8", "model.dropout=0.1", "train.save_interval=100", *extra]
    a = write_config(tmp / "a.yaml", data, tmp / "a", "train.max_steps=8", *common)
    _ok(run(train_cmd(a, resume="none", nproc=nproc)))
    b1 = write_config(tmp / "b1.yaml", data, tmp / "b", "train.max_steps=4", *common)
    _ok(run(train_cmd(b1, resume="none", nproc=nproc)))
    b2 = write_config(tmp / "b2.yaml", data, tmp / "b", "train.max_steps=8", *common)
    _ok(run(train_cmd(b2, resume="auto", nproc=nproc)))
    la, lb = losses(tmp / "a"), losses(tmp / "b")
    assert list(la) == list(range(1, 9)) and la == lb  # bitwise: floats compared exactly
    assert metrics(tmp / "a")[1] == metrics(tmp / "b")[1]
    wa, wb = load_checkpoint_weights(tmp / "a")[1], load_checkpoint_weights(tmp / "b")[1]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_exact_resume_one_process(data, tmp_path):
    _exact_resume(data, tmp_path, 1)


@pytest.mark.slow
def test_exact_resume_two_processes_zero1(data, tmp_path):
    _exact_resume(data, tmp_path, 2, "parallel.zero_stage=1", "train.micro_batch_size=2")
    assert {"rng_rank0.pt", "rng_rank1.pt", "rank_00000.safetensors", "rank_00001.safetensors"} <= {
        p.name for p in (tmp_path / "b" / "checkpoints" / "step_8").iterdir()
    }


def _wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    path = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        assert proc.poll() is None, f"training ended early:\n{proc.communicate()[1][-3000:]}"
        if path.is_file() and any(
            json.loads(x).get("step", 0) >= step and "loss" in x for x in path.read_text().splitlines()
        ):
            return
        time.sleep(0.05)
    raise AssertionError(f"training did not reach step {step} in time")


def test_sigterm_saves_exits_75_and_resumes_exactly(data, tmp_path):
    from conftest import subprocess_env

    common = [
        "optim.decay_steps=1000",
        "model.dropout=0.1",
        "train.save_interval=1000",
        "train.eval_interval=1000",
    ]
    cfg = write_config(tmp_path / "p.yaml", data, tmp_path / "p", "train.max_steps=1000", *common)
    proc = subprocess.Popen(
        train_cmd(cfg, resume="none"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
    )
    _wait_for_step(tmp_path / "p", proc, 3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert "preempted: saved" in stderr
    stopped = read_meta(
        tmp_path / "p" / "checkpoints" / (tmp_path / "p/checkpoints/latest").read_text().strip()
    )["step"]
    assert stopped >= 3 and stopped == max(losses(tmp_path / "p"))

    end = stopped + 3
    resumed = write_config(tmp_path / "p2.yaml", data, tmp_path / "p", f"train.max_steps={end}", *common)
    _ok(run(train_cmd(resumed)))
    ref = write_config(tmp_path / "r.yaml", data, tmp_path / "r", f"train.max_steps={end}", *common)
    _ok(run(train_cmd(ref, resume="none")))
    assert losses(tmp_path / "p") == losses(tmp_path / "r") and max(losses(tmp_path / "r")) == end


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(v.split(b"=", 1)[1]) for v in env if v.startswith(b"RANK=")]
    return ranks[0] if ranks else None


@pytest.mark.slow
def test_sigusr1_to_one_rank_stops_both_ranks(data, tmp_path):
    from conftest import subprocess_env

    common = ["optim.decay_steps=1000", "train.save_interval=1000", "train.eval_interval=1000"]
    cfg = write_config(tmp_path / "p.yaml", data, tmp_path / "p", "train.max_steps=1000", *common)
    proc = subprocess.Popen(
        train_cmd(cfg, resume="none", nproc=2),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
    )
    _wait_for_step(tmp_path / "p", proc, 2)
    workers = {_rank_of(p): p for p in _children(proc.pid)}
    os.kill(workers[1], signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and f"exitcode  : {EXIT_PREEMPTED}" in stderr.replace(
        "exitcode: ", "exitcode  : "
    )
    step_dir = tmp_path / "p" / "checkpoints" / (tmp_path / "p/checkpoints/latest").read_text().strip()
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in step_dir.iterdir()}
    stopped = read_meta(step_dir)["step"]
    resumed = write_config(
        tmp_path / "p2.yaml", data, tmp_path / "p", f"train.max_steps={stopped + 2}", *common
    )
    _ok(run(train_cmd(resumed, nproc=2)))
    assert max(losses(tmp_path / "p")) == stopped + 2


@pytest.mark.parametrize("zero", [0, 1])
def test_non_finite_steps_are_skipped_then_the_run_stops(data, tmp_path, zero):
    cfg = write_config(
        tmp_path / "n.yaml",
        data,
        tmp_path / "n",
        "optim.lr=1e30",
        "optim.warmup_steps=0",
        "train.max_skipped_steps=2",
        "train.save_interval=1",
        "train.keep_last=10",
        "train.max_steps=20",
        f"parallel.zero_stage={zero}",
    )
    result = run(train_cmd(cfg, resume="none"))
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged: 3 consecutive steps (2-4)") and "step_3" in last
    assert "step 2 skipped: non-finite" in result.stderr
    ckpts = tmp_path / "n" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_3" and not (ckpts / "step_4").exists()
    w1, w3 = load_checkpoint_weights(ckpts / "step_1")[1], load_checkpoint_weights(ckpts / "step_3")[1]
    assert all(
        torch.isfinite(v).all() and torch.equal(v, w1[k]) for k, v in w3.items()
    )  # skipped = unchanged
    train, _ = metrics(tmp_path / "n")
    assert train[0]["loss"] is not None and train[1]["loss"] is None  # NaN is written as null


def test_resume_refuses_another_shape_or_dataset(finished_run, data, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "new", "train.max_steps=10", "model.n_layer=3")
    result = run(train_cmd(cfg, resume=str(finished_run)))
    assert (
        result.returncode == 2 and "another model shape (model.n_layer: checkpoint 2, now 3)" in result.stderr
    )

    rng = np.random.default_rng(0)
    other = text_build(
        tmp_path / "other",
        __import__("gptforge.tokenizer", fromlist=["x"]).get_tokenizer(
            f"sentencepiece:{data.parent / 'sp.model'}"
        ),
        "".join(rng.choice(list("abc de\n"), 50000)),
    )
    cfg = write_config(tmp_path / "d.yaml", other.root, tmp_path / "new", "train.max_steps=10")
    result = run(train_cmd(cfg, resume=str(finished_run / "checkpoints" / "step_6")))
    assert (
        result.returncode == 2
        and "was trained on other data" in result.stderr
        and "--allow-new-data" in result.stderr
    )
    result = _ok(
        run([*train_cmd(cfg, resume=str(finished_run / "checkpoints" / "step_6")), "--allow-new-data"])
    )
    assert min(losses(tmp_path / "new")) == 7 and "resumed from" in result.stderr

    again = run(train_cmd(cfg, resume="none"))  # a run directory with checkpoints is not silently reused
    assert again.returncode == 2 and "already has checkpoints" in again.stderr


def test_a_synchronous_save_resumes_in_its_layout_and_in_another(data, tmp_path):
    """train.async_save=false writes the same files in the loop's time: the same layout resumes them bit
    for bit, another ZeRO stage re-shards them."""
    extra = ("train.max_steps=4", "train.save_interval=2")
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "run", *extra, "train.async_save=false")
    _ok(run(train_cmd(cfg, resume="none")))
    step = tmp_path / "run" / "checkpoints" / "step_2"
    assert (step / "checkpoint.json").is_file() and (step / "index.json").is_file()

    cfg = write_config(tmp_path / "z.yaml", data, tmp_path / "zero1", *extra, "parallel.zero_stage=1")
    result = _ok(run(train_cmd(cfg, resume=str(step))))
    assert "under another layout (zero_stage 0 -> 1)" in result.stderr
    assert set(losses(tmp_path / "zero1")) == {3, 4}

    cfg = write_config(tmp_path / "s.yaml", data, tmp_path / "same", *extra)
    result = _ok(run(train_cmd(cfg, resume=str(step))))
    assert f"resumed from {step} (step 2," in result.stderr
    assert losses(tmp_path / "same") == {s: v for s, v in losses(tmp_path / "run").items() if s > 2}


def test_generate_and_export_read_training_checkpoints(finished_run, tmp_path):
    import sys

    for source in (finished_run, finished_run / "checkpoints" / "step_6"):
        out = _ok(
            run(
                [
                    sys.executable,
                    "launch/generate.py",
                    "--checkpoint",
                    str(source),
                    "--prompt",
                    "ROMEO:",
                    "--max-new-tokens",
                    "5",
                    "--temperature",
                    "0",
                    "--json",
                ]
            )
        )
        completion = json.loads(out.stdout)["completion_tokens"]
        model = _model(source)
        from gptforge.generate import generate
        from gptforge.tokenizer import tokenizer_from_manifest

        tok = tokenizer_from_manifest(load_checkpoint_weights(source)[2])
        assert completion == generate(model, [tok.encode("ROMEO:")], 5, temperature=0, eot_id=tok.eot_id)[0]

    _ok(
        run(
            [
                sys.executable,
                "launch/export.py",
                "--checkpoint",
                str(finished_run),
                "--output",
                str(tmp_path / "hf"),
            ]
        )
    )
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 384, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, _model(finished_run)(x)[0], rtol=0, atol=1e-5)


def test_init_from_hugging_face_weights(tmp_path):
    """lr 0: the run starts from, evaluates and saves exactly the Hugging Face model's weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptforge import hf
    from gptforge.tokenizer import get_tokenizer

    torch.manual_seed(0)
    ref = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)).eval()
    ref.save_pretrained(tmp_path / "hf", safe_serialization=True)
    text = (ROOT.parent / "shared" / "corpora" / "grimm_tales.txt").read_text()[:60000]
    data = text_build(tmp_path / "data", get_tokenizer("gpt2"), text).root
    cfg = write_config(
        tmp_path / "c.yaml",
        data,
        tmp_path / "run",
        f"model.init_from=hf:{tmp_path / 'hf'}",
        "model.context_length=64",
        "optim.lr=0",
        "optim.min_lr=0",
        "train.max_steps=2",
        "train.eval_interval=2",
    )
    _ok(run(train_cmd(cfg, resume="none")))
    saved_cfg, weights, tokenizer = load_checkpoint_weights(tmp_path / "run")
    assert (saved_cfg.n_layer, saved_cfg.d_model, saved_cfg.vocab_size, saved_cfg.context_length) == (
        2,
        32,
        50257,
        64,
    )
    assert tokenizer["name"] == "gpt2"
    expected = hf.state_dict_from_hf(hf.read_hf_weights(tmp_path / "hf"), saved_cfg)
    assert all(torch.equal(weights[k], v) for k, v in expected.items())
    # step-0 val loss = transformers' own loss on the same windows
    val = WindowDataset(read_manifest(data), "val", 64, seed=0)
    total = n = 0
    with torch.no_grad():
        for x, y in eval_batches(val, 2 * 4, 4, 0, 1):
            total += float(
                ref(input_ids=x).logits.log_softmax(-1).gather(-1, y[..., None]).mean().neg()
            ) * len(x)
            n += len(x)
    assert metrics(tmp_path / "run")[1][0]["val_loss"] == pytest.approx(total / n, abs=1e-5)


def test_trains_on_a_real_build(tmp_path):
    """data_pipeline/build.py output (GPT-2 BPE) straight into training, under torchrun with one process."""
    import sys

    text = (ROOT.parent / "shared" / "corpora" / "grimm_tales.txt").read_text()
    stories = [s for s in text.split("\n\n\n") if len(s) > 2000][:30]
    (tmp_path / "in").mkdir()
    for i, story in enumerate(stories):
        (tmp_path / "in" / f"{i:02d}.txt").write_text(story)
    _ok(
        run(
            [
                sys.executable,
                "data_pipeline/build.py",
                "--input",
                str(tmp_path / "in"),
                "--output",
                str(tmp_path / "data"),
                "--val-fraction",
                "0.2",
                "--no-progress",
            ]
        )
    )
    manifest = read_manifest(tmp_path / "data")
    assert manifest.tokenizer["name"] == "gpt2" and manifest.splits["val"].tokens > 0
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "data", tmp_path / "run", "train.max_steps=4")
    _ok(run(train_cmd(cfg, resume="none", nproc=1, torchrun=True)))
    train, evals = metrics(tmp_path / "run")
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evals] == [0, 4]
    assert load_checkpoint_weights(tmp_path / "run")[0].vocab_size == 50257
    assert evals[1]["val_loss"] < evals[0]["val_loss"]


@pytest.mark.slow
def test_mpirun_two_ranks_match_one_process(data, tmp_path):
    """Launched by mpirun (DeepSpeed finds the ranks through MPI): data parallel gives the single
    process's losses (same global batch: 2 ranks x 4 vs 1 rank x 4 x 2 accumulation)."""
    import sys

    one = write_config(tmp_path / "one.yaml", data, tmp_path / "one", "train.max_steps=4")
    two = write_config(tmp_path / "two.yaml", data, tmp_path / "two", "train.max_steps=4")
    _ok(run(train_cmd(one, resume="none")))
    mpirun = str(Path(sys.executable).parent / "mpirun")
    _ok(run([mpirun, "-n", "2", *train_cmd(two, resume="none")]))
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert list(l1) == list(l2) == [1, 2, 3, 4]
    assert all(abs(l1[s] - l2[s]) <= 1e-5 * abs(l1[s]) for s in l1)
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= {
        p.name for p in (tmp_path / "two/checkpoints/step_4").iterdir()
    }


class _Payload:
    """A pickle that creates a file when loaded with weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_loads_pickled_states_weights_only(finished_run, data, tmp_path):
    """The one pickle a checkpoint has (each rank's RNG states) is loaded with weights_only: code in it is
    refused, not run."""
    import pickle
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run / "checkpoints" / "step_8", run_dir / "checkpoints" / "step_8")
    marker = tmp_path / "code-ran"
    with open(run_dir / "checkpoints" / "step_8" / "rng_rank0.pt", "wb") as f:
        pickle.dump({"module": _Payload(marker)}, f, protocol=2)
    cfg = write_config(tmp_path / "c.yaml", data, run_dir, "train.max_steps=10")
    result = run(train_cmd(cfg))
    assert result.returncode == 2 and "error: cannot load" in result.stderr, result.stderr[-2000:]
    assert not marker.exists()
