"""Corpus build benchmark: our pipeline beside raw tiktoken and datatrove's MinHash dedup, same run, same cores.

    python bench/build.py [--mb 50] [--reps 2] [--workers 2] [--keep DIR]

Makes a >= 50 MB JSONL corpus in a temporary directory from the shared texts: documents are pieces of
tinyshakespeare / Grimm with 35% of their words replaced at random (so repeats of the same piece are distinct,
5-gram Jaccard ~0.01), then exact copies and near copies (1-4 word edits, 5-gram Jaccard >= 0.9, checked)
of random earlier documents are planted. Documents our default filters would drop are left out, so both
deduplicators see the same candidates. Then, interleaved over --reps repetitions:

- raw tiktoken `encode_ordinary_batch` over every document's text (`--workers` threads);
- our end-to-end build (`--workers` processes/threads), with per-stage rates from its counters;
- our near-dedup stage alone in one process (signatures + LSH + components) and datasketch's own
  `MinHash.update_batch` hashing (sha1 per shingle) on a sample, to show why hashing is vectorized;
- datatrove's MinHash pipeline (signature -> buckets -> cluster -> filter) in one process, with the same
  shingles (5 words), bands and rows as ours, and a whitespace word tokenizer (faster than its default spaCy
  one, so the comparison is conservative).

Precision/recall of both against the planted duplicates. Prints a markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CORPORA = ROOT.parent / "shared" / "corpora"

from data_pipeline import BuildOptions, BuildResult, run_build  # noqa: E402
from data_pipeline.base import Doc, StepStats  # noqa: E402
from data_pipeline.dedup_minhash import MinHasher, lsh_params, near_groups  # noqa: E402
from data_pipeline.filters import build_filters, load_filter_config  # noqa: E402
from data_pipeline.textfeatures import shingle_hashes  # noqa: E402
from gptforge.tokenizer import get_tokenizer  # noqa: E402

_WORD = re.compile(r"[^\s!-/:-@\[-`{-~]+")


def shingles(text: str, n: int = 5) -> set:
    words = _WORD.findall(text.lower())
    return {tuple(words[i : i + n]) for i in range(max(len(words) - n + 1, 1))}


def pieces(words_per_doc: int = 700) -> list[str]:
    out = []
    for name in ("tinyshakespeare.txt", "grimm_tales.txt"):
        text = (CORPORA / name).read_text(encoding="utf-8").lstrip("\ufeff").replace("\r\n", "\n")
        cur, count = [], 0
        for line in text.split("\n"):
            cur.append(line)
            count += len(line.split())
            if count >= words_per_doc:
                out.append("\n".join(cur).strip() + "\n")
                cur, count = [], 0
    return out


def make_corpus(out: Path, mb: float, seed: int = 0) -> dict:
    """Write `files` JSONL files to `out`; return the planted duplicates {copy id: original id, kind}."""
    rng = np.random.default_rng(seed)
    prng = random.Random(seed)
    base = [np.array(p.split(" "), dtype=object) for p in pieces()]
    vocab = np.array(sorted({w for p in base for w in p if w.isalpha() and len(w) > 3}), dtype=object)
    filters = build_filters(load_filter_config("default"))

    def passes(text: str) -> bool:
        d = Doc("b", 0, 0, "str", None, len(text))
        d.text = text
        return all(f(d) for f in filters)

    docs: list[tuple[str, str]] = []  # (id, text) in global order
    planted: dict[str, tuple[str, str]] = {}
    size, k = 0, 0
    while size < mb * 1e6:
        words = base[k % len(base)]
        mask = rng.random(len(words)) < 0.35
        text = " ".join(np.where(mask, vocab[rng.integers(len(vocab), size=len(words))], words))
        k += 1
        if not passes(text):
            continue
        docs.append((f"doc{k}", text))
        size += len(text.encode())
        r = prng.random()
        if r < 0.16 and len(docs) > 10:  # plant a copy of a random earlier document, later in the order
            src_id, src = docs[prng.randrange(len(docs) - 1)]
            if r < 0.08:
                copy, kind = src, "exact"
            else:
                for _ in range(10):
                    ws = src.split(" ")
                    for _ in range(prng.randint(1, 4)):
                        i = prng.randrange(1, len(ws) - 1)
                        op = prng.random()
                        if op < 0.4:
                            ws[i] = str(vocab[prng.randrange(len(vocab))])
                        elif op < 0.7:
                            ws.insert(i, str(vocab[prng.randrange(len(vocab))]))
                        else:
                            del ws[i]
                    copy = " ".join(ws)
                    a, b = shingles(src), shingles(copy)
                    if len(a & b) / len(a | b) >= 0.9 and passes(copy):
                        break
                else:
                    continue
                kind = "near"
            docs.append((f"dup{k}", copy))
            planted[f"dup{k}"] = (src_id, kind)
            size += len(copy.encode())
    files = 16
    per = -(-len(docs) // files)
    for f in range(files):
        with open(out / f"part-{f:03d}.jsonl", "w", encoding="utf-8") as fh:
            for doc_id, text in docs[f * per : (f + 1) * per]:
                fh.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
    return planted


def load_texts(corpus: Path) -> tuple[list[str], list[str]]:
    ids, texts = [], []
    for path in sorted(corpus.glob("*.jsonl")):
        for line in path.open(encoding="utf-8"):
            rec = json.loads(line)
            ids.append(rec["id"])
            texts.append(rec["text"])
    return ids, texts


def precision_recall(predicted: set[str], planted: dict, kinds: tuple[str, ...]) -> tuple[float, float]:
    truth = {k for k, (_, kind) in planted.items() if kind in kinds}
    pred = (
        predicted
        if len(kinds) == 2
        else predicted - {k for k, (_, kind) in planted.items() if kind not in kinds}
    )
    tp = len(pred & truth)
    return (tp / len(pred) if pred else 1.0), (tp / len(truth) if truth else 1.0)


# ---------------------------------------------------------------------------------------------- runs


def run_tiktoken(texts: list[str], threads: int) -> float:
    enc = get_tokenizer("gpt2")._enc  # the tiktoken Encoding itself
    t0 = time.perf_counter()
    enc.encode_ordinary_batch(texts, num_threads=threads)
    return time.perf_counter() - t0


def run_ours(corpus: Path, out: Path, workers: int):
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    result = run_build(BuildOptions(inputs=[str(corpus)], output=str(out), workers=workers, progress=False))
    return time.perf_counter() - t0, result


def run_our_near_dedup(texts: list[str]) -> tuple[float, int]:
    hasher = MinHasher()
    t0 = time.perf_counter()
    sigs = np.stack([hasher.signature(t) for t in texts])
    removed = sum(j >= 0 for j in near_groups(sigs))
    return time.perf_counter() - t0, removed


def run_datasketch_hashing(texts: list[str]) -> tuple[float, float]:
    """datasketch's per-shingle update_batch (sha1 of each shingle) vs our vectorized signature."""
    from datasketch import MinHash

    sample = texts[:200]
    t0 = time.perf_counter()
    for t in sample:
        words = _WORD.findall(t.lower())
        m = MinHash(num_perm=128, seed=1)
        m.update_batch([" ".join(words[i : i + 5]).encode() for i in range(max(len(words) - 4, 1))])
    slow = time.perf_counter() - t0
    hasher = MinHasher()
    t0 = time.perf_counter()
    for t in sample:
        hasher.signature_of_shingles(shingle_hashes(t.lower().encode(), 5))
    return slow, time.perf_counter() - t0


DATATROVE_SCRIPT = r"""
import glob, json, sys, time
from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
    MinhashDedupFilter, MinhashDedupSignature)
from datatrove.utils.word_tokenizers import WordTokenizer
import datatrove.utils.hashes.xxhash as dt_xxhash
import xxhash

# datatrove's default shingle hash (xxhash64) passes str, which xxhash >= 3.5 refuses: encode first, as older
# xxhash versions did internally.
dt_xxhash.xxhash64 = lambda data: xxhash.xxh64_intdigest(data.encode("utf-8"))

class Whitespace(WordTokenizer):
    def word_tokenize(self, text): return text.split()
    def sent_tokenize(self, text): return text.split("\n")
    def span_tokenize(self, text): return []

corpus, work, bands, rows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def read(data, rank=0, world_size=1):  # JsonlReader needs orjson; this is the same records, in order
    for path in sorted(glob.glob(f"{corpus}/*.jsonl")):
        for line in open(path, encoding="utf-8"):
            rec = json.loads(line)
            yield Document(text=rec["text"], id=rec["id"])

def keep(data, rank=0, world_size=1):
    with open(f"{work}/kept.txt", "w") as f:
        for doc in data:
            f.write(doc.id + "\n")
    yield from ()

cfg = MinhashConfig(n_grams=5, num_buckets=bands, hashes_per_bucket=rows)
def ex(pipeline, name, tasks=1):  # one process throughout (workers=1); the bucket stage is one task per band
    return LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=f"{work}/logs/{name}",
                                 start_method="fork")
t0 = time.perf_counter()
ex([read, MinhashDedupSignature(f"{work}/sigs", config=cfg, language=Whitespace())], "sig").run()
t1 = time.perf_counter()
ex([MinhashDedupBuckets(f"{work}/sigs", f"{work}/buckets", config=cfg)], "buckets", tasks=bands).run()
ex([MinhashDedupCluster(f"{work}/buckets", f"{work}/remove", config=cfg)], "cluster").run()
ex([read, MinhashDedupFilter(f"{work}/remove"), keep], "filter").run()
t2 = time.perf_counter()
print(json.dumps({"signature": t1 - t0, "total": t2 - t0}))
"""


def run_datatrove(
    corpus: Path, work: Path, bands: int, rows: int, ids: list[str]
) -> tuple[float, float, set[str]]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    script = work.parent / "datatrove_minhash.py"
    script.write_text(DATATROVE_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(corpus), str(work), str(bands), str(rows)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"datatrove failed:\n{proc.stderr[-3000:]}")
    times = json.loads(proc.stdout.strip().splitlines()[-1])
    kept = set((work / "kept.txt").read_text().split())
    return times["signature"], times["total"], set(ids) - kept


def parse_args() -> argparse.Namespace:
    """The command line: corpus size, repetitions, workers, and where to keep the corpus."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=50.0)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", help="make the corpus here and keep it (default: a temporary directory)")
    return ap.parse_args()


def run_interleaved(
    args: argparse.Namespace, corpus: Path, tmp: Path, ids: list[str], texts: list[str], bands: int, rows: int
) -> tuple[dict[str, list[float]], BuildResult | None, set[str] | None]:
    """Time every contender once per repetition, in turn, so each repetition shares the load of its moment.

    Returns the times per contender, our last build's result and the ids datatrove removed in its last run.
    """
    times: dict[str, list[float]] = {
        k: [] for k in ("tiktoken", "ours", "near", "dt_total", "dt_sig", "ds", "vec")
    }
    result = dt_removed = None
    for rep in range(args.reps):
        times["tiktoken"].append(run_tiktoken(texts, args.workers))
        wall, result = run_ours(corpus, tmp / "out", args.workers)
        times["ours"].append(wall)
        near_s, _ = run_our_near_dedup(texts)
        times["near"].append(near_s)
        sig_s, total_s, dt_removed = run_datatrove(corpus, tmp / "datatrove", bands, rows, ids)
        times["dt_sig"].append(sig_s)
        times["dt_total"].append(total_s)
        slow, fast = run_datasketch_hashing(texts)
        times["ds"].append(slow)
        times["vec"].append(fast)
        print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    return times, result, dt_removed


def dedup_precision_recall(out: Path, planted: dict, dt_removed: set[str]) -> dict[str, tuple[float, float]]:
    """Precision/recall of our build's duplicate removals (from `removed.jsonl`) and datatrove's, all and near."""
    ours_removed = {
        json.loads(line)["id"]
        for line in (out / "removed.jsonl").read_text().splitlines()
        if json.loads(line)["reason"] in ("exact_duplicate", "near_duplicate")
    }
    return {
        "ours": precision_recall(ours_removed, planted, ("exact", "near")),
        "ours_near": precision_recall(ours_removed, planted, ("near",)),
        "datatrove": precision_recall(dt_removed, planted, ("exact", "near")),
        "datatrove_near": precision_recall(dt_removed, planted, ("near",)),
    }


def cpu_model() -> str:
    """The CPU's model name as lscpu reports it, for the report's machine line ("unknown" without lscpu)."""
    cpu = "unknown"
    with contextlib.suppress(StopIteration, OSError):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith("Model name")
        )
    return cpu


def comparison_lines(
    args: argparse.Namespace,
    cpu: str,
    mb: float,
    n_docs: int,
    n_exact: int,
    n_near: int,
    times: dict[str, list[float]],
    pr: dict[str, tuple[float, float]],
) -> list[str]:
    """The report's machine line and the markdown table comparing us with the peers, for bench/RESULTS.md."""
    # Interleaved repetitions share the machine's load of the moment: compare within each repetition and take
    # the median over repetitions (times are medians too).
    med = {k: float(np.median(v)) for k, v in times.items()}

    def paired(peer: str, ours: str) -> float:
        return float(np.median([p / o for p, o in zip(times[peer], times[ours], strict=True)]))

    def rate(seconds: float) -> float:
        return mb / seconds

    return [
        f"Machine: {cpu}, {args.workers} workers, Python {platform.python_version()}; "
        f"{datetime.date.today().isoformat()}; corpus {mb:.1f} MB, {n_docs} documents "
        f"({n_exact} exact + {n_near} near copies planted); medians of {args.reps} interleaved "
        "repetitions (ratios: median of the per-repetition ratios).",
        "",
        "| measurement | ours | peer | ratio (ours / peer) |",
        "| --- | --- | --- | --- |",
        f"| end to end vs raw tiktoken `encode_ordinary_batch` ({args.workers} threads), MB/s | "
        f"{rate(med['ours']):.1f} | {rate(med['tiktoken']):.1f} | {paired('tiktoken', 'ours'):.2f} |",
        f"| near dedup, 1 process (ours: signatures + LSH + connected components; datatrove: signature, buckets, cluster, "
        f"filter), MB/s | {rate(med['near']):.1f} | {rate(med['dt_total']):.1f} | "
        f"{paired('dt_total', 'near'):.2f} |",
        f"| MinHash signatures only, 1 process, MB/s | {rate(med['near']):.1f} (incl. LSH) | "
        f"{rate(med['dt_sig']):.1f} | {paired('dt_sig', 'near'):.2f} |",
        f"| shingle hashing: our numpy path vs datasketch `update_batch` (sha1), 200 docs | {med['vec']:.2f} s | "
        f"{med['ds']:.2f} s | {paired('ds', 'vec'):.1f}x faster |",
        f"| precision / recall, all planted duplicates | {pr['ours'][0]:.3f} / {pr['ours'][1]:.3f} | "
        f"{pr['datatrove'][0]:.3f} / {pr['datatrove'][1]:.3f} | |",
        f"| precision / recall, near copies only | {pr['ours_near'][0]:.3f} / {pr['ours_near'][1]:.3f} | "
        f"{pr['datatrove_near'][0]:.3f} / {pr['datatrove_near'][1]:.3f} | |",
        "",
        "Per repetition (interleaved), end to end / raw tiktoken: "
        + ", ".join(f"{t / o:.2f}" for t, o in zip(times["tiktoken"], times["ours"], strict=True))
        + "; near dedup ours / datatrove: "
        + ", ".join(f"{d / n:.1f}" for d, n in zip(times["dt_total"], times["near"], strict=True))
        + ".",
    ]


def stage_lines(stages: dict[str, StepStats]) -> list[str]:
    """The markdown table of our build's per-stage input, seconds and rate, from its counters."""
    lines = [
        "Our stages in the last end-to-end run (seconds summed over processes, so MB/s is per process):",
        "",
        "| stage | MB in | seconds | MB/s |",
        "| --- | --- | --- | --- |",
    ]
    for name, st in stages.items():
        r = st.bytes_in / 1e6 / st.seconds if st.seconds > 0 else float("inf")
        lines.append(f"| {name} | {st.bytes_in / 1e6:.1f} | {st.seconds:.2f} | {r:.1f} |")
    return lines


def main() -> None:
    args = parse_args()
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gptforge-bench-build-"))
    corpus = tmp / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    planted = make_corpus(corpus, args.mb)
    ids, texts = load_texts(corpus)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    n_exact = sum(kind == "exact" for _, kind in planted.values())
    print(
        f"corpus: {len(texts)} documents, {mb:.1f} MB, {n_exact} exact + {len(planted) - n_exact} near "
        f"copies planted ({time.perf_counter() - t0:.0f} s to make)",
        flush=True,
    )
    bands, rows = lsh_params(0.8, 128)
    times, result, dt_removed = run_interleaved(args, corpus, tmp, ids, texts, bands, rows)
    pr = dedup_precision_recall(tmp / "out", planted, dt_removed)
    stages = result.stats
    cpu = cpu_model()
    lines = comparison_lines(args, cpu, mb, len(texts), n_exact, len(planted) - n_exact, times, pr)
    lines += ["", *stage_lines(stages)]
    print("\n".join(lines))
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
