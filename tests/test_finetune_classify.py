"""Classification fine-tuning: a tiny model learns a task to >= 95 % val accuracy in seconds, metrics and
TensorBoard, the label set in the checkpoint, eval.py's accuracy and confusion matrix, training only the
last blocks, padding, truncation and class-balanced sampling."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from finetune_helpers import (
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

from gptforge.config import ModelConfig
from gptforge.data.order import SampleOrder
from gptforge.finetune.classify import GPTClassifier, classify_examples, label_set
from gptforge.finetune.data import Row, balanced_weights
from gptforge.hf import from_hf
from gptforge.tokenizer import get_tokenizer
from gptforge.train.checkpoint import load_checkpoint_weights, read_meta, resolve

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("cls")
    return {
        "hf": tiny_hf(tmp / "hf"),
        "train": write_jsonl(tmp / "train.jsonl", sentiment_rows(400, seed=1)),
        "val": write_jsonl(tmp / "val.jsonl", sentiment_rows(100, seed=2)),
        "tmp": tmp,
    }


@pytest.fixture(scope="module")
def trained(data) -> tuple[Path, float]:
    """100 steps of 16 examples from a random tiny GPT-2, with TensorBoard."""
    tmp = data["tmp"]
    cfg = write_ft_config(
        tmp / "cfg.yaml", f"hf:{data['hf']}", tmp / "run", "train.max_steps=100", "run.tensorboard=true"
    )
    start = time.perf_counter()
    result = ok(run(finetune_cmd("classify", cfg, data["train"], data["val"])))
    (tmp / "stderr.txt").write_text(result.stderr)
    return tmp / "run", time.perf_counter() - start


def test_learns_to_95_percent_in_seconds(trained):
    run_dir, seconds = trained
    lines = metric_lines(run_dir)
    evals = [r for r in lines if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 20, 40, 60, 80, 100]
    assert all(set(r) == {"step", "val_loss", "val_ppl", "val_accuracy"} for r in evals)
    assert evals[0]["val_accuracy"] < 0.75  # chance level before training
    assert evals[-1]["val_accuracy"] >= 0.95
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.4
    train = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 101))
    assert all(r["tokens"] > 0 and 0 < r["mfu"] < 1 for r in train)
    assert seconds < 120, f"fine-tuning took {seconds:.0f} s"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run_dir / "tensorboard"))
    tb.Reload()
    accuracy = [e.value for e in tb.Scalars("val/val_accuracy")]
    assert accuracy == pytest.approx([r["val_accuracy"] for r in evals])
    assert "train/loss" in tb.Tags()["scalars"]


def test_label_set_saved_with_checkpoint(trained, data):
    run_dir, _ = trained
    meta = read_meta(resolve(run_dir))
    assert meta["finetune"] == {"task": "classify", "labels": ["neg", "pos"], "lora": None}
    assert meta["step"] == 100
    _, state_dict, _ = load_checkpoint_weights(run_dir)
    assert state_dict["score.weight"].shape == (2, 32) and "lm_head.weight" not in state_dict
    record = metric_lines(run_dir)[0]
    assert record == {
        "step": 0,
        "train_examples": 400,
        "val_examples": 100,
        "train_truncated": 0,
        "val_truncated": 0,
        "trainable_params": record["total_params"],
        "total_params": 50257 * 32 + 64 * 32 + 2 * 12_704 + 64 + 2 * 32 + 2,
    }


def test_eval_classify_reports_the_runs_accuracy_and_confusion_matrix(trained, data):
    run_dir, _ = trained
    final = [r for r in metric_lines(run_dir) if "val_accuracy" in r][-1]
    result = json.loads(
        ok(
            run(
                eval_cmd(
                    "--checkpoint", str(run_dir), "--task", "classify", "--data", str(data["val"]), "--json"
                )
            )
        ).stdout
    )
    assert result["accuracy"] == final["val_accuracy"]
    assert result["loss"] == final["val_loss"]
    assert result["labels"] == ["neg", "pos"] and result["examples"] == 100
    matrix = np.array(result["confusion_matrix"])
    assert matrix.sum() == 100 and matrix.trace() == round(100 * final["val_accuracy"])
    truth = [row["label"] for row in map(json.loads, data["val"].read_text().splitlines())]
    assert list(matrix.sum(1)) == [truth.count("neg"), truth.count("pos")]

    text = ok(
        run(eval_cmd("--checkpoint", str(run_dir), "--task", "classify", "--data", str(data["val"])))
    ).stdout
    assert f"accuracy {final['val_accuracy']:.4f}" in text and "<- predicted" in text
    assert "     neg |" in text and "     pos |" in text


def test_train_only_last_block(data, tmp_path):
    """finetune.train_layers=1: block 0 and the embeddings are bit-for-bit the starting weights."""
    cfg = write_ft_config(tmp_path / "cfg.yaml", f"hf:{data['hf']}", tmp_path / "run", "train.max_steps=3")
    result = ok(run(finetune_cmd("classify", cfg, data["train"], data["val"], "finetune.train_layers=1")))
    _, after, _ = load_checkpoint_weights(tmp_path / "run")
    before = from_hf(data["hf"])[0].state_dict()
    frozen = [k for k in after if k.startswith(("transformer.wte", "transformer.wpe", "transformer.h.0."))]
    trained = [k for k in after if k.startswith(("transformer.h.1.", "transformer.ln_f", "score"))]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)
    assert all(not torch.equal(after[k], before[k]) for k in trained if not k.startswith("score"))
    counted = sum(after[k].numel() for k in trained)
    assert f"trainable parameters: {counted:,} of" in result.stderr
    assert "the last 1 of 2 blocks + final LayerNorm + head" in result.stderr


def test_right_padding_gives_each_row_its_own_logits():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=32, context_length=16, vocab_size=97)
    model = GPTClassifier(cfg, 3).eval()
    rows = [torch.randint(0, 97, (n,)) for n in (5, 16, 1, 9)]
    x = torch.full((4, 16), 96, dtype=torch.long)
    y = torch.full((4, 16), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, : len(r)] = r
        y[i, len(r) - 1] = i % 3
    with torch.no_grad():
        batched, loss = model(x, y)
        by_length, _ = model(x, lengths=torch.tensor([len(r) for r in rows]))
        alone = torch.cat([model(r[None])[0] for r in rows])
    assert torch.equal(batched, by_length)
    assert torch.allclose(batched, alone, atol=1e-6, rtol=0)
    assert float(loss) == pytest.approx(
        float(torch.nn.functional.cross_entropy(alone, torch.arange(4) % 3)), abs=1e-6
    )


def test_truncation_keeps_the_start_and_counts():
    tok = get_tokenizer("gpt2")
    rows = [Row({"text": "word " * 50, "label": "a"}, "f:1"), Row({"text": "short", "label": "b"}, "f:2")]
    labels = label_set(rows, "f")
    examples = classify_examples(rows, labels, tok, context=8, split="train")
    assert examples.truncated == 1
    assert examples.inputs[0] == tok.encode("word " * 50)[:8] and examples.inputs[1] == tok.encode("short")
    assert examples.targets[0] == [-100] * 7 + [0] and examples.targets[1] == [1]
    assert examples.labels == [0, 1]


def test_class_balanced_sampling():
    labels = [0] * 900 + [1] * 100
    balanced = SampleOrder(1000, seed=3, weights=balanced_weights(labels))
    drawn = np.array(labels)[balanced.positions(0, 20_000)]
    assert abs(drawn.mean() - 0.5) < 0.02  # ~50 % minority class instead of 10 %
    again = SampleOrder(1000, seed=3, weights=balanced_weights(labels))
    assert np.array_equal(again.positions(5000, 300), balanced.positions(5000, 300))  # f(seed, epoch)
    plain = SampleOrder(1000, seed=3)
    assert sorted(plain.positions(1000, 1000)) == list(range(1000))  # an epoch is a permutation
    assert abs(np.array(labels)[plain.positions(0, 20_000)].mean() - 0.1) < 1e-12


def test_balanced_run_logs_it(data, tmp_path):
    rows = [r for r in sentiment_rows(300, seed=5) if r["label"] == "pos"][:100]
    rows += [r for r in sentiment_rows(300, seed=6) if r["label"] == "neg"][:10]
    train = write_jsonl(tmp_path / "skewed.jsonl", rows)
    cfg = write_ft_config(tmp_path / "cfg.yaml", f"hf:{data['hf']}", tmp_path / "run", "train.max_steps=2")
    result = ok(run(finetune_cmd("classify", cfg, train, data["val"], "finetune.balance_classes=true")))
    assert "labels: 'neg' (10), 'pos' (100); class-balanced sampling" in result.stderr
    # the run drew its first batch from the balanced order: its token count says which examples it took
    seed = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["seed"]
    tok = get_tokenizer("gpt2")
    lengths = np.array([len(tok.encode(r["text"])) for r in rows])
    labels = [0 if r["label"] == "neg" else 1 for r in rows]
    tokens = {r["step"]: r["tokens"] for r in metric_lines(tmp_path / "run") if "loss" in r}
    balanced = SampleOrder(len(rows), seed, weights=balanced_weights(labels))
    plain = SampleOrder(len(rows), seed)
    assert tokens[1] == lengths[balanced.positions(0, 16)].sum() != lengths[plain.positions(0, 16)].sum()
    assert tokens[2] == lengths[balanced.positions(0, 32)].sum()
