"""The training loop: set up (data, model, engine, resume), then step, log, evaluate, sample, save.

One optimizer step = `grad_accum` micro-batches per data-parallel rank through DeepSpeed's engine
(forward, backward, step each; the engine applies the update at the accumulation boundary). The learning
rate is a function of the step; the data position is the number of samples consumed. Both are saved, with
every rank's RNG state, so a resumed run repeats the uninterrupted one bit for bit (fp32, CPU).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gptforge.config import Config, config_to_dict, dump_config
from gptforge.data.format import Manifest, read_manifest
from gptforge.data.loader import (
    TrainBatches,
    WindowDataset,
    check_tokenizer,
    eval_batches,
    remember_verified,
    shards_to_verify,
    verify_shards,
)
from gptforge.errors import DataError, GptforgeError
from gptforge.model import count_parameters, flops_per_token
from gptforge.parallel.parallelize import parallelize, pp_parts, seed_model_parallel, stage_lines
from gptforge.parallel.universal import gather_weights, has_universal, save_universal
from gptforge.train import checkpoint
from gptforge.train.engine import (
    Distributed,
    build_engine,
    check_layout,
    init_distributed,
    is_pipeline,
    launched_world_size,
    plan_batch,
    precision_mode,
)
from gptforge.train.metrics import (
    MetricsWriter,
    Throughput,
    eval_record,
    format_train,
    peak_flops,
    train_record,
)
from gptforge.train.optim import lr_at, set_lr
from gptforge.train.preemption import EXIT_PREEMPTED, Preemption

log = logging.getLogger("train")

SAMPLE_TEMPERATURE = 0.8
SAMPLE_TOP_K = 200


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


@torch.no_grad()
def evaluate(engine: Any, batches: list[tuple[Tensor, Tensor]], dist_ctx: Distributed) -> float:
    """Mean loss over the fixed validation windows (each rank its share, summed over ranks)."""
    if is_pipeline(engine):
        return _evaluate_pipeline(engine, batches, dist_ctx)
    engine.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=dist_ctx.device), 0
    for x, y in batches:
        _, loss = engine(x.to(dist_ctx.device), y.to(dist_ctx.device))
        total += loss.double() * x.size(0)
        count += x.size(0)
    engine.train()
    loss_sum, n = dist_ctx.sum([float(total), float(count)])
    return loss_sum / n


def _evaluate_pipeline(engine: Any, batches: list[tuple[Tensor, Tensor]], dist_ctx: Distributed) -> float:
    """`evaluate` through the pipeline: one `eval_batch` over this rank's windows (the last micro-batch may
    be smaller: shapes are sent with each), the losses weighted by micro-batch size on the last stage."""
    if dist_ctx.any(not batches):  # eval_batch is collective; fewer windows than dp ranks: nothing to run
        return float("nan")
    engine.dynamic_shape = True
    engine.reset_activation_shape()
    try:
        losses = engine.eval_batch(
            iter(batches), num_micro_batches=len(batches), reduce_output=None, bcast_loss=False
        )
    finally:
        engine.dynamic_shape = False
        engine.reset_activation_shape()  # training's micro-batches announce their shape again
    total = count = 0.0
    if engine.is_last_stage():
        total = sum(float(loss) * x.size(0) for loss, (x, _) in zip(losses, batches, strict=True))
        count = float(sum(x.size(0) for x, _ in batches))
    loss_sum, n = dist_ctx.sum([total, count])
    return loss_sum / n


def _float(value: Any) -> float:
    if value is None:
        return float("nan")
    return float(value)


class Trainer:
    """A configured run: everything `train` sets up, and the loop over steps."""

    def __init__(self, cfg: Config, resume: str = "auto", allow_new_data: bool = False) -> None:
        self.manifest: Manifest = read_manifest(cfg.data.path)
        resume_meta = self._start(cfg, resume, model_parallel=True)

        self._verify_data(cfg)
        seed_everything(cfg.train.seed)
        model, model_cfg = self._build_model(cfg)
        model = parallelize(model, model_cfg, cfg.parallel, self.dist.topology, cfg.train.seed)
        self.cfg = dataclasses.replace(cfg, model=model_cfg)
        self.model_cfg = model_cfg
        self.layout = {
            "world_size": self.dist.world_size,
            "dp": self.plan.dp,
            "tp": cfg.parallel.tp,
            "pp": cfg.parallel.pp,
            "zero_stage": cfg.parallel.zero_stage,
            "precision_mode": self.mode,
            "pp_parts": pp_parts(model_cfg, cfg.parallel),
        }
        self.layout_changes: list[str] = []
        if resume_meta is not None:
            assert self.resume_dir is not None
            self.layout_changes = checkpoint.check_resume(
                resume_meta,
                self.resume_dir,
                model_cfg,
                self.manifest.sha256,
                self.layout,
                allow_new_data,
                convertible=has_universal(self.resume_dir),
            )

        t = self.cfg.train
        train_data = WindowDataset(self.manifest, self.cfg.data.train_split, model_cfg.context_length, t.seed)
        self.batches = TrainBatches(
            train_data, self.plan.micro_batch, self.plan.grad_accum, self.dist.dp_rank, self.plan.dp
        )
        self.val_batches = self._val_batches()

        self.engine = build_engine(self.cfg, model, self.plan, self.mode, self.dist)
        self.state = checkpoint.TrainState()
        if resume_meta is not None and self.layout_changes:
            assert self.resume_dir is not None
            self.state = self._load_converted(resume_meta)
        elif resume_meta is not None:
            self.state = self._load(resume_meta)
        peak_source = self._open_run(resume_meta)
        self.flops_per_token = flops_per_token(model_cfg)
        self._log_setup(train_data, peak_source)

    # ------------------------------------------------------------------------------------------ setup

    def _start(self, cfg: Config, resume: str, model_parallel: bool) -> dict[str, Any] | None:
        """Layout and batch checks (before any process group: a bad layout fails on every rank at once),
        the process groups, precision, and the checkpoint to resume; returns its metadata, if any."""
        world = launched_world_size()
        check_layout(cfg, world, model_parallel=model_parallel)
        self.plan = plan_batch(cfg, world // (cfg.parallel.tp * cfg.parallel.pp))
        self.dist = init_distributed(cfg)
        self.mode = precision_mode(cfg.train.precision, self.dist.device)
        self.run_dir = Path(cfg.run.dir)
        self.resume_dir = checkpoint.find_resume(resume, self.run_dir)
        return checkpoint.read_meta(self.resume_dir) if self.resume_dir else None

    def _load(self, meta: dict[str, Any]) -> checkpoint.TrainState:
        """Resume a checkpoint of this layout from DeepSpeed's own files (bitwise)."""
        assert self.resume_dir is not None
        state = checkpoint.load(self.engine, self.resume_dir, meta, self.dist)
        log.info(
            "resumed from %s (step %d, %d samples consumed)",
            self.resume_dir,
            state.step,
            state.consumed_samples,
        )
        return state

    def _open_run(self, resume_meta: dict[str, Any] | None) -> str:
        """The run directory (half-written checkpoints removed, the resolved config written), the metrics
        writer (continuing the log of a resumed run) and the MFU peak; returns where the peak comes from."""
        if self.dist.is_main:
            checkpoint.remove_incomplete(self.run_dir / checkpoint.CHECKPOINTS)
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

    def _verify_data(self, cfg: Config) -> None:
        """sha256 of the shards not verified before, the ranks sharing the work; remembered on success."""
        if not cfg.data.verify_checksums:
            return
        splits = [s for s in (cfg.data.train_split, cfg.data.val_split) if s in self.manifest.splits]
        todo = shards_to_verify(self.manifest, splits)
        if not todo:
            return
        mine = verify_shards(self.manifest, todo, self.dist.rank, self.dist.world_size)
        problems = [p for rank_problems in self.dist.gather(mine) for p in rank_problems]
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise DataError(problems[0] + more)
        if self.dist.is_main:
            remember_verified(self.manifest, todo)

    def _load_converted(self, meta: dict[str, Any]) -> checkpoint.TrainState:
        """Resume a checkpoint of another layout from its `universal/` files; the RNG streams of the old
        ranks do not fit the new ones, so they are seeded afresh from (train.seed, step)."""
        assert self.resume_dir is not None
        state = checkpoint.load_converted(
            self.engine, self.resume_dir, meta, self.model_cfg, self.dist.topology
        )
        seed = self.cfg.train.seed + state.step
        seed_everything(seed)
        seed_model_parallel(seed, self.dist.topology)
        log.info(
            "resumed from %s (step %d, %d samples consumed) under another layout (%s): weights and AdamW "
            "state re-sharded from its universal/ files; dropout RNG reseeded",
            self.resume_dir,
            state.step,
            state.consumed_samples,
            "; ".join(self.layout_changes),
        )
        return state

    def _build_model(self, cfg: Config) -> tuple[torch.nn.Module, Any]:
        from gptforge.weights import init_model

        model_cfg = cfg.model
        if model_cfg.vocab_size is None:
            model_cfg = dataclasses.replace(model_cfg, vocab_size=int(self.manifest.tokenizer["vocab_size"]))
        model, model_cfg, weights_tokenizer = init_model(model_cfg)
        check_tokenizer(self.manifest, model_cfg.vocab_size, weights_tokenizer)
        return model.to(self.dist.device), model_cfg

    def _val_batches(self) -> list[tuple[Tensor, Tensor]]:
        t = self.cfg.train
        split = self.cfg.data.val_split
        if split not in self.manifest.splits or t.eval_iters < 1:
            log.warning(
                "no evaluation: the data has no '%s' split or train.eval_iters < 1", self.cfg.data.val_split
            )
            return []
        data = WindowDataset(self.manifest, split, self.model_cfg.context_length, t.seed)
        if len(data) == 0:
            log.warning("no evaluation: the '%s' split is shorter than one window", split)
            return []
        # eval_iters x micro_batch windows in all, shared by the ranks: the same val set in every layout
        return eval_batches(
            data, t.eval_iters * self.plan.micro_batch, self.plan.micro_batch, self.dist.dp_rank, self.plan.dp
        )

    def _log_layout(self) -> None:
        """The process layout, ZeRO stage and precision; with pp, which layers and ranks each stage has."""
        log.info(
            "layout: %s; ZeRO-%d; precision %s (%s)",
            self.dist.topology.describe(),
            self.cfg.parallel.zero_stage,
            self.cfg.train.precision,
            self.mode,
        )
        for line in stage_lines(self.model_cfg, self.cfg.parallel, self.dist.topology):
            log.info(line)

    def _log_setup(self, train_data: WindowDataset, peak_source: str) -> None:
        if not self.dist.is_main:
            return
        t, p, m = self.cfg.train, self.plan, self.model_cfg
        tokens_per_step = p.global_batch * m.context_length
        epochs = t.max_steps * p.global_batch / len(train_data) if len(train_data) else 0.0
        log.info(
            "model: %s parameters (%d layers, d_model %d, %d heads, context %d, vocab %d)",
            f"{count_parameters(m):,}",
            m.n_layer,
            m.d_model,
            m.n_head,
            m.context_length,
            m.vocab_size,
        )
        self._log_layout()
        log.info(
            "batch: %d sequences = %s tokens per step (micro batch %d x %d accumulation x %d data-parallel)",
            p.global_batch,
            f"{tokens_per_step:,}",
            p.micro_batch,
            p.grad_accum,
            p.dp,
        )
        log.info(
            "data: %s, %s train tokens = %s windows; %d steps = %.2f epochs; %d val batches per rank",
            self.cfg.data.path,
            f"{train_data.stream.tokens:,}",
            f"{len(train_data):,}",
            t.max_steps,
            epochs,
            len(self.val_batches),
        )
        peak = f"{self.peak / 1e12:.1f} TFLOP/s" if self.peak >= 1e12 else f"{self.peak / 1e9:.0f} GFLOP/s"
        log.info(
            "MFU peak: %s per rank (%s); %.1f MFLOPs per token", peak, peak_source, self.flops_per_token / 1e6
        )

    # ------------------------------------------------------------------------------------------ loop

    def run(self) -> int:
        t = self.cfg.train
        preemption = Preemption().install()
        try:
            if self.state.step >= t.max_steps:
                log.info(
                    "already at step %d of train.max_steps=%d: nothing to do", self.state.step, t.max_steps
                )
                return 0
            if self.state.step == 0 and self.val_batches:
                self._evaluate()
            return self._loop(preemption)
        finally:
            preemption.uninstall()
            self.metrics.close()

    def _loop(self, preemption: Preemption) -> int:
        t, state = self.cfg.train, self.state
        throughput = Throughput(self._tokens(), state.step)
        skipped_run = 0
        last_saved = state.step if self.resume_dir else -1
        while state.step < t.max_steps:
            lr = lr_at(state.step, self.cfg.optim, t.max_steps)
            set_lr(self.engine.optimizer, lr)
            loss = train_step(self.engine, self.batches.step(state.consumed_samples), self.dist.device)
            state.step += 1
            state.consumed_samples += self.plan.global_batch
            skipped_run = self._check_step(skipped_run, loss)
            tokens = self._tokens()

            if state.step % t.log_interval == 0 or state.step == t.max_steps:
                self._log_step(loss, lr, tokens, throughput)
            paused = False
            if self.val_batches and (state.step % t.eval_interval == 0 or state.step == t.max_steps):
                self._evaluate()
                paused = True
            if t.sample_interval and (state.step % t.sample_interval == 0 or state.step == t.max_steps):
                self._sample()
                paused = True
            stop = self.dist.any(preemption.received)
            if (
                stop or state.step % t.save_interval == 0 or state.step == t.max_steps
            ) and state.step != last_saved:
                self._save()
                last_saved = state.step
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

    def _tokens(self) -> int:
        """Tokens consumed so far (every window is context_length long; fine-tuning counts its own)."""
        return self.state.consumed_samples * self.model_cfg.context_length

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
            latest = checkpoint.latest_in(self.run_dir / checkpoint.CHECKPOINTS)
            kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was saved yet"
            raise GptforgeError(
                f"training diverged: {skipped_run} consecutive steps ({step - skipped_run + 1}-{step}) had a "
                f"non-finite loss or gradient norm (train.max_skipped_steps={limit}); {kept}. Lower optim.lr or "
                "raise optim.warmup_steps, then resume with --resume"
            )
        return skipped_run

    def _evaluate(self) -> None:
        val_loss = evaluate(self.engine, self.val_batches, self.dist)
        record = eval_record(self.state.step, val_loss)
        if self.dist.is_main:
            log.info("step %d | val loss %.4f | val ppl %.2f", record["step"], val_loss, record["val_ppl"])
        self.metrics.write(record, "val")

    def _sample(self) -> None:
        """Text from `train.sample_prompt` (rank 0; its own seeded generator, so training RNG is untouched).
        Where no rank holds the whole model (tp, pp, ZeRO-3) the ranks first gather it onto rank 0."""
        model = self.engine.module
        if self.layout["tp"] > 1 or self.layout["pp"] > 1 or self.layout["zero_stage"] == 3:
            from gptforge.model import GPT

            full = gather_weights(self.engine, self.model_cfg, self.dist.topology)
            if full is not None:
                with torch.random.fork_rng(devices=[]):  # its init must not move the training RNG
                    model = GPT(self.model_cfg)
                model.load_state_dict(full)
                model.to(self.dist.device)
        if not self.dist.is_main:
            return
        from gptforge.generate import generate
        from gptforge.tokenizer import tokenizer_from_manifest

        tok = tokenizer_from_manifest(self.manifest.tokenizer)
        t = self.cfg.train
        prompt = tok.encode(t.sample_prompt, allow_special=True) or [tok.eot_id]
        out = generate(
            model,
            [prompt],
            max_new_tokens=t.sample_tokens,
            temperature=SAMPLE_TEMPERATURE,
            top_k=SAMPLE_TOP_K,
            seed=t.seed + self.state.step,
            eot_id=tok.eot_id,
        )[0]
        text = t.sample_prompt + tok.decode(out)
        log.info("sample at step %d:\n%s", self.state.step, text)
        self.metrics.text("sample", text, self.state.step)

    def _save(self) -> Path:
        meta = checkpoint.checkpoint_meta(
            self.model_cfg,
            self.manifest.tokenizer,
            self.cfg.data.path,
            self.manifest.sha256,
            self.layout,
            config_to_dict(self.cfg),
        )
        path = checkpoint.save(
            self.engine,
            self.run_dir,
            self.state,
            meta,
            self.dist,
            self.cfg.train.keep_last,
            write_extra=(
                (lambda tmp: save_universal(self.engine, tmp, self.model_cfg, self.dist.topology))
                if self.cfg.train.save_universal
                else None
            ),
        )
        if self.dist.is_main:
            log.info("saved %s", path)
        return path


def train(
    cfg: Config, resume: str = "auto", allow_new_data: bool = False, trainer: type[Trainer] = Trainer
) -> int:
    """Run training (or `trainer`'s kind of run, e.g. fine-tuning) to the end; returns 0, or
    EXIT_PREEMPTED after a signal-triggered save. The process group is destroyed however it ends."""
    import torch.distributed as dist

    try:
        return trainer(cfg, resume, allow_new_data).run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
