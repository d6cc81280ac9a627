"""`python -m gptforge.model --config CONFIG.yaml [section.key=value ...]`: parameters and training memory."""

from __future__ import annotations

import argparse
import dataclasses

from gptforge.config import load_config
from gptforge.model.size import (
    PRECISIONS,
    count_parameters,
    flops_per_token,
    memory_report,
    parameters_per_layer,
    position_parameters,
)

GPT2_VOCAB = 50257


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptforge.model", description=__doc__)
    parser.add_argument("--config", required=True, help="a YAML config (its model section is used)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides).model
    if cfg.vocab_size is None:
        print(
            f"note: model.vocab_size is null (taken from the data at training time); assuming GPT-2's {GPT2_VOCAB}"
        )
        cfg = dataclasses.replace(cfg, vocab_size=GPT2_VOCAB)

    n = count_parameters(cfg)
    print(
        f"model: n_layer={cfg.n_layer} n_head={cfg.n_head} d_model={cfg.d_model} "
        f"context_length={cfg.context_length} vocab_size={cfg.vocab_size} "
        f"bias={cfg.bias} tie_embeddings={cfg.tie_embeddings}"
    )
    print(
        f"architecture: position_embedding={cfg.position_embedding} norm={cfg.norm} mlp={cfg.mlp} "
        f"ffn_hidden={cfg.ffn_dim} n_kv_head={cfg.kv_heads}"
    )
    print(f"parameters: {n:,}")
    print(
        f"  token embedding   {cfg.vocab_size * cfg.d_model:>15,}"
        + ("  (tied with the LM head)" if cfg.tie_embeddings else "")
    )
    print(f"  position table    {position_parameters(cfg):>15,}")
    print(
        f"  blocks            {cfg.n_layer * parameters_per_layer(cfg):>15,}  ({parameters_per_layer(cfg):,} per layer)"
    )
    if not cfg.tie_embeddings:
        print(f"  LM head           {cfg.vocab_size * cfg.d_model:>15,}")
    print(f"training FLOPs per token at context {cfg.context_length}: {flops_per_token(cfg):.3e}")
    print("training state (weights + grads + AdamW; activations not included):")
    print(f"  {'precision':<10}{'weights':>13}{'grads':>13}{'fp32 master':>13}{'AdamW m+v':>13}{'total':>13}")
    for precision, b in memory_report(cfg, PRECISIONS).items():
        label = precision if precision == "fp32" else f"{precision} mixed"
        print(
            f"  {label:<10}{_gib(b.weights):>13}{_gib(b.grads):>13}{_gib(b.master_weights):>13}"
            f"{_gib(b.optimizer):>13}{_gib(b.total):>13}"
        )
    return 0


if __name__ == "__main__":
    from gptforge.cli import run_cli

    run_cli(main)
