"""Text generation: greedy / temperature / top-k / top-p sampling with a KV cache, batched prompts.

Prompts of different lengths are left-padded into one batch; the model masks the padding and starts each
row's positions at 0 after it, so a row generates the same tokens as it would alone. While the sequence
fits the context, each step feeds one token through the KV cache. Beyond it the window slides. With rotary
positions the cache slides too (its keys were rotated at their own positions, and attention depends only on
the distance between positions, so the oldest slot is dropped and nothing is recomputed). With learned or
sinusoidal positions, added to the embeddings, cached keys cannot shift: the oldest tokens are cropped and
the window is recomputed from position 0 each step (as nanoGPT does). Either way `use_cache=True` and
`False` give the same tokens: without the cache a rotary model reads the whole sequence with
sliding-window attention (each token sees the `context_length` tokens up to itself), which is what the
sliding cache computes; a learned-position model reads the cropped window.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gptforge.errors import GptforgeError
from gptforge.model import GPT, KVCache


def _check_arguments(
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
) -> None:
    if not prompts:
        raise GptforgeError("generate: no prompts given")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise GptforgeError(
                f"generate: prompt {i} is empty; give at least one token (GPT-2 starts unconditional "
                "samples from <|endoftext|>)"
            )
    if max_new_tokens < 0:
        raise GptforgeError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise GptforgeError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise GptforgeError(f"generate: top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise GptforgeError(f"generate: top_p must be in (0, 1], got {top_p}")


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token per row from (B, V) logits: argmax at temperature 0, else sample from
    softmax(logits / temperature) restricted to the top-k tokens, then to the top-p nucleus."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the top token always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def _left_padded(
    prompts: Sequence[Sequence[int]], context: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts (each its last `context` tokens) as one left-padded batch, and each row's padding."""
    rows = [list(p)[-context:] for p in prompts]
    width = max(len(p) for p in rows)
    pad = torch.tensor([width - len(p) for p in rows], device=device)
    tokens = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for row, prompt in enumerate(rows):
        tokens[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
    return tokens, pad


def generate(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eot_id: int | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """The new tokens for each prompt (not the prompt; a row stops before `eot_id`, which is not
    returned). Prompts longer than the context keep their last `context_length` tokens."""
    _check_arguments(prompts, max_new_tokens, temperature, top_k, top_p)
    device = next(model.parameters()).device
    context = model.cfg.context_length
    tokens, pad = _left_padded(prompts, context, device)
    B = tokens.size(0)

    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    cache = KVCache(model.cfg.n_layer, context) if use_cache else None
    new_tokens = tokens.new_empty(B, 0)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    step_input = tokens
    try:
        for _ in range(max_new_tokens):
            overflow = cache.length + step_input.size(1) - context if cache is not None else 0
            if cache is not None and overflow > 0 and model.positions_shift:
                cache.shift(overflow)  # rope: drop the oldest slot, keep the rotated keys of the others
            elif overflow > 0:
                cache = None  # the window slides from here on: positions change, recompute each step
            if cache is not None:
                logits, _ = model(step_input, pad=pad, cache=cache, last_only=True)
            else:
                cropped = 0 if model.positions_shift else tokens.size(1) - min(tokens.size(1), context)
                window_pad = (pad - cropped).clamp(min=0)
                logits, _ = model(
                    tokens[:, cropped:], pad=window_pad if window_pad.any() else None, last_only=True
                )
            next_token = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
            if eot_id is not None:
                finished |= next_token == eot_id
            new_tokens = torch.cat([new_tokens, next_token[:, None]], dim=1)
            if finished.all():
                break
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            step_input = next_token[:, None]
    finally:
        model.train(was_training)
    out = []
    for row in new_tokens.tolist():
        out.append(row[: row.index(eot_id)] if eot_id in row else row)
    return out
