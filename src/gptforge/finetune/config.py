"""The `finetune` config section, and the config root `launch/finetune.py` reads (a training config plus
that section, so every `model`/`optim`/`train`/`parallel`/`run` key means what it means for training)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gptforge.config import Config
from gptforge.errors import ConfigError

TASKS = ("classify", "instruct")


@dataclass
class FinetuneConfig:
    """What to fine-tune on and which weights move.

    `train_layers` 0 = every layer; N = only the last N blocks, the final LayerNorm and the head.
    `lora_rank` > 0 trains LoRA adapters (plus a classifier's new head) on the modules named in
    `lora_targets` (c_attn, attn.c_proj, c_fc, mlp.c_proj; comma-separated) and freezes the rest.
    `epochs`, if set, replaces `train.max_steps` (ceil(epochs x train rows / global batch)).
    `template`: `alpaca` or a YAML file with `prompt_input` / `prompt_no_input`. `responses`: how many val
    rows get a generated response in responses.jsonl at the end of an instruct run (-1 = all, 0 = none).
    """

    task: str = field(default="classify", metadata={"choices": TASKS})
    train: str = ""
    val: str = ""
    epochs: float | None = None
    train_layers: int = 0
    balance_classes: bool = False
    template: str = "alpaca"
    train_on_prompt: bool = False
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "c_attn"
    responses: int = -1
    response_max_tokens: int = 128
    response_temperature: float = 0.0
    response_top_k: int | None = None


@dataclass
class FinetuneRunConfig(Config):
    """A training config with a `finetune` section: `load_config(path, overrides, cls=FinetuneRunConfig)`."""

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


def validate_finetune(cfg: FinetuneRunConfig) -> None:
    """Rules between keys that `load_config`'s per-key checks cannot see."""
    f = cfg.finetune
    if cfg.model.init_from == "scratch":
        raise ConfigError(
            "model.init_from=scratch: fine-tuning starts from trained weights; set model.init_from=hf:DIR "
            "(a Hugging Face GPT-2 directory) or checkpoint:DIR (a gptforge run or checkpoint)"
        )
    for key in ("train", "val"):
        if not getattr(f, key):
            raise ConfigError(f"no {key} file: pass --{key} FILE.jsonl (or set finetune.{key})")
    if f.train_layers < 0:
        raise ConfigError(f"finetune.train_layers must be >= 0 (0 = all layers), got {f.train_layers}")
    if f.lora_rank < 0:
        raise ConfigError(f"finetune.lora_rank must be >= 0 (0 = full fine-tuning), got {f.lora_rank}")
    if f.lora_rank and f.train_layers:
        raise ConfigError(
            "finetune.lora_rank and finetune.train_layers are alternatives (LoRA freezes every base weight): "
            "set one of them to 0"
        )
    if f.lora_rank and f.lora_alpha <= 0:
        raise ConfigError(f"finetune.lora_alpha must be > 0, got {f.lora_alpha}")
    if not 0.0 <= f.lora_dropout < 1.0:
        raise ConfigError(f"finetune.lora_dropout must be in [0, 1), got {f.lora_dropout}")
    if f.epochs is not None and f.epochs <= 0:
        raise ConfigError(f"finetune.epochs must be > 0 (or null to use train.max_steps), got {f.epochs}")
    if f.balance_classes and f.task != "classify":
        raise ConfigError("finetune.balance_classes applies to --task classify only")
    if f.response_max_tokens < 1 or f.response_temperature < 0:
        raise ConfigError("finetune.response_max_tokens must be >= 1 and finetune.response_temperature >= 0")
