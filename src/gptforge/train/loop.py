"""The trainer: set up (processes, batch plan, the task's data and model, engine, resume), then step, log,
evaluate, sample, save. What differs between pretraining and fine-tuning is the `Task` it is given
(`gptforge.train.task`; `gptforge.train.pretrain.PretrainTask` by default).

One optimizer step = `grad_accum` micro-batches per data-parallel rank through DeepSpeed's engine
(forward, backward, step each; the engine applies the update at the accumulation boundary). The learning
rate is a function of the step; the data position is the number of samples consumed. Both are saved, with
every rank's RNG state, so a resumed run repeats the uninterrupted one bit for bit (fp32, CPU).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gptforge.config import Config, config_to_dict, dump_config
from gptforge.errors import GptforgeError
from gptforge.launcher import launched_world_size
from gptforge.parallel.parallelize import pp_parts, stage_lines
from gptforge.train import checkpoint
from gptforge.train.batch import plan_batch
from gptforge.train.distributed import check_layout, init_distributed
from gptforge.train.engine import build_engine, is_pipeline
from gptforge.train.metrics import (
    MetricsWriter,
    Throughput,
    eval_record,
    format_train,
    peak_flops,
    train_record,
)
from gptforge.train.optim import lr_at, set_lr
from gptforge.train.precision import precision_mode
from gptforge.train.preemption import EXIT_PREEMPTED, Preemption
from gptforge.train.pretrain import PretrainTask
from gptforge.train.task import Task, seed_everything

log = logging.getLogger("train")


def train_step(engine: Any, micro_batches: Iterable[tuple[Tensor, Tensor]], device: torch.device) -> Tensor:
    """One optimizer step over this rank's micro-batches; returns their mean loss (a tensor: no host sync).
    A pipeline engine runs them through its 1F1B schedule (every stage is handed the same iterator; the
    first stage reads the inputs, the last the targets) and gives the mean loss to every stage."""
    if is_pipeline(engine):
        engine.train_batch(iter(micro_batches))
        return engine.dp_group_loss
    total, n = None, 0
    for x, y in micro_batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        _, loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        total = loss.detach() if total is None else total + loss.detach()
        n += 1
    assert total is not None, "a step needs at least one micro-batch"
    return total / n


def _float(value: Any) -> float:
    if value is None:
        return float("nan")
    return float(value)


class Trainer:
    """A configured run of `task` (pretraining by default): everything `train` sets up, and the loop."""

    def __init__(
        self, cfg: Config, resume: str = "auto", allow_new_data: bool = False, task: Task | None = None
    ) -> None:
        self.task = task = task if task is not None else PretrainTask()
        task.prepare(cfg)
        # Layout and batch checks before any process group: a bad layout fails on every rank at once.
        world = launched_world_size()
        topology = check_layout(cfg, world, model_parallel=task.model_parallel)
        self.plan = plan_batch(cfg, world)
        self.dist = init_distributed(cfg, topology)
        self.mode = precision_mode(cfg.train.precision, self.dist.device)
        self.run_dir = Path(cfg.run.dir)
        self.checkpoints = checkpoint.Checkpointer(self.run_dir, self.dist, cfg.train)
        self.resume_dir = self.checkpoints.find_resume(resume)
        resume_meta = checkpoint.read_meta(self.resume_dir) if self.resume_dir else None

        self.cfg = cfg
        seed_everything(cfg.train.seed)
        model, self.cfg = task.setup(self)
        self.model_cfg = self.cfg.model
        if resume_meta is not None:
            self._check_resume(resume_meta, allow_new_data)
        self.batches, self.val_batches = task.train_batches, task.val_batches

        self.engine = build_engine(self.cfg, model, self.plan, self.mode, self.dist)
        self.state = checkpoint.TrainState()
        if resume_meta is not None:
            assert self.resume_dir is not None
            self.state = self.checkpoints.load(
                self.engine, self.resume_dir, resume_meta, self.model_cfg, self.dist.topology, self.layout()
            )
            task.resumed(self, resume_meta)
        self.flops_per_token = task.flops_per_token(self.model_cfg)
        peak_source = self._open_run(resume_meta)
        self._log_setup(peak_source)

    # ------------------------------------------------------------------------------------------ setup

    def layout(self) -> dict[str, Any]:
        """The layout as a checkpoint records it (to refuse or convert a resume under another one)."""
        topo, p = self.dist.topology, self.cfg.parallel
        return {
            "world_size": self.dist.world_size,
            "dp": topo.dp,
            "tp": topo.tp,
            "pp": topo.pp,
            "zero_stage": p.zero_stage,
            "precision_mode": self.mode,
            "pp_parts": pp_parts(self.model_cfg, p),
        }

    def _check_resume(self, meta: dict[str, Any], allow_new_data: bool) -> None:
        """Same model shape and data (unless allowed); then whatever the task refuses."""
        assert self.resume_dir is not None
        checkpoint.check_resume(
            meta,
            self.resume_dir,
            self.model_cfg,
            self.task.data_sha256,
            self.layout(),
            allow_new_data,
        )
        self.task.check_resume(self, meta)

    def _open_run(self, resume_meta: dict[str, Any] | None) -> str:
        """The run directory (half-written checkpoints removed, the resolved config written), the metrics
        writer (continuing the log of a resumed run) and the MFU peak; returns where the peak comes from."""
        if self.dist.is_main:
            self.checkpoints.open()  # the run's lock; leftovers of interrupted saves removed
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.run_dir / "config.yaml")
        self.metrics = MetricsWriter(
            self.run_dir,
            self.dist.is_main,
            self.cfg.run.tensorboard,
            self.state.step if resume_meta else None,
        )
        t = self.cfg.train
        self.peak, peak_source = peak_flops(t.peak_flops, self.dist.device, t.precision)
        return peak_source

    def _log_setup(self, peak_source: str) -> None:
        """What is trained (the task's lines), the layout, the batch and data (the task's), the MFU peak."""
        if not self.dist.is_main:
            return
        before, after = self.task.setup_lines(self)
        for line in before:
            self.task.log.info(line)
        log.info(
            "layout: %s; ZeRO-%d; precision %s (%s)",
            self.dist.topology.describe(),
            self.cfg.parallel.zero_stage,
            self.cfg.train.precision,
            self.mode,
        )
        for line in stage_lines(self.model_cfg, self.cfg.parallel, self.dist.topology):
            log.info(line)
        for line in after:
            self.task.log.info(line)
        peak = f"{self.peak / 1e12:.1f} TFLOP/s" if self.peak >= 1e12 else f"{self.peak / 1e9:.0f} GFLOP/s"
        log.info(
            "MFU peak: %s per rank (%s); %.1f MFLOPs per token", peak, peak_source, self.flops_per_token / 1e6
        )

    # ------------------------------------------------------------------------------------------ loop

    def run(self) -> int:
        """The loop to train.max_steps; returns 0, or EXIT_PREEMPTED after a signal-triggered save."""
        t = self.cfg.train
        preemption = Preemption().install()
        try:
            self.task.begin(self)
            if self.state.step >= t.max_steps:
                log.info(
                    "already at step %d of train.max_steps=%d: nothing to do", self.state.step, t.max_steps
                )
                return 0
            if self.state.step == 0 and self.val_batches:
                self._evaluate()
            code = self._loop(preemption)
            if code == 0:
                self.task.end(self)
            return code
        finally:
            preemption.uninstall()
            try:
                self.checkpoints.close()  # the save in flight completes first
            finally:
                self.metrics.close()

    def _loop(self, preemption: Preemption) -> int:
        t, state = self.cfg.train, self.state
        throughput = Throughput(self.task.tokens(state.consumed_samples), state.step)
        skipped_run = 0
        while state.step < t.max_steps:
            lr = lr_at(state.step, self.cfg.optim, t.max_steps)
            set_lr(self.engine.optimizer, lr)
            loss = train_step(self.engine, self.batches.step(state.consumed_samples), self.dist.device)
            state.step += 1
            state.consumed_samples += self.plan.global_batch
            skipped_run = self._check_step(skipped_run, loss)
            tokens = self.task.tokens(state.consumed_samples)

            if state.step % t.log_interval == 0 or state.step == t.max_steps:
                self._log_step(loss, lr, tokens, throughput)
            paused = False
            if self.val_batches and (state.step % t.eval_interval == 0 or state.step == t.max_steps):
                self._evaluate()
                paused = True
            if t.sample_interval and (state.step % t.sample_interval == 0 or state.step == t.max_steps):
                self.task.sample(self)
                paused = True
            stop = self.dist.any(preemption.received)
            if self.checkpoints.due(state.step, t.max_steps, stop):
                self._save()
                paused = True
            if stop:  # every rank says so (SLURM logs show each task's lines)
                log.warning(
                    "preempted: saved %s; exiting with code %d (run again with --resume auto)",
                    self.run_dir / checkpoint.CHECKPOINTS / f"step_{state.step}",
                    EXIT_PREEMPTED,
                )
                return EXIT_PREEMPTED
            if paused:
                throughput.reset(tokens, state.step)
        return 0

    def _log_step(self, loss: Tensor, lr: float, tokens: int, throughput: Throughput) -> None:
        """The metrics.jsonl / TensorBoard line and the console line (the only host sync of the loss)."""
        rate, step_time = throughput.measure(tokens, self.state.step)
        record = train_record(
            self.state.step,
            _float(self.dist.mean_over_dp(loss)),
            lr,
            _float(self.engine.get_global_grad_norm()),
            tokens,
            rate,
            rate * self.flops_per_token / (self.peak * self.dist.world_size),
        )
        record.update(self.task.step_metrics(self.state.consumed_samples))
        if self.dist.is_main:
            log.info(format_train(record, self.cfg.train.max_steps, step_time))
        self.metrics.write(record, "train")

    def _check_step(self, skipped_run: int, loss: Tensor) -> int:
        """Count consecutive skipped (non-finite) steps; past train.max_skipped_steps, stop with an error.
        (Under fp16, a skip with a finite loss is the loss scaler backing off, not a problem of the run.)"""
        if self.engine.was_step_applied():
            return 0
        if self.mode == "fp16" and bool(torch.isfinite(loss)):
            return skipped_run  # fp16 loss scaling found an overflow and lowered the scale: routine
        skipped_run += 1
        step = self.state.step
        log.warning(
            "step %d skipped: non-finite loss or gradient norm (loss %s, %d in a row)",
            step,
            f"{float(loss):.4g}",
            skipped_run,
        )
        limit = self.cfg.train.max_skipped_steps
        if skipped_run > limit:
            latest = self.checkpoints.durable_latest()
            kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved yet"
            raise GptforgeError(
                f"training diverged: {skipped_run} consecutive steps ({step - skipped_run + 1}-{step}) had a "
                f"non-finite loss or gradient norm (train.max_skipped_steps={limit}); {kept}. Lower optim.lr or "
                "raise optim.warmup_steps, then resume with --resume"
            )
        return skipped_run

    def _evaluate(self) -> None:
        """The task's val metrics: one metrics line, one console line (its numbers, besides val loss/ppl)."""
        values = self.task.evaluate(self)
        record = {**eval_record(self.state.step, values.pop("val_loss")), **values}
        if self.dist.is_main:
            extra = "".join(
                f" | {k.removeprefix('val_').replace('_', ' ')} {v:.4f}"
                for k, v in values.items()
                if isinstance(v, float)
            )
            self.task.log.info(
                "step %d | val loss %.4f | val ppl %.2f%s",
                record["step"],
                record["val_loss"],
                record["val_ppl"],
                extra,
            )
        self.metrics.write(record, "val")

    def _save(self) -> Path:
        meta = checkpoint.checkpoint_meta(
            self.model_cfg,
            self.task.tokenizer_info,
            self.task.data_source,
            self.task.data_sha256,
            self.layout(),
            config_to_dict(self.cfg),
        )
        self.task.checkpoint_meta(self, meta)
        return self.checkpoints.save(self.engine, self.state, meta, self.model_cfg, self.dist.topology)


def train(cfg: Config, resume: str = "auto", allow_new_data: bool = False, task: Task | None = None) -> int:
    """Run `task` (pretraining by default) to the end; returns 0, or EXIT_PREEMPTED after a
    signal-triggered save. The process group is destroyed however it ends."""
    import torch.distributed as dist

    try:
        return Trainer(cfg, resume, allow_new_data, task).run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
