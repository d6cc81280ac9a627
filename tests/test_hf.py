"""Hugging Face GPT-2 interop: logits parity both ways, OpenAI's Hub layout, tokenizer files, and the
errors a user can fix. All offline: the HF models are tiny random ones made here."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptforge import hf
from gptforge.config import ModelConfig
from gptforge.errors import CheckpointError
from gptforge.model import GPT
from gptforge.tokenizer import get_tokenizer
from gptforge.weights import init_model, load_model, save_model_dir

transformers = pytest.importorskip("transformers")

TINY = ModelConfig(n_layer=2, n_head=4, d_model=64, context_length=32, vocab_size=101)
GPT2_VOCAB_TINY = ModelConfig(n_layer=2, n_head=2, d_model=32, context_length=64, vocab_size=50257)
HARD_TEXTS = [
    "Hello world",
    "  leading spaces,\ttabs\n\nand newlines\n",
    "unicode: héllo wörld 日本語 🤖 ﬁ",
    "numbers 1234567 and 3.14159, don't won't it's",
    "text with <|endoftext|> inside",
    "",
]


def our_model(cfg: ModelConfig = TINY, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():  # GPT-2's init makes norms 1 and biases 0: perturb them so parity sees them
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_model(tie: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=101, n_positions=32, n_embd=64, n_layer=2, n_head=4, tie_word_embeddings=tie
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("changes", [{}, {"tie_embeddings": False}, {"bias": False}])
def test_to_hf_logits_parity(changes):
    cfg = dataclasses.replace(TINY, **changes)
    model = our_model(cfg)
    idx = torch.randint(0, 101, (3, 32))
    converted = hf.to_hf(model, cfg).eval()
    assert isinstance(converted, transformers.GPT2LMHeadModel)
    assert max_diff(model(idx)[0], converted(idx).logits) <= 1e-5


@pytest.mark.parametrize("tie", [True, False])
def test_from_hf_logits_parity(tmp_path, tie):
    reference = hf_model(tie)
    reference.save_pretrained(tmp_path)
    model, cfg = hf.from_hf(tmp_path)
    assert cfg.tie_embeddings is tie and (cfg.n_layer, cfg.d_model, cfg.context_length) == (2, 64, 32)
    assert (model.lm_head.weight is model.transformer.wte.weight) is tie
    idx = torch.randint(0, 101, (3, 32))
    assert max_diff(model.eval()(idx)[0], reference(idx).logits) <= 1e-5


@pytest.mark.parametrize("changes", [{}, {"tie_embeddings": False}, {"bias": False}])
def test_save_hf_loads_in_transformers(tmp_path, changes):
    cfg = dataclasses.replace(TINY, **changes)
    model = our_model(cfg)
    hf.save_hf(model, cfg, tmp_path)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 101, (2, 32))
    assert max_diff(model(idx)[0], loaded(idx).logits) <= 1e-5
    back, back_cfg = hf.from_hf(tmp_path)
    assert max_diff(back.eval()(idx)[0], model(idx)[0]) <= 1e-6
    assert back_cfg == dataclasses.replace(cfg, bias=True)  # HF GPT-2 always has (here zero) biases


def test_exported_tokenizer_matches_ours(tmp_path):
    hf.save_hf(our_model(), TINY, tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = get_tokenizer("gpt2")
    corpus = (Path(__file__).resolve().parents[2] / "shared/corpora/tinyshakespeare.txt").read_text()[:50_000]
    for text in [*HARD_TEXTS, corpus]:
        ids = ours.encode(text, allow_special=True)
        assert hf_tok(text)["input_ids"] == ids
        assert hf_tok.decode(ids) == text
    merges = (tmp_path / "merges.txt").read_text().splitlines()
    assert merges[:4] == ["#version: 0.2", "Ġ t", "Ġ a", "h e"] and len(merges) == 50_001


def openai_layout(directory: Path, reference) -> None:
    """Rewrite a transformers save as OpenAI's `gpt2` on the Hub looks: no `transformer.` prefix, the
    causal-mask buffers stored as tensors, no separate LM head, the GPT-2 tokenizer files."""
    tensors = load_file(directory / "model.safetensors")
    ctx = reference.config.n_positions
    layout = {k.removeprefix("transformer."): v for k, v in tensors.items() if k != "lm_head.weight"}
    for i in range(reference.config.n_layer):
        layout[f"h.{i}.attn.bias"] = torch.ones(ctx, ctx).tril().view(1, 1, ctx, ctx)
        layout[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(layout, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config.update(
        {"n_ctx": ctx, "summary_type": "cls_index", "task_specific_params": {"text-generation": {}}}
    )
    (directory / "config.json").write_text(json.dumps(config))
    hf.write_gpt2_tokenizer_files(directory, ctx)


def test_openai_hub_layout_loads(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    reference = transformers.GPT2LMHeadModel(config).eval()
    reference.save_pretrained(tmp_path)
    openai_layout(tmp_path, reference)
    model, cfg, tok = load_model(f"hf:{tmp_path}")
    assert tok.name == "gpt2" and cfg.vocab_size == 50257
    idx = torch.randint(0, 50257, (2, 64))
    assert max_diff(model(idx)[0], reference(idx).logits) <= 1e-5


def test_consolidated_directory_round_trip(tmp_path):
    model = our_model(GPT2_VOCAB_TINY)
    info = get_tokenizer("gpt2").describe()
    save_model_dir(model, GPT2_VOCAB_TINY, info, tmp_path)
    assert set(load_file(tmp_path / "model.safetensors")) == set(model.state_dict()) - {"lm_head.weight"}
    loaded, cfg, tok = load_model(tmp_path)
    assert cfg == GPT2_VOCAB_TINY and tok.describe() == info
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_init_from_hf_takes_shape_from_weights_and_dropout_from_config(tmp_path):
    reference = hf_model()
    reference.save_pretrained(tmp_path)
    asked = ModelConfig(n_layer=12, vocab_size=None, dropout=0.2, init_from=f"hf:{tmp_path}")
    model, cfg, tokenizer_info = init_model(asked)
    assert (cfg.n_layer, cfg.d_model, cfg.vocab_size, cfg.dropout) == (2, 64, 101, 0.2)
    assert cfg.init_from == f"hf:{tmp_path}" and tokenizer_info["name"] == "gpt2"
    assert model.transformer.drop.p == 0.2
    idx = torch.randint(0, 101, (1, 32))
    assert max_diff(model.eval()(idx)[0], reference(idx).logits) <= 1e-5
    scratch, scratch_cfg, none = init_model(TINY)
    assert scratch_cfg is TINY and none is None and isinstance(scratch, GPT)


# ------------------------------------------------------------------------------------------ errors


def test_pickle_only_directory_is_refused(tmp_path):
    reference = hf_model()
    reference.config.save_pretrained(tmp_path)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin but no model\.safetensors"):
        hf.from_hf(tmp_path)


def test_weights_of_another_shape_name_the_tensor(tmp_path):
    hf_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_embd"] = 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"'transformer\.wte\.weight' has shape \(101, 64\) .* \(101, 128\)"
    ):
        hf.from_hf(tmp_path)


def test_corrupt_safetensors(tmp_path):
    hf_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        hf.from_hf(tmp_path)


def test_unsupported_gpt2_variant(tmp_path):
    hf_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["activation_function"] = "relu"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="activation_function='relu' is not supported"):
        hf.from_hf(tmp_path)


def test_foreign_vocabulary_is_an_unknown_tokenizer(tmp_path):
    hf_model().save_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    with pytest.raises(CheckpointError, match="unknown tokenizer"):
        load_model(f"hf:{tmp_path}")
