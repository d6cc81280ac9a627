"""Checkpoints: DeepSpeed's sharded format plus what exact resume needs, written so a crash never leaves a
half checkpoint named as complete.

    RUN/checkpoints/step_<N>/        DeepSpeed's files (mp_rank_00_model_states.pt, ZeRO optimizer shards)
                   step_<N>/checkpoint.json    step, consumed samples, model shape, tokenizer, data manifest
                                               sha256, layout, the resolved config (also DeepSpeed client state)
                   step_<N>/rng_rank<R>.pt     every rank's RNG states (python, numpy, torch, cuda, and
                                               the tensor-parallel dropout tracker's)
                   step_<N>/universal/         the same weights and Adam moments in serial coordinates
                                               (gptforge.parallel.universal), written by the pretraining
                                               trainer: what resuming under another layout, generation,
                                               export and convert_checkpoint read
    RUN/checkpoints/latest           the name of the last complete checkpoint (DeepSpeed's own convention)

A checkpoint is written as `step_<N>.tmp`, renamed when every rank has finished, then `latest` is
replaced (write + rename), then old ones beyond `train.keep_last` are pruned. The `layout` block records
how the run was sharded: in the same layout DeepSpeed's own files resume it bit for bit; in another
(dp with ZeRO, tp, pp, ZeRO stage, precision) `universal/` does (`check_resume(..., convertible=True)`,
`load_converted`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gptforge.config import ModelConfig, config_from_dict
from gptforge.errors import CheckpointError
from gptforge.weights import SHAPE_KEYS

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META_FILE = "checkpoint.json"
MODEL_STATES = "mp_rank_00_model_states.pt"
FORMAT = "gptforge-checkpoint"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainState:
    """Where training is: optimizer steps taken and samples consumed (over all ranks)."""

    step: int = 0
    consumed_samples: int = 0


# ---------------------------------------------------------------------------------------------- safe loading


class SafeCheckpointEngine:
    """DeepSpeed's checkpoint engine with `torch.load(weights_only=True)`: DeepSpeed loads its own files
    with `weights_only=False` (which can run code from a checkpoint). The few DeepSpeed classes its
    optimizer states contain are allow-listed by name; anything else is refused."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        with torch.serialization.safe_globals(
            [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]
        ):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
                raise CheckpointError(f"cannot load {path}: {str(exc).splitlines()[0]}") from None


# ---------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain values (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    tracked = _tp_rng_tracker().get_states()
    if tracked:  # tensor parallelism: the per-tp-rank dropout state (Megatron's RNG tracker)
        state["tp_tracker"] = tracked
    return state


def _tp_rng_tracker() -> Any:
    from gptforge.model.tensor_parallel import get_rng_tracker

    return get_rng_tracker()


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "tp_tracker" in state:
        _tp_rng_tracker().set_states(state["tp_tracker"])


# ---------------------------------------------------------------------------------------------- finding


def _step_of(path: Path) -> int:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else -1


def complete_checkpoints(root: Path) -> list[Path]:
    """`step_<N>` directories under `root`, oldest first (temporary `.tmp` ones are not checkpoints)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _step_of(p) >= 0), key=_step_of)


def latest_in(root: Path) -> Path | None:
    """The checkpoint `root/latest` names; without a `latest` file (a crash between the rename and its
    update) the newest complete `step_<N>`; None if there is neither."""
    latest = root / LATEST
    if not latest.is_file():
        complete = [p for p in complete_checkpoints(root) if (p / META_FILE).is_file()]
        return complete[-1] if complete else None
    name = latest.read_text().strip()
    step_dir = root / name
    if not (step_dir / META_FILE).is_file():
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


def find_resume(resume: str, run_dir: Path) -> Path | None:
    """`--resume auto`: the run's latest checkpoint if any; `none`: start fresh (refused if the run
    directory already has checkpoints, which the new run would mix with); else the given path."""
    root = run_dir / CHECKPOINTS
    if resume == "auto":
        return latest_in(root)
    if resume == "none":
        existing = latest_in(root)
        if existing is not None:
            raise CheckpointError(
                f"{run_dir} already has checkpoints (latest: {existing.name}) and --resume none starts a new run "
                "there; use --resume auto to continue it, or another run.dir"
            )
        return None
    return resolve(resume)


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
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {meta.get('version')}, this gptforge reads {FORMAT_VERSION}"
        )
    return meta


# ---------------------------------------------------------------------------------------------- checks


def check_resume(
    meta: dict[str, Any],
    step_dir: Path,
    model_cfg: ModelConfig,
    manifest_sha256: str,
    layout: dict[str, Any],
    allow_new_data: bool,
    convertible: bool = False,
) -> list[str]:
    """Refuse to resume into another model shape or other data (unless allowed), naming the difference.
    Returns how the layout changed (empty: the same); a change DeepSpeed's own files cannot load is
    refused unless `convertible` (the caller loads `universal/` then: `load_converted`)."""
    saved_model = meta["model"]
    diffs = [
        f"model.{k}: checkpoint {saved_model.get(k)}, now {getattr(model_cfg, k)}"
        for k in SHAPE_KEYS
        if saved_model.get(k) != getattr(model_cfg, k)
    ]
    if diffs:
        raise CheckpointError(f"{step_dir} is a checkpoint of another model shape ({'; '.join(diffs)})")
    saved_data = meta["data"]
    if saved_data["manifest_sha256"] != manifest_sha256 and not allow_new_data:
        raise CheckpointError(
            f"{step_dir} was trained on other data ({saved_data['path']}, manifest sha256 "
            f"{saved_data['manifest_sha256'][:12]}...; now {manifest_sha256[:12]}...); pass --allow-new-data to "
            "continue on this data (from the same sample position)"
        )
    saved = meta["layout"]
    changes = layout_changes(saved, layout)
    if convertible or not changes:
        return changes
    for key in ("zero_stage", "tp", "pp", "precision_mode"):
        if saved[key] != layout[key]:
            raise CheckpointError(
                f"{step_dir} was saved with {key}={saved[key]}, this run has {key}={layout[key]}, and it has no "
                f"universal/ files to re-shard from (saved with train.save_universal=false): resume with the "
                "saved setting"
            )
    if saved["dp"] != layout["dp"] and layout["zero_stage"] > 0:
        raise CheckpointError(
            f"{step_dir} was saved by {saved['dp']} data-parallel ranks with ZeRO-{saved['zero_stage']} (optimizer "
            f"states sharded {saved['dp']} ways) and has no universal/ files to re-shard from (saved with "
            f"train.save_universal=false): resume on {saved['dp']} data-parallel ranks"
        )
    raise CheckpointError(
        f"{step_dir} was saved in another layout ({'; '.join(changes)}) and has no universal/ files to "
        "re-shard from (saved with train.save_universal=false): resume with the saved setting"
    )


def layout_changes(saved: dict[str, Any], layout: dict[str, Any]) -> list[str]:
    """The differences that DeepSpeed's sharded files cannot bridge: tp, pp and its stage boundaries, the
    ZeRO stage, the precision, and the number of dp ranks under ZeRO (which shards optimizer states by it)."""
    changes = [
        f"{key} {saved.get(key)} -> {layout.get(key)}"
        for key in ("tp", "pp", "pp_parts", "zero_stage", "precision_mode")
        if saved.get(key) != layout.get(key)
    ]
    if saved["dp"] != layout["dp"] and (saved["zero_stage"] > 0 or layout["zero_stage"] > 0):
        changes.append(f"dp {saved['dp']} -> {layout['dp']} with ZeRO")
    return changes


# ---------------------------------------------------------------------------------------------- save


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_incomplete(root: Path) -> None:
    """Delete `step_<N>.tmp` leftovers of a save that was interrupted (rank 0, before training)."""
    if root.is_dir():
        for p in root.glob("step_*.tmp"):
            log.info("removing incomplete checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints (0 or less = keep all), never the one `latest` names."""
    if keep_last <= 0:
        return
    latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    for old in complete_checkpoints(root)[:-keep_last]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def save(
    engine: Any,
    run_dir: Path,
    state: TrainState,
    meta: dict[str, Any],
    dist_ctx: Any,
    keep_last: int,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Collective: every rank writes its DeepSpeed shards and RNG state into `step_<N>.tmp` (and whatever
    `write_extra(tmp_dir)` adds: the trainer's `universal/`); rank 0 adds checkpoint.json, renames the
    directory, points `latest` at it and prunes old ones."""
    root = run_dir / CHECKPOINTS
    name = f"step_{state.step}"
    tmp = root / f"{name}.tmp"
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "step": state.step,
        "consumed_samples": state.consumed_samples,
        **meta,
    }
    if dist_ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist_ctx.barrier()  # the directory exists before any rank writes into it
    engine.save_checkpoint(str(root), tag=tmp.name, client_state={"gptforge": meta}, save_latest=False)
    torch.save(rng_state(), tmp / f"rng_rank{dist_ctx.rank}.pt")
    if write_extra is not None:
        write_extra(tmp)
    dist_ctx.barrier()
    final = root / name
    if dist_ctx.is_main:
        _write_atomic(tmp / META_FILE, json.dumps(meta, indent=2) + "\n")
        if final.exists():  # the same step saved again (e.g. a run resumed and stopped before moving on)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_atomic(root / LATEST, name + "\n")
        _fsync_dir(root)
        prune(root, keep_last)
    dist_ctx.barrier()
    return final


# ---------------------------------------------------------------------------------------------- load


def load(engine: Any, step_dir: Path, meta: dict[str, Any], dist_ctx: Any) -> TrainState:
    """Collective: DeepSpeed restores weights and optimizer states; each rank restores its RNG states."""
    load_path, _ = engine.load_checkpoint(
        str(step_dir.parent),
        tag=step_dir.name,
        load_optimizer_states=True,
        load_lr_scheduler_states=False,
        load_module_strict=True,
    )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint files in {step_dir}")
    rng_file = step_dir / f"rng_rank{dist_ctx.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:  # more ranks than the checkpoint had (ZeRO-0 allows it): a fresh, rank-distinct stream
        log.warning(
            "%s missing: this rank's RNG is seeded afresh (the resume is not bitwise exact)", rng_file
        )
        seed = meta["config"]["train"]["seed"] + meta["step"] * 1000 + dist_ctx.rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
    return TrainState(step=meta["step"], consumed_samples=meta["consumed_samples"])


def load_converted(
    engine: Any, step_dir: Path, meta: dict[str, Any], model_cfg: ModelConfig, topology: Any
) -> TrainState:
    """Collective: resume a checkpoint of another layout from its `universal/` (weights, Adam moments and
    step count, re-sharded for this layout). RNG streams are not carried over: they belong to the old
    ranks; the caller reseeds."""
    from gptforge.parallel.universal import load_universal

    load_universal(engine, step_dir, model_cfg, topology)
    return TrainState(step=meta["step"], consumed_samples=meta["consumed_samples"])


def load_checkpoint_weights(path: str | Path) -> tuple[ModelConfig, dict[str, Tensor], dict[str, Any]]:
    """(model config, fp32 state dict, tokenizer info) of a run directory (its latest checkpoint), a
    `checkpoints/` directory or one step directory: what generation and export need, no optimizer."""
    step_dir = resolve(path)
    meta = read_meta(step_dir)
    cfg = config_from_dict({"model": meta["model"]}, source=str(step_dir / META_FILE)).model
    from gptforge.parallel import universal

    if universal.has_universal(step_dir):  # any layout: the serial fp32 weights, tp/pp merged
        return cfg, universal.read_weights(step_dir, cfg), meta["tokenizer"]
    layout = meta.get("layout", {})
    if layout.get("tp", 1) > 1 or layout.get("pp", 1) > 1 or layout.get("zero_stage", 0) == 3:
        raise CheckpointError(
            f"{step_dir}: {universal.UNIVERSAL}/ missing, and DeepSpeed's files of this layout (tp "
            f"{layout.get('tp')}, pp {layout.get('pp')}, ZeRO-{layout.get('zero_stage')}) hold no whole model; "
            "resume the run in its layout and let it save again"
        )
    states = step_dir / MODEL_STATES
    if not states.is_file():
        raise CheckpointError(
            f"{step_dir}: {MODEL_STATES} missing (incomplete or another layout's checkpoint)"
        )
    try:
        saved = torch.load(states, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or truncated file: torch raises several types
        raise CheckpointError(f"cannot load {states}: {str(exc).splitlines()[0]}") from None
    module = saved.get("module") if isinstance(saved, dict) else None
    if not isinstance(module, dict):
        raise CheckpointError(f"{states}: no 'module' weights in this DeepSpeed checkpoint")
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    return cfg, state_dict, meta["tokenizer"]


def checkpoint_meta(
    model_cfg: ModelConfig,
    tokenizer: dict[str, Any],
    data_path: str,
    manifest_sha256: str,
    layout: dict[str, Any],
    config: dict[str, Any],
) -> dict[str, Any]:
    """What a checkpoint records besides the step: enough to rebuild the model and to refuse a mismatch."""
    return {
        "model": dataclasses.asdict(model_cfg),
        "tokenizer": tokenizer,
        "data": {"path": data_path, "manifest_sha256": manifest_sha256},
        "layout": layout,
        "config": config,
    }
