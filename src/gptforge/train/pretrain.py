"""Pretraining as a `Task`: windows of a build output (or a blend of several), a GPT in any layout.

The data are `gptforge.data.blend.PretrainData` (every source's manifest, checked shards, one tokenizer);
the model is `model.init_from` (GPT-2's initialisation, or saved weights) cut for the layout by
`gptforge.parallel.parallelize`; the evaluation is the mean loss over each source's fixed val windows;
a sample from `train.sample_prompt` shows progress.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gptforge.config import Config, ModelConfig
from gptforge.data.blend import PretrainData
from gptforge.data.loader import check_tokenizer
from gptforge.data.order import RankBatches
from gptforge.evaluate import engine_loss
from gptforge.model import count_parameters, flops_per_token
from gptforge.parallel.parallelize import parallelize
from gptforge.tokenizer import Tokenizer, tokenizer_from_manifest
from gptforge.train.fragments import gather_weights
from gptforge.train.task import Task

if TYPE_CHECKING:
    from gptforge.train.loop import Trainer

log = logging.getLogger("train")

SAMPLE_TEMPERATURE = 0.8
SAMPLE_TOP_K = 200


class PretrainTask(Task):
    """Next-token prediction over the build outputs `data.path` / `data.blend` name."""

    name = "pretrain"
    log = log
    model_parallel = True

    def prepare(self, cfg: Config) -> None:
        self.data = PretrainData(cfg.data)  # every source's manifest; one shared tokenizer
        self.tokenizer_info = dict(self.data.manifest.tokenizer)
        if self.tokenizer_info.get("model"):  # a build's copy of its model is named relative to the build
            self.tokenizer_info["model"] = str(
                (self.data.manifest.root / self.tokenizer_info["model"]).resolve()
            )
        self.data_source, self.data_sha256 = self.data.path, self.data.sha256
        # loaded now, not at the first sample: a tokenizer that cannot load fails before any step
        self.tokenizer: Tokenizer | None = (
            tokenizer_from_manifest(self.tokenizer_info, self.data.manifest.root)
            if cfg.train.sample_interval
            else None
        )

    def setup(self, run: Trainer) -> tuple[nn.Module, Config]:
        from gptforge.weights import init_model

        cfg, dist = run.cfg, run.dist
        self.data.verify(dist)
        model_cfg = cfg.model
        if model_cfg.vocab_size is None:
            vocab = int(self.data.manifest.tokenizer["vocab_size"])
            model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab)
        model, model_cfg, weights_tokenizer = init_model(model_cfg)
        check_tokenizer(self.data.manifest, model_cfg.vocab_size, weights_tokenizer)
        module = parallelize(model.to(dist.device), model_cfg, cfg.parallel, dist.topology, cfg.train.seed)

        t, p, ctx = cfg.train, run.plan, model_cfg.context_length
        self.train_data = self.data.train(ctx, t.seed)
        self.train_batches = RankBatches(self.train_data, p.micro_batch, p.grad_accum, dist.dp_rank, p.dp)
        self.val_sets: dict[str, list[Any]] = {}
        if t.eval_iters < 1:
            log.warning("no evaluation: train.eval_iters < 1")
        else:  # eval_iters x micro_batch windows per source, shared by the ranks: one val set in every layout
            self.val_sets = self.data.val(
                ctx, t.eval_iters * p.micro_batch, p.micro_batch, dist.dp_rank, p.dp
            )
        self.val_batches = [b for batches in self.val_sets.values() for b in batches]
        self.context = ctx
        return module, dataclasses.replace(cfg, model=model_cfg)

    def resumed(self, run: Trainer, meta: dict[str, Any]) -> None:
        """A blend's per-source position; with new weights, a new mixture from there."""
        change = self.train_data.restore(meta["data"], run.state.consumed_samples)
        if change and run.dist.is_main:
            log.info("data: %s", change)

    def setup_lines(self, run: Trainer) -> tuple[list[str], list[str]]:
        m, p = run.model_cfg, run.plan
        model = (
            f"model: {count_parameters(m):,} parameters ({m.n_layer} layers, d_model {m.d_model}, "
            f"{m.n_head} heads, context {m.context_length}, vocab {m.vocab_size})"
        )
        batch = (
            f"batch: {p.global_batch} sequences = {p.global_batch * m.context_length:,} tokens per step "
            f"(micro batch {p.micro_batch} x {p.grad_accum} accumulation x {p.dp} data-parallel)"
        )
        data = self.data.setup_lines(
            self.train_data, run.cfg.train.max_steps, p.global_batch, len(self.val_batches)
        )
        return [model], [batch, *data]

    def evaluate(self, run: Trainer) -> dict[str, Any]:
        """The val loss; with a blend, each source's and their mean over all windows."""
        if not self.data.is_blend:
            return {"val_loss": engine_loss(run.engine, self.val_batches, run.dist)}
        by_source = {name: engine_loss(run.engine, b, run.dist) for name, b in self.val_sets.items()}
        return {"val_loss": self.data.val_loss(by_source), "val_loss_by_source": by_source}

    def tokens(self, consumed: int) -> int:
        return consumed * self.context  # every window is context_length long

    def step_metrics(self, consumed: int) -> dict[str, Any]:
        return self.train_data.by_source(consumed)  # a blend's tokens and epochs per source

    def flops_per_token(self, model_cfg: ModelConfig) -> float:
        return flops_per_token(model_cfg)

    def checkpoint_meta(self, run: Trainer, meta: dict[str, Any]) -> None:
        meta["data"]["blend"] = self.train_data.state(run.state.consumed_samples)

    def sample(self, run: Trainer) -> None:
        """Text from `train.sample_prompt` (rank 0; its own seeded generator, so training RNG is untouched).
        Where no rank holds the whole model (tp, pp, ZeRO-3) the ranks first gather it onto rank 0."""
        topo, model_cfg, dist = run.dist.topology, run.model_cfg, run.dist
        model = run.engine.module
        if topo.tp > 1 or topo.pp > 1 or run.cfg.parallel.zero_stage == 3:
            from gptforge.model import GPT

            full = gather_weights(run.engine, model_cfg, topo)
            if full is not None:
                with torch.random.fork_rng(devices=[]):  # its init must not move the training RNG
                    model = GPT(model_cfg)
                model.load_state_dict(full)
                model.to(dist.device)
        if not dist.is_main:
            return
        from gptforge.generate import generate

        tok, t, step = self.tokenizer, run.cfg.train, run.state.step
        assert tok is not None  # loaded in prepare when train.sample_interval is set
        prompt = tok.encode(t.sample_prompt, allow_special=True) or [tok.eot_id]
        out = generate(
            model,
            [prompt],
            max_new_tokens=t.sample_tokens,
            temperature=SAMPLE_TEMPERATURE,
            top_k=SAMPLE_TOP_K,
            seed=t.seed + step,
            eot_id=tok.eot_id,
        )[0]
        text = t.sample_prompt + tok.decode(out)
        log.info("sample at step %d:\n%s", step, text)
        run.metrics.text("sample", text, step)
