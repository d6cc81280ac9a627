"""Shared pieces of the trainer tests: a small real-text dataset, a tiny model config, running
`launch/train.py` as a real process, reading metrics.jsonl."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gptforge.data.format import Manifest, ShardInfo, SplitInfo, file_sha256, write_index, write_manifest
from gptforge.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TRAIN = str(ROOT / "launch" / "train.py")

# A model small enough for seconds per run: ~60k parameters with a 256-token vocabulary.
TINY = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.d_model=32",
    "model.context_length=32",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "train.log_interval=1",
    "train.eval_interval=4",
    "train.eval_iters=2",
    "train.save_interval=4",
    "train.sample_interval=0",
    "optim.warmup_steps=2",
    "optim.lr=3e-3",
    "optim.min_lr=3e-4",
    "run.tensorboard=false",
]

# A Llama-style tiny model: rope + rmsnorm + swiglu, 4 query heads sharing 2 key/value heads, no biases.
TINY_LLAMA = [
    "model.n_head=4",
    "model.n_kv_head=2",
    "model.position_embedding=rope",
    "model.norm=rmsnorm",
    "model.mlp=swiglu",
    "model.ffn_hidden=96",
    "model.bias=false",
]


def write_build(
    out: Path,
    splits: dict[str, Sequence[np.ndarray]],
    tokenizer: dict,
    dtype: str = "uint16",
    shard_docs: int = 0,
) -> Manifest:
    """A build output directory as data_pipeline/build.py writes it: documents (token arrays, eot
    included) per split, `shard_docs` documents per shard (0 = one shard per split)."""
    out.mkdir(parents=True, exist_ok=True)
    infos = {}
    for split, docs in splits.items():
        groups = [docs[i : i + shard_docs] for i in range(0, len(docs), shard_docs)] if shard_docs else [docs]
        shards = []
        for k, group in enumerate(groups):
            stem = f"{split}_{k:05d}"
            tokens = np.concatenate(group).astype(dtype) if len(group) else np.zeros(0, dtype)
            (out / f"{stem}.bin").write_bytes(tokens.astype(np.dtype(dtype).newbyteorder("<")).tobytes())
            lengths = np.array([len(d) for d in group], dtype=np.int32)
            write_index(out / f"{stem}.idx", lengths, dtype if dtype != "uint32" else "int32")
            shards.append(
                ShardInfo(
                    f"{stem}.bin",
                    f"{stem}.idx",
                    int(len(tokens)),
                    len(group),
                    file_sha256(out / f"{stem}.bin"),
                )
            )
        infos[split] = SplitInfo(sum(s.tokens for s in shards), len(docs), shards)
    manifest = Manifest(root=out, tokenizer=tokenizer, dtype=dtype, splits=infos, stats={}, config={})
    write_manifest(manifest)
    return manifest


def text_build(
    out: Path, tok: Tokenizer, text: str, doc_chars: int = 2000, val_every: int = 10, **kw
) -> Manifest:
    """Cut `text` into documents, tokenize (eot after each), every `val_every`-th document to val."""
    docs = [text[i : i + doc_chars] for i in range(0, len(text), doc_chars)]
    ids = [np.array(tok.encode(d) + [tok.eot_id]) for d in docs]
    splits = {"train": [d for i, d in enumerate(ids) if i % val_every], "val": ids[::val_every]}
    return write_build(out, splits, tok.describe(), **kw)


def train_cmd(
    config: Path | str, *overrides: str, resume: str | None = None, nproc: int = 1, torchrun: bool = False
) -> list[str]:
    import sys

    launcher = (
        [sys.executable]
        if nproc == 1 and not torchrun
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
        ]
    )
    cmd = [*launcher, TRAIN, "--config", str(config), *overrides]
    if resume is not None:
        cmd += ["--resume", resume]
    return cmd


def run(cmd: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    from conftest import subprocess_env

    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=subprocess_env(), cwd=ROOT, **kw
    )


def metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training lines, eval lines) of a run's metrics.jsonl."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "val_loss" in r]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir)[0]}


def sentencepiece_data(out: Path, vocab_size: int = 384, chars: int = 300_000) -> Path:
    """A build output of real text (tinyshakespeare) with a small SentencePiece vocabulary, so a tiny
    model's loss falls within a few steps and samples decode."""
    from gptforge.tokenizer import get_tokenizer, train_sentencepiece

    out.mkdir(parents=True, exist_ok=True)
    text = (SHARED / "corpora" / "tinyshakespeare.txt").read_text()[:chars]
    (out / "sp.txt").write_text(text)
    model = train_sentencepiece([out / "sp.txt"], out / "sp", vocab_size=vocab_size)
    text_build(out / "data", get_tokenizer(f"sentencepiece:{model}"), text)
    return out / "data"


def write_config(path: Path, data: Path, run_dir: Path, *extra: str) -> Path:
    """configs/tiny.yaml shrunk to TINY, pointed at `data` and `run_dir` (plus `extra` section.key=value)."""
    import yaml

    values: dict = {"base": str(ROOT / "configs" / "tiny.yaml")}
    for item in [*TINY, f"data.path={data}", f"run.dir={run_dir}", *extra]:
        key, _, value = item.partition("=")
        section, name = key.split(".")
        values.setdefault(section, {})[name] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(values))
    return path
