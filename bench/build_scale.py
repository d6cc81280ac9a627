"""Weak scaling of the corpus build under real `mpirun`: the corpus grows with the ranks.

    python bench/build_scale.py [--ranks 1,2,4,8] [--docs-per-rank 50000] [--no-resume] [--keep DIR]

For R ranks: R JSONL files of `--docs-per-rank` distinct documents each (runs of the shared texts' words, 30%
replaced at random: 5-gram Jaccard ~0.01 between any two), plus planted copies of random documents of *other*
files (2.5% exact, 2.5% near: one word changed), so duplicates cross ranks. Each build runs
`mpirun -n R data_pipeline/build.py --workers 1 --filters none` (one process per rank, so a rank's CPU time is
all its own; the filters are measured per MB by bench/build.py). From every rank's last log lines: peak RSS,
bytes sent to other ranks (MPI buffers) and signature bytes read from other ranks' files, CPU seconds per
stage. Also (1 rank): a build killed at ~80% of its scan and re-run, against a full build. Prints markdown for
bench/RESULTS.md and the per-document costs the extrapolation there uses.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT.parent / "shared" / "corpora"
MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or "mpirun"
RANK_LINE = re.compile(
    r"rank (\d+): peak RSS ([\d.]+) MB \(per stage[^)]*\), sent ([\d.]+) MB to other ranks, CPU s (.*)"
)
NEAR_LINE = re.compile(r"rank (\d+): near dedup: .* ([\d.]+) MB of signatures read from other ranks")


def make_corpus(out: Path, ranks: int, per_rank: int, words: int = 60, seed: int = 0) -> int:
    """`ranks` files; returns the number of documents."""
    rng = np.random.default_rng(seed)
    vocab = np.array(
        " ".join(
            (CORPORA / n).read_text(encoding="utf-8") for n in ("grimm_tales.txt", "tinyshakespeare.txt")
        ).split(),
        dtype=object,
    )
    files = []
    for _ in range(ranks):
        docs = []
        for _ in range(per_rank):
            k = int(rng.integers(0, len(vocab) - words))
            w = vocab[k : k + words].copy()
            swap = rng.random(words) < 0.3
            w[swap] = vocab[rng.integers(0, len(vocab), int(swap.sum()))]
            docs.append(" ".join(w))
        files.append(docs)
    total = 0
    for r, docs in enumerate(files):
        planted = []
        for _ in range(per_rank // 40):
            other = files[int(rng.integers(0, ranks))]
            planted.append(other[int(rng.integers(0, per_rank))])
            w = other[int(rng.integers(0, per_rank))].split(" ")
            w[int(rng.integers(1, words - 1))] = "lantern"
            planted.append(" ".join(w))
        with open(out / f"part-{r:03d}.jsonl", "w") as f:
            for d in docs + planted:
                f.write(json.dumps({"text": d}) + "\n")
        total += len(docs) + len(planted)
    return total


def build_cmd(ranks: int, src: Path, out: Path) -> list[str]:
    launcher = [MPIRUN, "-n", str(ranks)] if ranks > 1 else []
    return [*launcher, sys.executable, str(ROOT / "data_pipeline" / "build.py"), "--input", str(src), "--output",
            str(out), "--workers", "1", "--filters", "none", "--no-progress"]  # fmt: skip


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(ranks: int, src: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(build_cmd(ranks, src, out), env=env(), capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr)
    per_rank = {}
    for m in RANK_LINE.finditer(proc.stderr):
        cpu = {k: float(v) for k, v in (kv.split("=") for kv in m.group(4).split())}
        per_rank[int(m.group(1))] = {"rss": float(m.group(2)), "sent": float(m.group(3)), "cpu": cpu}
    for m in NEAR_LINE.finditer(proc.stderr):
        per_rank[int(m.group(1))]["remote"] = float(m.group(2))
    manifest = json.loads((out / "manifest.json").read_text())
    return {"ranks": ranks, "wall": wall, "per_rank": per_rank, "stats": manifest["stats"]}


def resume_check(src: Path, tmp: Path) -> tuple[float, float, int, int]:
    """(full build s, re-run after a kill at ~80% of the scan s, committed batches, all batches)."""
    full = run(1, src, tmp / "full")
    batches = full["stats"]["input_documents"] / 2000
    out = tmp / "killed"
    proc = subprocess.Popen(build_cmd(1, src, out), env=env(), cwd=ROOT, stderr=subprocess.DEVNULL)
    commit = out / ".build" / "scan-00000.json"
    while proc.poll() is None:
        try:
            done = json.loads(commit.read_text())["batches"]
            if done >= 0.8 * batches:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    again = run(1, src, out)
    return full["wall"], again["wall"], done, int(np.ceil(batches))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="1,2,4,8")
    ap.add_argument("--docs-per-rank", type=int, default=50_000)
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--keep", type=Path)
    args = ap.parse_args()
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="build_scale_"))
    results = []
    for ranks in [int(r) for r in args.ranks.split(",")]:
        src = tmp / f"in{ranks}"
        src.mkdir(parents=True, exist_ok=True)
        docs = make_corpus(src, ranks, args.docs_per_rank)
        res = run(ranks, src, tmp / f"out{ranks}")
        res["docs"] = docs
        results.append(res)
        print(json.dumps({k: v for k, v in res.items() if k != "stats"}), flush=True)
    base_rss = results[0]["per_rank"][0]["rss"]
    print(
        "\n| ranks | documents | wall s | peak RSS per rank, MB (min-max) | rank 0 RSS / 1-rank | MPI bytes sent "
        "per doc | signature bytes read from other ranks per doc | CPU s per doc: scan+tokenize / exact / near "
        "/ decide / write (mean of ranks) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for res in results:
        pr = res["per_rank"]
        rss = [p["rss"] for p in pr.values()]
        sent = sum(p["sent"] for p in pr.values()) * 1e6 / res["docs"]
        remote = sum(p.get("remote", 0.0) for p in pr.values()) * 1e6 / res["docs"]
        per_doc = {}
        for stage in ("scan", "exact_dedup", "near_dedup", "decide", "write"):
            per_doc[stage] = sum(p["cpu"].get(stage, 0.0) for p in pr.values()) / res["docs"]
        cpu = " / ".join(f"{per_doc[s] * 1e6:.0f} µs" for s in per_doc)
        print(
            f"| {res['ranks']} | {res['docs']:,} | {res['wall']:.1f} | {min(rss):.0f}-{max(rss):.0f} | "
            f"{pr[0]['rss'] / base_rss:.2f} | {sent:.0f} | {remote:.0f} | {cpu} |"
        )
    if not args.no_resume:
        src = tmp / "in1"
        full, again, done, batches = resume_check(src, tmp / "resume")
        print(
            f"\nresume: full build {full:.1f} s; killed after {done}/{batches} committed scan batches, the re-run "
            f"took {again:.1f} s = {again / full:.0%} of a full build"
        )
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
