"""Small corpora for the corpus-pipeline tests, made from the shared texts (never committed)."""

from __future__ import annotations

import gzip
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "data_pipeline" / "build.py"
CORPORA = ROOT.parent / "shared" / "corpora"


def shared_text(name: str) -> str:
    """A shared corpus in the pipeline's normal form (no byte-order mark, "\n" line ends)."""
    return (CORPORA / name).read_text(encoding="utf-8").lstrip("\ufeff").replace("\r\n", "\n")


def chunk_documents(text: str, words: int = 400, limit: int | None = None) -> list[str]:
    """Consecutive pieces of about `words` words, cut at line ends (distinct literary documents)."""
    docs, cur, count = [], [], 0
    for line in text.split("\n"):
        cur.append(line)
        count += len(line.split())
        if count >= words:
            docs.append("\n".join(cur).strip("\n") + "\n")
            cur, count = [], 0
            if limit and len(docs) >= limit:
                break
    return docs


def shingle_set(text: str, n: int = 5) -> set[tuple[str, ...]]:
    """Word n-grams with the pipeline's word definition (lower-cased, split at ASCII whitespace/punctuation)."""
    words = [w for w in re.split(r"[\s!-/:-@\[-`{-~]+", text.lower()) if w]
    return {tuple(words[i : i + n]) for i in range(max(len(words) - n + 1, 1))}


def jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = shingle_set(a, n), shingle_set(b, n)
    return len(sa & sb) / len(sa | sb)


def near_copy(text: str, rng: random.Random, edits: int) -> str:
    """`edits` random word substitutions, insertions or deletions."""
    words = text.split(" ")
    for _ in range(edits):
        i = rng.randrange(1, len(words) - 1)
        op = rng.choice(("sub", "ins", "del"))
        if op == "sub":
            words[i] = rng.choice(("moon", "lantern", "copper", "meadow", "quill", "thunder"))
        elif op == "ins":
            words.insert(i, rng.choice(("verily", "anon", "forsooth", "alas")))
        else:
            del words[i]
    return " ".join(words)


def write_jsonl(path: Path, records: list[dict], compress: bool = False) -> Path:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return path


def run_build(
    *args: str,
    env: dict | None = None,
    check: bool = True,
    launcher: list[str] | None = None,
    timeout: int = 300,
) -> subprocess.CompletedProcess:
    from conftest import subprocess_env

    cmd = [*(launcher or []), sys.executable, str(BUILD), *args]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"build failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def output_bytes(out: Path) -> dict[str, bytes]:
    """Every output file's bytes; the manifest without its wall-clock seconds."""
    files = {}
    for path in sorted(out.iterdir()):
        data = path.read_bytes()
        if path.name == "manifest.json":
            manifest = json.loads(data)
            manifest["stats"].pop("seconds")
            data = json.dumps(manifest, sort_keys=True).encode()
        files[path.name] = data
    return files


# ---------------------------------------------------------------------------------------------- Megatron
# An independent reader of Megatron-LM's MMIDIDX index, written from its documented layout
# (megatron/core/datasets/indexed_dataset.py, _IndexWriter/_IndexReader), not from gptforge.data.format.

MEGATRON_DTYPES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}


def megatron_documents(prefix: Path) -> list[np.ndarray]:
    """The token arrays of every sequence in `prefix.idx` / `prefix.bin`."""
    idx = Path(f"{prefix}.idx").read_bytes()
    assert idx[:9] == b"MMIDIDX\x00\x00", "bad magic"
    version = int.from_bytes(idx[9:17], "little")
    assert version == 1
    dtype = MEGATRON_DTYPES[idx[17]]
    seq_count = int.from_bytes(idx[18:26], "little")
    doc_count = int.from_bytes(idx[26:34], "little")
    off = 34
    lengths = np.frombuffer(idx, np.int32, seq_count, off)
    off += lengths.nbytes
    pointers = np.frombuffer(idx, np.int64, seq_count, off)
    off += pointers.nbytes
    doc_idx = np.frombuffer(idx, np.int64, doc_count, off)
    off += doc_idx.nbytes
    assert off == len(idx)
    assert doc_idx[0] == 0 and doc_idx[-1] == seq_count
    data = np.fromfile(f"{prefix}.bin", dtype=np.dtype(dtype).newbyteorder("<"))
    itemsize = np.dtype(dtype).itemsize
    return [
        data[p // itemsize : p // itemsize + n]
        for p, n in zip(pointers.tolist(), lengths.tolist(), strict=True)
    ]


def synthetic_corpus(path: Path, documents: int, words: int = 50, seed: int = 0) -> Path:
    """`documents` distinct short documents (runs of the shared texts' words, 30% replaced at random) plus 5%
    exact and 5% near copies (one word changed) of random earlier ones, as one JSONL file."""
    rng = np.random.default_rng(seed)
    vocab = np.array(
        (shared_text("grimm_tales.txt") + shared_text("tinyshakespeare.txt")).split(), dtype=object
    )
    docs = []
    for _ in range(documents):
        k = int(rng.integers(0, len(vocab) - words))
        w = vocab[k : k + words].copy()
        swap = rng.random(words) < 0.3
        w[swap] = vocab[rng.integers(0, len(vocab), int(swap.sum()))]
        docs.append(" ".join(w))
    for _ in range(documents // 20):
        docs.append(docs[int(rng.integers(0, documents))])
        w = docs[int(rng.integers(0, documents))].split(" ")
        w[int(rng.integers(1, words - 1))] = "lantern"
        docs.append(" ".join(w))
    return write_jsonl(path, [{"text": d} for d in docs])
