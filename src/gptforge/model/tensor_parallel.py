"""Megatron-style tensor parallelism: split each big matmul across the `tp` ranks of a tensor-parallel group.

A transformer block needs two all-reduces forward and two backward (Megatron-LM, Shoeybi et al. 2019):

    x -> copy -> ColumnParallel(QKV: heads split) -> attention on local heads -> RowParallel(out) -> reduce
    x -> copy -> ColumnParallel(MLP in: 4C split)  -> GELU (local)            -> RowParallel(out) -> reduce

Grouped-query attention splits the query heads and the key/value heads alike (each rank keeps whole KV
heads with the query heads they serve), so tp must divide n_kv_head: a KV head is never split or
replicated (`validate_layout` refuses tp > n_kv_head). SwiGLU's gate and input projections are both
column-parallel; RMSNorm, like LayerNorm, is replicated.

`copy` is identity forward / all-reduce backward; `reduce` is all-reduce forward / identity backward.
The embedding and the tied LM head split the (padded) vocabulary, and the loss is computed on the vocab
shards without ever gathering the logits (`vocab_parallel_cross_entropy`).

`parallelize_tensor(model, topology)` shards a full serial `gptforge.model.GPT` in place from its own weights,
so a tp run starts from exactly the serial initialization; `gather_full_state_dict` is the inverse (for
checkpoints and export). `shard_state_dict` / `merge_shards` are the same rules on plain state dicts.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.runtime.activation_checkpointing import checkpointing as _ds_checkpointing
from torch import nn

from gptforge.parallel.topology import padded_vocab_size

# ---------------------------------------------------------------------------------------------- comms


def _world(group: Any) -> int:
    return dist.get_world_size(group) if group is not None else 1


def _all_reduce(x: torch.Tensor, group: Any) -> torch.Tensor:
    if _world(group) == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, group=group)
    return x


def _gather_last(x: torch.Tensor, group: Any) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _split_last(x: torch.Tensor, group: Any) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    return x.chunk(world, dim=-1)[dist.get_rank(group)].contiguous()


class _CopyToTP(torch.autograd.Function):
    """Identity forward, all-reduce backward: the input of a column-parallel layer feeds every rank."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward, identity backward: sums the partial outputs of a row-parallel layer."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    """All-gather along the last dim forward, keep own slice backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


class _ScatterToTP(torch.autograd.Function):
    """Keep own slice of the last dim forward, all-gather backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


def copy_to_tp_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    return _GatherFromTP.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    return _ScatterToTP.apply(x, group)


# ---------------------------------------------------------------------------------------------- RNG


TP_RNG = "model-parallel-rng"  # the tracked state's name in Megatron and DeepSpeed


def get_rng_tracker() -> Any:
    """Megatron's `get_cuda_rng_tracker`: named RNG states swapped in around a region by `fork(name)`.

    Dropout on activations that are *split* across tp ranks (attention probabilities of the local heads)
    runs under a state seeded per tp rank, so each rank drops different elements; dropout on *replicated*
    activations (embeddings, residual) uses the default generator, seeded identically on every tp rank,
    so the copies stay equal. This is DeepSpeed's tracker instance: device-agnostic through DeepSpeed's
    accelerator (the CPU generator on CPU), and `deepspeed.checkpointing.checkpoint` saves and restores
    it, so recomputed blocks replay the same masks. `get_states`/`set_states` make resume exact.
    """
    return _ds_checkpointing.get_cuda_rng_tracker()


def model_parallel_seed(seed: int, tp_rank: int, pp_rank: int = 0) -> None:
    """Megatron's `model_parallel_cuda_manual_seed` (+ its per-stage offset): default generator =
    seed + 100*pp_rank (the same on every tp and dp rank of a stage); the tracked tp state = that + 2718 +
    tp_rank (different per tp rank, the same across dp)."""
    base = seed + 100 * pp_rank
    torch.manual_seed(base)
    tracker = get_rng_tracker()
    tracker.reset()
    tracker.add(TP_RNG, base + 2718 + tp_rank)


# ---------------------------------------------------------------------------------------------- layers


def _mark_parallel(p: nn.Parameter, dim: int) -> nn.Parameter:
    """Megatron's attributes; DeepSpeed counts such a parameter on every tp rank in grad norms."""
    p.tensor_model_parallel = True
    p.partition_dim = dim
    p.partition_stride = 1
    return p


class ColumnParallelLinear(nn.Module):
    """Y = X A^T with A's output rows split across tp ranks: each rank computes its slice of Y."""

    def __init__(
        self, in_features: int, out_features: int, group: Any, bias: bool = True, gather_output: bool = False
    ):
        super().__init__()
        world = _world(group)
        if out_features % world:
            raise ValueError(f"out_features {out_features} not divisible by tp {world}")
        self.in_features, self.out_features = in_features, out_features
        self.group, self.gather_output = group, gather_output
        self.weight = _mark_parallel(nn.Parameter(torch.empty(out_features // world, in_features)), 0)
        self.bias = _mark_parallel(nn.Parameter(torch.zeros(out_features // world)), 0) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_tp_region(x, self.group), self.weight, self.bias)
        return gather_from_tp_region(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features} (local {self.weight.shape[0]})"


class RowParallelLinear(nn.Module):
    """Y = X A^T with A's input columns split: each rank multiplies its slice of X, then one all-reduce.
    The bias is added once, after the reduce."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group: Any,
        bias: bool = True,
        input_is_parallel: bool = True,
    ):
        super().__init__()
        world = _world(group)
        if in_features % world:
            raise ValueError(f"in_features {in_features} not divisible by tp {world}")
        self.in_features, self.out_features = in_features, out_features
        self.group, self.input_is_parallel = group, input_is_parallel
        self.weight = _mark_parallel(nn.Parameter(torch.empty(out_features, in_features // world)), 1)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.group)
        y = reduce_from_tp_region(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in={self.in_features} (local {self.weight.shape[1]}), out={self.out_features}"


class VocabParallelEmbedding(nn.Module):
    """Each tp rank holds `num_embeddings / tp` consecutive rows; ids outside a rank's range give zeros
    there, and an all-reduce assembles the full lookup."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group: Any, rank: int = 0):
        super().__init__()
        world = _world(group)
        if num_embeddings % world:
            raise ValueError(
                f"num_embeddings {num_embeddings} not divisible by tp {world}; pad the vocabulary"
            )
        self.num_embeddings, self.embedding_dim, self.group = num_embeddings, embedding_dim, group
        per_rank = num_embeddings // world
        self.vocab_start, self.vocab_end = rank * per_rank, (rank + 1) * per_rank
        self.weight = _mark_parallel(nn.Parameter(torch.empty(per_rank, embedding_dim)), 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if _world(self.group) == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp_region(out, self.group)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim} (local rows {self.vocab_start}-{self.vocab_end - 1})"


class VocabParallelLMHead(nn.Module):
    """Logits for this rank's vocabulary slice; the weight is the embedding's own Parameter when tied."""

    def __init__(self, weight: nn.Parameter, group: Any):
        super().__init__()
        self.weight, self.group = weight, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp_region(x, self.group), self.weight)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Megatron's: softmax cross-entropy over logits split along the vocabulary, never gathered.

    Three all-reduces of [tokens]-sized tensors (max, target logit, sum of exp). Columns >= `vocab_size`
    (the padding) are masked to -inf, so the loss equals the unpadded serial model's exactly.
    """

    @staticmethod
    def forward(ctx, logits, targets, group, vocab_start, vocab_size, ignore_index):
        logits = logits.float()
        per_rank = logits.size(-1)
        if vocab_start + per_rank > vocab_size:  # this rank holds padding columns
            cols = torch.arange(vocab_start, vocab_start + per_rank, device=logits.device)
            logits = logits.masked_fill(cols >= vocab_size, float("-inf"))
        logits_max = logits.max(dim=-1).values
        if _world(group) > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)

        valid = targets != ignore_index
        local_t = targets - vocab_start
        in_range = valid & (local_t >= 0) & (local_t < per_rank)
        local_t = local_t.masked_fill(~in_range, 0)
        target_logit = shifted.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~in_range, 0.0)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        if _world(group) > 1:
            stacked = torch.stack([target_logit, sum_exp])
            dist.all_reduce(stacked, group=group)
            target_logit, sum_exp = stacked[0], stacked[1]
        losses = (sum_exp.log() - target_logit).masked_fill(~valid, 0.0)
        count = valid.sum()
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_t, in_range, valid, count)
        return losses.sum() / count

    @staticmethod
    def backward(ctx, grad):
        softmax, local_t, in_range, valid, count = ctx.saved_tensors
        g = softmax
        flat = g.view(-1, g.size(-1))
        rows = torch.arange(flat.size(0), device=g.device)
        flat[rows, local_t.view(-1)] -= in_range.view(-1).to(g.dtype)
        g = g * valid.unsqueeze(-1).to(g.dtype) * (grad / count)
        return g, None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    group: Any,
    vocab_start: int,
    vocab_size: int,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy over non-ignored targets, with `logits` = this rank's vocabulary columns."""
    return _VocabParallelCrossEntropy.apply(logits, targets, group, vocab_start, vocab_size, ignore_index)


class VocabParallelCrossEntropy(nn.Module):
    """`criterion(logits, targets)` for vocab-split logits: the tp replacement for the model's criterion."""

    def __init__(self, group: Any, vocab_start: int, vocab_size: int, ignore_index: int = -100):
        super().__init__()
        self.group, self.vocab_start, self.vocab_size, self.ignore_index = (
            group,
            vocab_start,
            vocab_size,
            ignore_index,
        )

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(
            logits, targets, self.group, self.vocab_start, self.vocab_size, self.ignore_index
        )


# ---------------------------------------------------------------------------------------------- sharding rules
# One table says how each serial GPT weight is split (torchtitan's "parallelize plan"). Keys are matched
# against the end of a state-dict name; anything not listed is replicated on every tp rank.
#   column: split dim 0 (output rows);  row: split dim 1 (input columns);  qkv: column, per q/k/v part
#   (the parts' sizes are `qkv_sizes(cfg)`: q is n_head heads, k and v n_kv_head heads each);
#   vocab: column over the padded vocabulary.

TP_PLAN: dict[str, tuple[str, int]] = {
    "attn.c_attn.weight": ("qkv", 0),
    "attn.c_attn.bias": ("qkv", 0),
    "attn.c_proj.weight": ("row", 1),
    "mlp.c_fc.weight": ("column", 0),
    "mlp.c_fc.bias": ("column", 0),
    "mlp.c_gate.weight": ("column", 0),
    "mlp.c_gate.bias": ("column", 0),
    "mlp.c_proj.weight": ("row", 1),
    "wte.weight": ("vocab", 0),
    "lm_head.weight": ("vocab", 0),
}


QKV = tuple[int, int, int]


def qkv_sizes(cfg: Any) -> QKV:
    """Rows of the fused QKV projection that are q, k and v (a ModelConfig)."""
    return cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim


def _qkv_parts(full: torch.Tensor, dim: int, qkv: QKV | None, tp: int = 1) -> list[torch.Tensor]:
    """q, k, v of a fused QKV tensor (or of one tp shard of it: sizes / tp). Without `qkv`, a weight's
    input width is the query width (d_model) and k, v share the rest; a bias splits in three equal parts
    (multi-head attention)."""
    if qkv is None:
        rows = full.size(dim)
        q = full.size(1) if full.dim() == 2 else rows // 3 * tp
        qkv = (q, (rows * tp - q) // 2, (rows * tp - q) // 2)
    return list(full.split([n // tp for n in qkv], dim=dim))


def tp_rule(name: str) -> tuple[str, int] | None:
    for suffix, rule in TP_PLAN.items():
        if name == suffix or name.endswith("." + suffix):
            return rule
    return None


def shard_tensor(
    name: str, full: torch.Tensor, tp_rank: int, tp: int, qkv: QKV | None = None
) -> torch.Tensor:
    """This tp rank's shard of one full serial weight (for tp > 1, vocab weights padded to 128*tp rows first).
    `qkv` = `qkv_sizes(cfg)`, needed for a grouped-query attention QKV bias."""
    rule = tp_rule(name)
    if rule is None or tp == 1:  # tp=1 is the serial model: unpadded
        return full
    kind, dim = rule
    if kind == "vocab":
        rows = padded_vocab_size(full.size(0), tp)
        full = (
            torch.cat([full, full.new_zeros(rows - full.size(0), *full.shape[1:])])
            if rows > full.size(0)
            else full
        )
    if kind == "qkv":
        return torch.cat(
            [part.chunk(tp, dim=dim)[tp_rank] for part in _qkv_parts(full, dim, qkv)], dim=dim
        ).clone()
    return full.chunk(tp, dim=dim)[tp_rank].clone()


def merge_shards(
    name: str, shards: list[torch.Tensor], vocab_size: int | None = None, qkv: QKV | None = None
) -> torch.Tensor:
    """The full serial weight from every tp rank's shard, in tp-rank order (vocab padding removed)."""
    rule = tp_rule(name)
    if rule is None or len(shards) == 1:
        return shards[0]
    kind, dim = rule
    if kind == "qkv":
        split = [_qkv_parts(s, dim, qkv, len(shards)) for s in shards]
        parts = [torch.cat([s[i] for s in split], dim=dim) for i in range(3)]
        return torch.cat(parts, dim=dim)
    full = torch.cat(shards, dim=dim)
    if kind == "vocab" and vocab_size is not None:
        full = full[:vocab_size]
    return full


def shard_state_dict(
    full: dict[str, torch.Tensor], tp_rank: int, tp: int, qkv: QKV | None = None
) -> dict[str, torch.Tensor]:
    """This tp rank's part of a full serial state dict: loading serial weights (a checkpoint written under
    another layout, Hugging Face weights) into a tp model."""
    return {name: shard_tensor(name, t, tp_rank, tp, qkv) for name, t in full.items()}


# ---------------------------------------------------------------------------------------------- the GPT


def _column_from(
    linear: nn.Linear, group: Any, rank: int, tp: int, name: str, qkv: QKV | None = None
) -> ColumnParallelLinear:
    layer = ColumnParallelLinear(linear.in_features, linear.out_features, group, bias=linear.bias is not None)
    with torch.no_grad():
        layer.weight.copy_(shard_tensor(f"{name}.weight", linear.weight, rank, tp, qkv))
        if linear.bias is not None:
            layer.bias.copy_(shard_tensor(f"{name}.bias", linear.bias, rank, tp, qkv))
    return layer.to(linear.weight.device, linear.weight.dtype)


def _row_from(linear: nn.Linear, group: Any, rank: int, tp: int, name: str) -> RowParallelLinear:
    layer = RowParallelLinear(linear.in_features, linear.out_features, group, bias=linear.bias is not None)
    with torch.no_grad():
        layer.weight.copy_(shard_tensor(f"{name}.weight", linear.weight, rank, tp))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
    return layer.to(linear.weight.device, linear.weight.dtype)


def _tp_dropout_hooks(attn: nn.Module) -> None:
    """Run the attention module under the tp RNG state (its SDPA dropout acts on this rank's heads) but its
    residual dropout, on the replicated output, under the shared default state, as Megatron does."""
    forks: list[Any] = []

    def enter(*_: Any) -> None:
        forks.append(get_rng_tracker().fork(TP_RNG))
        forks[-1].__enter__()

    def leave(*_: Any) -> None:
        forks.pop().__exit__(None, None, None)

    attn.register_forward_pre_hook(enter)
    attn.register_forward_hook(leave)
    attn.resid_dropout.register_forward_pre_hook(leave)
    attn.resid_dropout.register_forward_hook(enter)


def parallelize_block(block: nn.Module, group: Any, rank: int, tp: int, dropout: float = 0.0) -> nn.Module:
    """Shard one `gptforge.model.Block` in place: query and key/value heads and the MLP hidden dim (GELU's
    input, or SwiGLU's gate and input) split over tp; the norms stay replicated."""
    attn, mlp = block.attn, block.mlp
    if attn.n_head % tp or attn.n_kv_head % tp:
        raise ValueError(
            f"n_head {attn.n_head} and n_kv_head {attn.n_kv_head} must both be divisible by tp {tp}"
        )
    hd = attn.head_dim
    qkv = (attn.n_head * hd, attn.n_kv_head * hd, attn.n_kv_head * hd)
    attn.c_attn = _column_from(attn.c_attn, group, rank, tp, "attn.c_attn", qkv)
    attn.c_proj = _row_from(attn.c_proj, group, rank, tp, "attn.c_proj")
    attn.n_head //= tp  # the forward reshapes by n_head (and the rest of c_attn's width): the local heads
    for name, child in list(mlp.named_children()):
        if name in ("c_fc", "c_gate"):
            setattr(mlp, name, _column_from(child, group, rank, tp, f"mlp.{name}"))
    mlp.c_proj = _row_from(mlp.c_proj, group, rank, tp, "mlp.c_proj")
    if dropout > 0:
        _tp_dropout_hooks(attn)
    return block


def vocab_parallel_embedding_from(
    weight: torch.Tensor, group: Any, rank: int, tp: int
) -> VocabParallelEmbedding:
    """This rank's slice of a full (vocab, dim) embedding, padded to a multiple of 128*tp rows."""
    vocab_size, dim = weight.shape
    emb = VocabParallelEmbedding(padded_vocab_size(vocab_size, tp), dim, group, rank)
    with torch.no_grad():
        emb.weight.copy_(shard_tensor("wte.weight", weight, rank, tp))
    return emb.to(weight.device, weight.dtype)


def parallelize_tensor(model: nn.Module, topology: Any) -> nn.Module:
    """Shard a full serial GPT in place across its tp group (Megatron layout). Returns the model.

    Heads are split across ranks (each rank's fused QKV holds its q, k and v heads), the MLP hidden
    dimension is split, the (padded) vocabulary of the tied embedding/LM head is split, and
    `model.criterion` becomes the vocab-parallel cross-entropy. Needs `topology.init_process_groups()`.
    """
    tp = topology.get_tensor_model_parallel_world_size()
    if tp == 1:
        return model
    group, rank = topology.get_tensor_model_parallel_group(), topology.get_tensor_model_parallel_rank()
    for block in model.transformer.h:
        parallelize_block(block, group, rank, tp, model.cfg.dropout)
    wte = model.transformer.wte
    vocab_size = wte.weight.size(0)
    tied = model.lm_head.weight is wte.weight
    model.transformer.wte = vocab_parallel_embedding_from(wte.weight.detach(), group, rank, tp)
    if tied:
        head_weight = model.transformer.wte.weight
    else:
        head_weight = _mark_parallel(
            nn.Parameter(shard_tensor("lm_head.weight", model.lm_head.weight.detach(), rank, tp)), 0
        )
    model.lm_head = VocabParallelLMHead(head_weight, group)
    model.criterion = VocabParallelCrossEntropy(group, model.transformer.wte.vocab_start, vocab_size)
    model.tp_vocab_size = vocab_size
    return model


def gather_tp_tensors(
    named: dict[str, torch.Tensor], topology: Any, vocab_size: int | None = None, qkv: QKV | None = None
) -> dict[str, torch.Tensor]:
    """Full serial tensors from tp-sharded ones named like the serial GPT's (weights or their grads).
    Collective over the tp group; every tp rank gets the full dict; vocabulary padding is dropped.
    `qkv` = `qkv_sizes(cfg)` (needed for a grouped-query attention QKV bias)."""
    tp = topology.get_tensor_model_parallel_world_size()
    group = topology.get_tensor_model_parallel_group() if tp > 1 else None
    out = {}
    for name, tensor in named.items():
        tensor = tensor.detach()
        if tp > 1 and tp_rule(name) is not None:
            shards = [torch.empty_like(tensor) for _ in range(tp)]
            dist.all_gather(shards, tensor.contiguous(), group=group)
            tensor = merge_shards(name, shards, vocab_size, qkv)
        out[name] = tensor.clone()
    return out


def gather_full_state_dict(model: nn.Module, topology: Any) -> dict[str, torch.Tensor]:
    """The serial GPT's state dict from a tp-sharded model (collective over the tp group), loadable
    into the serial `GPT` (vocabulary padding dropped): what checkpoints-for-export and HF export need."""
    return gather_tp_tensors(
        model.state_dict(), topology, getattr(model, "tp_vocab_size", None), qkv_sizes(model.cfg)
    )
