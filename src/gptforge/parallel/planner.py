"""Per-GPU memory and expected speed of every (tp, pp, dp, ZeRO) layout of a config, and which to use.

Memory per GPU, for the busiest pipeline stage (the first: embedding, or the last: head and logits):

- weights, grads, optimizer: DeepSpeed's own accounting (the ZeRO paper's), so the totals agree with
  `estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs`. Mixed precision keeps
  2-byte weights and grads, a 4-byte master copy and 8 bytes of Adam moments per parameter, plus a 4-byte
  gradient partition for the optimizer; ZeRO-1 partitions master + moments over dp, ZeRO-2 also the
  gradients, ZeRO-3 also the weights (plus 4 bytes x the largest module, gathered while it runs). CPU
  offload moves the optimizer (and with ZeRO-3 the weights) to host memory.
- activations: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"),
  per block and micro-batch s*b*h*(10 + 24/tp) bytes in 16-bit, plus 5*a*s^2*b/tp for the attention
  matrix when it is materialised (PyTorch SDPA's flash/memory-efficient kernels do not, which is what the
  model uses, so `flash_attention=True` leaves it out); the logits (vocab/tp per token, in 16 and 32 bit)
  on the last stage. A pipeline stage holds min(pp, micro-batches) micro-batches in flight (1F1B), i.e.
  about all n_layer blocks' worth on the first stage. With activation checkpointing a block keeps only its
  input (2*s*b*h) and one block is recomputed at a time.

Speed (`step_seconds`), the heuristic that ranks the layouts that fit: the model's training FLOPs at the
GPU's peak times an achievable fraction (`mfu`), x 4/3 with activation checkpointing (one more forward),
x (1 + (pp-1)/micro-batches) for the pipeline bubble; plus communication that is not overlapped: tp's 4
all-reduces of the activations per block per micro-batch (NVLink inside a node, the network across),
pipeline activations sent between stages, and the dp gradient reduction (all-reduce; ZeRO-3 gathers the
weights forward and backward as well: 1.5x) over the network once a dp group leaves its node; offload adds
PCIe traffic and a CPU Adam step. It prefers what practitioners do (Megatron/NeoX guidance): tp inside a
node only as far as memory needs it, pp only when tp is not enough, the lowest ZeRO stage that fits,
offload last. Figures are estimates for ranking, not promises; fragmentation and framework buffers are
covered by using only `usable_fraction` of the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptforge.config import Config, ModelConfig, ParallelConfig
from gptforge.errors import ConfigError, GptforgeError
from gptforge.model.size import (
    flops_per_token,
    norm_parameters,
    parameters_per_layer,
    position_parameters,
    state_bytes,
)
from gptforge.parallel.topology import padded_vocab_size, validate_layout

GB = 1024**3


@dataclass(frozen=True)
class Hardware:
    """The cluster: defaults are an A100-80GB / NVLink / 200 Gb/s-per-GPU InfiniBand node of 8."""

    gpus: int
    gpu_mem: float = 80 * GB
    gpus_per_node: int = 8
    peak_flops: float = 312e12  # bf16 dense
    mfu: float = 0.45  # fraction of peak a well-tuned dense step reaches
    intra_node_bw: float = 200e9  # bytes/s per GPU, NVLink all-reduce bus bandwidth
    inter_node_bw: float = 20e9  # bytes/s per GPU across nodes
    pcie_bw: float = 20e9  # host <-> GPU, for offload
    cpu_adam_params_per_s: float = 1e9  # per GPU's share of the host CPUs
    usable_fraction: float = 0.9
    fs_bandwidth: float = 10e9  # bytes/s the shared filesystem takes from all ranks writing at once


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    zero: int
    offload_optimizer: bool = False
    offload_params: bool = False

    @property
    def name(self) -> str:
        off = "+off-opt" if self.offload_optimizer else ""
        off += "+off-param" if self.offload_params else ""
        return f"tp{self.tp} pp{self.pp} dp{self.dp} z{self.zero}{off}"


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU on the busiest stage."""

    weights: int
    grads: int
    optimizer: int
    activations: int  # without activation checkpointing
    activations_ckpt: int  # with

    @property
    def model_states(self) -> int:
        return self.weights + self.grads + self.optimizer

    def total(self, checkpointing: bool) -> int:
        return self.model_states + (self.activations_ckpt if checkpointing else self.activations)


@dataclass(frozen=True)
class Plan:
    layout: Layout
    memory: Memory
    micro_batches: int
    fits: bool  # without activation checkpointing
    fits_ckpt: bool  # with
    step_s: float  # for the cheapest way it fits (no checkpointing if possible)
    tokens_per_s: float
    checkpoint_per_rank: int = 0  # bytes the busiest rank writes per checkpoint
    save_s: float = 0.0  # one checkpoint, every rank writing its part at once, at Hardware.fs_bandwidth

    @property
    def checkpointing(self) -> bool:
        return not self.fits and self.fits_ckpt


# ---------------------------------------------------------------------------------------------- parameters


def stage_parameters(cfg: ModelConfig, tp: int, pp: int) -> list[tuple[int, int]]:
    """(parameters, largest module's parameters) held by one tp rank of each pipeline stage.

    Blocks are split evenly (remainder to the first stages); the first stage has the embeddings, the last
    ln_f and the (tied copy of the) head. Under tp the vocabulary is padded to 128*tp and split.
    """
    d, b = cfg.d_model, int(cfg.bias)
    vocab_rows = (padded_vocab_size(cfg.vocab_size, tp) // tp) if tp > 1 else cfg.vocab_size
    replicated = 2 * d * b + 2 * norm_parameters(cfg)  # the two row-parallel biases, two norms
    block = (parameters_per_layer(cfg) - replicated) // tp + replicated  # QKV, attn-out, MLP split over tp
    qkv = (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim
    largest_in_block = max(cfg.ffn_dim * (d + b), qkv * (d + b), cfg.ffn_dim * d + d * b) // tp  # per module
    embed, wpe = vocab_rows * d, position_parameters(cfg)
    out = []
    for s in range(pp):
        n_blocks = cfg.n_layer // pp + (1 if s < cfg.n_layer % pp else 0)
        params, largest = n_blocks * block, largest_in_block
        if s == 0:
            params += embed + wpe
            largest = max(largest, embed, wpe)
        if s == pp - 1:
            params += norm_parameters(cfg)
            if pp > 1 or not cfg.tie_embeddings:  # the head's weight (tied: a second copy on another stage)
                params += embed
                largest = max(largest, embed)
        out.append((params, largest))
    return out


# ---------------------------------------------------------------------------------------------- checkpoints

CHECKPOINT_BYTES_PER_PARAMETER = 12  # fp32 master weight + AdamW's two fp32 moments


def checkpoint_bytes(cfg: ModelConfig, layout: Layout) -> tuple[int, int]:
    """(bytes the busiest rank writes, bytes of the whole checkpoint): every rank writes only its part (a
    dp-th of its stage's tp shard, ZeRO or not: replicas share the writing), nothing is gathered."""
    stages = [p for p, _ in stage_parameters(cfg, layout.tp, layout.pp)]
    if layout.pp > 1 and cfg.tie_embeddings:  # the last stage's copy of the tied embedding is not written
        tp = layout.tp
        stages[-1] -= (
            padded_vocab_size(cfg.vocab_size, tp) // tp if tp > 1 else cfg.vocab_size
        ) * cfg.d_model
    per_rank = -(-max(stages) * CHECKPOINT_BYTES_PER_PARAMETER // layout.dp)
    total = sum(stages) * layout.tp * CHECKPOINT_BYTES_PER_PARAMETER
    return per_rank, total


def save_warnings(plans: list[Plan], save_timeout_s: float) -> list[str]:
    """Layouts whose preemption save may outlast the SLURM script's SAVE_TIMEOUT_S: at a signal the
    trainer waits for the save in flight, then writes the final one (2 saves in the worst case)."""
    slow = [p for p in plans if (p.fits or p.fits_ckpt) and 2 * p.save_s > save_timeout_s]
    if not slow:
        return []
    worst = max(slow, key=lambda p: p.save_s)
    return [
        f"warning: {len(slow)} fitting layout(s) may not finish saving at preemption within SAVE_TIMEOUT_S="
        f"{save_timeout_s:.0f}s (slurm/pretrain_8node.sh): e.g. {worst.layout.name} writes "
        f"{worst.checkpoint_per_rank / GB:.1f} GB per rank, ~{worst.save_s:.0f}s per save, up to 2 saves at a "
        "signal; raise SAVE_TIMEOUT_S, or use a faster filesystem (--fs-bandwidth)"
    ]


# ---------------------------------------------------------------------------------------------- memory


def model_state_bytes(params: int, largest: int, layout: Layout, precision: str) -> tuple[int, int, int]:
    """(weights, grads, optimizer) bytes on one GPU holding `params` before ZeRO partitions them."""
    per = state_bytes(1, precision)
    mixed = per.master_weights > 0
    dp, z = layout.dp, layout.zero
    opt_share = params / dp if z >= 1 else params
    if layout.offload_params:
        weights = 4 * largest
    elif z == 3:
        weights = per.weights * params / dp + 4 * largest
    else:
        weights = per.weights * params
    if layout.offload_optimizer:
        grads = 0 if z >= 2 else per.grads * params  # ZeRO-2/3 stream reduced grads straight to the host
        optimizer = 0
    else:
        if mixed:  # low-precision grads (full, or partitioned with ZeRO-2; folded into fp32 with ZeRO-3)
            low = 0 if z == 3 else per.grads * (params / dp if z == 2 else params)
            grads = low + 4 * opt_share
        else:
            grads = per.grads * (params / dp if z >= 2 else params)
        optimizer = (per.master_weights + per.optimizer) * opt_share
    return int(weights), int(grads), int(optimizer)


def activation_bytes(
    cfg: ModelConfig,
    tp: int,
    pp: int,
    stage: int,
    micro_batch: int,
    micro_batches: int,
    precision: str,
    checkpointing: bool,
    flash_attention: bool = True,
) -> int:
    """Activation memory of one GPU of `stage` (see the module docstring for the formula)."""
    s, b, h, a, v = cfg.context_length, micro_batch, cfg.d_model, cfg.n_head, cfg.vocab_size
    scale = 2 if precision == "fp32" else 1  # the formula counts 2-byte activations
    # the tp-split part, 24 sbh for GPT-2: q + k + v + the attention output (4 + 4 kv/h), and the MLP's
    # hidden activations (GELU: in + out, 4 F/h; SwiGLU: gate, up, silu, product, 8 F/h)
    split = 4 + 4 * cfg.kv_heads / cfg.n_head + (8 if cfg.mlp == "swiglu" else 4) * cfg.ffn_dim / h
    per_block = s * b * h * (10 + split / tp) * scale
    if not flash_attention:
        per_block += 5 * a * s * s * b / tp * scale
    n_blocks = cfg.n_layer // pp + (1 if stage < cfg.n_layer % pp else 0)
    in_flight = min(pp - stage, micro_batches) if pp > 1 else 1
    if checkpointing:
        total = n_blocks * in_flight * 2 * s * b * h * scale + per_block
    else:
        total = n_blocks * in_flight * per_block
    if stage == pp - 1:  # logits (+ fp32 softmax for the loss) of this rank's vocabulary slice
        rows = padded_vocab_size(v, tp) // tp if tp > 1 else v
        total += s * b * rows * (8 if precision == "fp32" else 6)
    return int(total)


def layout_memory(cfg: Config, layout: Layout, micro_batches: int, flash_attention: bool = True) -> Memory:
    """The busiest stage's memory (the stage with the largest total without checkpointing)."""
    m, precision, mbs = cfg.model, cfg.train.precision, cfg.train.micro_batch_size
    best: Memory | None = None
    for stage, (params, largest) in enumerate(stage_parameters(m, layout.tp, layout.pp)):
        w, g, o = model_state_bytes(params, largest, layout, precision)
        act = activation_bytes(
            m, layout.tp, layout.pp, stage, mbs, micro_batches, precision, False, flash_attention
        )
        act_ck = activation_bytes(
            m, layout.tp, layout.pp, stage, mbs, micro_batches, precision, True, flash_attention
        )
        mem = Memory(w, g, o, act, act_ck)
        if best is None or mem.total(False) > best.total(False):
            best = mem
    assert best is not None
    return best


# ---------------------------------------------------------------------------------------------- speed


def _allreduce_s(nbytes: float, ranks: int, bw: float) -> float:
    return 0.0 if ranks == 1 else 2 * (ranks - 1) / ranks * nbytes / bw


def step_seconds(cfg: Config, layout: Layout, hw: Hardware, micro_batches: int, checkpointing: bool) -> float:
    """Expected seconds per optimizer step (see the module docstring for the model)."""
    m, mbs = cfg.model, cfg.train.micro_batch_size
    act_bytes = 4 if cfg.train.precision == "fp32" else 2
    tokens = mbs * micro_batches * layout.dp * m.context_length
    compute = flops_per_token(m) * tokens / (hw.gpus * hw.peak_flops * hw.mfu)
    if checkpointing:
        compute *= 4 / 3
    compute *= 1 + (layout.pp - 1) / micro_batches

    bw_tp = hw.intra_node_bw if layout.tp <= hw.gpus_per_node else hw.inter_node_bw
    msg = mbs * m.context_length * m.d_model * act_bytes
    blocks_per_stage = -(-m.n_layer // layout.pp)
    tp_comm = 4 * blocks_per_stage * micro_batches * _allreduce_s(msg, layout.tp, bw_tp)
    pp_bw = hw.intra_node_bw if layout.tp * layout.dp * layout.pp <= hw.gpus_per_node else hw.inter_node_bw
    pp_comm = 2 * micro_batches * msg / layout.tp / pp_bw if layout.pp > 1 else 0.0

    params = max(p for p, _ in stage_parameters(m, layout.tp, layout.pp))
    bw_dp = hw.intra_node_bw if layout.tp * layout.dp <= hw.gpus_per_node else hw.inter_node_bw
    dp_comm = _allreduce_s(params * act_bytes, layout.dp, bw_dp) * (1.5 if layout.zero == 3 else 1.0)

    offload = 0.0
    if layout.offload_optimizer:
        share = params / layout.dp
        offload += 2 * act_bytes * share / hw.pcie_bw + share / hw.cpu_adam_params_per_s
    if layout.offload_params:
        offload += 2 * act_bytes * params / hw.pcie_bw * micro_batches  # fetched forward and backward
    return compute + tp_comm + pp_comm + dp_comm + offload


# ---------------------------------------------------------------------------------------------- search


def candidate_layouts(cfg: Config, hw: Hardware) -> list[Layout]:
    """Every layout `validate_layout` accepts, tp within a node, with and without offload."""
    out = []
    for tp in range(1, min(hw.gpus_per_node, hw.gpus) + 1):
        for pp in range(1, min(cfg.model.n_layer, hw.gpus) + 1):
            if hw.gpus % (tp * pp):
                continue
            for zero in range(4):
                for off_opt, off_par in [(False, False), (True, False), (True, True)]:
                    par = ParallelConfig(
                        tp=tp,
                        pp=pp,
                        zero_stage=zero,
                        offload_optimizer="cpu" if off_opt else "none",
                        offload_params=off_par,
                    )
                    try:
                        dp = validate_layout(hw.gpus, par, cfg.model)
                    except GptforgeError:
                        continue
                    out.append(Layout(tp, pp, dp, zero, off_opt, off_par))
    return out


def _micro_batches(cfg: Config, dp: int) -> int | None:
    gbs = cfg.train.global_batch_size or cfg.train.micro_batch_size * dp
    per_step = cfg.train.micro_batch_size * dp
    return gbs // per_step if gbs % per_step == 0 else None


def plan(cfg: Config, hw: Hardware, flash_attention: bool = True) -> list[Plan]:
    """Every valid layout with its memory and expected speed: those that fit first, fastest first."""
    if cfg.model.vocab_size is None:
        raise ConfigError("model.vocab_size is not set: the planner needs it (e.g. model.vocab_size=50257)")
    plans = []
    budget = hw.gpu_mem * hw.usable_fraction
    for layout in candidate_layouts(cfg, hw):
        micro = _micro_batches(cfg, layout.dp)
        if micro is None:
            continue
        mem = layout_memory(cfg, layout, micro, flash_attention)
        fits, fits_ck = mem.total(False) <= budget, mem.total(True) <= budget
        step = step_seconds(cfg, layout, hw, micro, checkpointing=not fits)
        tokens = cfg.train.micro_batch_size * micro * layout.dp * cfg.model.context_length
        per_rank, total = checkpoint_bytes(cfg.model, layout)
        save_s = total / hw.fs_bandwidth
        plans.append(Plan(layout, mem, micro, fits, fits_ck, step, tokens / step, per_rank, save_s))
    # equal speed (e.g. ZeRO-0 vs 1: the same bytes on the wire): the one leaving more memory free first
    plans.sort(
        key=lambda p: (
            not (p.fits or p.fits_ckpt),
            -round(p.tokens_per_s, 6),
            p.memory.total(p.checkpointing),
        )
    )
    return plans


def best(plans: list[Plan]) -> Plan | None:
    fitting = [p for p in plans if p.fits or p.fits_ckpt]
    return fitting[0] if fitting else None


def parse_bytes(text: str) -> float:
    """'80GB', '80G', '40GiB', '1.5TB' -> bytes (binary units, as GPU memory is quoted)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1024, "M": 1024**2, "G": GB, "T": 1024**4}
    try:
        if t and t[-1] in units:
            return float(t[:-1]) * units[t[-1]]
        return float(t)
    except ValueError:
        raise ConfigError(f"--gpu-mem {text!r}: expected a size like 80GB or 40GiB") from None


def format_plans(plans: list[Plan], hw: Hardware, total_params: int) -> str:
    """The table `launch/plan.py` prints, then the suggestion."""

    def gb(x: float) -> str:
        return f"{x / GB:7.2f}"

    lines = [
        f"{total_params / 1e6:.1f}M parameters on {hw.gpus} GPU(s) of {hw.gpu_mem / GB:.0f} GB "
        f"({hw.gpus_per_node} per node); usable {hw.usable_fraction:.0%}; GB = GiB per GPU, busiest stage; "
        f"a checkpoint written at {hw.fs_bandwidth / 1e9:g} GB/s in all",
        f"{'layout':<34} {'weights':>7} {'grads':>7} {'optim':>7} {'act':>7} {'act+ckpt':>8} "
        f"{'total':>7} {'w/ ckpt':>7}  {'fits':<9} {'tokens/s':>10} {'ckpt/rank':>9} {'save s':>6}",
    ]
    for p in plans:
        m = p.memory
        fit = "yes" if p.fits else ("ckpt only" if p.fits_ckpt else "no")
        speed = f"{p.tokens_per_s:10.0f}" if p.fits or p.fits_ckpt else f"{'-':>10}"
        lines.append(
            f"{p.layout.name:<34} {gb(m.weights)} {gb(m.grads)} {gb(m.optimizer)} {gb(m.activations)} "
            f"{gb(m.activations_ckpt):>8} {gb(m.total(False))} {gb(m.total(True))}  {fit:<9} {speed} "
            f"{gb(p.checkpoint_per_rank):>9} {p.save_s:6.1f}"
        )
    choice = best(plans)
    if choice is None:
        lines.append("\nno layout fits: add GPUs, lower train.micro_batch_size, or use a larger --gpu-mem")
    else:
        lay = choice.layout
        keys = [f"parallel.tp={lay.tp}", f"parallel.pp={lay.pp}", f"parallel.zero_stage={lay.zero}"]
        if lay.offload_optimizer:
            keys.append("parallel.offload_optimizer=cpu")
        if lay.offload_params:
            keys.append("parallel.offload_params=true")
        keys.append(f"parallel.activation_checkpointing={'true' if choice.checkpointing else 'false'}")
        lines.append(
            f"\nsuggested: {lay.name}{' with activation checkpointing' if choice.checkpointing else ''} "
            f"(~{choice.tokens_per_s:,.0f} tokens/s expected, {choice.micro_batches} micro-batch(es) per step)\n"
            f"  {' '.join(keys)}"
        )
    return "\n".join(lines)
