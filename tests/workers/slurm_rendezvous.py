"""Stand-in for launch/train.py under slurm/pretrain_8node.sh (TRAIN_SCRIPT=this file).

Joins the process group torchrun set up, all-reduces each rank's number, and writes what it saw to
$SLURM_TEST_OUT/rank<N>.json: rank, world size, SLURM node, the sum, its command line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    out = Path(os.environ["SLURM_TEST_OUT"])
    record = {
        "rank": rank,
        "world_size": world,
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "node": os.environ.get("SLURMD_NODENAME"),
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "all_reduce_sum": value.item(),
        "argv": sys.argv[1:],
        "dist_backend": dist.get_backend(),
    }
    dist.destroy_process_group()
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
