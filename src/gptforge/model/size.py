"""Parameter count, training-state memory and FLOPs, from the model's shape alone (no model is built).

The parallelism planner reuses `state_bytes` for sharded layouts, and the trainer's MFU uses
`flops_per_token`; both must agree with the real `GPT` module, which the tests check.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptforge.config import ModelConfig
from gptforge.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")


def _vocab(cfg: ModelConfig) -> int:
    if cfg.vocab_size is None:
        raise ConfigError(
            "model.vocab_size is not set (null): set it, e.g. model.vocab_size=50257 for GPT-2 BPE"
        )
    return cfg.vocab_size


def norm_parameters(cfg: ModelConfig) -> int:
    """One norm: LayerNorm's gain (+ bias with model.bias), or RMSNorm's gain."""
    return cfg.d_model + (cfg.d_model * int(cfg.bias) if cfg.norm == "layernorm" else 0)


def attention_parameters(cfg: ModelConfig) -> int:
    """Fused QKV (n_head query + 2 x n_kv_head key/value heads) + output projection."""
    d, b, hd = cfg.d_model, int(cfg.bias), cfg.head_dim
    qkv = (cfg.n_head + 2 * cfg.kv_heads) * hd
    return d * qkv + qkv * b + cfg.n_head * hd * d + d * b


def mlp_parameters(cfg: ModelConfig) -> int:
    """GELU: in + out projections; SwiGLU: gate + in + out."""
    d, b, f = cfg.d_model, int(cfg.bias), cfg.ffn_dim
    inputs = 2 if cfg.mlp == "swiglu" else 1
    return inputs * (d * f + f * b) + f * d + d * b


def parameters_per_layer(cfg: ModelConfig) -> int:
    """One Block: attention, MLP, two norms."""
    return attention_parameters(cfg) + mlp_parameters(cfg) + 2 * norm_parameters(cfg)


def position_parameters(cfg: ModelConfig) -> int:
    """The learned position table; sinusoidal and rotary positions have no parameters."""
    return cfg.context_length * cfg.d_model if cfg.position_embedding == "learned" else 0


def count_parameters(cfg: ModelConfig) -> int:
    """Exactly sum(p.numel() for p in GPT(cfg).parameters()), tied weights counted once."""
    d, v = cfg.d_model, _vocab(cfg)
    embeddings = v * d + position_parameters(cfg)
    head = 0 if cfg.tie_embeddings else v * d
    return embeddings + cfg.n_layer * parameters_per_layer(cfg) + norm_parameters(cfg) + head


def matmul_parameters(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: the blocks' linear weights and the LM head (biases,
    norms and the embedding lookups are not matmuls)."""
    d, hd, f = cfg.d_model, cfg.head_dim, cfg.ffn_dim
    attn = d * (cfg.n_head + 2 * cfg.kv_heads) * hd + cfg.n_head * hd * d
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * f
    return cfg.n_layer * (attn + mlp) + _vocab(cfg) * d


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token (forward + backward): 6 * matmul params + 12 * n_layer * d_model * seq_len
    for attention scores and values (PaLM's convention, which counts the causal half that is skipped;
    grouped-query attention computes as many scores as multi-head, so the term does not change)."""
    t = cfg.context_length if seq_len is None else seq_len
    return 6 * matmul_parameters(cfg) + 12 * cfg.n_layer * cfg.d_model * t


@dataclass(frozen=True)
class StateBytes:
    """Bytes of training state for some number of parameters (activations not included)."""

    weights: int  # what forward/backward read: fp32, or the bf16/fp16 copy under mixed precision
    grads: int
    master_weights: int  # fp32 copy that mixed precision updates (0 in fp32)
    optimizer: int  # AdamW exp_avg + exp_avg_sq, fp32

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.master_weights + self.optimizer


def state_bytes(n_params: int, precision: str) -> StateBytes:
    """fp32: 4+4+8 = 16 bytes/param. bf16/fp16 mixed precision as DeepSpeed and the ZeRO paper count it:
    2 (half weights) + 2 (half grads) + 4 (fp32 master) + 8 (AdamW) = 16 bytes/param."""
    if precision == "fp32":
        return StateBytes(weights=4 * n_params, grads=4 * n_params, master_weights=0, optimizer=8 * n_params)
    if precision in ("bf16", "fp16"):
        return StateBytes(
            weights=2 * n_params, grads=2 * n_params, master_weights=4 * n_params, optimizer=8 * n_params
        )
    raise ConfigError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")


def memory_report(cfg: ModelConfig, precisions: tuple[str, ...] = PRECISIONS) -> dict[str, StateBytes]:
    """Training-state bytes of the whole (unsharded) model for each precision."""
    n = count_parameters(cfg)
    return {p: state_bytes(n, p) for p in precisions}
