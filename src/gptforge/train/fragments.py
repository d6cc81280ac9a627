"""This rank's part of a DeepSpeed engine's state as fragments of global tensors, and the inverse: loading
a checkpoint's regions (any layout's) into this rank's part.

What a rank holds of each parameter (under the serial GPT's name, its tp shard if tp-sharded):
- ZeRO-3 (`ds_id`): a flat partition of the fp32 master and of each AdamW moment;
- ZeRO-1/2, DeepSpeed's bf16 optimizer (`_hp_mapping`): the whole working copy, and a flat range of the
  fp32 master and moments (`lp_fragment_address`);
- otherwise (ZeRO-0 fp32/autocast, frozen parameters): the whole parameter and the moments in the torch
  optimizer's state.
A rank writes only its ranges; a range several ranks hold (data-parallel replicas without ZeRO, a weight
tensor parallelism replicates) is written by one of them, chosen per tensor so that the writing is spread.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gptforge.checkpoint_format import DTYPE, MOMENTS, WEIGHTS, Checkpoint
from gptforge.config import ModelConfig
from gptforge.errors import CheckpointError


@dataclass
class Piece:
    """One parameter on this rank: its serial name, shard spec, and the flat range [start, stop) of the
    shard whose master value and moments this rank keeps (`kind` says how)."""

    name: str
    param: nn.Parameter
    tp_rank: int
    tp: int
    start: int
    stop: int
    kind: str  # "zero3" | "mapped" | "plain"
    writes: bool  # this rank writes the range (False: another replica does)


def serial_parameters(
    module: nn.Module, model_cfg: ModelConfig, pipeline: bool, owned: bool = False
) -> list[tuple[str, nn.Parameter]]:
    """This rank's parameters under the serial GPT's names. `owned`: leave out the pipeline's copy of the
    tied embedding on the last stage (stored once, from the first)."""
    from gptforge.model.pipeline import pipeline_to_serial_name

    out = []
    for name, p in module.named_parameters():
        if pipeline:
            if owned and getattr(p, "ds_pipe_replicated", False):
                continue
            name = pipeline_to_serial_name(name, model_cfg)
        out.append((name, p))
    return out


def inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's ZeRO / bf16 wrappers (ours, as given, under ZeRO-0 fp32)."""
    return getattr(optimizer, "optimizer", optimizer)


def adam_step(optimizer: Any) -> int:
    """Optimizer steps applied (AdamW's bias-correction count), agreed over every rank."""
    steps = [float(s["step"]) for s in inner_optimizer(optimizer).state.values() if "step" in s]
    step = torch.tensor([max(steps, default=0.0)], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            step = step.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(step, op=dist.ReduceOp.MAX)
    return int(step.item())


def _link_fragments(optimizer: Any) -> None:
    """ZeRO-1/2 and DeepSpeed's bf16 optimizer map each parameter to its slice of the flat optimizer
    states once, lazily, after stepping the first param group only: with two groups (decay / no decay)
    the second group's parameters stay unmapped. Map them all again now that every state exists."""
    link = getattr(optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        optimizer._hp_optimizer_states_linked = False
        link()


def _create_adam_state(optimizer: Any) -> None:
    """AdamW's per-parameter state as torch creates it lazily at the first step (zeros, step 0), so moments
    can be written into it before any step. (ZeRO-3 hands its flat fp32 partitions to the torch optimizer
    only while stepping them: they are listed in `fp32_partitioned_groups_flat`.)"""
    inner = inner_optimizer(optimizer)
    flats = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    groups = [{**inner.param_groups[0], "params": flats}] if flats else inner.param_groups
    for group in groups:
        on_device = group.get("fused") or group.get("capturable")
        for q in group["params"]:
            state = inner.state[q]
            if state:
                continue
            state["step"] = torch.zeros((), dtype=torch.float32, device=q.device if on_device else "cpu")
            for key in MOMENTS + (("max_exp_avg_sq",) if group.get("amsgrad") else ()):
                state[key] = torch.zeros_like(q, memory_format=torch.preserve_format)


def _global_shapes(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The serial GPT's parameter shapes (built on the meta device: no memory)."""
    from gptforge.model import GPT

    with torch.device("meta"):
        return {n: tuple(p.shape) for n, p in GPT(model_cfg).named_parameters()}


def pieces(engine: Any, model_cfg: ModelConfig, topology: Any, owned: bool) -> Iterator[Piece]:
    """This rank's parameters as pieces (`owned`: the tied pipeline copy left out)."""
    from gptforge.model.tensor_parallel import tp_rule

    tp, tp_rank = topology.tp, topology.get_tensor_model_parallel_rank()
    dp, dp_rank = topology.get_data_parallel_world_size(), topology.get_data_parallel_rank()
    zero = engine.zero_optimization_stage()
    for i, (name, p) in enumerate(serial_parameters(engine.module, model_cfg, topology.pp > 1, owned)):
        sharded = tp > 1 and tp_rule(name) is not None
        spec = (tp_rank, tp) if sharded else (0, 1)
        tp_copies = 1 if sharded or tp == 1 else tp  # a replicated weight: one tp rank writes it
        my_tp_copy = 0 if tp_copies == 1 else tp_rank
        if hasattr(p, "ds_id"):
            part = p.ds_tensor.numel()
            start = dist.get_rank(group=p.ds_process_group) * part
            yield Piece(
                name,
                p,
                *spec,
                start,
                max(start, min(start + part, p.ds_numel)),
                "zero3",
                i % tp_copies == my_tp_copy,
            )
        elif hasattr(p, "_hp_mapping") and p.requires_grad:
            m = p._hp_mapping
            a = m.lp_fragment_address.start if m is not None else 0
            b = a + m.lp_fragment_address.numel if m is not None else 0
            copies = tp_copies * (1 if zero > 0 else dp)  # without ZeRO every dp rank maps it all
            me = my_tp_copy * (1 if zero > 0 else dp) + (0 if zero > 0 else dp_rank)
            yield Piece(name, p, *spec, a, b, "mapped", m is not None and i % copies == me)
        else:
            if p.requires_grad and p.dtype != torch.float32:
                raise CheckpointError(
                    f"{name}: a {p.dtype} parameter whose fp32 master copy DeepSpeed keeps out of reach (its fp16 "
                    "optimizer without ZeRO): set parallel.zero_stage=1 (the same memory per GPU at dp 1)"
                )
            copies, me = tp_copies * dp, my_tp_copy * dp + dp_rank
            yield Piece(name, p, *spec, 0, p.numel(), "plain", i % copies == me)


def _value(piece: Piece) -> Tensor:
    """The fp32 master values of the piece's range (a view where the engine holds them as such)."""
    from deepspeed.utils import safe_get_local_fp32_param

    p = piece.param
    if piece.kind == "zero3":
        return safe_get_local_fp32_param(p).view(-1)[: piece.stop - piece.start]
    if piece.kind == "mapped":
        return p._hp_mapping.hp_fragment.view(-1)
    return p.detach().view(-1).float()


def _moment(piece: Piece, key: str, optimizer: Any) -> Tensor | None:
    from deepspeed.utils import safe_get_local_optimizer_state

    p = piece.param
    if not p.requires_grad:
        return None
    if piece.kind == "zero3":
        return safe_get_local_optimizer_state(p, key).view(-1)[: piece.stop - piece.start]
    if piece.kind == "mapped":
        return p._hp_mapping.get_optim_state_fragment(key).view(-1)
    state = inner_optimizer(optimizer).state.get(p)
    return state[key].view(-1).float() if state and key in state else None


@dataclass
class Owned:
    """A fragment this rank writes: the tensor's index name, global shape, shard spec, range, values."""

    name: str
    shape: tuple[int, ...]
    tp_rank: int
    tp: int
    start: int
    stop: int
    values: Tensor  # 1-D, on the engine's device (a view of live state)


def owned_fragments(engine: Any, model_cfg: ModelConfig, topology: Any, with_moments: bool) -> list[Owned]:
    """What this rank writes: its ranges of the fp32 weights and (after a step) of the AdamW moments."""
    if with_moments:
        _link_fragments(engine.optimizer)
    shapes = _global_shapes(model_cfg) if topology.tp > 1 else {}
    out = []
    for piece in pieces(engine, model_cfg, topology, owned=True):
        if not piece.writes or piece.stop <= piece.start:
            continue
        shape = shapes.get(piece.name, tuple(piece.param.shape)) if piece.tp > 1 else _shape(piece)
        frag = (piece.tp_rank, piece.tp, piece.start, piece.stop)
        out.append(Owned(WEIGHTS + piece.name, shape, *frag, _value(piece).detach()))
        for key in MOMENTS if with_moments else ():
            moment = _moment(piece, key, engine.optimizer)
            if moment is not None:
                out.append(Owned(f"{key}/{piece.name}", shape, *frag, moment.detach()))
    return out


def _shape(piece: Piece) -> tuple[int, ...]:
    p = piece.param
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


# ---------------------------------------------------------------------------------------------- loading


def _part(values: Tensor, size: int) -> Tensor:
    """`values` zero-padded to a ZeRO-3 partition's size (the last partition is padded)."""
    if values.numel() == size:
        return values
    return torch.cat([values, values.new_zeros(size - values.numel())])


def state_bytes(engine: Any, model_cfg: ModelConfig, topology: Any) -> int:
    """Bytes of fp32 state this rank holds (its weights as loaded, its master and moment ranges): what
    a resume of this rank has to read at least."""
    total = 0
    for piece in pieces(engine, model_cfg, topology, owned=False):
        n = piece.stop - piece.start
        whole = piece.param.ds_numel if piece.kind == "zero3" else piece.param.numel()
        held = whole if piece.kind != "zero3" or piece.param.data.numel() == whole else n
        total += 4 * (held + (2 * n if piece.param.requires_grad else 0))
    return total


@torch.no_grad()
def load_into(engine: Any, ckpt: Checkpoint, model_cfg: ModelConfig, topology: Any) -> None:
    """Weights, AdamW moments and step count of `ckpt` into this rank's part of the engine, reading only
    the regions this rank holds."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    step = ckpt.adam_step
    inner = inner_optimizer(engine.optimizer)
    if step > 0:
        _create_adam_state(engine.optimizer)
        _link_fragments(engine.optimizer)
    for piece in pieces(engine, model_cfg, topology, owned=False):
        p, name, spec = piece.param, piece.name, (piece.tp_rank, piece.tp)
        moments = step > 0 and p.requires_grad
        if piece.kind == "zero3":
            part = p.ds_tensor.numel()
            if p.data.numel() == p.ds_numel:  # gathered (a persistent parameter): its full copy too
                whole = ckpt.read(WEIGHTS + name, *spec)
                p.data.copy_(whole.view_as(p.data))
                value = whole[piece.start : piece.stop]
            elif piece.stop > piece.start:
                value = ckpt.read(WEIGHTS + name, *spec, piece.start, piece.stop)
            if piece.stop <= piece.start:
                continue
            value = _part(value, part)
            p.ds_tensor.data.copy_(value)
            safe_set_local_fp32_param(p, value.to(p.ds_tensor.device))
            for key in MOMENTS if moments else ():
                m = _part(ckpt.read(f"{key}/{name}", *spec, piece.start, piece.stop), part)
                safe_set_local_optimizer_state(p, m.to(p.ds_tensor.device), key)
            continue
        value = ckpt.read(WEIGHTS + name, *spec)
        p.data.copy_(value.view_as(p))
        if piece.kind == "mapped":
            if p._hp_mapping is None:
                continue
            p._hp_mapping.hp_fragment.data.copy_(
                value[piece.start : piece.stop].view_as(p._hp_mapping.hp_fragment)
            )
            for key in MOMENTS if moments else ():
                frag = p._hp_mapping.get_optim_state_fragment(key)
                frag.copy_(ckpt.read(f"{key}/{name}", *spec, piece.start, piece.stop).view_as(frag))
        elif moments:
            state = inner.state[p]
            for key in MOMENTS:
                state[key].copy_(ckpt.read(f"{key}/{name}", *spec).view_as(state[key]))
    for state in inner.state.values():
        if "step" not in state:
            continue
        if isinstance(state["step"], Tensor):
            state["step"].fill_(step)
        else:
            state["step"] = step


# ---------------------------------------------------------------------------------------------- samples


def gather_weights(engine: Any, model_cfg: ModelConfig, topology: Any) -> dict[str, Tensor] | None:
    """The full serial fp32 state dict on global rank 0 (None elsewhere); collective, one parameter at a
    time. For samples during training under tp, pp or ZeRO-3, where no rank holds the whole model."""
    from deepspeed.utils import safe_get_full_fp32_param

    from gptforge.model.tensor_parallel import gather_tp_tensors, qkv_sizes

    pp_rank, dp_rank, tp_rank = topology.coords(dist.get_rank() if dist.is_initialized() else 0)
    keep = dp_rank == 0 and tp_rank == 0
    tensors: dict[str, Tensor] = {}
    for name, p in serial_parameters(engine.module, model_cfg, topology.pp > 1, owned=True):
        zero = hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")
        value = safe_get_full_fp32_param(p) if zero else None  # collective over dp under ZeRO
        value = (value if value is not None else p.detach()).to(DTYPE)
        full = gather_tp_tensors({name: value}, topology, model_cfg.vocab_size, qkv_sizes(model_cfg))
        if keep:
            tensors.update({n: t.cpu() for n, t in full.items()})
    if not keep:
        return None
    if topology.pp > 1:  # the dp-0 / tp-0 ranks of every stage form global rank 0's pipeline group
        parts: list[Any] = [None] * topology.pp
        dist.all_gather_object(parts, tensors, group=topology.get_pipe_parallel_group())
        tensors = {n: t for part in parts for n, t in part.items()}
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    if model_cfg.tie_embeddings:
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"]
    return tensors
