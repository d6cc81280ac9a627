"""Bad input to launch/finetune.py, launch/eval.py and launch/generate.py, as real processes: one clear line
on stderr (what, where, how to fix) and exit code 2; over-long prompts are truncated with a warning and
counted in metrics.jsonl."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from finetune_helpers import (
    EXPORT,
    GENERATE,
    alpaca_rows,
    eval_cmd,
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
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    return tiny_hf(tmp_path_factory.mktemp("hf") / "hf")


def fails(result, *fragments: str) -> str:
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, f"{fragment!r} not in {last!r}"
    return last


def finetune(tmp: Path, hf: Path, task: str, train: list[dict], val: list[dict], *extra: str):
    cfg = write_ft_config(tmp / "cfg.yaml", f"hf:{hf}", tmp / "run", "train.max_steps=1", *extra)
    return run(
        finetune_cmd(task, cfg, write_jsonl(tmp / "train.jsonl", train), write_jsonl(tmp / "val.jsonl", val))
    )


def test_row_missing_a_field_names_file_and_line(tmp_path, hf):
    train = sentiment_rows(5, seed=1)
    del train[2]["label"]
    fails(
        finetune(tmp_path, hf, "classify", train, sentiment_rows(4, seed=2)),
        f"{tmp_path / 'train.jsonl'}:3: missing field 'label'",
        '{"text": "...", "label": "..."}',
    )
    val = alpaca_rows(3, seed=2)
    del val[1]["output"]
    fails(
        finetune(tmp_path, hf, "instruct", alpaca_rows(4, seed=1), val),
        f"{tmp_path / 'val.jsonl'}:2: missing field 'output'",
    )


def test_invalid_json_and_wrong_types_name_file_and_line(tmp_path, hf):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(3, seed=1))
    train.write_text(train.read_text() + '{"text": "unterminated\n')
    cfg = write_ft_config(tmp_path / "cfg.yaml", f"hf:{hf}", tmp_path / "run")
    val = write_jsonl(tmp_path / "val.jsonl", sentiment_rows(3, seed=2))
    fails(run(finetune_cmd("classify", cfg, train, val)), f"{train}:4: invalid JSON")
    fails(
        finetune(tmp_path, hf, "instruct", [{"instruction": 3, "output": "x"}], alpaca_rows(2, seed=2)),
        f"{tmp_path / 'train.jsonl'}:1: field 'instruction' must be a string, got 3",
    )


def test_single_class_training_set(tmp_path, hf):
    train = [r for r in sentiment_rows(40, seed=1) if r["label"] == "pos"]
    fails(
        finetune(tmp_path, hf, "classify", train, sentiment_rows(4, seed=2)),
        "every training row has label 'pos'",
        "at least two classes",
    )


def test_val_label_not_seen_in_training(tmp_path, hf):
    val = sentiment_rows(4, seed=2)
    val[1]["label"] = "meh"
    fails(
        finetune(tmp_path, hf, "classify", sentiment_rows(40, seed=1), val),
        f"{tmp_path / 'val.jsonl'}:2: label 'meh' does not occur in the training set (labels: 'neg', 'pos')",
    )


def test_prompt_longer_than_context_is_truncated_and_counted(tmp_path, hf):
    long = {"instruction": "Summarize. " + "word " * 200, "input": "", "output": "short"}
    train = [long, *alpaca_rows(20, seed=1), long]
    result = ok(
        finetune(tmp_path, hf, "instruct", train, [long, *alpaca_rows(3, seed=2)], "finetune.responses=0")
    )
    assert (
        "2 of 22 train examples are longer than the context (64 tokens) and were truncated" in result.stderr
    )
    assert "1 of 4 val examples are longer than the context" in result.stderr
    record = metric_lines(tmp_path / "run")[0]
    assert (record["train_truncated"], record["val_truncated"]) == (2, 1)
    assert not (tmp_path / "run" / "responses.jsonl").exists()  # finetune.responses=0


def test_classification_checkpoint_refused_by_generate_and_export(tmp_path, hf):
    ok(finetune(tmp_path, hf, "classify", sentiment_rows(40, seed=1), sentiment_rows(8, seed=2)))
    run_dir = str(tmp_path / "run")
    for cmd in (
        [sys.executable, GENERATE, "--checkpoint", run_dir, "--prompt", "hello"],
        [sys.executable, EXPORT, "--checkpoint", run_dir, "--output", str(tmp_path / "out")],
    ):
        fails(
            run(cmd),
            f"{run_dir} is a classification model",
            "labels 'neg', 'pos'",
            "evaluate it with launch/eval.py --checkpoint",
            "--task classify",
        )
    # and eval.py's language-model tasks refuse it the same way; --task choice rows need their fields
    choice = write_jsonl(tmp_path / "choice.jsonl", [{"context": "a", "endings": ["b", "c"], "label": 0}])
    fails(
        run(eval_cmd("--checkpoint", run_dir, "--task", "choice", "--data", str(choice))),
        "is a classification model",
    )


def test_eval_bad_input(tmp_path, hf):
    rows = write_jsonl(
        tmp_path / "choice.jsonl",
        [
            {"context": "a", "endings": ["b", "c"], "label": 0},
            {"context": "a", "endings": ["b", "c"], "label": 2},
        ],
    )
    fails(
        run(eval_cmd("--hf", str(hf), "--task", "choice", "--data", str(rows))),
        f"{rows}:2: 'label' must be the index of the right ending, 0..1; got 2",
    )
    fails(
        run(eval_cmd("--hf", str(hf), "--data", str(rows))),
        "is not a build output directory",
        "--task choice",
    )
    fails(
        run(eval_cmd("--hf", str(hf), "--task", "classify", "--data", str(rows))),
        "needs a classification checkpoint",
    )
    fails(run(eval_cmd("--hf", str(hf), "--data", str(tmp_path))), f"no manifest.json in {tmp_path}")


def test_config_mistakes(tmp_path, hf):
    rows = sentiment_rows(8, seed=1)
    fails(
        finetune(tmp_path, hf, "classify", rows, rows, "finetune.lora_rank=4", "finetune.train_layers=1"),
        "finetune.lora_rank and finetune.train_layers are alternatives",
    )
    fails(
        finetune(tmp_path, hf, "classify", rows, rows, "finetune.lora_rnak=4"),
        "did you mean 'finetune.lora_rank'",
    )
    cfg = write_ft_config(tmp_path / "cfg.yaml", "scratch", tmp_path / "run")
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    fails(
        run(finetune_cmd("classify", cfg, data, data)), "model.init_from=scratch", "hf:DIR", "checkpoint:DIR"
    )
