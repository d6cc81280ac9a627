"""The serial GPT a run starts from, turned into this rank's part of it for the run's layout.

Every rank builds the same full serial model (same seed, or the same `init_from` weights); then:

    pp > 1   -> this rank's pipeline stage (`build_pipeline`), weights copied from the serial model
                (tensor-parallel inside when tp > 1); DeepSpeed recomputes the blocks if asked
    tp > 1   -> `parallelize_tensor`: heads, MLP width and vocabulary split in place
    activation_checkpointing (pp = 1) -> every block recomputed in backward

So every layout starts from exactly the weights one process would train, which is what makes the
equivalence tests (and resuming under another layout) possible.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from gptforge.config import ModelConfig, ParallelConfig
from gptforge.model.pipeline import build_pipeline, describe_stages, load_serial_state_dict, stage_parts
from gptforge.model.tensor_parallel import model_parallel_seed, parallelize_tensor
from gptforge.parallel.topology import Topology

log = logging.getLogger(__name__)


def parallelize(
    model: nn.Module, model_cfg: ModelConfig, parallel: ParallelConfig, topology: Topology, seed: int
) -> nn.Module:
    """This rank's module for DeepSpeed: the serial `model` itself, sharded in place, or a pipeline stage.
    Collective when tp > 1 or pp > 1 (needs `topology.init_process_groups()` and DeepSpeed's
    `init_distributed`). Seeds the dropout RNGs of the layout afterwards (`seed_model_parallel`)."""
    if topology.pp > 1:
        pipe = build_pipeline(model_cfg, topology, parallel.pp_partition, parallel.activation_checkpointing)
        device = next(model.parameters()).device
        load_serial_state_dict(pipe, model.state_dict(), model_cfg, topology)
        model = pipe.to(device)
    else:
        model = parallelize_tensor(model, topology)
        if parallel.activation_checkpointing:
            checkpoint_blocks(model)
    seed_model_parallel(seed, topology)
    return model


def seed_model_parallel(seed: int, topology: Topology) -> None:
    """Megatron's dropout seeding (`model_parallel_seed`) under tp or pp; nothing for data parallelism,
    whose ranks keep the generator `train.seed` gave them (so one-process runs are unchanged)."""
    if topology.tp > 1 or topology.pp > 1:
        pp_rank, _, tp_rank = topology.coords(topology.get_global_rank())
        model_parallel_seed(seed, tp_rank, pp_rank)


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each block of a `GPT` in backward instead of keeping its activations.

    Through `deepspeed.checkpointing.checkpoint`, which saves and restores both the default RNG and the
    tensor-parallel tracker's, so a recomputed block draws the same dropout masks. The blocks' forward is
    replaced on the instances (state-dict names stay the serial ones); generation with a KV cache and
    evaluation (no grad) run the blocks as they are.
    """
    from deepspeed.runtime.activation_checkpointing.checkpointing import checkpoint

    for block in model.transformer.h:
        run = block.forward

        def forward(
            x: torch.Tensor, mask: Any = None, cache: Any = None, positions: Any = None, _run: Any = run
        ) -> torch.Tensor:
            if mask is None and cache is None and torch.is_grad_enabled():
                return checkpoint(_run, x, None, None, positions)
            return _run(x, mask, cache, positions)

        block.forward = forward


def counts_in_grad_norm(param: torch.Tensor, tp_rank: int) -> bool:
    """Whether this rank's copy of `param` enters the global gradient norm (each weight counted once over
    the model-parallel group): tensor-parallel shards on every tp rank, replicated weights on tp rank 0,
    and the pipeline's tied embedding on the first stage only (later stages mark their copy
    `ds_pipe_replicated`)."""
    if getattr(param, "ds_pipe_replicated", False):
        return False
    return bool(getattr(param, "tensor_model_parallel", False)) or tp_rank == 0


def pp_parts(model_cfg: ModelConfig, parallel: ParallelConfig) -> list[int] | None:
    """The pipeline's stage boundaries (spec indices), recorded in a checkpoint's layout; None without pp."""
    return stage_parts(model_cfg, parallel.pp, parallel.pp_partition) if parallel.pp > 1 else None


def stage_lines(model_cfg: ModelConfig, parallel: ParallelConfig, topology: Topology) -> list[str]:
    """For the start-of-run log, one line per pipeline stage (`stage 0: layers 0-5 (+ embedding, ...),
    ranks 0,1`); none without pp."""
    return describe_stages(model_cfg, topology, parallel.pp_partition) if topology.pp > 1 else []
