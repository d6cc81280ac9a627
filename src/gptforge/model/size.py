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


def parameters_per_layer(cfg: ModelConfig) -> int:
    """One Block: attention (fused QKV + output projection), 4x MLP, two LayerNorms."""
    d, b = cfg.d_model, int(cfg.bias)
    attn = 3 * d * d + 3 * d * b + d * d + d * b
    mlp = 4 * d * d + 4 * d * b + 4 * d * d + d * b
    norms = 2 * (d + d * b)
    return attn + mlp + norms


def count_parameters(cfg: ModelConfig) -> int:
    """Exactly sum(p.numel() for p in GPT(cfg).parameters()), tied weights counted once."""
    d, v = cfg.d_model, _vocab(cfg)
    embeddings = v * d + cfg.context_length * d
    head = 0 if cfg.tie_embeddings else v * d
    ln_f = d + d * int(cfg.bias)
    return embeddings + cfg.n_layer * parameters_per_layer(cfg) + ln_f + head


def matmul_parameters(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: the blocks' linear weights and the LM head (biases,
    LayerNorms and the embedding lookups are not matmuls)."""
    return cfg.n_layer * 12 * cfg.d_model**2 + _vocab(cfg) * cfg.d_model


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token (forward + backward): 6 * matmul params + 12 * n_layer * d_model * seq_len
    for attention scores and values (PaLM's convention, which counts the causal half that is skipped)."""
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
