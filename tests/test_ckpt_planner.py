"""launch/plan.py's checkpoint figures (issue 13 req 9): each layout's checkpoint bytes per rank (12 bytes
per parameter over every rank, nothing gathered), the save time at the stated filesystem bandwidth, and a
warning when a preemption save would outlast the SLURM script's SAVE_TIMEOUT_S."""

from __future__ import annotations

import json
import sys

from train_helpers import ROOT, run

from gptforge.config import load_config
from gptforge.model.size import count_parameters
from gptforge.parallel import planner as pn

PLAN = str(ROOT / "launch" / "plan.py")
CONFIG = str(ROOT / "configs" / "gpt2-1.5b.yaml")


def test_checkpoint_bytes_are_every_ranks_share_of_12_bytes_per_parameter():
    cfg = load_config(CONFIG, ["model.vocab_size=50257"]).model
    n = count_parameters(cfg)
    one, total = pn.checkpoint_bytes(cfg, pn.Layout(1, 1, 1, 0))
    assert one == total == 12 * n
    for layout in (pn.Layout(1, 1, 16, 1), pn.Layout(1, 1, 16, 0), pn.Layout(2, 2, 4, 1)):
        per_rank, total = pn.checkpoint_bytes(cfg, layout)
        ranks = layout.tp * layout.pp * layout.dp
        assert 12 * n <= total <= 12 * n * 1.05  # tp-replicated norms and the tied head's copy counted again
        assert total / ranks <= per_rank <= 1.3 * total / ranks  # the busiest stage


def test_plan_prints_save_time_and_warns_past_save_timeout():
    slow = run(
        [sys.executable, PLAN, "--config", CONFIG, "--gpus", "16", "--fs-bandwidth", "0.2GB"], timeout=120
    )
    assert slow.returncode == 0, slow.stderr
    assert "ckpt/rank" in slow.stdout and "a checkpoint written at 0.2 GB/s in all" in slow.stdout
    assert "may not finish saving at preemption within SAVE_TIMEOUT_S=100s" in slow.stdout
    fast = run([sys.executable, PLAN, "--config", CONFIG, "--gpus", "16", "--json"], timeout=120)
    out = json.loads(fast.stdout)
    assert out["warnings"] == []
    row = out["layouts"][0]
    assert row["checkpoint_gb_per_rank"] > 0 and 0 < row["save_s"] < 50  # 18.7 GB at 10 GB/s
    longer = run(
        [
            sys.executable,
            PLAN,
            "--config",
            CONFIG,
            "--gpus",
            "16",
            "--fs-bandwidth",
            "0.2GB",
            "--save-timeout",
            "1000",
        ],
        timeout=120,
    )
    assert "may not finish saving" not in longer.stdout
