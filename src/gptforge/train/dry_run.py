"""`--dry-run`: every check a run makes before its first step, for a stated cluster shape, in seconds.

What a 64-GPU job would find out only after its nodes start — a batch that does not divide, a layout that
does not fit the world size or the GPU's memory, missing or foreign data — found on the login node or the
batch host instead, with the same one-line errors. Nothing here starts a process group, a process or CUDA:
the config is resolved, the data manifest read, the batch planned, the topology checked (without groups)
and the memory per GPU estimated with the planner.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from gptforge.config import Config, ModelConfig, config_from_dict
from gptforge.errors import ConfigError
from gptforge.launcher import launched_local_size, launched_world_size, slurm_job_shape

DEFAULT_GPU_MEM = "80GB"


@dataclass(frozen=True)
class Shape:
    """The cluster the run will start on: total processes and processes (GPUs) per node."""

    world_size: int
    gpus_per_node: int

    @property
    def nodes(self) -> int:
        return self.world_size // self.gpus_per_node


def resolve_shape(world_size: int | None, gpus_per_node: int | None) -> Shape:
    """`--world-size`/`--gpus-per-node`, else what the launcher says (torchrun, a SLURM allocation)."""
    slurm = slurm_job_shape()
    if world_size is None:
        world_size = slurm[0] if slurm and launched_world_size() == 1 else launched_world_size()
    if gpus_per_node is None:
        local = launched_local_size()
        gpus_per_node = local if local > 1 else (slurm[1] if slurm else min(world_size, 8))
    if world_size < 1 or gpus_per_node < 1:
        raise ConfigError(
            f"--world-size and --gpus-per-node must be >= 1, got {world_size} and {gpus_per_node}"
        )
    if world_size % gpus_per_node and world_size > gpus_per_node:
        raise ConfigError(
            f"--world-size {world_size} is not a multiple of --gpus-per-node {gpus_per_node}: a node runs "
            f"{gpus_per_node} processes, so use {world_size // gpus_per_node * gpus_per_node} or "
            f"{(world_size // gpus_per_node + 1) * gpus_per_node}"
        )
    return Shape(world_size, min(gpus_per_node, world_size))


def _model_with_vocab(cfg: Config, read_data: bool) -> tuple[ModelConfig, list[str]]:
    """The model as the run will build it: the starting weights' shape (if any), the data's vocabulary."""
    from gptforge.data.blend import read_sources
    from gptforge.data.loader import check_tokenizer

    model, lines = cfg.model, []
    if model.init_from != "scratch":
        model = dataclasses.replace(_start_weights_shape(model.init_from), dropout=model.dropout)
        lines.append(f"weights: {cfg.model.init_from} (shape from the weights)")
    if read_data:
        sources = read_sources(cfg.data)  # every manifest of the blend, one tokenizer across them
        vocab = model.vocab_size or int(sources[0].manifest.tokenizer["vocab_size"])
        for source in sources:
            check_tokenizer(source.manifest, vocab)
            splits = ", ".join(
                f"{name} {info.tokens:,} tokens" for name, info in source.manifest.splits.items()
            )
            weight = f"weight {source.weight:.3f}; " if len(sources) > 1 else ""
            lines.append(
                f"data: {source.name} = {source.path} ({weight}{source.manifest.tokenizer.get('name')}; {splits})"
            )
        model = dataclasses.replace(model, vocab_size=vocab)
    if model.vocab_size is None:
        raise ConfigError("model.vocab_size is not set and no data.path gives it: set one of them")
    return model, lines


def _start_weights_shape(spec: str) -> ModelConfig:
    """The shape of `model.init_from`'s weights, read from its metadata (no tensors for HF or a run)."""
    from gptforge import hf
    from gptforge.errors import CheckpointError
    from gptforge.weights import read_saved, run_meta

    path = Path(spec.removeprefix("hf:").removeprefix("checkpoint:"))
    if not path.is_dir():
        raise CheckpointError(f"model.init_from={spec}: model directory not found: {path}")
    if spec.startswith("hf:") or hf.is_hf_dir(path):
        return hf.read_hf_config(path)
    meta = run_meta(spec)
    if meta is not None:
        return config_from_dict({"model": meta["model"]}, source=str(path)).model
    return read_saved(spec)[0]


def check_memory(cfg: Config, shape: Shape, micro_batches: int, gpu_mem: str) -> str:
    """The planner's per-GPU estimate for this layout; an error if it does not fit `gpu_mem`."""
    from gptforge.parallel.planner import GB, Hardware, Layout, layout_memory, parse_bytes

    p = cfg.parallel
    dp = shape.world_size // (p.tp * p.pp)
    layout = Layout(p.tp, p.pp, dp, p.zero_stage, p.offload_optimizer == "cpu", p.offload_params)
    hw = Hardware(gpus=shape.world_size, gpu_mem=parse_bytes(gpu_mem), gpus_per_node=shape.gpus_per_node)
    mem = layout_memory(cfg, layout, micro_batches)
    budget = hw.gpu_mem * hw.usable_fraction
    need = mem.total(p.activation_checkpointing)
    line = (
        f"memory per GPU (planner estimate, busiest stage): {need / GB:.1f} GiB of {budget / GB:.1f} usable "
        f"(weights {mem.weights / GB:.1f}, grads {mem.grads / GB:.1f}, optimizer {mem.optimizer / GB:.1f}, "
        f"activations {(mem.activations_ckpt if p.activation_checkpointing else mem.activations) / GB:.1f})"
    )
    if need <= budget:
        return line
    hint = (
        "set parallel.activation_checkpointing=true"
        if not p.activation_checkpointing and mem.total(True) <= budget
        else "lower train.micro_batch_size or shard more (parallel.zero_stage, tp, pp)"
    )
    raise ConfigError(
        f"layout {layout.name} needs ~{need / GB:.1f} GiB per GPU, more than the {budget / GB:.1f} GiB usable "
        f"of --gpu-mem {gpu_mem}; {hint}, or see `python launch/plan.py --config ... --gpus "
        f"{shape.world_size} --gpu-mem {gpu_mem}` for layouts that fit"
    )


def dry_run(
    cfg: Config,
    shape: Shape,
    gpu_mem: str = DEFAULT_GPU_MEM,
    model_parallel: bool = True,
    extra: list[str] | None = None,
) -> str:
    """Every start-up check for `shape`; returns the summary (raises the run's one-line errors).

    `model_parallel=False` is fine-tuning: its data are the `extra` files, not `data.path`, and its layouts
    are the ones a plain module supports (see `check_layout`)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the topology's DeepSpeed import must not probe GPUs
    from gptforge.model.size import count_parameters
    from gptforge.train.batch import plan_batch
    from gptforge.train.distributed import check_layout

    model, lines = _model_with_vocab(cfg, read_data=model_parallel)
    cfg = dataclasses.replace(cfg, model=model)
    p = cfg.parallel
    check_layout(cfg, shape.world_size, model_parallel=model_parallel)
    if p.tp > 1 and shape.gpus_per_node % p.tp:
        raise ConfigError(
            f"parallel.tp={p.tp} does not divide the {shape.gpus_per_node} GPUs per node: a tensor-parallel "
            "group must stay inside a node (its all-reduces need NVLink); use a tp that divides it"
        )
    dp = shape.world_size // (p.tp * p.pp)
    plan = plan_batch(cfg, shape.world_size)
    ctx = model.context_length
    tokens_per_step = plan.global_batch * ctx
    summary = [
        f"dry run: {shape.world_size} process(es) = {shape.nodes} node(s) x {shape.gpus_per_node}",
        f"model: {count_parameters(model) / 1e6:,.1f}M parameters ({model.n_layer} layers, d_model "
        f"{model.d_model}, {model.n_head} heads, context {ctx}, vocab {model.vocab_size})",
        *lines,
        *(extra or []),
        f"layout: dp {dp} x tp {p.tp} x pp {p.pp}, ZeRO-{p.zero_stage}"
        + (f", optimizer offload {p.offload_optimizer}" if p.offload_optimizer != "none" else "")
        + (", parameter offload" if p.offload_params else "")
        + (", activation checkpointing" if p.activation_checkpointing else ""),
        f"batch: {plan.micro_batch} sequences x {plan.grad_accum} accumulation step(s) x {dp} dp rank(s) = "
        f"{plan.global_batch} sequences ({tokens_per_step:,} tokens) per step; {cfg.train.max_steps:,} steps "
        f"= {tokens_per_step * cfg.train.max_steps / 1e9:,.2f}B tokens",
        check_memory(cfg, shape, plan.grad_accum, gpu_mem),
        "dry run: OK (no process, process group or GPU was started)",
    ]
    return "\n".join(summary)


def add_dry_run_args(parser) -> None:  # argparse.ArgumentParser
    """The flags `launch/train.py` and `launch/finetune.py` share."""
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check config, data, batch plan, layout and memory for the shape below, then exit",
    )
    parser.add_argument("--world-size", type=int, help="dry run: processes (default: the launcher's)")
    parser.add_argument(
        "--gpus-per-node", type=int, help="dry run: processes per node (default: the launcher's)"
    )
    parser.add_argument(
        "--gpu-mem", default=DEFAULT_GPU_MEM, help=f"dry run: memory per GPU (default {DEFAULT_GPU_MEM})"
    )


def files_exist(*paths: str) -> list[str]:
    """Summary lines for input files, an error naming the first that is missing."""
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"file not found: {path}")
    return [f"{Path(p).name}: {Path(p).stat().st_size:,} bytes" for p in paths]
