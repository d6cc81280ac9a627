"""A training checkpoint on disk, and reading it: finding the latest one, its metadata, its tensors.

    RUN/checkpoints/latest                 the name of the last complete checkpoint (a name, nothing else)
    RUN/checkpoints/step_<N>/checkpoint.json  step, samples consumed, model shape, tokenizer, data manifest
                                           sha256, layout, the resolved config (what a resume checks)
                   step_<N>/index.json     every tensor's global shape and where its fragments are
                   step_<N>/rank_<R>.safetensors  rank R's fragments (1-D fp32), written by rank R only
                   step_<N>/rng_rank<R>.pt every rank's RNG states (weights_only-loadable)

A tensor is a serial GPT name under `model/` (the fp32 master weights), `exp_avg/` or `exp_avg_sq/`
(AdamW's moments). Each of its fragments is, in index.json:

    {"file": "rank_00003.safetensors", "offset": <byte offset of its data in that file>,
     "shard": [tp_rank, tp], "flat": [start, stop]}

= elements `start:stop` of `shard_tensor(name, tensor, tp_rank, tp).flatten()` (tp 1: the tensor itself;
tp > 1: that rank's tensor-parallel shard, vocabulary padding included). ZeRO's flat partitions are such
ranges, so every rank writes exactly what it holds. Reading takes any region of any shard: only the byte
ranges that overlap it are read (`Checkpoint.read`), so each rank of a new layout reads its own part.

This module is the format's one definition and only reads (and writes single fragment files); saving a
running engine's state is `gptforge.train.checkpoint`'s job. Older checkpoints (format version 1:
DeepSpeed's own files plus `universal/`) are still read for their weights.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gptforge.config import ModelConfig, config_from_dict
from gptforge.errors import CheckpointError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META_FILE = "checkpoint.json"
INDEX_FILE = "index.json"
FORMAT = "gptforge-checkpoint"
FORMAT_VERSION = 2
INDEX_FORMAT = "gptforge-checkpoint-index"
READS_VERSIONS = (1, 2)
WEIGHTS = "model/"
MOMENTS = ("exp_avg", "exp_avg_sq")
DTYPE = torch.float32
_STEP_DIR = re.compile(r"^step_(\d+)$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.safetensors"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


# ---------------------------------------------------------------------------------------------- finding


def step_of(path: Path) -> int:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else -1


def inside(base: Path, name: str, what: str) -> Path:
    """`base/name` for a plain file name read from checkpoint metadata; an absolute path, `..` or a
    separator is refused (a checkpoint must not make us read or write outside its directory)."""
    if not isinstance(name, str) or not _FILE_NAME.match(name) or name in (".", ".."):
        raise CheckpointError(
            f"{what} names {name!r}: expected a plain name inside {base} (no '/', '..' or absolute path); "
            "the file was edited or is not ours"
        )
    return base / name


def complete_checkpoints(root: Path) -> list[Path]:
    """`step_<N>` directories under `root`, oldest first (temporary `.tmp` ones are not checkpoints)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) >= 0), key=step_of)


def latest_in(root: Path) -> Path | None:
    """The checkpoint `root/latest` names; without a `latest` file (a crash between the rename and its
    update) the newest complete `step_<N>`; None if there is neither."""
    latest = root / LATEST
    if not latest.is_file():
        complete = [p for p in complete_checkpoints(root) if (p / META_FILE).is_file()]
        return complete[-1] if complete else None
    name = latest.read_text().strip()
    step_dir = inside(root, name, str(latest))
    if step_of(step_dir) < 0:
        raise CheckpointError(f"{latest} names {name!r}, which is not a step_<N> checkpoint name")
    if not (step_dir / META_FILE).is_file():
        moved = root / f"{name}.old"  # a crash while the same step was being saved again
        if (moved / META_FILE).is_file():
            return moved
        raise CheckpointError(f"{latest} names '{name}', but {step_dir} is not a complete checkpoint")
    return step_dir


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a step directory, a `checkpoints/` directory or a run directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if (path / META_FILE).is_file():
        return path
    for root in (path, path / CHECKPOINTS):
        step_dir = latest_in(root)
        if step_dir is not None:
            return step_dir
    raise CheckpointError(
        f"{path} is not a checkpoint: expected a step directory (with {META_FILE}), a run directory or its "
        f"{CHECKPOINTS}/ directory (with a '{LATEST}' file)"
    )


def read_meta(step_dir: Path) -> dict[str, Any]:
    path = step_dir / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{step_dir} is not a checkpoint ({META_FILE} missing)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} file")
    if meta.get("version") not in READS_VERSIONS:
        raise CheckpointError(
            f"{path}: checkpoint format version {meta.get('version')}, this gptforge reads "
            f"{', '.join(map(str, READS_VERSIONS))}"
        )
    for key in ("model", "tokenizer"):  # what every reader (generate, export, eval, resume) needs
        if not isinstance(meta.get(key), dict):
            raise CheckpointError(
                f"{path}: no '{key}' object; the file is damaged or was not written by gptforge's trainer: "
                "use another checkpoint of the run"
            )
    return meta


def model_config(step_dir: Path, meta: dict[str, Any]) -> ModelConfig:
    return config_from_dict({"model": meta["model"]}, source=str(step_dir / META_FILE)).model


# ---------------------------------------------------------------------------------------------- writing


def write_safetensors(
    path: Path, shapes: dict[str, tuple[int, ...]], tensors: Iterable[tuple[str, Tensor]]
) -> dict[str, int]:
    """Write fp32 CPU tensors as one safetensors file, one at a time as `tensors` yields them (in the order
    of `shapes`), straight from their memory (no second copy, unlike `safetensors.torch.save_file`), and
    fsync it. Returns each tensor's data byte offset in the file."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for key, shape in shapes.items():
        n = int(np.prod(shape, dtype=np.int64)) * 4
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data 8-byte aligned, as safetensors writes it
    start = 8 + len(raw)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for (key, t), expected in zip(tensors, shapes, strict=True):
            if key != expected or tuple(t.shape) != tuple(shapes[key]) or t.dtype != DTYPE:
                raise ValueError(
                    f"{path}: got {key} {tuple(t.shape)} {t.dtype}, expected {expected} {shapes[expected]}"
                )
            if t.numel():
                f.write(memoryview(t.contiguous().numpy()).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    return {key: start + header[key]["data_offsets"][0] for key in shapes}


def write_fragments(path: Path, tensors: dict[str, Tensor]) -> dict[str, int]:
    """1-D fp32 fragments as one safetensors file (see `write_safetensors`)."""
    return write_safetensors(path, {k: (t.numel(),) for k, t in tensors.items()}, tensors.items())


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Fragment:
    file: str
    offset: int
    tp_rank: int
    tp: int
    start: int
    stop: int


@dataclass
class Entry:
    shape: tuple[int, ...]
    fragments: list[Fragment] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def _tensor_parallel() -> Any:
    """The tp sharding rules (`gptforge.model.tensor_parallel`, which imports DeepSpeed). Without a GPU,
    DeepSpeed is told its accelerator is the CPU, as `gptforge.cli.quiet_deepspeed` does, so it prints
    nothing on stdout (generate --json promises one JSON object there)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from gptforge.model import tensor_parallel

    return tensor_parallel


def _shard_fn(cfg: ModelConfig | None) -> Any:
    """`shard_tensor` with this model's q/k/v sizes (needed for grouped-query attention)."""
    tp = _tensor_parallel()
    qkv = tp.qkv_sizes(cfg) if cfg is not None else None
    return lambda name, full, rank, n: tp.shard_tensor(name, full, rank, n, qkv=qkv)


class Checkpoint:
    """One step directory of the fragment format: its metadata and index, tensors read by byte range.
    `bytes_read` counts what was read from the fragment files."""

    def __init__(self, step_dir: str | Path) -> None:
        self.dir = Path(step_dir)
        self.meta = read_meta(self.dir)
        if self.meta["version"] != FORMAT_VERSION:
            raise CheckpointError(
                f"{self.dir} is a format-{self.meta['version']} checkpoint (DeepSpeed's files + universal/): "
                "resume it in the layout that saved it (its next save writes the current format), or read "
                "its weights with launch/convert_checkpoint.py"
            )
        self.model_cfg = model_config(self.dir, self.meta)
        path = self.dir / INDEX_FILE
        try:
            index = json.loads(path.read_text())
            self.index = index
            self.tensors = {
                name: Entry(
                    tuple(e["shape"]),
                    [
                        Fragment(f["file"], int(f["offset"]), *map(int, f["shard"]), *map(int, f["flat"]))
                        for f in e["fragments"]
                    ],
                )
                for name, e in index["tensors"].items()
            }
        except FileNotFoundError:
            raise CheckpointError(f"{self.dir}: {INDEX_FILE} missing (an incomplete checkpoint)") from None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not a valid checkpoint index ({exc!r})") from None
        for name in {f.file for e in self.tensors.values() for f in e.fragments}:
            inside(self.dir, name, str(path))
        self.bytes_read = 0
        self._fds: dict[str, int] = {}
        self._shard = None

    # -------------------------------------------------------------------------------- metadata

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def adam_step(self) -> int:
        return int(self.index.get("adam_step", 0))

    @property
    def loss_scaler(self) -> dict[str, Any] | None:
        return self.index.get("loss_scaler")

    def names(self, prefix: str = WEIGHTS) -> list[str]:
        """Tensor names under `prefix`, prefix removed."""
        return [n.removeprefix(prefix) for n in self.tensors if n.startswith(prefix)]

    def rng_path(self, rank: int) -> Path | None:
        name = self.index.get("rng", {}).get(str(rank))
        return inside(self.dir, name, str(self.dir / INDEX_FILE)) if name else None

    # -------------------------------------------------------------------------------- reading

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _fd(self, name: str) -> int:
        if name not in self._fds:
            path = self.dir / name
            try:
                self._fds[name] = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise CheckpointError(
                    f"cannot read {path}: {exc.strerror} (an incomplete checkpoint?)"
                ) from None
        return self._fds[name]

    def _read_into(self, frag: Fragment, start: int, out: Tensor) -> None:
        """Elements `start : start + len(out)` of the shard, from `frag`, into `out` (1-D fp32)."""
        view = memoryview(out.numpy()).cast("B")
        offset = frag.offset + (start - frag.start) * 4
        done = 0
        while done < len(view):
            n = os.preadv(self._fd(frag.file), [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(
                    f"{self.dir / frag.file}: truncated (an incomplete or damaged checkpoint)"
                )
            done += n
        self.bytes_read += done

    def _entry(self, name: str) -> Entry:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(
                f"{self.dir}: no tensor {name} in {INDEX_FILE} (a checkpoint of another model?)"
            ) from None

    def _fill(self, entry: Entry, name: str, tp_rank: int, tp: int, start: int, out: Tensor) -> None:
        """Elements `start:` of shard (tp_rank, tp) of `name`, stored as such, into `out`."""
        stop = start + out.numel()
        covered = 0
        for f in entry.fragments:
            if (f.tp_rank, f.tp) != (tp_rank, tp):
                continue
            a, b = max(start, f.start), min(stop, f.stop)
            if a < b:
                self._read_into(f, a, out[a - start : b - start])
                covered += b - a
        if covered != stop - start:
            raise CheckpointError(
                f"{self.dir}: tensor {name} has {covered} of elements {start}-{stop} of its tp shard "
                f"{tp_rank}/{tp} (an incomplete checkpoint)"
            )

    def read(
        self, name: str, tp_rank: int = 0, tp: int = 1, start: int = 0, stop: int | None = None
    ) -> Tensor:
        """Elements `start:stop` of the flattened shard `shard_tensor(name, tensor, tp_rank, tp)` (1-D fp32),
        from the byte ranges of the fragments that overlap it, whatever layout wrote them."""
        entry = self._entry(name)
        stored = {(f.tp_rank, f.tp) for f in entry.fragments}
        stored_tp = {t for _, t in stored}
        if len(stored_tp) != 1:
            raise CheckpointError(
                f"{self.dir}: tensor {name} has fragments of several tp degrees {stored_tp}"
            )
        (src_tp,) = stored_tp
        if src_tp == tp or (self._unsharded(name) and src_tp == 1):
            src = (tp_rank, tp) if src_tp == tp else (0, 1)
            if stop is None:
                stop = self._shard_numel(name, entry, *src)
            out = torch.empty(stop - start, dtype=DTYPE)
            self._fill(entry, name, *src, start, out)
            return out
        return self._read_resharded(name, entry, src_tp, tp_rank, tp, start, stop)

    def tensor(self, name: str) -> Tensor:
        """The whole serial tensor (tp shards merged, vocabulary padding dropped)."""
        entry = self._entry(name)
        tps = {f.tp for f in entry.fragments}
        if tps == {1}:
            return self.read(name).view(entry.shape)
        if len(tps) != 1:
            raise CheckpointError(f"{self.dir}: tensor {name} has fragments of several tp degrees {tps}")
        (tp,) = tps
        tensor_parallel = _tensor_parallel()
        shape_of = self._shard_shape
        serial = name.split("/", 1)[1]
        shards = [self.read(name, r, tp).view(shape_of(name, entry, r, tp)) for r in range(tp)]
        qkv = tensor_parallel.qkv_sizes(self.model_cfg)
        return tensor_parallel.merge_shards(serial, shards, vocab_size=entry.shape[0], qkv=qkv)

    # -------------------------------------------------------------------------------- sharding arithmetic

    def _shard_of(self, name: str, full: Tensor, tp_rank: int, tp: int) -> Tensor:
        if self._shard is None:
            self._shard = _shard_fn(self.model_cfg)
        return self._shard(name.split("/", 1)[1], full, tp_rank, tp)

    def _unsharded(self, name: str) -> bool:
        return _tensor_parallel().tp_rule(name.split("/", 1)[1]) is None

    def _shard_shape(self, name: str, entry: Entry, tp_rank: int, tp: int) -> tuple[int, ...]:
        if tp == 1:
            return entry.shape
        return tuple(self._shard_of(name, torch.empty(entry.shape, device="meta"), tp_rank, tp).shape)

    def _shard_numel(self, name: str, entry: Entry, tp_rank: int, tp: int) -> int:
        return int(np.prod(self._shard_shape(name, entry, tp_rank, tp), dtype=np.int64))

    def _positions(self, name: str, entry: Entry, tp_rank: int, tp: int) -> Tensor:
        """For each element of the shard, its index in the flattened tensor (-1: vocabulary padding)."""
        ids = torch.arange(1, entry.numel + 1, dtype=torch.int64).view(entry.shape)
        return self._shard_of(name, ids, tp_rank, tp).reshape(-1) - 1

    def _read_resharded(
        self, name: str, entry: Entry, src_tp: int, tp_rank: int, tp: int, start: int, stop: int | None
    ) -> Tensor:
        """A region of a shard of another tp degree than the stored one: map each wanted element to the
        stored shard and position holding it, then read the runs of consecutive positions."""
        wanted = self._positions(name, entry, tp_rank, tp)[start:stop]
        shard_of = torch.full((entry.numel,), -1, dtype=torch.int64)
        pos_in = torch.empty(entry.numel, dtype=torch.int64)
        for r in range(src_tp):
            pos = self._positions(name, entry, r, src_tp)
            real = pos >= 0
            shard_of[pos[real]] = r
            pos_in[pos[real]] = torch.nonzero(real).flatten()
        del pos, real
        out = torch.zeros(wanted.numel(), dtype=DTYPE)  # vocabulary padding stays 0
        keep = torch.nonzero(wanted >= 0).flatten()
        if keep.numel():
            g = wanted[keep]
            src, at = shard_of[g].numpy(), pos_in[g].numpy()
            k = keep.numpy()
            breaks = np.flatnonzero((np.diff(src) != 0) | (np.diff(at) != 1) | (np.diff(k) != 1)) + 1
            for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(k)], strict=True):
                t0, n = int(k[lo]), int(hi - lo)
                self._fill(entry, name, int(src[lo]), src_tp, int(at[lo]), out[t0 : t0 + n])
        return out


# ---------------------------------------------------------------------------------------------- weights


def load_checkpoint_weights(path: str | Path) -> tuple[ModelConfig, dict[str, Tensor], dict[str, Any]]:
    """(model config, fp32 state dict, tokenizer info) of a run directory (its latest checkpoint), a
    `checkpoints/` directory or one step directory: what generation and export need, no optimizer."""
    step_dir = resolve(path)
    meta = read_meta(step_dir)
    if meta["version"] == 1:
        return _legacy_weights(step_dir, meta)
    with Checkpoint(step_dir) as ckpt:
        cfg = ckpt.model_cfg
        weights = {name: ckpt.tensor(WEIGHTS + name) for name in ckpt.names(WEIGHTS)}
        aliases = ckpt.index.get("aliases", {})
    for name, same in aliases.items():
        weights[name] = weights[same]
    return cfg, weights, meta["tokenizer"]


def _legacy_weights(
    step_dir: Path, meta: dict[str, Any]
) -> tuple[ModelConfig, dict[str, Tensor], dict[str, Any]]:
    """Format 1: `universal/model-*.safetensors` (any layout), else DeepSpeed's `mp_rank_00_model_states.pt`
    (one process or data parallel only)."""
    cfg = model_config(step_dir, meta)
    files = sorted((step_dir / "universal").glob("model-*-of-*.safetensors"))
    if files:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        stages = int(files[0].name.rsplit("-of-", 1)[1].split(".")[0])
        if len(files) != stages:
            raise CheckpointError(
                f"{step_dir / 'universal'}: {len(files)} model file(s) for {stages} pipeline stage(s): "
                "incomplete checkpoint"
            )
        weights: dict[str, Tensor] = {}
        for f in files:
            try:
                weights.update(load_file(str(f)))
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"cannot read {f}: {exc}") from None
        if cfg.tie_embeddings and "transformer.wte.weight" in weights:
            weights["lm_head.weight"] = weights["transformer.wte.weight"]
        return cfg, weights, meta["tokenizer"]
    layout = meta.get("layout", {})
    if layout.get("tp", 1) > 1 or layout.get("pp", 1) > 1 or layout.get("zero_stage", 0) == 3:
        raise CheckpointError(
            f"{step_dir}: universal/ missing, and DeepSpeed's files of this layout (tp "
            f"{layout.get('tp')}, pp {layout.get('pp')}, ZeRO-{layout.get('zero_stage')}) hold no whole model; "
            "resume the run in its layout and let it save again"
        )
    states = step_dir / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise CheckpointError(
            f"{step_dir}: {states.name} missing (incomplete or another layout's checkpoint)"
        )
    try:
        saved = torch.load(states, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or truncated file: torch raises several types
        raise CheckpointError(f"cannot load {states}: {str(exc).splitlines()[0]}") from None
    module = saved.get("module") if isinstance(saved, dict) else None
    if not isinstance(module, dict):
        raise CheckpointError(f"{states}: no 'module' weights in this DeepSpeed checkpoint")
    return cfg, {k: v.float() if v.is_floating_point() else v for k, v in module.items()}, meta["tokenizer"]
