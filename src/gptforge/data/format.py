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
from pathlib import Path, PurePosixPath, PureWindowsPath
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
# What a manifest's `dtype` may be: unsigned 16 bits or 32 bits (int32 as Megatron writes it, uint32 as
# other tools do); anything else (floats, bogus names) is refused.
TOKEN_DTYPES = ("uint16", "int32", "uint32")


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
    """`manifest.json` of a build output (the format the README's "Corpus pipeline" section fixes). Shard
    paths are relative to `root`."""

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
    """`DIR/manifest.json`, every field checked: bad input is one `DataError` naming the file and field."""
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
    if (
        not isinstance(data, dict)
        or data.get("format") != FORMAT_NAME
        or data.get("version") != FORMAT_VERSION
    ):
        got = (
            data if not isinstance(data, dict) else f"{data.get('format')!r} version {data.get('version')!r}"
        )
        raise DataError(f"{path}: format {got} is not {FORMAT_NAME!r} version {FORMAT_VERSION}")
    return Manifest(
        root=root,
        tokenizer=_tokenizer_field(path, data.get("tokenizer")),
        dtype=_dtype_field(path, data.get("dtype")),
        splits=_splits_field(path, data.get("splits")),
        stats=data.get("stats", {}),
        config=data.get("config", {}),
        sha256=hashlib.sha256(raw).hexdigest(),
    )


def _bad(path: Path, what: str) -> DataError:
    return DataError(f"{path}: malformed manifest: {what}; rebuild the data with data_pipeline/build.py")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tokenizer_field(path: Path, tok: Any) -> dict[str, Any]:
    if not isinstance(tok, dict):
        raise _bad(path, f"'tokenizer' must be an object with name, vocab_size, eot_id, got {tok!r}")
    for key, ok in (
        ("name", isinstance(tok.get("name"), str)),
        ("vocab_size", _is_int(tok.get("vocab_size"))),
    ):
        if not ok:
            raise _bad(path, f"'tokenizer.{key}' is {tok.get(key)!r}")
    if not _is_int(tok.get("eot_id")) or tok["eot_id"] >= tok["vocab_size"]:
        raise _bad(path, f"'tokenizer.eot_id' is {tok.get('eot_id')!r} (vocab_size {tok['vocab_size']})")
    return tok


def _dtype_field(path: Path, dtype: Any) -> str:
    if dtype not in TOKEN_DTYPES:
        raise _bad(path, f"'dtype' is {dtype!r}; token ids are stored as one of {', '.join(TOKEN_DTYPES)}")
    return dtype


def _splits_field(path: Path, splits: Any) -> dict[str, SplitInfo]:
    if not isinstance(splits, dict) or not splits:
        raise _bad(path, f"'splits' must be an object of splits (e.g. {{\"train\": ...}}), got {splits!r}")
    out = {}
    for name, split in splits.items():
        where = f"splits.{name}"
        if not isinstance(split, dict) or not isinstance(split.get("shards"), list):
            raise _bad(path, f"'{where}' must be an object with a 'shards' list")
        for key in ("tokens", "documents"):
            if not _is_int(split.get(key)):
                raise _bad(path, f"'{where}.{key}' is {split.get(key)!r}")
        shards = [_shard_field(path, f"{where}.shards[{k}]", sh) for k, sh in enumerate(split["shards"])]
        out[name] = SplitInfo(split["tokens"], split["documents"], shards)
    return out


def _shard_field(path: Path, where: str, shard: Any) -> ShardInfo:
    keys = ("bin", "idx", "tokens", "documents", "sha256")
    if not isinstance(shard, dict) or not set(keys) <= set(shard):
        raise _bad(path, f"'{where}' must be an object with {', '.join(keys)}")
    for key in ("bin", "idx"):
        _inside(path, f"{where}.{key}", shard[key])
    for key in ("tokens", "documents"):
        if not _is_int(shard[key]):
            raise _bad(path, f"'{where}.{key}' is {shard[key]!r}")
    if not isinstance(shard["sha256"], str):
        raise _bad(path, f"'{where}.sha256' is {shard['sha256']!r}")
    return ShardInfo(*(shard[k] for k in keys))


def _inside(path: Path, where: str, rel: Any) -> None:
    """Shard paths are relative and stay inside the data directory: a manifest never points elsewhere."""
    parts = PurePosixPath(rel).parts if isinstance(rel, str) else ()
    if not parts or rel.startswith(("/", "\\")) or PureWindowsPath(rel).drive or ".." in parts:
        raise DataError(
            f"{path}: '{where}' is {rel!r}: shard paths must be relative to the data directory and stay "
            "inside it (no absolute paths, no '..'); rebuild the data with data_pipeline/build.py"
        )


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
