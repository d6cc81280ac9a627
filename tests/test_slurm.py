"""The SLURM scripts on a real two-node SLURM cluster started on this machine (tests/slurm_cluster.py).

Jobs are submitted with sbatch exactly as a user would, overriding only what differs from a GPU cluster:
`--nodes=2 --gpus-per-node=0`, and DEVICE=cpu / GPUS_PER_NODE=1 so each fake node runs one gloo process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT, subprocess_env
from slurm_cluster import SlurmCluster, SlurmUnavailable, free_port

PRETRAIN = ROOT / "slurm" / "pretrain_8node.sh"
DEBUG = ROOT / "slurm" / "debug_1gpu.sh"
BUILD_DATA = ROOT / "slurm" / "build_data.sh"
STAND_IN = "tests/workers/slurm_rendezvous.py"
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


@pytest.fixture(scope="module")
def cluster():
    """A fresh cluster for this module; its daemons are stopped by pid afterwards. Skips only when SLURM
    cannot be installed or run here (not root, no apt), and never under CI=true: there it fails."""
    # mkdtemp under /tmp, not pytest's tmp_path: munged runs as user `munge` and must traverse the path.
    state = Path(tempfile.mkdtemp(prefix="gptforge-slurm-"))
    c = SlurmCluster(state, cpus_per_node=2)  # two CPUs: room for the 4-rank build (2 tasks per node)
    try:
        c.start()
    except SlurmUnavailable as exc:
        shutil.rmtree(state, ignore_errors=True)
        if os.environ.get("CI") == "true":  # CI exists to run these: a skip there would hide a broken install
            pytest.fail(f"CI=true but no local SLURM cluster could be started: {exc}")
        pytest.skip(f"no local SLURM cluster: {exc}")
    try:
        yield c
    finally:
        c.stop()
        for pid in c.pids().values():  # stop() clears them; anything left would be a leak
            pytest.fail(f"daemon pid {pid} still recorded after stop")
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_dir):
    """Four .jsonl inputs (plays in chunks, tales, exact and near duplicates) and their single-process build."""
    root = tmp_path_factory.mktemp("corpus")
    plays = [
        p for p in (shared_dir / "corpora" / "tinyshakespeare.txt").read_text().split("\n\n") if p.strip()
    ]
    tales = [t for t in (shared_dir / "corpora" / "grimm_tales.txt").read_text().split("\n\n\n") if t.strip()]
    docs = ["\n\n".join(plays[i : i + 12]) for i in range(0, len(plays), 12)] + tales
    docs += docs[::25] + [d.replace(" the ", " a ", 1) for d in docs[5::40]]
    inputs = root / "inputs"
    inputs.mkdir()
    for part in range(4):
        lines = (json.dumps({"text": d}) + "\n" for d in docs[part::4])
        (inputs / f"part{part}.jsonl").write_text("".join(lines))
    single = root / "single"
    proc = subprocess.run(
        [sys.executable, "data_pipeline/build.py", "--input", str(inputs), "--output", str(single), "--no-progress"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return inputs, single


@pytest.fixture
def workdir(tmp_path):
    """Where sbatch is run from: logs/ must exist before sbatch (SLURM opens logs/%x-%j.out itself)."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path


def job_env(cluster: SlurmCluster, **extra: str) -> dict[str, str]:
    """What the submitting shell exports: the knobs of the scripts, gloo over loopback."""
    env = cluster.env(
        subprocess_env(
            REPO_DIR=str(ROOT),
            PYTHON=sys.executable,
            DEVICE="cpu",
            GPUS_PER_NODE="1",
            RDZV_PORT=str(free_port()),
            GLOO_SOCKET_IFNAME="lo",
        )
    )
    env.update(extra)
    return env


def sbatch(cluster: SlurmCluster, cwd: Path, env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        ["sbatch", "--parsable", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, f"sbatch {args} failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def job_info(cluster: SlurmCluster, job_id: str) -> dict[str, str]:
    out = cluster.run("scontrol", "show", "job", "-o", job_id).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_job(cluster: SlurmCluster, job_id: str, timeout_s: float, log: Path | None = None) -> dict[str, str]:
    """Poll until the job reaches a terminal state; on timeout, fail showing its log."""
    deadline = time.monotonic() + timeout_s
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = job_info(cluster, job_id)
        if info.get("JobState") in TERMINAL:
            return info
        time.sleep(0.5)
    cluster.run("scancel", job_id, check=False)
    text = log.read_text() if log and log.exists() else "(no log)"
    pytest.fail(f"job {job_id} not done after {timeout_s:.0f}s (state {info.get('JobState')}); log:\n{text}")


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.2)


def read_records(out: Path) -> list[dict]:
    """What each rank of the stand-in training script reported, by rank."""
    return sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")), key=lambda r: r["rank"])


# -- the fake cluster itself ------------------------------------------------------------------------------
@pytest.mark.slurm
@pytest.mark.slow
def test_two_fake_nodes_run_one_task_each(cluster, workdir):
    job = sbatch(
        cluster, workdir, cluster.env(subprocess_env()), "--nodes=2", "--ntasks-per-node=1", "--output=logs/%j.out",
        "--wrap", "srun bash -c 'echo task=$SLURM_PROCID node=$SLURMD_NODENAME host=$(hostname)'",
    )  # fmt: skip
    info = wait_job(cluster, job, 60)
    assert info["JobState"] == "COMPLETED", info
    lines = sorted((workdir / "logs" / f"{job}.out").read_text().split())
    tasks = sorted(line for line in lines if line.startswith(("task=", "node=")))
    assert tasks == ["node=gfnode1", "node=gfnode2", "task=0", "task=1"], lines
    assert cluster.node_states() == {"gfnode1": "idle", "gfnode2": "idle"}


# -- slurm/pretrain_8node.sh launch mechanics, with a stand-in training script ----------------------------
@pytest.mark.slurm
@pytest.mark.slow
def test_pretrain_script_two_node_rendezvous(cluster, workdir):
    out = workdir / "out"
    env = job_env(cluster, TRAIN_SCRIPT=STAND_IN, CONFIG="configs/tiny.yaml", SLURM_TEST_OUT=str(out), DRY_RUN="0",
                  OVERRIDES="train.max_steps=7 optim.lr=1e-3", RUN_DIR=str(workdir / "run"))  # fmt: skip
    job = sbatch(
        cluster, workdir, env, "--nodes=2", "--gpus-per-node=0", "--time=5", str(PRETRAIN), "train.seed=3"
    )
    log = workdir / "logs" / f"gptforge-pretrain-{job}.out"
    info = wait_job(cluster, job, 120, log)
    assert info["JobState"] == "COMPLETED", log.read_text()
    records = read_records(out)
    assert [r["rank"] for r in records] == [0, 1], log.read_text()
    assert {r["node"] for r in records} == {"gfnode1", "gfnode2"}  # one rank per node
    for r in records:
        assert r["world_size"] == 2 and r["local_rank"] == 0 and r["job_id"] == job
        assert r["all_reduce_sum"] == 3.0  # 1 + 2: the two nodes really exchanged data
        assert r["dist_backend"] == "gloo"
        assert r["argv"] == [
            "--config", "configs/tiny.yaml", "train.max_steps=7", "optim.lr=1e-3", "train.seed=3",
            f"run.dir={workdir / 'run'}", "run.dist_backend=gloo", "--resume", "auto",
        ]  # fmt: skip
    assert f"rendezvous gfnode1:{env['RDZV_PORT']}" in log.read_text()


@pytest.mark.slurm
@pytest.mark.slow
def test_pretrain_script_refuses_a_bad_config_before_srun(cluster, workdir, corpus):
    """The dry run at the job's real shape (2 nodes x 1): a batch that does not divide by the world size
    fails on the batch host with the trainer's one-line error, and no srun step ever starts."""
    env = job_env(cluster, CONFIG="configs/tiny.yaml", RUN_DIR=str(workdir / "run"),
                  OVERRIDES=f"data.path={corpus[1]} train.micro_batch_size=3 train.global_batch_size=3")  # fmt: skip
    job = sbatch(cluster, workdir, env, "--nodes=2", "--gpus-per-node=0", "--time=5", str(PRETRAIN))
    log = workdir / "logs" / f"gptforge-pretrain-{job}.out"
    info = wait_job(cluster, job, 120, log)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"].startswith("2:"), text
    errors = [line for line in text.splitlines() if "error:" in line]
    assert len(errors) == 1 and "3 x 2 = 6" in errors[0], text
    assert "dry run failed (status 2): nothing was started" in text and "training step exited" not in text
    assert not (workdir / "run").exists()


def _train_lines(metrics: Path) -> list[dict]:
    if not metrics.exists():
        return []
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r for r in lines if "loss" in r]


# The tiny config made tinier: each step takes a fraction of a second on one CPU per fake node.
TINY = ["model.n_layer=2", "model.n_head=2", "model.d_model=64", "model.context_length=64",
        "train.micro_batch_size=2", "train.global_batch_size=4", "train.log_interval=1", "train.eval_iters=2",
        "train.eval_interval=1000", "train.sample_interval=0", "train.save_interval=1000", "optim.warmup_steps=2"]  # fmt: skip
STEPS = 60


@pytest.mark.slurm
@pytest.mark.slow
def test_pretrain_script_trains_is_preempted_requeued_and_resumes_exactly(cluster, workdir, corpus):
    """The unchanged pretrain script, the real trainer, two nodes: USR1 (as before the time limit) makes the
    trainer save and exit, the script requeues, the requeued job resumes from that checkpoint, and the
    losses of steps 1..STEPS, each logged once, equal those of a never-interrupted 2-process run bitwise."""
    data = shutil.copytree(corpus[1], workdir / "data")  # the trainer adds a checksum cache to it
    run = workdir / "run"
    overrides = [f"data.path={data}", f"train.max_steps={STEPS}", *TINY]
    env = job_env(cluster, CONFIG="configs/tiny.yaml", RUN_DIR=str(run), OVERRIDES=" ".join(overrides))
    job = sbatch(cluster, workdir, env, "--nodes=2", "--gpus-per-node=0", "--time=10", str(PRETRAIN))
    log = workdir / "logs" / f"gptforge-pretrain-{job}.out"
    # Meanwhile the reference: the same training in one uninterrupted torchrun with 2 local processes.
    ref_run = workdir / "reference"
    reference = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "launch/train.py",
         "--config", "configs/tiny.yaml", *overrides, f"run.dir={ref_run}", "run.dist_backend=gloo"],
        cwd=ROOT, env=subprocess_env(GLOO_SOCKET_IFNAME="lo"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        wait_for(
            lambda: len(_train_lines(run / "metrics.jsonl")) >= 5, 180, "the job to log 5 training steps"
        )
        cluster.run("scancel", "--batch", "--signal=USR1", job)  # what --signal=B:USR1@120 does
        info = wait_job(cluster, job, 300, log)
        ref_out = reference.communicate(timeout=300)[0]
    finally:
        reference.kill()
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text
    assert reference.returncode == 0, ref_out

    # A two-node rendezvous: world size 2, rank 0 and rank 1 printing from different srun tasks (= nodes).
    # (srun --label prefixes each line with its task = node index; rank 1 logs warnings only, so look at the
    # first run, where both ranks warn about the signal.)
    first_run = text.split(f"job {job} (restart 1)")[0]
    assert "layout: 2 ranks = dp 2" in first_run, text
    pairs = {(int(m[1]), int(m[2])) for m in re.finditer(r"^(\d+): .*\[rank (\d+)\]", first_run, re.M)}
    assert len(pairs) == 2 and {r for _, r in pairs} == {0, 1} and {t for t, _ in pairs} == {0, 1}, pairs

    # Preempted mid-run, saved, requeued, resumed from exactly that checkpoint.
    saved = set(re.findall(r"preempted: saved \S*/checkpoints/step_(\d+)", text))  # each rank says so
    assert len(saved) == 1, text
    stopped_at = int(saved.pop())
    assert 5 <= stopped_at < STEPS, text
    assert "requeueing job" in text and f"job {job} (restart 1)" in text
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == sorted(
        ["latest", f"step_{stopped_at}", f"step_{STEPS}"]
    )
    assert (ckpts / "latest").read_text().strip() == f"step_{STEPS}"

    # No step lost or repeated, and the same numbers as the run that was never stopped.
    lines = _train_lines(run / "metrics.jsonl")
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1))
    ref_lines = _train_lines(ref_run / "metrics.jsonl")
    for key in ("loss", "grad_norm", "lr", "tokens"):
        assert [r[key] for r in lines] == [r[key] for r in ref_lines], key


@pytest.mark.slurm
@pytest.mark.slow
def test_build_data_script_with_two_tasks_matches_single_process(cluster, workdir, corpus):
    inputs, single = corpus
    out = workdir / "multi"
    env = cluster.env(subprocess_env(GPTFORGE_ROOT=str(ROOT), PYTHON=sys.executable))
    job = sbatch(cluster, workdir, env, "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", str(BUILD_DATA),
                 "--input", str(inputs), "--output", str(out), "--no-progress")  # fmt: skip
    log = workdir / f"gptforge-build-data-{job}.out"
    info = wait_job(cluster, job, 300, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert "rank 0/2" in text and "rank 1/2" in text  # two MPI ranks really shared the work
    files = sorted(p.name for p in single.iterdir())
    assert sorted(p.name for p in out.iterdir()) == files
    assert any(f.endswith(".bin") for f in files) and "removed.jsonl" in files
    for name in files:
        if name != "manifest.json":
            assert (out / name).read_bytes() == (single / name).read_bytes(), name
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (single, out)]
    for m in manifests:
        del m["stats"]["seconds"]  # wall time: the one field that may differ
    assert manifests[0] == manifests[1]
    assert manifests[0]["stats"]["removed"]["exact_duplicate"] > 0


@pytest.mark.slurm
@pytest.mark.slow
def test_build_data_script_with_four_tasks_two_per_node_matches_single_process(cluster, workdir, corpus):
    """Four ranks, two on each node, every rank writing its shards and its part of removed.jsonl into the
    shared output: the bytes of the one-process build."""
    inputs, single = corpus
    out = workdir / "multi4"
    env = cluster.env(subprocess_env(GPTFORGE_ROOT=str(ROOT), PYTHON=sys.executable))
    job = sbatch(cluster, workdir, env, "--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1",
                 str(BUILD_DATA), "--input", str(inputs), "--output", str(out), "--no-progress")  # fmt: skip
    log = workdir / f"gptforge-build-data-{job}.out"
    info = wait_job(cluster, job, 300, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert all(f"rank {r}/4" in text for r in range(4)), text
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in single.iterdir())
    for path in sorted(single.iterdir()):
        if path.name != "manifest.json":
            assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (single, out)]
    for m in manifests:
        del m["stats"]["seconds"]
    assert manifests[0] == manifests[1]


@pytest.mark.slurm
@pytest.mark.slow
def test_debug_script_runs_one_process(cluster, workdir):
    out = workdir / "out"
    env = job_env(cluster, TRAIN_SCRIPT=STAND_IN, SLURM_TEST_OUT=str(out))
    job = sbatch(
        cluster, workdir, env, "--gpus-per-node=0", "--cpus-per-task=1", str(DEBUG), "train.max_steps=2"
    )
    log = workdir / "logs" / f"gptforge-debug-{job}.out"
    info = wait_job(cluster, job, 90, log)
    assert info["JobState"] == "COMPLETED", log.read_text()
    (record,) = read_records(out)
    assert record["world_size"] == 1 and record["all_reduce_sum"] == 1.0
    assert record["argv"] == ["--config", "configs/tiny.yaml", "train.max_steps=2", "--resume", "auto"]


def test_pretrain_script_says_what_is_missing(tmp_path):
    """Outside SLURM too: a wrong CONFIG or DEVICE is one clear line and exit 2, before anything launches."""
    env = subprocess_env(REPO_DIR=str(ROOT), CONFIG="configs/nope.yaml")
    proc = subprocess.run(["bash", str(PRETRAIN)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert re.fullmatch(r"error: configs/nope.yaml not found under REPO_DIR=\S+ \(.*\)\n", proc.stderr)
    env = subprocess_env(REPO_DIR=str(ROOT), DEVICE="tpu")
    proc = subprocess.run(["bash", str(PRETRAIN)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert (proc.returncode, proc.stderr) == (2, "error: DEVICE=tpu: expected cuda or cpu\n")


def test_scripts_parse():
    for script in (PRETRAIN, DEBUG, ROOT / "docker" / "entrypoint.sh"):
        assert os.access(script, os.X_OK), f"{script} is not executable"
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
