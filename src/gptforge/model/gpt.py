"""The decoder, readable top to bottom: GPT-2 by default, Llama-style by config.

Module names follow nanoGPT (and so OpenAI's checkpoint), which makes Hugging Face conversion a transpose:
`transformer.wte/wpe/drop/h[i]/ln_f`, `lm_head`. Every piece the parallel wrappers need is reachable on its
own: `embed()`, each `Block`, `transformer.ln_f` + `lm_head`, and the loss through `criterion`, so tensor and
pipeline parallelism wrap these modules instead of re-implementing the model.

The architecture options are small modules picked once, at construction, from the tables below; the forward
pass has no branches on them:

    model.position_embedding  learned (GPT-2: a table added to the tokens) | sinusoidal (a fixed table,
                              added) | rope (rotary: q and k rotated inside attention, nothing added)
    model.norm                layernorm (GPT-2) | rmsnorm (Llama)
    model.mlp                 gelu (GPT-2: 4x, tanh GELU) | swiglu (Llama: silu(gate) * up)
    model.n_kv_head           key/value heads; < n_head = grouped-query attention (Llama 3), 1 = multi-query
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptforge.config import ModelConfig
from gptforge.errors import ConfigError
from gptforge.model.loss import LMLoss


class KVCache:
    """Keys and values of the positions seen so far, per layer, for incremental decoding.

    Buffers are allocated on first use with the dtype the attention produced (so autocast works) and hold
    `max_len` slots of the KV heads only (grouped-query attention caches n_kv_head heads, not n_head).
    `length` is how many slots are filled (the model advances it after each forward). Keys are stored after
    the rotary rotation, so a rope model's window can slide (`shift`): the oldest slots are dropped and
    `offset` counts them, so the positions of later tokens keep counting from the start of the sequence.
    """

    def __init__(self, n_layer: int, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.offset = 0
        self.layers = [LayerCache(self) for _ in range(n_layer)]

    def shift(self, n: int) -> None:
        """Forget the `n` oldest slots (only for rotary positions, whose cached keys need no recompute)."""
        for layer in self.layers:
            layer.drop_oldest(n)
        self.length -= n
        self.offset += n


class LayerCache:
    """One layer's slice of a KVCache."""

    def __init__(self, parent: KVCache) -> None:
        self.parent = parent
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new positions' (B, H_kv, T, hd) keys/values; return those of every slot so far."""
        start = self.parent.length
        end = start + k.size(2)
        if end > self.parent.max_len:
            raise ValueError(f"KV cache holds {self.parent.max_len} positions, asked for {end}")
        if self.k is None or self.v is None:
            B, H, _, hd = k.shape
            self.k = k.new_empty(B, H, self.parent.max_len, hd)
            self.v = v.new_empty(B, H, self.parent.max_len, hd)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def drop_oldest(self, n: int) -> None:
        if self.k is None or self.v is None:
            return
        filled = self.parent.length
        self.k[:, :, : filled - n] = self.k[:, :, n:filled].clone()
        self.v[:, :, : filled - n] = self.v[:, :, n:filled].clone()


# ---------------------------------------------------------------------------------------------- positions


class LearnedPositions(nn.Embedding):
    """GPT-2: a learned (context_length, d_model) table added to the token embeddings."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg.context_length, cfg.d_model)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:  # type: ignore[override]
        return x + super().forward(positions)


class SinusoidalPositions(nn.Module):
    """Vaswani et al.'s fixed sin/cos table, added to the token embeddings; computed from the positions (no
    parameters, no buffer to save)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.d_model = cfg.d_model

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        freq = torch.exp(
            torch.arange(0, self.d_model, 2, device=x.device, dtype=torch.float32)
            * (-math.log(10000.0) / self.d_model)
        )
        angles = positions[..., None].float() * freq  # (..., T, d/2)
        table = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # sin, cos interleaved
        return x + table.to(x.dtype)


class NoAddedPositions(nn.Module):
    """Rotary models add nothing to the embeddings: positions enter through q and k in attention."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        return x


class Rotary(nn.Module):
    """RoPE (Su et al.) in the "rotate half" layout Hugging Face's Llama uses, so weights convert as they
    are. Angles are computed from the positions each call: any position works (a sliding KV cache keeps
    counting past the context), and there is no table to shard, save or cast."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim, self.theta = cfg.head_dim, cfg.rope_theta

    def forward(self, q: Tensor, k: Tensor, positions: Tensor | None) -> tuple[Tensor, Tensor]:
        """q (B, H, T, hd), k (B, H_kv, T, hd); positions (T,) or (B, T), None = 0..T-1."""
        if positions is None:
            positions = torch.arange(q.size(2), device=q.device)
        exponent = (
            torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=q.device).float() / self.head_dim
        )
        freqs = positions[..., None].float() * (1.0 / self.theta**exponent)  # (T | B T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(-3)  # broadcast over heads
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class NoRotary(nn.Module):
    """Learned and sinusoidal positions were added to the embeddings: q and k pass through."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()

    def forward(self, q: Tensor, k: Tensor, positions: Tensor | None) -> tuple[Tensor, Tensor]:
        return q, k


POSITIONS: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    # model.position_embedding: (added to the embeddings as transformer.wpe, applied to q/k in attention)
    "learned": (LearnedPositions, NoRotary),
    "sinusoidal": (SinusoidalPositions, NoRotary),
    "rope": (NoAddedPositions, Rotary),
}


# ---------------------------------------------------------------------------------------------- norms


def make_norm(cfg: ModelConfig) -> nn.Module:
    """model.norm: LayerNorm (GPT-2; bias per model.bias) or RMSNorm (Llama: a gain, no mean, no bias)."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.layer_norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)


NORM_TYPES = (nn.LayerNorm, nn.RMSNorm)


# ---------------------------------------------------------------------------------------------- blocks


class CausalSelfAttention(nn.Module):
    """Causal self-attention with n_head query heads and n_kv_head key/value heads (grouped-query when
    fewer), through PyTorch SDPA (flash / memory-efficient kernels on GPU).

    `c_attn` is one fused projection whose output is [Q (n_head heads) | K (n_kv_head) | V (n_kv_head)].
    Shapes come from `n_head`, `head_dim` and the width of `c_attn`'s output (what is not q is k and v),
    not from the config, so a tensor-parallel wrapper can shard `c_attn` by heads and set the local n_head.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.head_dim
        self.c_attn = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.kv_heads) * self.head_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_head * self.head_dim, cfg.d_model, bias=cfg.bias)
        self.rotary = POSITIONS[cfg.position_embedding][1](cfg)
        self.attn_dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    @property
    def n_kv_head(self) -> int:
        """Key/value heads of this module (the local ones under tensor parallelism)."""
        return (self.c_attn.weight.shape[0] // self.head_dim - self.n_head) // 2

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        cache: LayerCache | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """`mask` None = plain causal attention over `x`; else a (B, 1, T, S) bool mask (True = attend).
        `positions` (T,) or (B, T) are the tokens' positions for rotary models (None = 0..T-1)."""
        B, T, _ = x.shape
        hd = self.head_dim
        qkv = self.c_attn(x)
        kv_width = (qkv.size(2) - self.n_head * hd) // 2
        q, k, v = qkv.split([self.n_head * hd, kv_width, kv_width], dim=2)
        q = q.view(B, T, self.n_head, hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, kv_width // hd, hd).transpose(1, 2)  # (B, H_kv, T, hd)
        v = v.view(B, T, kv_width // hd, hd).transpose(1, 2)
        q, k = self.rotary(q, k, positions)
        if cache is not None:
            k, v = cache.append(k, v)  # rotated keys, KV heads only
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=mask is None,
            enable_gqa=kv_width != self.n_head * hd,
        )
        y = y.transpose(1, 2).reshape(B, T, self.n_head * hd)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GPT-2: expansion (4x by default) with the tanh-approximated GELU (one fused kernel, same values as
    `gelu_new`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class SwiGLU(nn.Module):
    """Llama (Shazeer 2020): c_proj(silu(c_gate(x)) * c_fc(x)). Two separate input projections, so tensor
    parallelism splits each by columns with the same rule as GPT-2's c_fc (and Llama's gate/up map 1:1)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_gate = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.bias)
        self.c_fc = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.silu(self.c_gate(x)) * self.c_fc(x)))


MLPS: dict[str, type[nn.Module]] = {"gelu": MLP, "swiglu": SwiGLU}


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLPS[cfg.mlp](cfg)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        cache: LayerCache | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache, positions)
        return x + self.mlp(self.ln_2(x))


# ---------------------------------------------------------------------------------------------- the model


class GPT(nn.Module):
    """Decoder language model: embeddings, `n_layer` blocks, final norm, LM head (tied by default)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ConfigError(
                "model.vocab_size is not set: take it from the data manifest or set model.vocab_size (50257 for GPT-2 BPE)"
            )
        self.cfg = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.d_model),
                wpe=POSITIONS[cfg.position_embedding][0](cfg),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=make_norm(cfg),
            )
        )
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.criterion: nn.Module = LMLoss()
        self.reset_parameters()

    @property
    def positions_shift(self) -> bool:
        """Whether a KV cache may slide past the context without recomputing (rotary positions only)."""
        return self.cfg.position_embedding == "rope"

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2's initialisation: N(0, init_std) weights, zero biases, norms = identity, and the two
        residual projections per block scaled by 1/sqrt(2 * n_layer) so the residual stream's variance does
        not grow with depth."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, NORM_TYPES):
                nn.init.ones_(module.weight)
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layer))

    def embed(self, idx: Tensor, pos_offset: int = 0, positions: Tensor | None = None) -> Tensor:
        """Token embeddings + added positions (learned / sinusoidal; nothing for rope), then dropout.
        `positions` (B, T), if given, overrides `pos_offset`: left-padded batches give each row its own."""
        if positions is None:
            positions = torch.arange(pos_offset, pos_offset + idx.size(1), device=idx.device)
        return self.transformer.drop(self.transformer.wpe(self.transformer.wte(idx), positions))

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        *,
        pad: Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, V) and the loss if `targets` (B, T) are given (already shifted: targets[t] is the
        token after idx[t]; -100 = ignore).

        Generation extras: `pad` (B,) = number of left-padding slots per row (their keys are masked and the
        row's positions start at 0 after them); `cache` = a KVCache that `idx` continues; `last_only` computes
        logits for the last position only. A rotary model also reads sequences longer than the context,
        with sliding-window attention (each token sees the `context_length` tokens up to itself): what its
        sliding KV cache computes.
        """
        start, context = (cache.length if cache is not None else 0), self.cfg.context_length
        T = idx.size(1)
        if start + T > context and not self.positions_shift:
            raise ValueError(f"sequence of {start + T} tokens is longer than model.context_length={context}")
        mask = positions = None
        if pad is not None or cache is not None or start + T > context:
            offset = cache.offset if cache is not None else 0
            mask, positions = self._mask_and_positions(idx, start, pad, offset, context)
        x = self.embed(idx, start, positions)
        # positions only when there are some (generation): training calls each block as (x, mask, cache),
        # the signature block wrappers (activation checkpointing) were written for
        rest = () if positions is None else (positions,)
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, cache.layers[i] if cache is not None else None, *rest)
        if cache is not None:
            cache.length += T
        x = self.transformer.ln_f(x[:, -1:] if last_only else x)
        logits = self.lm_head(x)
        loss = self.criterion(logits, targets) if targets is not None else None
        return logits, loss

    @staticmethod
    def _mask_and_positions(
        idx: Tensor, start: int, pad: Tensor | None, offset: int, window: int
    ) -> tuple[Tensor, Tensor]:
        """Attention mask (B, 1, T, start+T) and positions (B, T) for slots start..start+T-1.

        A query attends to earlier-or-equal slots that are not padding and fewer than `window` slots back.
        A padding slot attends to itself only, so no row of the mask is empty (SDPA would return NaN
        there); nothing real attends to it. `offset` = slots a sliding cache has dropped: padding shrinks
        by it, positions keep counting.
        """
        B, T = idx.shape
        if pad is None:
            pad = torch.zeros(B, dtype=torch.long, device=idx.device)
        q = torch.arange(start, start + T, device=idx.device)  # query slots
        k = torch.arange(start + T, device=idx.device)  # key slots
        causal = (k[None, :] <= q[:, None]) & (q[:, None] - k[None, :] < window)  # (T, S)
        real_key = k[None, :] >= (pad - offset).clamp(min=0)[:, None]  # (B, S)
        mask = causal[None] & (real_key[:, None, :] | (k[None, :] == q[:, None])[None])
        positions = (q[None, :] + offset - pad[:, None]).clamp(min=0)
        return mask[:, None], positions
