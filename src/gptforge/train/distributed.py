"""Process start-up: the run's layout checked and built once, then the process group and its sub-groups.

`check_layout` validates a layout before any process group exists (so a bad one fails on every rank at
once) and returns the run's one `Topology`; `init_distributed` starts (or joins) the process group under
torchrun, SLURM's srun, mpirun or plain `python` (a one-process group on a free port) and makes that
topology's groups. `Distributed` carries the rank facts and the few collectives the loop needs.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from gptforge.config import Config
from gptforge.errors import ConfigError
from gptforge.launcher import launched_by_torchrun, launched_local_rank, launched_world_size
from gptforge.parallel.topology import Topology

DATA_PARALLEL_ZERO_STAGES = (0, 1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def check_layout(cfg: Config, world_size: int, model_parallel: bool = False) -> Topology:
    """The run's layout, checked before any process group exists (every failure says how to fix it).

    `model_parallel=True` (a task whose model has tensor/pipeline variants and gathers ZeRO-3 weights where
    it needs them, i.e. pretraining): every layout `Topology.from_config` accepts. Otherwise (a task whose
    model is a plain module used as is, i.e. fine-tuning): data parallel with ZeRO 0 or 1 only."""
    p = cfg.parallel
    if not model_parallel:
        unsupported = []
        if p.tp > 1:
            unsupported.append(f"parallel.tp={p.tp} (tensor parallelism)")
        if p.pp > 1:
            unsupported.append(f"parallel.pp={p.pp} (pipeline parallelism)")
        if p.zero_stage not in DATA_PARALLEL_ZERO_STAGES:
            unsupported.append(f"parallel.zero_stage={p.zero_stage}")
        if p.offload_optimizer != "none" or p.offload_params:
            unsupported.append("parallel.offload_optimizer / offload_params")
        if p.activation_checkpointing:
            unsupported.append("parallel.activation_checkpointing")
        if unsupported:
            raise ConfigError(
                f"{', '.join(unsupported)}: not supported for fine-tuning, which runs data parallel with "
                "parallel.zero_stage 0 or 1 (set parallel.tp=1 parallel.pp=1 parallel.zero_stage=1)"
            )
    return Topology.from_config(p, world_size, cfg.model)


def init_distributed(cfg: Config, topology: Topology | None = None) -> Distributed:
    """Start (or join) the process group and make `topology`'s groups (by default: data parallel over the
    whole world). torchrun/SLURM set RANK etc.; under mpirun DeepSpeed reads MPI; plain `python` gets a
    one-process group on a free local port."""
    import deepspeed
    import deepspeed.ops

    single = not launched_by_torchrun() and launched_world_size() == 1
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
    local_rank = launched_local_rank()
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
    local_rank = launched_local_rank()  # under mpirun DeepSpeed has now set LOCAL_RANK from MPI's
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if topology is None:
        topology = Topology.from_config(cfg.parallel, world, cfg.model)
    return Distributed(rank, world, local_rank, device, topology.init_process_groups())
