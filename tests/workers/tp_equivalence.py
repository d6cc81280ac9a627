"""torchrun --nproc_per_node=2 tests/workers/tp_equivalence.py OUT.json

Every tensor-parallel piece against its serial twin, on gloo/CPU in fp32. Rank 0 writes the largest
relative differences (and the RNG facts) to OUT.json; tests/test_tensor_parallel.py asserts on them.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gptforge.config import ModelConfig
from gptforge.model import GPT
from gptforge.model import tensor_parallel as tpl
from gptforge.parallel.topology import Topology, padded_vocab_size

V = 300  # not a multiple of 128*tp: exercises the vocabulary padding, with real tokens on both ranks


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def check_layers(topo: Topology, rank: int, out: dict) -> None:
    group, tp = topo.get_tensor_model_parallel_group(), topo.tp
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)

    # column-parallel (gathered output) and row-parallel (parallel input) against nn.Linear
    full = nn.Linear(16, 24)
    col = tpl._column_from(full, group, rank, tp, "mlp.c_fc")
    col.gather_output = True
    y_ref, y = full(x), col(x)
    (y_ref * torch.arange(24.0)).sum().backward()
    xg_ref, x.grad = x.grad.clone(), None
    (y * torch.arange(24.0)).sum().backward()
    grads = tpl.gather_tp_tensors({"mlp.c_fc.weight": col.weight.grad, "mlp.c_fc.bias": col.bias.grad}, topo)
    out["column"] = max(
        rel(y, y_ref),
        rel(x.grad, xg_ref),
        rel(grads["mlp.c_fc.weight"], full.weight.grad),
        rel(grads["mlp.c_fc.bias"], full.bias.grad),
    )
    x.grad = None

    full = nn.Linear(16, 8)
    row = tpl._row_from(full, group, rank, tp, "mlp.c_proj")
    x_local = x.detach().chunk(tp, dim=-1)[rank].clone().requires_grad_()
    y_ref, y = full(x), row(x_local)
    (y_ref * torch.arange(8.0)).sum().backward()
    (y * torch.arange(8.0)).sum().backward()
    xg = tpl.gather_from_tp_region(x_local.grad, group)
    grads = tpl.gather_tp_tensors({"mlp.c_proj.weight": row.weight.grad}, topo)
    out["row"] = max(
        rel(y, y_ref),
        rel(xg, x.grad),
        rel(grads["mlp.c_proj.weight"], full.weight.grad),
        rel(row.bias.grad, full.bias.grad),
    )

    # vocab-parallel embedding with a padded vocabulary (V=300 -> 512 rows for tp=2: 256 per rank)
    emb_ref = nn.Embedding(V, 16)
    padded = padded_vocab_size(V, tp)
    emb = tpl.VocabParallelEmbedding(padded, 16, group, rank)
    with torch.no_grad():
        emb.weight.copy_(tpl.shard_tensor("wte.weight", emb_ref.weight, rank, tp))
    ids = torch.randint(0, V, (4, 7))
    ids[0, :4] = torch.tensor([0, 255, 256, V - 1])  # both rank ranges' edges
    e_ref, e = emb_ref(ids), emb(ids)
    (e_ref**2).sum().backward()
    (e**2).sum().backward()
    g = tpl.gather_tp_tensors({"wte.weight": emb.weight.grad}, topo, vocab_size=V)["wte.weight"]
    out["embedding"] = max(rel(e, e_ref), rel(g, emb_ref.weight.grad))
    out["padded_vocab"] = padded

    # vocab-parallel cross-entropy: ignore_index, targets on both ranks, padded columns masked
    logits_full = torch.randn(4, 7, V).requires_grad_()
    targets = torch.randint(0, V, (4, 7))
    targets[0, 0], targets[1, 3], targets[2, 2], targets[3, 1] = -100, V - 1, 0, 255
    ref = F.cross_entropy(logits_full.flatten(0, 1), targets.flatten(), ignore_index=-100)
    ref.backward()
    padded_logits = torch.cat([logits_full.detach(), torch.full((4, 7, padded - V), 5.0)], dim=-1)
    local = padded_logits.chunk(tp, dim=-1)[rank].clone().requires_grad_()
    loss = tpl.vocab_parallel_cross_entropy(local, targets, group, rank * padded // tp, V)
    loss.backward()
    g = tpl.gather_from_tp_region(local.grad, group)
    out["cross_entropy"] = max(rel(loss, ref), rel(g[..., :V], logits_full.grad))
    out["cross_entropy_pad_grad"] = float(g[..., V:].abs().max())


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(n_layer=2, n_head=4, d_model=32, context_length=16, vocab_size=V, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def check_gpt(topo: Topology, out: dict, tie: bool) -> None:
    key = "gpt_tied" if tie else "gpt_untied"
    torch.manual_seed(1234)
    serial = GPT(tiny_cfg(tie_embeddings=tie))
    par = tpl.parallelize_tensor(copy.deepcopy(serial), topo)
    torch.manual_seed(7)
    idx = torch.randint(0, V, (3, 16))
    targets = torch.randint(0, V, (3, 16))
    idx[0, :2], targets[1, :2] = torch.tensor([V - 1, 256]), torch.tensor([V - 1, 255])
    targets[0, :3] = -100
    _, loss_ref = serial(idx, targets)
    loss_ref.backward()
    _, loss = par(idx, targets)
    loss.backward()
    grads = tpl.gather_tp_tensors({n: p.grad for n, p in par.named_parameters()}, topo, vocab_size=V)
    ref_grads = {n: p.grad for n, p in serial.named_parameters()}
    assert grads.keys() == ref_grads.keys(), (grads.keys(), ref_grads.keys())
    full_sd = tpl.gather_full_state_dict(par, topo)
    serial_sd = serial.state_dict()
    assert full_sd.keys() == serial_sd.keys()
    out[key] = {
        "loss": rel(loss, loss_ref),
        "grads": max(rel(grads[n], ref_grads[n]) for n in ref_grads),
        "state_dict": max(rel(full_sd[n], serial_sd[n]) for n in serial_sd),
        "local_heads": par.transformer.h[0].attn.n_head,
        "local_qkv_rows": par.transformer.h[0].attn.c_attn.weight.shape[0],
        "wte_rows": par.transformer.wte.weight.shape[0],
        "pad_grad": float(
            par.transformer.wte.weight.grad[max(0, V - par.transformer.wte.vocab_start) :].abs().max()
        )
        if par.transformer.wte.vocab_end > V
        else 0.0,
        "head_is_wte": par.lm_head.weight is par.transformer.wte.weight,
        "tp_marked": sum(getattr(p, "tensor_model_parallel", False) for p in par.parameters()),
    }
    reloaded = GPT(tiny_cfg(tie_embeddings=tie))
    reloaded.load_state_dict(full_sd)
    out[key]["reloaded_loss"] = rel(reloaded(idx, targets)[1], loss_ref)


def check_dropout(topo: Topology, rank: int, world: int, out: dict) -> None:
    """tp ranks drop different attention elements but keep replicated activations equal; dp ranks agree."""

    def masks(tp_rank: int, pp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        tpl.model_parallel_seed(42, tp_rank, pp_rank)
        with tpl.get_rng_tracker().fork(tpl.TP_RNG):
            tracked = F.dropout(torch.ones(256), 0.5)
        return tracked, F.dropout(torch.ones(256), 0.5)

    def all_equal(t: torch.Tensor) -> bool:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t)
        return all(torch.equal(parts[0], p) for p in parts[1:])

    as_tp = Topology(tp=world).coords(rank)  # 2 ranks as one tp group
    as_dp = Topology(dp=world).coords(rank)  # 2 ranks as data-parallel replicas
    tracked_tp, default_tp = masks(as_tp[2], as_tp[0])
    tracked_dp, default_dp = masks(as_dp[2], as_dp[0])
    out["rng"] = {
        "tracked_equal_across_tp": all_equal(tracked_tp),
        "default_equal_across_tp": all_equal(default_tp),
        "tracked_equal_across_dp": all_equal(tracked_dp),
        "default_equal_across_dp": all_equal(default_dp),
    }
    # the whole model with dropout: the residual stream (ln_f input) stays identical on both tp ranks
    torch.manual_seed(5)
    model = tpl.parallelize_tensor(GPT(tiny_cfg(dropout=0.3)), topo)
    tpl.model_parallel_seed(42, topo.get_tensor_model_parallel_rank())
    state_before = tpl.get_rng_tracker().get_states()[tpl.TP_RNG]
    seen = {}
    model.transformer.ln_f.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))
    idx = torch.randint(0, V, (2, 16))
    model.train()
    loss = model(idx, idx)[1]
    state_after = tpl.get_rng_tracker().get_states()[tpl.TP_RNG]
    out["rng"]["residual_equal_across_tp"] = all_equal(seen["x"])
    out["rng"]["loss_finite"] = bool(torch.isfinite(loss))
    out["rng"]["tracker_advanced"] = not torch.equal(state_after, state_before)
    # deepspeed.checkpointing recomputes each block with the tracker restored: the same masks, the same grads
    plain, recomputed = dropout_grads(topo, idx, checkpoint=False), dropout_grads(topo, idx, checkpoint=True)
    out["rng"]["checkpointed_grads"] = max(rel(recomputed[n], plain[n]) for n in plain)


def dropout_grads(topo: Topology, idx: torch.Tensor, checkpoint: bool) -> dict[str, torch.Tensor]:
    import deepspeed

    torch.manual_seed(5)
    model = tpl.parallelize_tensor(GPT(tiny_cfg(dropout=0.3)), topo).train()
    if checkpoint:
        for block in model.transformer.h:
            block.forward = lambda x, mask=None, cache=None, f=block.forward: (
                deepspeed.checkpointing.checkpoint(f, x)
            )
    tpl.model_parallel_seed(42, topo.get_tensor_model_parallel_rank())
    model(idx, idx)[1].backward()
    return {n: p.grad for n, p in model.named_parameters()}


def check_mpu(topo: Topology, rank: int, world: int) -> bool:
    """The topology answers DeepSpeed's mpu questions (through DeepSpeed's own helpers too) on every rank."""
    from deepspeed.utils.bwc import bwc_pipeline_parallel_world_size, bwc_tensor_model_parallel_rank

    ok = (
        topo.get_tensor_model_parallel_rank() == rank
        and topo.get_tensor_model_parallel_world_size() == world
        and topo.get_tensor_model_parallel_src_rank() == 0
        and dist.get_world_size(topo.get_tensor_model_parallel_group()) == world
        and topo.get_data_parallel_rank() == 0
        and topo.get_data_parallel_world_size() == 1
        and topo.get_data_parallel_group_ranks() == [rank]
        and topo.get_model_parallel_rank() == rank
        and topo.get_model_parallel_world_size() == world
        and topo.get_pipe_parallel_world_size() == 1
        and topo.is_first_stage()
        and topo.is_last_stage()
        and bwc_tensor_model_parallel_rank(topo) == rank
        and bwc_pipeline_parallel_world_size(topo) == 1
    )
    flag = torch.tensor([int(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    topo = Topology(tp=world).init_process_groups()
    out: dict = {"mpu": check_mpu(topo, rank, world)}
    check_layers(topo, topo.get_tensor_model_parallel_rank(), out)
    check_gpt(topo, out, tie=True)
    check_gpt(topo, out, tie=False)
    check_dropout(topo, rank, world, out)
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
