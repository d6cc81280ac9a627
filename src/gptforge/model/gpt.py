"""GPT-2, readable top to bottom.

Module names follow nanoGPT (and so OpenAI's checkpoint), which makes Hugging Face conversion a transpose:
`transformer.wte/wpe/drop/h[i]/ln_f`, `lm_head`. Every piece the parallel wrappers need is reachable on its
own: `embed()`, each `Block`, `transformer.ln_f` + `lm_head`, and the loss through `criterion`, so tensor and
pipeline parallelism wrap these modules instead of re-implementing the model.
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
    `max_len` positions; `length` is how many are filled (the model advances it after each forward).
    """

    def __init__(self, n_layer: int, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.layers = [LayerCache(self) for _ in range(n_layer)]


class LayerCache:
    """One layer's slice of a KVCache."""

    def __init__(self, parent: KVCache) -> None:
        self.parent = parent
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new positions' (B, H, T, hd) keys/values; return those of every position so far."""
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


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through PyTorch SDPA (flash / memory-efficient kernels on GPU).

    Shapes come from `n_head`, `head_dim` and the width of `c_attn`'s output, not from the config, so a
    tensor-parallel wrapper can shard `c_attn` by heads and set the local `n_head`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.d_model // cfg.n_head
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)  # fused Q, K, V
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.attn_dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None, cache: LayerCache | None = None) -> Tensor:
        """`mask` None = plain causal attention over `x`; else a (B, 1, T, S) bool mask (True = attend)."""
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.n_head * self.head_dim, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.append(k, v)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=mask is None,
        )
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """4x expansion with GPT-2's tanh-approximated GELU (one fused kernel, same values as `gelu_new`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, mask: Tensor | None = None, cache: LayerCache | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 language model: embeddings, `n_layer` blocks, final LayerNorm, LM head (tied by default)."""

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
                wpe=nn.Embedding(cfg.context_length, cfg.d_model),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.criterion: nn.Module = LMLoss()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2's initialisation: N(0, init_std) weights, zero biases, LayerNorm = identity, and the two
        residual projections per block scaled by 1/sqrt(2 * n_layer) so the residual stream's variance does
        not grow with depth."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layer))

    def embed(self, idx: Tensor, pos_offset: int = 0, positions: Tensor | None = None) -> Tensor:
        """Token + position embeddings (then dropout). `positions` (B, T), if given, overrides
        `pos_offset`: left-padded batches give each row its own positions."""
        if positions is None:
            positions = torch.arange(pos_offset, pos_offset + idx.size(1), device=idx.device)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))

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
        logits for the last position only.
        """
        start = cache.length if cache is not None else 0
        T = idx.size(1)
        if start + T > self.cfg.context_length:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than model.context_length={self.cfg.context_length}"
            )
        mask = positions = None
        if pad is not None or cache is not None:
            mask, positions = self._mask_and_positions(idx, start, pad)
        x = self.embed(idx, start, positions)
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.length += T
        x = self.transformer.ln_f(x[:, -1:] if last_only else x)
        logits = self.lm_head(x)
        loss = self.criterion(logits, targets) if targets is not None else None
        return logits, loss

    @staticmethod
    def _mask_and_positions(idx: Tensor, start: int, pad: Tensor | None) -> tuple[Tensor, Tensor]:
        """Attention mask (B, 1, T, start+T) and positions (B, T) for slots start..start+T-1.

        A query attends to earlier-or-equal slots that are not padding. A padding slot attends to itself
        only, so no row of the mask is empty (SDPA would return NaN there); nothing real attends to it.
        """
        B, T = idx.shape
        if pad is None:
            pad = torch.zeros(B, dtype=torch.long, device=idx.device)
        q = torch.arange(start, start + T, device=idx.device)  # query slots
        k = torch.arange(start + T, device=idx.device)  # key slots
        causal = k[None, :] <= q[:, None]  # (T, S)
        real_key = k[None, :] >= pad[:, None]  # (B, S)
        mask = causal[None] & (real_key[:, None, :] | (k[None, :] == q[:, None])[None])
        positions = (q[None, :] - pad[:, None]).clamp(min=0)
        return mask[:, None], positions
