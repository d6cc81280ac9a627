"""The build's options, validated, and the resolved form recorded in the manifest's `config`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from data_pipeline.distributed import available_cpus
from data_pipeline.filters import load_filter_config
from data_pipeline.spill import default_memory
from gptforge.errors import ConfigError
from gptforge.launcher import launched_local_size

DEDUP_METHODS = ("exact", "minhash")


def default_workers() -> int:
    """CPUs this process may use, shared among the MPI ranks on this node."""
    return max(1, available_cpus() // launched_local_size())


def default_memory_per_rank() -> int:
    """Half of this node's memory, divided among the MPI ranks on it."""
    return default_memory(launched_local_size())


def parse_dedup(spec: str) -> tuple[str, ...]:
    """`none`, `exact`, `minhash` or `exact,minhash`."""
    if spec.strip() == "none":
        return ()
    methods = tuple(m.strip() for m in spec.split(",") if m.strip())
    bad = [m for m in methods if m not in DEDUP_METHODS]
    if bad or not methods:
        raise ConfigError(f"--dedup {spec!r}: use none, exact, minhash or exact,minhash")
    return tuple(m for m in DEDUP_METHODS if m in methods)


@dataclass
class BuildOptions:
    inputs: list[str]
    output: str
    tokenizer: str = "gpt2"
    text_field: str = "text"
    dedup: tuple[str, ...] = DEDUP_METHODS
    minhash_threshold: float = 0.8
    num_perm: int = 128
    ngram: int = 5
    filters: str = "default"
    strip_gutenberg: bool = False
    utf8_errors: str = "strict"
    val_fraction: float = 0.01
    shard_tokens: int = 100_000_000
    seed: int = 1234
    on_error: str = "fail"
    workers: int = field(default_factory=default_workers)
    overwrite: bool = False
    progress: bool = True
    memory_per_rank: int = field(default_factory=default_memory_per_rank)  # bytes
    tmp_dir: str | None = None  # default: OUTPUT/.build

    def __post_init__(self) -> None:
        checks = [
            (bool(self.inputs), "--input: give at least one file, directory, glob or hf:NAME"),
            (0.0 < self.minhash_threshold < 1.0, "--minhash-threshold must be in (0, 1)"),
            (2 <= self.num_perm <= 1024, "--num-perm must be in [2, 1024]"),
            (self.ngram >= 1, "--ngram must be >= 1"),
            (0.0 <= self.val_fraction < 1.0, "--val-fraction must be in [0, 1)"),
            (self.shard_tokens >= 1, "--shard-tokens must be >= 1"),
            (self.workers >= 1, "--workers must be >= 1"),
            (self.memory_per_rank >= 1 << 20, "--memory-per-rank must be at least 1M"),
            (self.on_error in ("fail", "skip"), "--on-error must be fail or skip"),
            (self.utf8_errors in ("strict", "replace"), "--utf8-errors must be strict or replace"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.filter_config = load_filter_config(self.filters)

    def resolved(self) -> dict[str, Any]:
        """What the output depends on (not the worker count, memory, paths or progress display), JSON-normal
        so that it compares equal with the manifest's copy."""
        from data_pipeline.dedup_minhash import lsh_params

        minhash = None
        if "minhash" in self.dedup:
            bands, rows = lsh_params(self.minhash_threshold, self.num_perm)
            minhash = {
                "threshold": self.minhash_threshold,
                "num_perm": self.num_perm,
                "ngram": self.ngram,
                "bands": bands,
                "rows": rows,
            }
        config = {
            "inputs": list(self.inputs),
            "text_field": self.text_field,
            "tokenizer": self.tokenizer,
            "dedup": list(self.dedup),
            "minhash": minhash,
            "filters": {"spec": self.filters, "rules": self.filter_config},
            "strip_gutenberg": self.strip_gutenberg,
            "utf8_errors": self.utf8_errors,
            "val_fraction": self.val_fraction,
            "shard_tokens": self.shard_tokens,
            "seed": self.seed,
            "on_error": self.on_error,
        }
        return json.loads(json.dumps(config))
