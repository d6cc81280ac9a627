"""launch/eval.py: the loss over a build output is exactly the val_loss the trainer logged for the same
checkpoint (one process or data parallel, fp32 or CPU bf16), and multiple-choice accuracy is the argmax of
each ending's mean log-likelihood."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from finetune_helpers import EXPORT, eval_cmd, ok, write_jsonl
from train_helpers import metrics, run, sentencepiece_data, train_cmd, write_config

from gptforge.data.format import read_manifest
from gptforge.evaluate import choice_examples, join, mean_log_likelihood
from gptforge.finetune.data import Row
from gptforge.tokenizer import tokenizer_from_manifest
from gptforge.weights import load_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return sentencepiece_data(tmp_path_factory.mktemp("sp"))


def trained(tmp: Path, data: Path, *overrides: str, nproc: int = 1) -> Path:
    cfg = write_config(tmp / "cfg.yaml", data, tmp / "run", "train.max_steps=4", *overrides)
    ok(run(train_cmd(cfg, resume="none", nproc=nproc)))
    return tmp / "run"


def evaluated(run_dir: Path, data: Path, *args: str, nproc: int = 1) -> dict:
    return json.loads(
        ok(
            run(eval_cmd("--checkpoint", str(run_dir), "--data", str(data), "--json", *args, nproc=nproc))
        ).stdout
    )


@pytest.fixture(scope="module")
def fp32_run(data, tmp_path_factory) -> Path:
    return trained(tmp_path_factory.mktemp("fp32"), data)


def test_loss_equals_the_trainers_val_loss_exactly(fp32_run, data):
    logged = metrics(fp32_run)[1][-1]
    assert logged["step"] == 4
    result = evaluated(fp32_run, data)
    assert result["loss"] == logged["val_loss"] and result["ppl"] == logged["val_ppl"]
    assert result["windows"] == 2 * 4 and result["tokens"] == 8 * 32  # train.eval_iters x micro batch
    everything = evaluated(fp32_run, data, "--eval-iters", "0")
    assert everything["windows"] > 8 and everything["loss"] != result["loss"]
    # the same number computed here from the weights (a different code path: no engine, plain batches)
    model, _, _ = load_model(fp32_run)
    from gptforge.data.loader import WindowDataset, eval_batches

    val = WindowDataset(read_manifest(data), "val", 32, seed=0)
    with torch.no_grad():
        losses = [(float(model(x, y)[1]), len(x)) for x, y in eval_batches(val, 8, 4, 0, 1)]
    assert sum(loss * n for loss, n in losses) / 8 == pytest.approx(result["loss"], rel=1e-6)


def test_loss_equals_the_trainers_val_loss_in_bf16(data, tmp_path):
    run_dir = trained(tmp_path, data, "train.precision=bf16")
    logged = metrics(run_dir)[1][-1]
    assert evaluated(run_dir, data)["loss"] == logged["val_loss"]
    assert evaluated(run_dir, data, "--precision", "fp32")["loss"] != logged["val_loss"]  # precision matters


@pytest.mark.slow
def test_data_parallel_trainer_and_eval_agree_exactly(data, tmp_path):
    """A 2-rank run's logged val_loss = eval.py on 1 process = eval.py under torchrun with 2 ranks."""
    run_dir = trained(tmp_path, data, nproc=2)
    logged = metrics(run_dir)[1][-1]
    assert evaluated(run_dir, data)["loss"] == logged["val_loss"]
    assert evaluated(run_dir, data, nproc=2)["loss"] == logged["val_loss"]
    single, double = (
        evaluated(run_dir, data, "--eval-iters", "0"),
        evaluated(run_dir, data, "--eval-iters", "0", nproc=2),
    )
    assert single == double and single["windows"] > 8


def choice_rows(data: Path, n: int = 24) -> list[dict]:
    """Consecutive lines of the shared corpus: the right ending is the line that follows."""
    lines = [line for line in (data.parent / "sp.txt").read_text().splitlines() if 15 < len(line) < 35][:400]
    r = random.Random(0)
    rows = []
    for i in r.sample(range(len(lines) - 1), n):
        endings = [lines[i + 1], *r.sample(lines, 3)]
        r.shuffle(endings)
        rows.append({"context": lines[i], "endings": endings, "label": endings.index(lines[i + 1])})
    return rows


def reference_correct(model, tok, rows: list[dict]) -> int:
    """Row by row, ending by ending, no batching or padding."""
    correct = 0
    for row in rows:
        ctx = tok.encode(row["context"])
        scores = []
        for ending in row["endings"]:
            end = tok.encode(join(row["context"], ending))
            seq = torch.tensor([(ctx + end)[-33:]])
            with torch.no_grad():
                logp = torch.log_softmax(model(seq[:, :-1])[0].float(), -1)[0]
            n = len(end)
            targets = seq[0, -n:]
            scores.append(float(logp[-n:].gather(-1, targets[:, None]).mean()))
        correct += max(range(len(scores)), key=scores.__getitem__) == row["label"]
    return correct


def test_multiple_choice_accuracy(fp32_run, data, tmp_path):
    rows = choice_rows(data)
    path = write_jsonl(tmp_path / "choice.jsonl", rows)
    model, _, tok = load_model(fp32_run)
    expected = reference_correct(model, tok, rows)
    result = json.loads(
        ok(
            run(eval_cmd("--checkpoint", str(fp32_run), "--task", "choice", "--data", str(path), "--json"))
        ).stdout
    )
    assert result == {"accuracy": expected / len(rows), "correct": expected, "examples": len(rows)}
    # the same model as a Hugging Face directory, through --hf
    ok(run([sys.executable, EXPORT, "--checkpoint", str(fp32_run), "--output", str(tmp_path / "hf")]))
    via_hf = json.loads(
        ok(
            run(
                eval_cmd(
                    "--hf",
                    str(tmp_path / "hf"),
                    "--task",
                    "choice",
                    "--data",
                    str(path),
                    "--json",
                    "--micro-batch-size",
                    "3",
                )
            )
        ).stdout
    )
    assert via_hf["correct"] == expected


def test_choice_scores_are_mean_log_likelihoods_of_the_ending(fp32_run, data):
    model, cfg, tok = load_model(fp32_run)
    rows = [Row(r, f"f:{i}") for i, r in enumerate(choice_rows(data, 3))]
    examples, counts, labels = choice_examples(rows, tok, cfg.context_length)
    assert counts == [4, 4, 4] and labels == [r.values["label"] for r in rows]
    x, y = examples.batch(range(len(examples)), tok.eot_id)
    batched = mean_log_likelihood(model, x, y)
    for i in range(len(examples)):
        xi, yi = examples.batch([i], tok.eot_id)
        alone = mean_log_likelihood(model, xi, yi)
        assert float(batched[i]) == pytest.approx(float(alone), abs=1e-5)
        scored = [t for t in examples.targets[i] if t != -100]
        assert scored == tok.encode(
            join(rows[i // 4].values["context"], rows[i // 4].values["endings"][i % 4])
        )
    assert tokenizer_from_manifest(read_manifest(data).tokenizer).name == tok.name


def test_join_adds_one_space_between_words():
    assert join("He said", "hello") == " hello"
    assert join("He said ", "hello") == "hello" and join("He said", " hello") == " hello"
    assert join("", "hello") == "hello"


def test_finetune_starts_from_a_training_checkpoint(fp32_run, data, tmp_path):
    """checkpoint:RUN as model.init_from (SentencePiece tokenizer): the frozen block is the run's own."""
    from finetune_helpers import finetune_cmd, write_ft_config

    from gptforge.train.checkpoint import load_checkpoint_weights

    text = (data.parent / "sp.txt").read_text().splitlines()
    rows = [
        {"text": line, "label": "speaker" if line.isupper() else "line"} for line in text if line.strip()
    ][:200]
    train, val = (
        write_jsonl(tmp_path / "train.jsonl", rows[:160]),
        write_jsonl(tmp_path / "val.jsonl", rows[160:]),
    )
    cfg = write_ft_config(
        tmp_path / "cfg.yaml",
        f"checkpoint:{fp32_run}",
        tmp_path / "run",
        "train.max_steps=2",
        "finetune.train_layers=1",
    )
    result = ok(run(finetune_cmd("classify", cfg, train, val)))
    assert f"fine-tuning (classify) from checkpoint:{fp32_run}: 2 layers, d_model 32" in result.stderr
    _, start, tokenizer = load_checkpoint_weights(fp32_run)
    _, tuned, tuned_tokenizer = load_checkpoint_weights(tmp_path / "run")
    assert tuned_tokenizer == tokenizer and tokenizer["name"] == "sentencepiece"
    assert all(
        torch.equal(tuned[k], start[k])
        for k in start
        if k.startswith(("transformer.h.0.", "transformer.wte"))
    )
    assert not torch.equal(tuned["transformer.h.1.mlp.c_fc.weight"], start["transformer.h.1.mlp.c_fc.weight"])
