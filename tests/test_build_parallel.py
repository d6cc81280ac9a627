"""The same bytes for 1 process, --workers 2, `mpirun -n 2` and slurm/build_data.sh; duplicates found across
ranks (real processes, no mocks)."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import stat
import sys
from pathlib import Path

import pytest
from build_helpers import ROOT, chunk_documents, near_copy, output_bytes, run_build, shared_text, write_jsonl
from conftest import subprocess_env

from data_pipeline.distributed import split_sources
from data_pipeline.readers import expand_inputs

pytestmark = pytest.mark.slow
MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """Four files (one gzipped, one .txt.gz book); exact and near copies of first-file documents in the last
    files, which land on the other rank; and the single-process reference build."""
    tmp = tmp_path_factory.mktemp("par")
    src = tmp / "in"
    src.mkdir()
    rng = random.Random(5)
    docs = chunk_documents(shared_text("grimm_tales.txt"), words=300)
    parts = [docs[i::3] for i in range(3)]
    recs = [[{"text": t} for t in p] for p in parts]
    recs[2] += [{"text": t} for t in parts[0][:8]]
    recs[2] += [{"text": near_copy(t, rng, 2)} for t in parts[0][8:16]]
    write_jsonl(src / "a.jsonl", recs[0])
    write_jsonl(src / "b.jsonl.gz", recs[1], compress=True)
    write_jsonl(src / "c.jsonl", recs[2])
    (src / "d.txt.gz").write_bytes(gzip.compress(shared_text("tinyshakespeare.txt")[:200000].encode()))
    ranks = split_sources(expand_inputs([str(src)]), 2)
    assert [s.path for s in ranks[0]] == [
        str(src / "a.jsonl"),
        str(src / "b.jsonl.gz"),
    ]  # a and c: other ranks
    ref = tmp / "ref"
    run_build(
        "--input",
        str(src),
        "--output",
        str(ref),
        "--workers",
        "1",
        "--val-fraction",
        "0.1",
        "--shard-tokens",
        "20000",
    )
    return src, ref


def _removed(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]


def test_reference_finds_cross_file_duplicates(corpus):
    src, ref = corpus
    removed = {r["id"]: r for r in _removed(ref)}
    n_c = len(chunk_documents(shared_text("grimm_tales.txt"), words=300)[2::3])
    found = 0
    for k in range(
        16
    ):  # copy k of c.jsonl (exact for k < 8, near after) duplicates a.jsonl:k if that is kept
        original, copy = f"{src / 'a.jsonl'}:{k}", f"{src / 'c.jsonl'}:{n_c + k}"
        if original in removed:
            continue
        assert removed[copy]["reason"] == ("exact_duplicate" if k < 8 else "near_duplicate")
        assert removed[copy]["duplicate_of"] == original
        found += 1
    assert found >= 12
    assert len(json.loads((ref / "manifest.json").read_text())["splits"]["train"]["shards"]) > 2


def test_workers_2_same_bytes(corpus, tmp_path):
    src, ref = corpus
    run_build(
        "--input",
        str(src),
        "--output",
        str(tmp_path / "w2"),
        "--workers",
        "2",
        "--val-fraction",
        "0.1",
        "--shard-tokens",
        "20000",
    )
    assert output_bytes(tmp_path / "w2") == output_bytes(ref)


def test_mpirun_2_ranks_same_bytes(corpus, tmp_path):
    src, ref = corpus
    assert MPIRUN, "mpirun not found (pip install mpich)"
    proc = run_build(
        "--input",
        str(src),
        "--output",
        str(tmp_path / "mpi"),
        "--workers",
        "1",
        "--val-fraction",
        "0.1",
        "--shard-tokens",
        "20000",
        launcher=[MPIRUN, "-n", "2"],
    )
    assert "[rank 1]" in proc.stderr and "rank 1/2" in proc.stderr
    assert output_bytes(tmp_path / "mpi") == output_bytes(ref)


def test_slurm_script_runs_the_build_under_srun(corpus, tmp_path):
    """slurm/build_data.sh with a stand-in `srun` that launches its tasks through mpirun, as srun would."""
    src, ref = corpus
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "srun"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'echo "srun $*" >> "$SRUN_LOG"\n'
        'while [[ "$1" == --* ]]; do shift; done\n'
        f'exec {MPIRUN} -n "$SLURM_NTASKS" "$@"\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "slurm"
    env = subprocess_env(
        PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}",
        SLURM_NTASKS="2",
        SLURM_CPUS_PER_TASK="1",
        SLURM_SUBMIT_DIR=str(ROOT),
        PYTHON=sys.executable,
        SRUN_LOG=str(tmp_path / "srun.log"),
        INPUT=str(src),
        OUTPUT=str(out),
        BUILD_ARGS="--val-fraction 0.1 --shard-tokens 20000",
    )
    import subprocess

    proc = subprocess.run(
        ["bash", str(ROOT / "slurm" / "build_data.sh"), "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "srun.log").read_text()
    assert "--mpi=pmi2" in log and "--workers 1 --input" in log and log.rstrip().endswith("--no-progress")
    assert output_bytes(out) == output_bytes(ref)
