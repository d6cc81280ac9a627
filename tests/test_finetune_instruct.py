"""Instruction tuning: the Alpaca template, prompt tokens that provably carry no gradient, end-of-text
after each response, truncation, responses.jsonl, and generate.py --instruct applying the same template."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from finetune_helpers import (
    GENERATE,
    alpaca_rows,
    finetune_cmd,
    metric_lines,
    ok,
    tiny_hf,
    write_ft_config,
    write_jsonl,
)
from train_helpers import run

from gptforge.config import ModelConfig
from gptforge.errors import ConfigError
from gptforge.finetune.data import Row
from gptforge.finetune.instruct import ALPACA, fit, instruct_examples, load_template
from gptforge.model import GPT
from gptforge.tokenizer import get_tokenizer

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TOK = get_tokenizer("gpt2")


def rows(*values: dict) -> list[Row]:
    return [Row({"input": "", **v}, f"f:{i + 1}") for i, v in enumerate(values)]


def test_alpaca_template_text():
    assert ALPACA.format("Name a color.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a color.\n\n### Response:\n"
    )
    assert ALPACA.format("Add.", "2 and {3}") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n"
        "2 and {3}\n\n### Response:\n"
    )


def test_custom_template_file(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(
        'prompt_input: "Q: {instruction} ({input})\\nA: "\nprompt_no_input: "Q: {instruction}\\nA: "\n'
    )
    template = load_template(str(path))
    assert template.format("hi", "x") == "Q: hi (x)\nA: " and template.format("hi") == "Q: hi\nA: "
    path.write_text('prompt_input: "Q: {instruction}"\nprompt_no_input: "Q: {instruction}"\n')
    with pytest.raises(ConfigError, match="prompt_input must be a string containing \\{input\\}"):
        load_template(str(path))
    with pytest.raises(ConfigError, match="not 'alpaca' and no such file"):
        load_template(str(tmp_path / "missing.yaml"))


def test_examples_mask_the_prompt_and_end_with_eot():
    data = rows(
        {"instruction": "Say hi.", "output": "hi there"},
        {"instruction": "Add.", "input": "1 and 2", "output": "3"},
    )
    examples = instruct_examples(data, ALPACA, TOK, context=256, train_on_prompt=False, split="train")
    for row, x, y in zip(data, examples.inputs, examples.targets, strict=True):
        prompt = TOK.encode(ALPACA.format(row.values["instruction"], row.values["input"]))
        response = TOK.encode(row.values["output"]) + [TOK.eot_id]
        assert x == (prompt + response)[:-1]
        assert y == [-100] * (len(prompt) - 1) + response  # the first response token is the first target
    everything = instruct_examples(data, ALPACA, TOK, context=256, train_on_prompt=True, split="train")
    assert everything.targets[0] == (everything.inputs[0] + [TOK.eot_id])[1:]


def test_masked_prompt_tokens_carry_no_gradient():
    """d loss / d logits is exactly zero at every prompt and padding position, and the weights' gradient
    is the gradient of a loss over the response tokens alone."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, context_length=128, vocab_size=50257))
    data = rows(
        {"instruction": "Say hi.", "output": "hi there"},
        {"instruction": "Add.", "input": "1 and 2", "output": "3"},
    )
    for train_on_prompt in (False, True):
        examples = instruct_examples(data, ALPACA, TOK, 128, train_on_prompt, "train")
        x, y = examples.batch([0, 1], TOK.eot_id)
        model.zero_grad()
        logits, loss = model(x, y)
        logits.retain_grad()
        loss.backward()
        per_position = logits.grad.abs().sum(-1)  # (B, T)
        scored = y != -100
        assert torch.all(per_position[~scored] == 0)
        assert torch.all(per_position[scored] > 0)
        prompt_len = len(TOK.encode(ALPACA.format("Add.", "1 and 2")))
        assert (
            bool(scored[1, : prompt_len - 1].any()) is train_on_prompt
        )  # the control: unmasked gets gradient
    # weights: the same gradient as a loss computed on the response positions only
    examples = instruct_examples(data, ALPACA, TOK, 128, False, "train")
    x, y = examples.batch([0, 1], TOK.eot_id)
    model.zero_grad()
    model(x, y)[1].backward()
    masked_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits, _ = model(x)
    keep = y != -100
    torch.nn.functional.cross_entropy(logits[keep], y[keep]).backward()
    for ours, reference in zip(masked_grads, (p.grad for p in model.parameters()), strict=True):
        assert torch.allclose(ours, reference, atol=1e-7, rtol=1e-5)


def test_fit_keeps_the_response_and_the_prompts_end():
    prompt, response = list(range(100)), list(range(1000, 1010))
    assert fit(prompt, response, 200) == (prompt, response)
    p, r = fit(prompt, response, 40)  # prompt longer than the budget: it loses its start
    assert r == response and p == prompt[-30:]
    p, r = fit(list(range(10)), list(range(1000, 1100)), 40)  # long response: cut at the end
    assert p == list(range(10)) and r == list(range(1000, 1030))
    p, r = fit(prompt, list(range(1000, 1100)), 40)  # both long: the response keeps half
    assert len(p) == 20 and p == prompt[-20:] and r == list(range(1000, 1020))


@pytest.fixture(scope="module")
def instruct_run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("instruct")
    hf = tiny_hf(tmp / "hf")
    train = write_jsonl(tmp / "train.jsonl", alpaca_rows(64, seed=1))
    val = write_jsonl(tmp / "val.jsonl", alpaca_rows(6, seed=2))
    (tmp / "template.yaml").write_text(
        'prompt_input: "Q: {instruction} {input}\\nA:"\nprompt_no_input: "Q: {instruction}\\nA:"\n'
    )
    cfg = write_ft_config(
        tmp / "cfg.yaml",
        f"hf:{hf}",
        tmp / "run",
        "train.max_steps=8",
        "train.eval_interval=4",
        "finetune.response_max_tokens=5",
        f"finetune.template={tmp / 'template.yaml'}",
    )
    result = ok(run(finetune_cmd("instruct", cfg, train, val)))
    return {"run": tmp / "run", "val": val, "hf": hf, "log": result.stderr}


def test_instruct_run_writes_metrics_checkpoint_and_responses(instruct_run):
    run_dir = instruct_run["run"]
    lines = metric_lines(run_dir)
    assert lines[0]["train_examples"] == 64 and lines[0]["train_truncated"] == 0
    evals = [r for r in lines if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8] and evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert all("val_accuracy" not in r for r in evals)
    responses = [json.loads(line) for line in (run_dir / "responses.jsonl").read_text().splitlines()]
    val = [json.loads(line) for line in instruct_run["val"].read_text().splitlines()]
    assert [{k: r[k] for k in ("instruction", "input", "output")} for r in responses] == val
    assert all(isinstance(r["response"], str) for r in responses)
    assert "wrote 6 val responses" in instruct_run["log"]


def test_generate_instruct_applies_the_checkpoints_template(instruct_run):
    run_dir = instruct_run["run"]
    result = ok(
        run(
            [
                sys.executable,
                GENERATE,
                "--checkpoint",
                str(run_dir),
                "--instruct",
                "--prompt",
                "Add the two numbers.",
                "--input",
                "2 and 3",
                "--temperature",
                "0",
                "--max-new-tokens",
                "5",
                "--json",
            ]
        )
    )
    out = json.loads(result.stdout)
    assert out["prompt_tokens"] == TOK.encode("Q: Add the two numbers. 2 and 3\nA:")
    # the response in responses.jsonl for the same prompt is what generate.py produces (greedy both)
    responses = [json.loads(line) for line in (run_dir / "responses.jsonl").read_text().splitlines()]
    first = responses[0]
    again = json.loads(
        ok(
            run(
                [
                    sys.executable,
                    GENERATE,
                    "--checkpoint",
                    str(run_dir),
                    "--instruct",
                    "--prompt",
                    first["instruction"],
                    "--input",
                    first["input"],
                    "--temperature",
                    "0",
                    "--max-new-tokens",
                    "5",
                    "--json",
                ]
            )
        ).stdout
    )
    assert again["text"] == first["response"]
    # a plain model gets the Alpaca template
    hf_out = json.loads(
        ok(
            run(
                [
                    sys.executable,
                    GENERATE,
                    "--hf",
                    str(instruct_run["hf"]),
                    "--instruct",
                    "--prompt",
                    "Name a color.",
                    "--max-new-tokens",
                    "1",
                    "--json",
                ]
            )
        ).stdout
    )
    assert hf_out["prompt_tokens"] == TOK.encode(ALPACA.format("Name a color."))
