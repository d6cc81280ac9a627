"""torchrun --nproc_per_node=N tests/workers/pp_equivalence.py OUT.json TP PP PARTITION

A real DeepSpeed PipelineEngine (N = TP x PP x DP processes, gloo/CPU, fp32) against the serial GPT:
eval loss, one train_batch (2 micro-batches, SGD, gradient clipping: the norm spans every stage) and the
gathered weights after it. Rank 0 writes the
largest relative differences, the stage layout and the grid's groups to OUT.json.
"""

from __future__ import annotations

import copy
import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from gptforge.config import ModelConfig
from gptforge.model import GPT
from gptforge.model.pipeline import (
    build_pipeline,
    describe_stages,
    load_serial_state_dict,
    pipeline_to_serial_name,
)
from gptforge.model.tensor_parallel import gather_tp_tensors, qkv_sizes
from gptforge.parallel.topology import Topology

MICRO, ACCUM, LR, CLIP = 2, 2, 0.5, 1.0


def gather_serial_state_dict(
    module: torch.nn.Module, cfg: ModelConfig, topology: Topology
) -> dict[str, torch.Tensor]:
    """The full serial GPT state dict from every stage and tp shard (collective over the world; every
    rank gets it), to compare with the serial model's."""
    local = {pipeline_to_serial_name(n, cfg): t for n, t in module.state_dict().items()}
    local = (
        gather_tp_tensors(local, topology, cfg.vocab_size, qkv_sizes(cfg))
        if topology.tp > 1
        else {n: t.detach().clone() for n, t in local.items()}
    )
    if topology.pp > 1:
        stages: list[dict[str, torch.Tensor] | None] = [None] * topology.pp
        dist.all_gather_object(stages, local, group=topology.get_pipe_parallel_group())
        local = {n: t for part in stages for n, t in part.items()}
    if cfg.tie_embeddings:
        local["lm_head.weight"] = local["transformer.wte.weight"]
    return local


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a).detach().float(), torch.as_tensor(b).detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def main() -> None:
    out_path, tp, pp, partition = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dp = world // (tp * pp)
    topo = Topology(tp=tp, pp=pp, dp=dp).init_process_groups()
    cfg = ModelConfig(n_layer=4, n_head=4, d_model=32, context_length=16, vocab_size=300, dropout=0.0)

    torch.manual_seed(1234)
    serial = GPT(cfg)
    pipe = build_pipeline(cfg, topo, partition)
    load_serial_state_dict(pipe, serial.state_dict(), cfg, topo)
    start = gather_serial_state_dict(pipe, cfg, topo)
    start_rel = max(rel(start[n], t) for n, t in serial.state_dict().items())

    engine, *_ = deepspeed.initialize(
        model=pipe,
        optimizer=torch.optim.SGD(pipe.parameters(), lr=LR),
        config={
            "train_micro_batch_size_per_gpu": MICRO,
            "gradient_accumulation_steps": ACCUM,
            "train_batch_size": MICRO * ACCUM * dp,
            "steps_per_print": 10**9,
            "gradient_clipping": CLIP,
        },
    )
    torch.manual_seed(99)  # the same data on every rank; dp rank d takes its own micro-batches
    data = [
        (torch.randint(0, 300, (MICRO, 16)), torch.randint(0, 300, (MICRO, 16))) for _ in range(ACCUM * dp)
    ]
    data[0][1][0, :4] = -100
    mine = data[topo.coords(rank)[1] * ACCUM : (topo.coords(rank)[1] + 1) * ACCUM]

    eval_loss = engine.eval_batch(iter(copy.deepcopy(mine)))
    train_loss = engine.train_batch(iter(copy.deepcopy(mine)))
    after = gather_serial_state_dict(engine.module, cfg, topo)

    # serial reference: the mean loss of the micro-batches, one SGD step on the mean gradient
    ref_opt = torch.optim.SGD(serial.parameters(), lr=LR)
    losses = [serial(x, y)[1] for x, y in data]
    ref_eval = torch.stack(losses).mean()
    ref_eval.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(serial.parameters(), CLIP)
    ref_opt.step()
    serial_after = serial.state_dict()

    # the grid DeepSpeed uses as mpu is built from our topology: same groups, rank for rank
    grid = engine.grid
    grid_matches = {
        "dp": grid.dp_group == topo.group_ranks("dp", rank),
        "pp": grid.pp_group == topo.group_ranks("pp", rank),
        "tp": grid.slice_group == topo.group_ranks("tp", rank),
        "model_rank": grid.get_model_parallel_rank() == topo.get_model_parallel_rank(),
    }
    flags = torch.tensor([all(grid_matches.values())], dtype=torch.int)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    result = {
        "start_state_dict": start_rel,
        "eval_loss": rel(eval_loss, ref_eval),
        "train_loss": rel(train_loss, ref_eval),
        "weights_after_step": max(rel(after[n], serial_after[n]) for n in serial_after),
        "moved": max(float((after[n] - start[n]).abs().max()) for n in serial_after),
        "grad_norm": float(grad_norm),
        "keys_equal": sorted(after) == sorted(serial_after),
        "grid_matches_topology": bool(flags.item()),
        "stages": describe_stages(cfg, topo, partition),
        "local_blocks": sum(1 for name, _ in engine.module.named_children() if name.isdigit()),
        "parts": list(engine.module.parts),
    }
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
