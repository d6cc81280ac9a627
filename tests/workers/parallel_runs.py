"""torchrun --nproc_per_node=N tests/workers/parallel_runs.py SPEC.json

Several training runs, one after another, in the same N processes: the trainer exactly as
`launch/train.py` runs it (`Trainer(cfg, resume).run()`), without paying process start-up, DeepSpeed's
import and torchrun's rendezvous once per run. SPEC: {"config": YAML, "runs": [{"overrides": [...],
"resume": "none" | "auto" | PATH}, ...]}. Each run is a fresh Trainer (new process groups, model,
engine); between runs the ranks meet at a barrier. The process group is destroyed at the end only.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch.distributed as dist

from gptforge.cli import quiet_deepspeed, setup_rank_logging
from gptforge.config import load_config


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    setup_rank_logging()
    quiet_deepspeed()
    from gptforge.train.loop import Trainer

    for run in spec["runs"]:
        cfg = load_config(spec["config"], run["overrides"])
        logging.getLogger("worker").info("run: %s (resume %s)", " ".join(run["overrides"]), run["resume"])
        code = Trainer(cfg, run["resume"]).run()
        if code:
            raise SystemExit(code)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
