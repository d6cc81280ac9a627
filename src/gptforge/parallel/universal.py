"""A checkpoint's model and optimizer state in serial coordinates, readable by any layout.

DeepSpeed's own checkpoint files are sharded the way the run was: one file per tp rank, per pipeline
layer, per ZeRO partition. They resume only in that layout. Beside them every checkpoint gets
`universal/` (the idea of DeepSpeed's "universal checkpoint", in our own simple format):

    universal/model-<s>-of-<pp>.safetensors      fp32 weights of pipeline stage s, under the serial
                                                 GPT's names, tp shards merged, vocabulary padding dropped
    universal/optimizer-<s>-of-<pp>.safetensors  AdamW's `exp_avg.<name>` and `exp_avg_sq.<name>`, the same
                                                 way; metadata {"adam_step": N}

A tied embedding is stored once (as `transformer.wte.weight`). Writing is collective: ZeRO partitions are
gathered over dp, tp shards over tp, and the dp-0 / tp-0 rank of each stage writes its stage's files, so
stages write in parallel and no rank holds more than its stage. Reading into another layout is the
inverse: every rank reads the tensors, takes its tp shard (`shard_state_dict` rules) of the parameters
its stage holds and hands them to the engine (ZeRO-1/2/3 through DeepSpeed's `safe_set_full_*` API), with
the Adam moments and step count, so training continues as if the layout had never changed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gptforge.config import ModelConfig
from gptforge.errors import CheckpointError

UNIVERSAL = "universal"
MOMENTS = ("exp_avg", "exp_avg_sq")
STEP_KEY = "adam_step"


def has_universal(step_dir: Path) -> bool:
    return any((step_dir / UNIVERSAL).glob("model-*.safetensors"))


def _file(kind: str, stage: int, stages: int) -> str:
    return f"{kind}-{stage + 1:05d}-of-{stages:05d}.safetensors"


# ---------------------------------------------------------------------------------------------- reading


class TensorFiles(Mapping[str, Tensor]):
    """The tensors of a set of safetensors files by name, each read from disk only when asked for: a rank
    resuming under another layout reads just the tensors of its own stage, not the whole model."""

    def __init__(self, paths: list[Path]) -> None:
        from safetensors import safe_open

        self._where: dict[str, Path] = {}
        self.metadata: dict[str, str] = {}
        for path in paths:
            with _readable(path), safe_open(str(path), "pt") as f:
                self._where.update(dict.fromkeys(f.keys(), path))
                self.metadata.update(f.metadata() or {})

    def __getitem__(self, name: str) -> Tensor:
        from safetensors import safe_open

        path = self._where[name]
        with _readable(path), safe_open(str(path), "pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


@contextmanager
def _readable(path: Path) -> Iterator[None]:
    """A damaged file is a CheckpointError naming it, not a safetensors traceback."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def _read(step_dir: Path, kind: str) -> TensorFiles:
    files = sorted((step_dir / UNIVERSAL).glob(f"{kind}-*-of-*.safetensors"))
    if files:
        stages = int(files[0].name.rsplit("-of-", 1)[1].split(".")[0])
        if len(files) != stages:
            raise CheckpointError(
                f"{step_dir / UNIVERSAL}: {len(files)} {kind} file(s) for {stages} pipeline stage(s): "
                "incomplete checkpoint"
            )
    return TensorFiles(files)


def read_weights(step_dir: Path, model_cfg: ModelConfig) -> dict[str, Tensor]:
    """The full serial state dict (fp32, the tied head included as the serial `GPT.state_dict()` has it)."""
    weights = dict(_read(step_dir, "model"))
    if not weights:
        raise CheckpointError(f"{step_dir}: no {UNIVERSAL}/model-*.safetensors")
    if model_cfg.tie_embeddings and "transformer.wte.weight" in weights:
        weights["lm_head.weight"] = weights["transformer.wte.weight"]
    return weights


def read_optimizer(step_dir: Path) -> tuple[Mapping[str, Tensor], int]:
    """AdamW's moments by `<moment>.<serial name>` (read when asked for) and its step count (empty and 0
    before any step)."""
    moments = _read(step_dir, "optimizer")
    return moments, int(moments.metadata.get(STEP_KEY, 0))


# ---------------------------------------------------------------------------------------------- this rank


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


def _zero_managed(p: Tensor) -> bool:
    """ZeRO-3 (`ds_id`) or ZeRO-1/2 / bf16 (`_hp_mapping`): DeepSpeed holds the fp32 master and states."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _link_fragments(optimizer: Any) -> None:
    """ZeRO-1/2 and DeepSpeed's bf16 optimizer map each parameter to its slice of the flat optimizer
    states once, lazily, after stepping the first param group only: with two groups (decay / no decay)
    the second group's parameters stay unmapped. Map them all again now that every state exists."""
    link = getattr(optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        optimizer._hp_optimizer_states_linked = False
        link()


def _full_value(p: nn.Parameter) -> Tensor:
    """The fp32 master value of `p` (this rank's tp shard), whole over dp. Collective over dp under ZeRO."""
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(p) if _zero_managed(p) else None
    return (value if value is not None else p.detach()).float()


def _full_moment(p: nn.Parameter, key: str, optimizer: Any) -> Tensor:
    from deepspeed.utils import safe_get_full_optimizer_state

    if _zero_managed(p):
        return safe_get_full_optimizer_state(p, key).float()
    state = inner_optimizer(optimizer).state.get(p)
    return state[key].float() if state and key in state else torch.zeros_like(p, dtype=torch.float32)


def _writer(topology: Any) -> tuple[int, bool]:
    """(this rank's pipeline stage, whether it is the stage's dp-0 / tp-0 rank: the one that keeps)."""
    pp_rank, dp_rank, tp_rank = topology.coords(dist.get_rank() if dist.is_initialized() else 0)
    return pp_rank, dp_rank == 0 and tp_rank == 0


def _stage_tensors(
    engine: Any, model_cfg: ModelConfig, topology: Any, with_moments: bool
) -> dict[str, Tensor]:
    """This stage's serial tensors, whole over dp and tp, on CPU on the stage's writer (empty elsewhere).
    Collective over dp and tp, one parameter at a time, so no device holds more than one extra full
    tensor and only one rank per stage holds the stage in CPU memory."""
    from gptforge.model.tensor_parallel import gather_tp_tensors

    _, keep = _writer(topology)
    if with_moments:
        _link_fragments(engine.optimizer)
    out: dict[str, Tensor] = {}
    for name, p in serial_parameters(engine.module, model_cfg, topology.pp > 1, owned=True):
        tensors = {name: _full_value(p)}
        if with_moments:
            tensors.update({f"{key}.{name}": _full_moment(p, key, engine.optimizer) for key in MOMENTS})
        gathered = gather_tp_tensors(tensors, topology, model_cfg.vocab_size)
        if keep:
            out.update({n: t.cpu().contiguous() for n, t in gathered.items()})
    return out


def save_universal(engine: Any, step_dir: Path, model_cfg: ModelConfig, topology: Any) -> None:
    """Write `step_dir/universal/` (collective: every rank calls it)."""
    from safetensors.torch import save_file

    step = adam_step(engine.optimizer)
    tensors = _stage_tensors(engine, model_cfg, topology, with_moments=step > 0)
    pp_rank, writer = _writer(topology)
    if not writer:
        return
    out = step_dir / UNIVERSAL
    out.mkdir(parents=True, exist_ok=True)
    weights = {n: t for n, t in tensors.items() if not n.startswith(tuple(f"{k}." for k in MOMENTS))}
    save_file(weights, str(out / _file("model", pp_rank, topology.pp)), metadata={"format": "pt"})
    moments = {n: t for n, t in tensors.items() if n not in weights}
    save_file(
        moments,
        str(out / _file("optimizer", pp_rank, topology.pp)),
        metadata={"format": "pt", STEP_KEY: str(step)},
    )


def gather_weights(engine: Any, model_cfg: ModelConfig, topology: Any) -> dict[str, Tensor] | None:
    """The full serial fp32 state dict on global rank 0 (None elsewhere); collective. For samples during
    training under tp, pp or ZeRO-3, where no rank holds the whole model."""
    tensors = _stage_tensors(engine, model_cfg, topology, with_moments=False)
    if not _writer(topology)[1]:
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


# ---------------------------------------------------------------------------------------------- loading


def _set_value(p: nn.Parameter, value: Tensor) -> None:
    from deepspeed.utils import safe_set_full_fp32_param

    value = value.to(p.device)
    if hasattr(p, "ds_id"):  # ZeRO-3: the working copy is partitioned; gather, write, re-partition
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.data.copy_(value)
    else:
        p.data.copy_(value)
    if _zero_managed(p):
        safe_set_full_fp32_param(p, value)


def _create_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW's per-parameter state as torch creates it lazily at the first step (zeros, step 0), so moments
    can be written into it before any step. (DeepSpeed's ZeRO optimizers hold flat fp32 partitions.)"""
    for group in optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for q in group["params"]:
            state = optimizer.state[q]
            if state:
                continue
            state["step"] = torch.zeros((), dtype=torch.float32, device=q.device if on_device else "cpu")
            for key in MOMENTS + (("max_exp_avg_sq",) if group.get("amsgrad") else ()):
                state[key] = torch.zeros_like(q, memory_format=torch.preserve_format)


def _set_moment(p: nn.Parameter, key: str, value: Tensor, optimizer: Any) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    if _zero_managed(p):
        safe_set_full_optimizer_state(p, value.to(p.device), key)
    else:
        inner_optimizer(optimizer).state[p][key].copy_(value)


def load_universal(engine: Any, step_dir: Path, model_cfg: ModelConfig, topology: Any) -> int:
    """Weights, Adam moments and step count from `step_dir/universal/` into this rank's part of the engine
    (collective under ZeRO-3). Returns the Adam step count."""
    from gptforge.model.tensor_parallel import shard_tensor

    weights = _read(step_dir, "model")  # each rank reads only the tensors its stage holds
    if not weights:
        raise CheckpointError(f"{step_dir}: no {UNIVERSAL}/model-*.safetensors")
    moments, step = read_optimizer(step_dir)
    params = serial_parameters(engine.module, model_cfg, topology.pp > 1)
    tp, tp_rank = topology.tp, topology.coords(dist.get_rank() if dist.is_initialized() else 0)[2]
    for name, p in params:
        if name not in weights:
            raise CheckpointError(
                f"{step_dir / UNIVERSAL}: no tensor {name} (a checkpoint of another model?)"
            )
        _set_value(p, shard_tensor(name, weights[name], tp_rank, tp))
    if step == 0:
        return 0
    inner = inner_optimizer(engine.optimizer)
    _create_adam_state(inner)
    _link_fragments(engine.optimizer)
    for name, p in params:
        for key in MOMENTS:
            full = moments.get(f"{key}.{name}")
            if full is None:
                raise CheckpointError(f"{step_dir / UNIVERSAL}: no optimizer state {key}.{name}")
            _set_moment(p, key, shard_tensor(name, full, tp_rank, tp), engine.optimizer)
    for state in inner.state.values():
        if isinstance(state.get("step"), Tensor):
            state["step"].fill_(step)
        else:
            state["step"] = step
    return step
