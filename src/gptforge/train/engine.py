"""The one place that knows DeepSpeed: process start-up, batch arithmetic, DeepSpeed's config, the engine.

`init_distributed` works under torchrun, mpirun and plain `python` (a one-process group on a free port);
`Distributed` carries the rank facts and the few collectives the loop needs, with every process group
coming from `gptforge.parallel.topology.Topology` (handed to DeepSpeed as its `mpu`).
`deepspeed_config` turns our config into DeepSpeed's; `build_engine` calls `deepspeed.initialize`.
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gptforge.config import Config
from gptforge.errors import ConfigError
from gptforge.parallel.topology import Topology
from gptforge.train.optim import AdamW, param_groups

SUPPORTED_ZERO_STAGES = (0, 1)
MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")  # Open MPI, MPICH (hydra)


# ---------------------------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_world_size() -> int:
    """World size the launcher announced (torchrun's WORLD_SIZE, or MPI's), 1 for plain `python`."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    for var in MPI_SIZE_VARS:
        if var in os.environ:
            return int(os.environ[var])
    return 1


@dataclass
class Distributed:
    """Who this process is, and the collectives the training loop uses (over the whole world unless a
    topology group is named)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    topology: Topology

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.topology.get_data_parallel_rank()

    @property
    def dp_size(self) -> int:
        return self.topology.get_data_parallel_world_size()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def mean_over_dp(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a scalar over the data-parallel ranks (each holds the mean over its own samples)."""
        if self.dp_size > 1:
            value = value.detach().clone()
            dist.all_reduce(value, group=self.topology.get_data_parallel_group())
            value /= self.dp_size
        return value

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (small picklable objects only)."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def sum(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def check_layout(cfg: Config, world_size: int, model_parallel: bool = False) -> None:
    """Check the layout before any process group exists (every failure says how to fix it).

    `model_parallel=True` (the pretraining trainer, whose model code has tensor/pipeline variants and
    gathers ZeRO-3 weights where it needs them): every layout `Topology.from_config` accepts. Otherwise
    (callers whose model is a plain module used as is): data parallel with ZeRO 0 or 1 only."""
    p = cfg.parallel
    if model_parallel:
        Topology.from_config(p, world_size, cfg.model)
        return
    unsupported = []
    if p.tp > 1:
        unsupported.append(f"parallel.tp={p.tp} (tensor parallelism)")
    if p.pp > 1:
        unsupported.append(f"parallel.pp={p.pp} (pipeline parallelism)")
    if p.zero_stage not in SUPPORTED_ZERO_STAGES:
        unsupported.append(f"parallel.zero_stage={p.zero_stage}")
    if p.offload_optimizer != "none" or p.offload_params:
        unsupported.append("parallel.offload_optimizer / offload_params")
    if p.activation_checkpointing:
        unsupported.append("parallel.activation_checkpointing")
    if unsupported:
        raise ConfigError(
            f"{', '.join(unsupported)}: not supported by the trainer yet; it runs data parallel with "
            "parallel.zero_stage 0 or 1 (set parallel.tp=1 parallel.pp=1 parallel.zero_stage=1)"
        )
    Topology.from_config(p, world_size, cfg.model)  # validates the rest (divisibility) without groups


def init_distributed(cfg: Config) -> Distributed:
    """Start (or join) the process group: torchrun/SLURM set RANK etc.; under mpirun DeepSpeed reads MPI;
    plain `python` gets a one-process group on a free local port."""
    import deepspeed
    import deepspeed.ops

    single = "RANK" not in os.environ and launched_world_size() == 1
    if single:  # a one-process group; RANK stays unset, so log lines carry no rank prefix
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine reads it
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce for *inference* the first time it
    # starts (~1 min, and a C++ compiler on every machine). Training never calls it: mark it unavailable.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = cfg.run.dist_backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("run.dist_backend=nccl needs CUDA GPUs; use gloo (or auto) on CPU")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(
        dist_backend=backend,
        timeout=timedelta(seconds=cfg.run.dist_timeout_s),
        verbose=False,
        auto_mpi_discovery=not single,
        init_method=f"tcp://127.0.0.1:{_free_port()}" if single else None,
        rank=0 if single else -1,
        world_size=1 if single else -1,
    )
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    topology = Topology.from_config(cfg.parallel, world, cfg.model).init_process_groups()
    return Distributed(rank, world, local_rank, device, topology)


# ---------------------------------------------------------------------------------------------- batch


@dataclass(frozen=True)
class BatchPlan:
    """Sequences per micro-batch, accumulation steps, data-parallel ranks, and their product."""

    micro_batch: int
    grad_accum: int
    dp: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp


def plan_batch(cfg: Config, dp: int) -> BatchPlan:
    """Gradient accumulation from the global batch (sequences or tokens), micro batch and dp size."""
    t, ctx = cfg.train, cfg.model.context_length
    if t.micro_batch_size < 1:
        raise ConfigError(f"train.micro_batch_size must be >= 1, got {t.micro_batch_size}")
    per_step = t.micro_batch_size * dp
    if t.global_batch_tokens is not None:
        if t.global_batch_size is not None:
            raise ConfigError(
                "set train.global_batch_size (sequences) or train.global_batch_tokens, not both"
            )
        if t.global_batch_tokens % ctx:
            raise ConfigError(
                f"train.global_batch_tokens={t.global_batch_tokens} is not a multiple of model.context_length={ctx}"
            )
        global_batch = t.global_batch_tokens // ctx
        given = f"train.global_batch_tokens={t.global_batch_tokens} ({global_batch} sequences)"
    elif t.global_batch_size is not None:
        global_batch, given = t.global_batch_size, f"train.global_batch_size={t.global_batch_size}"
    else:
        return BatchPlan(t.micro_batch_size, 1, dp)
    if global_batch < 1 or global_batch % per_step:
        fits = [m for m in range(1, global_batch // dp + 1) if global_batch % (m * dp) == 0]
        hint = f"a micro batch size in {fits[:8]}" if fits else f"a global batch that is a multiple of {dp}"
        raise ConfigError(
            f"{given} is not divisible by train.micro_batch_size x data-parallel ranks = "
            f"{t.micro_batch_size} x {dp} = {per_step}; use {hint}"
        )
    return BatchPlan(t.micro_batch_size, global_batch // per_step, dp)


# ---------------------------------------------------------------------------------------------- precision


def cpu_supports_bf16() -> bool:
    """Native bf16 matmuls (avx512_bf16 or AMX), read from /proc/cpuinfo (False where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def precision_mode(precision: str, device: torch.device) -> str:
    """How a precision runs here: `fp32`; `autocast` (bf16 matmuls under torch.autocast over fp32 weights:
    on CPU as fast as DeepSpeed's bf16, and weights, loss and gradient all-reduce stay fp32); `bf16` /
    `fp16` (DeepSpeed's mixed precision on GPU: half-precision weights, fp32 master copy, dynamic loss
    scaling for fp16)."""
    if precision == "fp32":
        return "fp32"
    if device.type == "cpu":
        if precision == "fp16":
            raise ConfigError("train.precision=fp16 needs a GPU (loss-scaled fp16); use bf16 or fp32 on CPU")
        if not cpu_supports_bf16():
            raise ConfigError(
                "train.precision=bf16: this CPU has no native bf16 (avx512_bf16 or AMX); use train.precision=fp32"
            )
        return "autocast"
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision=bf16: this GPU does not support bf16; use fp16 or fp32")
    return precision


# ---------------------------------------------------------------------------------------------- DeepSpeed


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
    """`deepspeed.initialize` with our AdamW (decay groups), and DeepSpeed's checkpoint loader switched to
    `torch.load(weights_only=True)`. `model` is what `gptforge.parallel.parallelize` made: a (tp-sharded)
    GPT, or a pipeline stage, for which DeepSpeed builds its PipelineEngine (whose grid, built from the same
    topology, is then the mpu: DeepSpeed accepts no other with a pipeline)."""
    import deepspeed

    from gptforge.parallel.parallelize import counts_in_grad_norm
    from gptforge.train.checkpoint import SafeCheckpointEngine

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
    engine.checkpoint_engine = SafeCheckpointEngine(engine.checkpoint_engine)
    return engine
