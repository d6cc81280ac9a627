"""Generation: agreement with transformers' greedy search, KV cache on/off, batching with padding,
seeded sampling, stopping and cropping."""

from __future__ import annotations

import pytest
import torch

from gptforge import hf
from gptforge.config import ModelConfig
from gptforge.errors import GptforgeError
from gptforge.generate import generate, sample_next
from gptforge.model import GPT

# init_std 0.2 spreads the logits, so greedy choices are far from ties and comparisons are exact.
CFG = ModelConfig(n_layer=2, n_head=4, d_model=64, context_length=32, vocab_size=101, init_std=0.2)
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [42], list(range(40, 60))]


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG).eval()


def test_greedy_equals_transformers(model):
    reference = hf.to_hf(model, CFG).eval()
    for prompt in PROMPTS:
        new = 32 - len(prompt)  # HF cannot go past n_positions
        expected = reference.generate(
            torch.tensor([prompt]), max_new_tokens=new, do_sample=False, pad_token_id=0, attention_mask=None
        )[0, len(prompt) :].tolist()
        assert generate(model, [prompt], new, temperature=0) == [expected]


def test_kv_cache_on_and_off_agree(model):
    """40 new tokens on a 32-token context: the cached phase and the sliding-window phase both run."""
    for kwargs in ({"temperature": 0}, {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 7}):
        with_cache = generate(model, PROMPTS, 40, use_cache=True, **kwargs)
        without = generate(model, PROMPTS, 40, use_cache=False, **kwargs)
        assert with_cache == without
        assert all(len(row) == 40 for row in with_cache)


def test_batched_prompts_equal_one_by_one(model):
    batched = generate(model, PROMPTS, 40, temperature=0)
    assert batched == [generate(model, [p], 40, temperature=0)[0] for p in PROMPTS]


def test_seeded_sampling_is_reproducible(model):
    a = generate(model, PROMPTS, 20, temperature=1.0, seed=123)
    assert a == generate(model, PROMPTS, 20, temperature=1.0, seed=123)
    assert a != generate(model, PROMPTS, 20, temperature=1.0, seed=124)
    assert a != generate(model, PROMPTS, 20, temperature=0)


def test_stops_at_end_of_text(model):
    greedy = generate(model, [PROMPTS[0]], 20, temperature=0)[0]
    eot = greedy[5]
    stopped = generate(model, [PROMPTS[0]], 20, temperature=0, eot_id=eot)[0]
    assert stopped == greedy[: greedy.index(eot)]
    # in a batch, rows that have not stopped keep going
    alone = generate(model, [PROMPTS[2]], 20, temperature=0, eot_id=eot)[0]
    assert generate(model, [PROMPTS[0], PROMPTS[2]], 20, temperature=0, eot_id=eot) == [stopped, alone]
    assert len(stopped) < 20


def test_long_prompt_is_cropped_from_the_left(model):
    long = list(range(1, 80))
    assert generate(model, [long], 10, temperature=0) == generate(model, [long[-32:]], 10, temperature=0)
    assert generate(model, [long], 10, temperature=0) != generate(model, [long[:32]], 10, temperature=0)


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    greedy = generate(model, PROMPTS, 10, temperature=0)
    assert generate(model, PROMPTS, 10, temperature=1.0, top_k=1, seed=0) == greedy
    assert generate(model, PROMPTS, 10, temperature=1.0, top_p=1e-6, seed=0) == greedy


def test_sampling_filters_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {0, 1}
    draws = {sample_next(logits, 1.0, top_p=0.85, generator=g).item() for _ in range(300)}
    assert draws == {0, 1, 2}  # 0.5 + 0.3 < 0.85 needs the third token; the fourth is never needed
    draws = {sample_next(logits, 1.0, top_p=0.8, generator=g).item() for _ in range(300)}
    assert draws == {0, 1}


def test_model_mode_is_restored(model):
    model.train()
    generate(model, [PROMPTS[0]], 2, temperature=0)
    assert model.training
    model.eval()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompts": [[]]}, "prompt 0 is empty"),
        ({"prompts": []}, "no prompts"),
        ({"temperature": -1}, "temperature must be >= 0"),
        ({"top_k": 0}, "top_k must be >= 1"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"max_new_tokens": -1}, "max_new_tokens must be >= 0"),
    ],
)
def test_bad_arguments(model, kwargs, message):
    args = {"prompts": [[1]], "max_new_tokens": 3, **kwargs}
    with pytest.raises(GptforgeError, match=message):
        generate(model, **args)
