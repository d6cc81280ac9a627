"""Saving and resuming a run: the `Checkpointer` decides when to save, saves (in the background), loads
into any layout, prunes old checkpoints and moves `latest`. The files are `gptforge.checkpoint_format`'s.

A save: every rank copies the state it owns (`gptforge.train.fragments`) into a staging buffer (pinned
host memory on GPU) and training continues; a background thread writes `step_<N>.tmp/rank_<R>.safetensors`
and the rank's RNG states and fsyncs them; the ranks then agree that every file is durable (an all-gather
on a side gloo group), and rank 0 writes index.json + checkpoint.json, fsyncs, renames the directory to
`step_<N>`, replaces `latest` (write + rename + fsync) and prunes. At most one save is in flight: the next
save, the end of the run and a preemption wait for it. A crash at any point leaves the previous `latest`.

One job per run directory: rank 0 holds `RUN/.lock` (host, pid, SLURM job) while it runs; a second job is
refused, a stale lock (a dead process of this host, or the same SLURM job requeued) taken over.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import random
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from gptforge.checkpoint_format import (
    CHECKPOINTS,
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    INDEX_FORMAT,
    LATEST,
    META_FILE,
    Checkpoint,
    complete_checkpoints,
    latest_in,
    load_checkpoint_weights,
    rank_file,
    read_meta,
    resolve,
    rng_file,
)
from gptforge.config import SHAPE_KEYS, ModelConfig, TrainConfig
from gptforge.errors import CheckpointError

# The reading side, for the trainer's callers: they need not know which module reads.
__all__ = [
    "CHECKPOINTS",
    "LATEST",
    "META_FILE",
    "Checkpointer",
    "TrainState",
    "check_resume",
    "checkpoint_meta",
    "latest_in",
    "layout_changes",
    "load_checkpoint_weights",
    "read_meta",
    "resolve",
]

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
_SCALER_KEYS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


@dataclass
class TrainState:
    """Where training is: optimizer steps taken and samples consumed (over all ranks)."""

    step: int = 0
    consumed_samples: int = 0


# ---------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain values (loadable with weights_only=True). CUDA:
    this process's device only, so a resume may see another number of GPUs."""
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
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
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
    cuda = state.get("cuda")
    if isinstance(cuda, Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)  # the current device's
    if "tp_tracker" in state:
        _tp_rng_tracker().set_states(state["tp_tracker"])


def _load_rng(path: Path) -> dict[str, Any]:
    """A rank's RNG states: tensors and plain values only (`weights_only`: a pickle cannot run code)."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise CheckpointError(f"cannot load {path}: {str(exc).splitlines()[0]}") from None


def _reseed(seed: int, topology: Any) -> None:
    from gptforge.parallel.parallelize import seed_model_parallel

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    seed_model_parallel(seed, topology)


# ---------------------------------------------------------------------------------------------- checks


def check_resume(
    meta: dict[str, Any],
    step_dir: Path,
    model_cfg: ModelConfig,
    manifest_sha256: str,
    layout: dict[str, Any],
    allow_new_data: bool,
) -> list[str]:
    """Refuse to resume into another model shape or other data (unless allowed), naming the difference.
    Returns how the layout changed (empty: the same); any change loads, except from the old format-1
    checkpoints (DeepSpeed's files), which resume in their own layout only."""
    # a key a checkpoint predates (the architecture options) has its default, GPT-2's
    saved_model = {k: meta["model"].get(k, getattr(ModelConfig, k, None)) for k in SHAPE_KEYS}
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
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{step_dir} is a format-{meta.get('version')} checkpoint (DeepSpeed's own files), which this "
            "gptforge no longer resumes; convert its weights with launch/convert_checkpoint.py and start from "
            "them (model.init_from=checkpoint:DIR), or resume it with the gptforge that wrote it"
        )
    return layout_changes(meta["layout"], layout)


def layout_changes(saved: dict[str, Any], layout: dict[str, Any]) -> list[str]:
    """How the sharding changed: tp, pp and its stage boundaries, the ZeRO stage, the precision, and the
    number of dp ranks under ZeRO (which shards optimizer states by it)."""
    changes = [
        f"{key} {saved.get(key)} -> {layout.get(key)}"
        for key in ("tp", "pp", "pp_parts", "zero_stage", "precision_mode")
        if saved.get(key) != layout.get(key)
    ]
    if saved["dp"] != layout["dp"] and (saved["zero_stage"] > 0 or layout["zero_stage"] > 0):
        changes.append(f"dp {saved['dp']} -> {layout['dp']} with ZeRO")
    return changes


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


# ---------------------------------------------------------------------------------------------- files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
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
    """Delete leftovers of an interrupted save: `step_<N>.tmp`, and `step_<N>.old` once `step_<N>` is
    complete (rank 0, before training)."""
    if not root.is_dir():
        return
    for p in root.glob("step_*.tmp"):
        log.info("removing incomplete checkpoint %s", p)
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob("step_*.old"):
        if (root / p.name.removesuffix(".old") / META_FILE).is_file():
            shutil.rmtree(p, ignore_errors=True)


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints (0 or less = keep all), never the one `latest` names."""
    if keep_last <= 0:
        return
    latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    for old in complete_checkpoints(root)[:-keep_last]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def _commit(root: Path, tmp: Path, name: str, keep_last: int) -> Path:
    """`tmp` (durable) becomes `name`, then `latest` names it. An existing `name` (the same step saved
    again) is moved aside first and deleted only after `latest` is durable, so a crash in between leaves it
    (as `<name>.old`, which `latest_in` falls back to)."""
    _fsync_dir(tmp)
    final = root / name
    old = root / f"{name}.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_atomic(root / LATEST, name + "\n")
    _fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)
    prune(root, keep_last)
    return final


class RunLock:
    """`RUN/.lock`: one job writes a run directory. Holds host, pid and SLURM job id."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.mine = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "job": os.environ.get("SLURM_JOB_ID"),
        }

    def acquire(self) -> None:
        holder = self._holder()
        if holder is not None and holder != self.mine:
            if self._alive(holder):
                raise CheckpointError(
                    f"{self.path.parent} is in use by another job (pid {holder.get('pid')} on "
                    f"{holder.get('host')}{', SLURM job ' + holder['job'] if holder.get('job') else ''}): two jobs "
                    f"writing one run directory would mix their checkpoints; use another run.dir, or delete "
                    f"{self.path} if that job is gone"
                )
            log.warning("taking over the stale lock %s (%s)", self.path, holder)
        _write_atomic(self.path, json.dumps(self.mine) + "\n")

    def release(self) -> None:
        if self._holder() == self.mine:
            self.path.unlink(missing_ok=True)

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return None
        return holder if isinstance(holder, dict) else {}

    def _alive(self, holder: dict[str, Any]) -> bool:
        """Whether the holder may still run: a process of this host that exists (not ours), or a job on
        another host unless it is this SLURM job (requeued: the old one has ended)."""
        if holder.get("job") and holder.get("job") == self.mine["job"]:
            return False
        if holder.get("host") != self.mine["host"]:
            return True
        pid = holder.get("pid")
        if not isinstance(pid, int) or pid == self.mine["pid"]:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


# ---------------------------------------------------------------------------------------------- manager


@dataclass
class _Save:
    """One save in flight: its staged fragments and what the commit needs."""

    name: str
    tmp: Path
    meta: dict[str, Any]
    fragments: list[Any]
    rng: dict[str, Any]
    adam_step: int
    loss_scaler: dict[str, Any] | None
    aliases: dict[str, str]
    started: float
    error: str | None = None
    path: Path | None = None


class Checkpointer:
    """The run's checkpoints: when to save, saving, loading, pruning, `latest`. Collective methods (every
    rank calls them at the same point) are `save`, `wait`, `load` and `close`."""

    def __init__(self, run_dir: str | Path, dist_ctx: Any, train: TrainConfig) -> None:
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CHECKPOINTS
        self.dist = dist_ctx
        self.interval = train.save_interval
        self.keep_last = train.keep_last
        self.async_save = train.async_save
        self.seed = train.seed
        self._lock = RunLock(self.run_dir) if dist_ctx.is_main else None
        if self._lock is not None:  # before anything of the run directory is read: no race with its owner
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
            atexit.register(self._lock.release)  # however this process ends (short of a kill)
        # the background writer's collectives run on their own group, beside the training's
        self._group = dist.new_group(backend="gloo") if dist_ctx.world_size > 1 else None
        self._inflight: _Save | None = None
        self._thread: threading.Thread | None = None
        self._staging: dict[int, Tensor] = {}
        self._last_saved = -1
        self.last: dict[str, float] = {}  # the last save's figures: stall_s, save_s, bytes

    # ------------------------------------------------------------------------------------ finding

    @property
    def latest(self) -> Path | None:
        return latest_in(self.root)

    def durable_latest(self) -> Path | None:
        """Collective: the latest checkpoint once the save in flight (if any) is complete."""
        self.wait()
        return self.latest

    def find_resume(self, resume: str) -> Path | None:
        return find_resume(resume, self.run_dir)

    def open(self) -> None:
        """Before training (rank 0): clear leftovers of interrupted saves."""
        if self._lock is not None:
            remove_incomplete(self.root)

    # ------------------------------------------------------------------------------------ loading

    def load(
        self,
        engine: Any,
        step_dir: Path,
        meta: dict[str, Any],
        model_cfg: ModelConfig,
        topology: Any,
        layout: dict[str, Any],
    ) -> TrainState:
        """Collective: this rank's part of the checkpoint into the engine (any layout: each rank reads only
        the byte ranges of its part); the ranks' RNG states in the same layout, else seeded afresh from
        (train.seed, step)."""
        from gptforge.train.fragments import load_into, state_bytes

        changes = layout_changes(meta["layout"], layout)
        same = not changes and meta["layout"]["world_size"] == layout["world_size"]
        state = TrainState(step=meta["step"], consumed_samples=meta["consumed_samples"])
        with Checkpoint(step_dir) as ckpt:
            load_into(engine, ckpt, model_cfg, topology)
            self._restore_loss_scaler(engine, ckpt.loss_scaler)
            rng = ckpt.rng_path(self.dist.rank)
            if same and rng is not None and rng.is_file():
                set_rng_state(_load_rng(rng))
            else:
                _reseed(self.seed + state.step, topology)
            read = ckpt.bytes_read
        engine.global_steps, engine.global_samples = state.step, state.consumed_samples
        self._last_saved = state.step
        reads = self.dist.gather((read, state_bytes(engine, model_cfg, topology)))
        worst = max(range(len(reads)), key=lambda r: reads[r][0] / max(reads[r][1], 1))
        log.info(
            "checkpoint: %d bytes of fragments read by %d rank(s); the most for its state: rank %d, %d of %d bytes",
            sum(r for r, _ in reads),
            len(reads),
            worst,
            *reads[worst],
        )
        if same:
            log.info(
                "resumed from %s (step %d, %d samples consumed)", step_dir, state.step, state.consumed_samples
            )
        else:
            log.info(
                "resumed from %s (step %d, %d samples consumed) under another layout (%s): weights and AdamW "
                "state re-sharded from its fragments; dropout RNG reseeded",
                step_dir,
                state.step,
                state.consumed_samples,
                "; ".join(changes) or f"{meta['layout']['world_size']} -> {layout['world_size']} ranks",
            )
        return state

    @staticmethod
    def _restore_loss_scaler(engine: Any, saved: dict[str, Any] | None) -> None:
        scaler = getattr(engine.optimizer, "loss_scaler", None)
        if saved and scaler is not None:
            for key, value in saved.items():
                if hasattr(scaler, key):
                    setattr(scaler, key, value)

    # ------------------------------------------------------------------------------------ saving

    def due(self, step: int, max_steps: int, stop: bool = False) -> bool:
        """Whether to save after `step`: every `train.save_interval` steps, at the end, at a preemption
        (once per step: not again right after a resume from it)."""
        return (stop or step % self.interval == 0 or step == max_steps) and step != self._last_saved

    def save(
        self, engine: Any, state: TrainState, meta: dict[str, Any], model_cfg: ModelConfig, topology: Any
    ) -> Path:
        """Collective: stage this rank's state and write it (in the background with `train.async_save`).
        Returns the directory the checkpoint will have once complete."""
        from gptforge.train.fragments import adam_step, owned_fragments

        self.wait()
        t0 = time.perf_counter()
        name = f"step_{state.step}"
        tmp = self.root / f"{name}.tmp"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.dist.barrier()  # the directory exists before any rank writes into it
        adam = adam_step(engine.optimizer)
        owned = owned_fragments(engine, model_cfg, topology, with_moments=adam > 0)
        scaler = getattr(engine.optimizer, "loss_scaler", None)
        job = _Save(
            name=name,
            tmp=tmp,
            meta={
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "step": state.step,
                "consumed_samples": state.consumed_samples,
                **meta,
            },
            fragments=self._stage(owned),
            rng=rng_state(),
            adam_step=adam,
            loss_scaler={k: getattr(scaler, k) for k in _SCALER_KEYS if hasattr(scaler, k)}
            if scaler is not None and getattr(engine, "fp16_enabled", lambda: False)()
            else None,
            aliases=_aliases(engine, model_cfg, topology),
            started=t0,
        )
        self._last_saved = state.step
        self._inflight = job
        self.last = {"stall_s": 0.0, "bytes": float(sum(f.values.numel() * 4 for f in job.fragments))}
        if self.async_save:
            self._thread = threading.Thread(
                target=self._write, args=(job,), name="checkpoint-writer", daemon=True
            )
            self._thread.start()
            self.last["stall_s"] = time.perf_counter() - t0
        else:
            self._write(job)
            self.wait()
        return self.root / name

    def _stage(self, owned: list[Any]) -> list[Any]:
        """The fragments as CPU tensors the training cannot change under the writer: copies into reused
        staging buffers (pinned on GPU) when saving in the background, else the live CPU tensors."""
        out = []
        for i, f in enumerate(owned):
            values = f.values
            if self.async_save or values.device.type != "cpu" or values.dtype != torch.float32:
                buf = self._staging.get(i)
                if buf is None or buf.numel() != values.numel():
                    pin = values.device.type == "cuda"
                    buf = torch.empty(values.numel(), dtype=torch.float32, pin_memory=pin)
                    self._staging[i] = buf
                buf.copy_(values, non_blocking=buf.is_pinned())
                values = buf
            out.append(dataclasses.replace(f, values=values))
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        for i in [i for i in self._staging if i >= len(owned)]:
            del self._staging[i]
        return out

    def _write(self, job: _Save) -> None:
        """This rank's files (fsynced), then every rank's report; rank 0 commits if all succeeded."""
        from gptforge.checkpoint_format import write_fragments

        report: dict[str, Any] = {"rank": self.dist.rank, "error": None, "entries": []}
        try:
            tensors = {f"{f.name}@{f.tp_rank}.{f.start}": f.values for f in job.fragments}
            offsets = write_fragments(job.tmp / rank_file(self.dist.rank), tensors)
            report["entries"] = [
                (f.name, list(f.shape), f.tp_rank, f.tp, f.start, f.stop, offsets[k])
                for f, k in zip(job.fragments, tensors, strict=True)
            ]
            with open(job.tmp / rng_file(self.dist.rank), "wb") as fh:
                torch.save(job.rng, fh)
                fh.flush()
                os.fsync(fh.fileno())
        except Exception as exc:  # disk full, permissions, ...: reported to every rank, nothing committed
            report["error"] = f"{type(exc).__name__}: {exc}"
        job.fragments = []  # the staging buffers stay for the next save; the job lets go of them
        try:
            reports = [report]
            if self._group is not None:
                reports = [None] * self.dist.world_size
                dist.all_gather_object(reports, report, group=self._group)
            failed = [r for r in reports if r["error"]]
            if failed:
                job.error = f"rank {failed[0]['rank']} could not write its part: {failed[0]['error']}"
                return
            if self.dist.is_main:
                try:
                    self._write_index(job, reports)
                    job.path = _commit(self.root, job.tmp, job.name, self.keep_last)
                except Exception as exc:  # reported; the other ranks still meet at the barrier below
                    job.error = f"rank 0 could not complete it: {type(exc).__name__}: {exc}"
            if self._group is not None:
                dist.barrier(group=self._group)  # `latest` moved before any rank counts the save as done
        except Exception as exc:  # a rank died: the collectives fail
            job.error = job.error or f"the ranks could not agree on it: {type(exc).__name__}: {exc}"

    def _write_index(self, job: _Save, reports: list[dict[str, Any]]) -> None:
        tensors: dict[str, Any] = {}
        for report in reports:
            file = rank_file(report["rank"])
            for name, shape, tp_rank, tp, start, stop, offset in report["entries"]:
                entry = tensors.setdefault(name, {"shape": shape, "dtype": "float32", "fragments": []})
                entry["fragments"].append(
                    {"file": file, "offset": offset, "shard": [tp_rank, tp], "flat": [start, stop]}
                )
        index = {
            "format": INDEX_FORMAT,
            "version": 1,
            "step": job.meta["step"],
            "adam_step": job.adam_step,
            "loss_scaler": job.loss_scaler,
            "aliases": job.aliases,
            "rng": {str(r["rank"]): rng_file(r["rank"]) for r in reports},
            "tensors": dict(sorted(tensors.items())),
        }
        _write_atomic(job.tmp / INDEX_FILE, json.dumps(index) + "\n")
        _write_atomic(job.tmp / META_FILE, json.dumps(job.meta, indent=2) + "\n")

    def wait(self) -> Path | None:
        """Collective: wait for the save in flight, if any; raise if it failed on any rank."""
        job, self._inflight = self._inflight, None
        if job is None:
            return None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if job.error:
            raise CheckpointError(f"checkpoint {job.tmp} not saved: {job.error}")
        self.last["save_s"] = time.perf_counter() - job.started
        if self.dist.is_main:
            log.info("saved %s", job.path)
        return self.root / job.name

    def close(self) -> None:
        """The end of the run (however it ends): the save in flight completes, the lock is released."""
        try:
            self.wait()
        finally:
            if self._lock is not None:
                self._lock.release()


def _aliases(engine: Any, model_cfg: ModelConfig, topology: Any) -> dict[str, str]:
    """Names in the model's state dict that are another tensor (the tied LM head): the consolidated
    weights repeat them as the model expects."""
    if model_cfg.tie_embeddings and (topology.pp > 1 or hasattr(engine.module, "lm_head")):
        return {"lm_head.weight": "transformer.wte.weight"}
    return {}
