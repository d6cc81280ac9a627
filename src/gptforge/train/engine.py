"""DeepSpeed's config from ours, and the engine: `deepspeed.initialize` with our AdamW.

`deepspeed_config` turns our config, a batch plan (`gptforge.train.batch`) and a precision mode
(`gptforge.train.precision`) into DeepSpeed's JSON config; `build_engine` calls `deepspeed.initialize` on
the module `gptforge.parallel.parallelize` made, with the run's `Topology` as DeepSpeed's `mpu`. The
process group itself starts in `gptforge.train.distributed`; checkpoints are `gptforge.train.checkpoint`'s
(DeepSpeed's own checkpoint files are not used).
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any

from torch import nn

from gptforge.config import Config
from gptforge.train.batch import BatchPlan
from gptforge.train.distributed import Distributed
from gptforge.train.optim import AdamW, param_groups


def optimizer_guards(mode: str, zero_stage: int) -> bool:
    """Whether our AdamW computes the gradient norm, clips and skips non-finite steps itself: DeepSpeed's
    ZeRO and mixed-precision optimizers do all three; with a plain optimizer DeepSpeed only clips."""
    return zero_stage == 0 and mode in ("fp32", "autocast")


def deepspeed_config(cfg: Config, plan: BatchPlan, mode: str) -> dict[str, Any]:
    """DeepSpeed's JSON config for our config. Everything DeepSpeed would do per step that we do not need
    (progress prints, throughput timers that synchronize the device, its own monitors) is off."""
    p = cfg.parallel
    guarded = optimizer_guards(mode, p.zero_stage)
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu"}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    ds: dict[str, Any] = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,  # = the pipeline's micro-batches per step
        "gradient_clipping": 0.0 if guarded else cfg.optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # ZeRO-Offload runs our AdamW (torch's fused CPU kernel) on the offloaded fp32 states instead of
        # DeepSpeed's CPU Adam, a C++ op compiled on first use: one optimizer, same numbers, in every layout.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        "checkpoint": {"tag_validation": "FAIL"},
    }
    if mode == "autocast":
        # fp32 weights and gradients (so gradients are all-reduced in fp32: no module is listed as
        # safe for lower-precision communication), bf16 matmuls.
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    elif mode == "bf16":
        ds["bf16"] = {"enabled": True}
    elif mode == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "hysteresis": 2}
    return ds


def is_pipeline(engine: Any) -> bool:
    """A DeepSpeed PipelineEngine (pp > 1): it runs whole steps (`train_batch`), not forward/backward."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def build_engine(cfg: Config, model: nn.Module, plan: BatchPlan, mode: str, dist_ctx: Distributed) -> Any:
    """`deepspeed.initialize` with our AdamW (decay groups). `model` is what `gptforge.parallel.parallelize` made: a (tp-sharded)
    GPT, or a pipeline stage, for which DeepSpeed builds its PipelineEngine (whose grid, built from the same
    topology, is then the mpu: DeepSpeed accepts no other with a pipeline)."""
    import deepspeed

    from gptforge.model.compile import compile_blocks
    from gptforge.parallel.parallelize import counts_in_grad_norm

    o, topo = cfg.optim, dist_ctx.topology
    guarded = optimizer_guards(mode, cfg.parallel.zero_stage)
    split = guarded and (topo.tp > 1 or topo.pp > 1)  # our AdamW's norm spans the model-parallel group
    optimizer = AdamW(
        param_groups(model, o.weight_decay),
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        guard=guarded,
        max_grad_norm=o.grad_clip,
        norm_group=topo.get_model_parallel_group() if split else None,
        norm_counts=partial(counts_in_grad_norm, tp_rank=topo.get_tensor_model_parallel_rank())
        if split
        else None,
        fused=dist_ctx.device.type in ("cpu", "cuda"),
    )
    if topo.pp > 1:  # its stages exchange activations by broadcasts that autograd passes through as is
        warnings.filterwarnings("ignore", message="c10d::broadcast_: an autograd kernel was not registered")
    if cfg.train.compile:
        compile_blocks(model, cfg.parallel)  # in place, before DeepSpeed wraps it (or a logged fallback)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=deepspeed_config(cfg, plan, mode),
        mpu=None if topo.pp > 1 else topo,
        dist_init_required=False,
    )
    if plan.dp == 1 and cfg.parallel.zero_stage == 0:
        # Nothing to reduce, but DeepSpeed would still flatten every gradient into a bucket, "all-reduce"
        # it over one rank and copy it back: two extra copies of the gradients per step. (A pipeline
        # engine has its own flag; its tied-embedding reduction between stages is separate and stays.)
        engine.enable_backward_allreduce = False
        engine.pipeline_enable_backward_allreduce = False
    return engine
