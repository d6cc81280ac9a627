"""The on-disk token format, in one place: `data_pipeline` writes through it, the trainer reads through it.

A build output directory holds `manifest.json` and shards. Each shard is a `.bin` of little-endian token ids
(every document's tokens followed by the end-of-text id) and a `.idx` in Megatron-LM's indexed-dataset
layout (`MMIDIDX`, version 1), so Megatron-LM and GPT-NeoX read our shards too:

    9 bytes   b"MMIDIDX\\x00\\x00"
    <Q        version = 1
    <B        dtype code (8 = uint16, 4 = int32, ...; Megatron's DType enum)
    <Q        sequence count S
    <Q        document count D (= S + 1: the document boundaries, starting at 0)
    int32[S]  sequence lengths (tokens, eot included)
    int64[S]  sequence pointers (byte offsets into .bin)
    int64[D]  document indices (0, 1, ..., S)
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gptforge.errors import DataError

FORMAT_NAME = "gptforge-tokens"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# Megatron-LM's DType codes (megatron/core/datasets/indexed_dataset.py).
DTYPE_CODES: dict[str, int] = {
    "uint8": 1,
    "int8": 2,
    "int16": 3,
    "int32": 4,
    "int64": 5,
    "float64": 6,
    "float32": 7,
    "uint16": 8,
}
CODE_DTYPES = {code: name for name, code in DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> str:
    """uint16 while the vocabulary fits, else int32 (MMIDIDX has no uint32 code), as Megatron does."""
    return "uint16" if vocab_size <= 65536 else "int32"


# ---------------------------------------------------------------------------------------------- index


def write_index(path: str | Path, lengths: np.ndarray, dtype: str) -> None:
    """Write a `.idx` for documents of `lengths` tokens stored back to back in `dtype`."""
    lengths = np.asarray(lengths, dtype=np.int32)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    doc_idx = np.arange(len(lengths) + 1, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(INDEX_MAGIC)
        f.write(struct.pack("<Q", INDEX_VERSION))
        f.write(struct.pack("<B", DTYPE_CODES[dtype]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(doc_idx.tobytes(order="C"))


@dataclass
class ShardIndex:
    """A parsed `.idx`: per-document lengths and byte offsets."""

    dtype: str
    lengths: np.ndarray
    pointers: np.ndarray
    doc_idx: np.ndarray


def read_index(path: str | Path) -> ShardIndex:
    path = Path(path)
    try:
        buf = path.read_bytes()
    except FileNotFoundError:
        raise DataError(
            f"index file missing: {path} (rebuild the data with data_pipeline/build.py)"
        ) from None
    head = len(INDEX_MAGIC) + 8 + 1 + 8 + 8
    if len(buf) < head or buf[: len(INDEX_MAGIC)] != INDEX_MAGIC:
        raise DataError(f"{path}: not a Megatron MMIDIDX index (bad header); rebuild the data")
    off = len(INDEX_MAGIC)
    (version,) = struct.unpack_from("<Q", buf, off)
    (code,) = struct.unpack_from("<B", buf, off + 8)
    seq_count, doc_count = struct.unpack_from("<QQ", buf, off + 9)
    if version != INDEX_VERSION or code not in CODE_DTYPES:
        raise DataError(f"{path}: unsupported index version {version} / dtype code {code}")
    need = head + seq_count * 4 + seq_count * 8 + doc_count * 8
    if len(buf) != need:
        raise DataError(f"{path}: index is {len(buf)} bytes, expected {need} (truncated or corrupt); rebuild")
    lengths = np.frombuffer(buf, np.int32, seq_count, head)
    pointers = np.frombuffer(buf, np.int64, seq_count, head + seq_count * 4)
    doc_idx = np.frombuffer(buf, np.int64, doc_count, head + seq_count * 12)
    return ShardIndex(CODE_DTYPES[code], lengths, pointers, doc_idx)


# ---------------------------------------------------------------------------------------------- manifest


@dataclass
class ShardInfo:
    bin: str
    idx: str
    tokens: int
    documents: int
    sha256: str


@dataclass
class SplitInfo:
    tokens: int = 0
    documents: int = 0
    shards: list[ShardInfo] = field(default_factory=list)


@dataclass
class Manifest:
    """`manifest.json` of a build output (CONTRACTS §2). Shard paths are relative to `root`."""

    root: Path
    tokenizer: dict[str, Any]
    dtype: str
    splits: dict[str, SplitInfo]
    stats: dict[str, Any]
    config: dict[str, Any]
    sha256: str = ""  # of the manifest file itself: identifies the dataset in checkpoints

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "tokenizer": self.tokenizer,
            "dtype": self.dtype,
            "splits": {
                name: {
                    "tokens": s.tokens,
                    "documents": s.documents,
                    "shards": [vars(sh) for sh in s.shards],
                }
                for name, s in self.splits.items()
            },
            "stats": self.stats,
            "config": self.config,
        }


def write_manifest(manifest: Manifest) -> Path:
    """Write `manifest.json` atomically (temp file + rename): a build is complete iff its manifest exists."""
    path = manifest.root / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    text = json.dumps(manifest.to_json(), indent=2, sort_keys=False) + "\n"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    manifest.sha256 = hashlib.sha256(text.encode()).hexdigest()
    return path


def read_manifest(root: str | Path) -> Manifest:
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        hint = "" if root.is_dir() else " (the directory does not exist)"
        raise DataError(
            f"no {MANIFEST} in {root}{hint}: build the data first with "
            f"`python data_pipeline/build.py --input ... --output {root}`"
        )
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); rebuild the data") from None
    if data.get("format") != FORMAT_NAME or data.get("version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: format {data.get('format')!r} version {data.get('version')!r} is not "
            f"{FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    try:
        splits = {
            name: SplitInfo(s["tokens"], s["documents"], [ShardInfo(**sh) for sh in s["shards"]])
            for name, s in data["splits"].items()
        }
        return Manifest(
            root=root,
            tokenizer=data["tokenizer"],
            dtype=data["dtype"],
            splits=splits,
            stats=data.get("stats", {}),
            config=data.get("config", {}),
            sha256=hashlib.sha256(raw).hexdigest(),
        )
    except (KeyError, TypeError) as exc:
        raise DataError(
            f"{path}: malformed manifest (missing or bad field {exc}); rebuild the data"
        ) from None


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def open_shard(root: Path, shard: ShardInfo, dtype: str) -> np.ndarray:
    """Memory-map a shard's tokens, checking its size against the manifest (a truncated shard is an error)."""
    path = root / shard.bin
    if not path.is_file():
        raise DataError(f"shard missing: {path} (listed in {root / MANIFEST}); rebuild the data")
    itemsize = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size != shard.tokens * itemsize:
        raise DataError(
            f"shard {path} is {size} bytes, the manifest says {shard.tokens} tokens x {itemsize} bytes "
            f"= {shard.tokens * itemsize}: truncated or corrupt; rebuild the data"
        )
    if size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")


def verify_shard(root: Path, shard: ShardInfo) -> None:
    """sha256 of a shard against the manifest."""
    digest = file_sha256(root / shard.bin)
    if digest != shard.sha256:
        raise DataError(
            f"shard {root / shard.bin} is corrupt: sha256 {digest[:16]}..., manifest says {shard.sha256[:16]}...; "
            "rebuild the data"
        )
