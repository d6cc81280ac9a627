"""Fine-tuning under torchrun with 2 data-parallel ranks (gloo, CPU): the same losses as one process with
the same global batch, ZeRO-1 with frozen weights (LoRA), responses from every rank's share; and resume."""

from __future__ import annotations

import json

import pytest
from finetune_helpers import (
    alpaca_rows,
    finetune_cmd,
    metric_lines,
    ok,
    sentiment_rows,
    tiny_hf,
    write_ft_config,
    write_jsonl,
)
from train_helpers import run

pytest.importorskip("transformers")
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.slow]


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metric_lines(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("dp")
    return {
        "hf": tiny_hf(tmp / "hf"),
        "cls_train": write_jsonl(tmp / "cls_train.jsonl", sentiment_rows(200, seed=1)),
        "cls_val": write_jsonl(tmp / "cls_val.jsonl", sentiment_rows(50, seed=2)),
        "ins_train": write_jsonl(tmp / "ins_train.jsonl", alpaca_rows(48, seed=1)),
        "ins_val": write_jsonl(tmp / "ins_val.jsonl", alpaca_rows(5, seed=2)),
    }


def test_two_ranks_match_one_process(files, tmp_path):
    """Global batch 16: one process accumulates 2 micro-batches of 8, two ranks (ZeRO-1) take one each."""
    runs = {}
    for nproc, zero in ((1, 0), (2, 1)):
        run_dir = tmp_path / f"run{nproc}"
        cfg = write_ft_config(
            tmp_path / f"cfg{nproc}.yaml",
            f"hf:{files['hf']}",
            run_dir,
            "train.max_steps=12",
            "train.micro_batch_size=8",
            "train.eval_interval=6",
            f"parallel.zero_stage={zero}",
        )
        ok(run(finetune_cmd("classify", cfg, files["cls_train"], files["cls_val"], nproc=nproc)))
        runs[nproc] = run_dir
    one, two = losses(runs[1]), losses(runs[2])
    assert list(one) == list(two) == list(range(1, 13))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-5), step
    evals = [[r for r in metric_lines(d) if "val_accuracy" in r] for d in runs.values()]
    assert [r["step"] for r in evals[1]] == [0, 6, 12]
    assert evals[0][0]["val_accuracy"] == evals[1][0]["val_accuracy"]  # same weights, val split over 2 ranks
    assert evals[1][-1]["val_loss"] == pytest.approx(evals[0][-1]["val_loss"], rel=1e-4)
    meta = json.loads((runs[2] / "checkpoints" / "step_12" / "checkpoint.json").read_text())
    assert meta["layout"]["dp"] == 2 and meta["layout"]["zero_stage"] == 1


def test_two_rank_lora_instruct_with_zero1_and_responses(files, tmp_path):
    cfg = write_ft_config(
        tmp_path / "cfg.yaml",
        f"hf:{files['hf']}",
        tmp_path / "run",
        "train.max_steps=4",
        "train.micro_batch_size=4",
        "train.global_batch_size=8",
        "parallel.zero_stage=1",
        "finetune.lora_rank=4",
        "finetune.response_max_tokens=3",
        "optim.lr=3e-2",
    )
    ok(run(finetune_cmd("instruct", cfg, files["ins_train"], files["ins_val"], nproc=2)))
    responses = [json.loads(line) for line in (tmp_path / "run" / "responses.jsonl").read_text().splitlines()]
    val = [json.loads(line) for line in files["ins_val"].read_text().splitlines()]
    assert [r["instruction"] for r in responses] == [r["instruction"] for r in val]  # 3 + 2 rows, in order
    assert len(losses(tmp_path / "run")) == 4


def test_resume_continues_the_same_run(files, tmp_path):
    """Stopped at step 3 and resumed to 6 = 6 steps straight (constant LR: the schedule is not in play)."""
    common = [
        "train.micro_batch_size=8",
        "train.global_batch_size=16",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        "train.save_interval=3",
        "train.eval_interval=3",
    ]
    straight = write_ft_config(
        tmp_path / "a.yaml", f"hf:{files['hf']}", tmp_path / "a", "train.max_steps=6", *common
    )
    ok(run(finetune_cmd("classify", straight, files["cls_train"], files["cls_val"])))
    stopped = write_ft_config(
        tmp_path / "b.yaml", f"hf:{files['hf']}", tmp_path / "b", "train.max_steps=3", *common
    )
    ok(run(finetune_cmd("classify", stopped, files["cls_train"], files["cls_val"])))
    resumed = ok(
        run(
            finetune_cmd(
                "classify", stopped, files["cls_train"], files["cls_val"], "train.max_steps=6", resume="auto"
            )
        )
    )
    assert "resumed from" in resumed.stderr
    assert losses(tmp_path / "b") == losses(tmp_path / "a")  # bitwise (fp32, CPU)
    other = write_jsonl(tmp_path / "other.jsonl", sentiment_rows(200, seed=9))
    refused = run(
        finetune_cmd("classify", stopped, other, files["cls_val"], "train.max_steps=9", resume="auto")
    )
    assert refused.returncode == 2 and "was trained on other data" in refused.stderr
