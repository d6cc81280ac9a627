"""Typed configuration: dataclasses, YAML files that extend each other, `key.sub=value` overrides.

A config file is YAML with the sections below; `base: other.yaml` (relative to the file) makes it extend
another file, section by section and key by key. Every key is checked against the dataclasses here, in the
file it was written in, so a typo names its file and the nearest valid key. `dump_config` writes the
resolved config; `load_config` on that file gives back an equal object.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gptforge.errors import ConfigError


def _choice(default: str, *choices: str, help: str = "") -> Any:
    return field(default=default, metadata={"choices": choices, "help": help})


@dataclass
class ModelConfig:
    """The decoder's shape; the defaults are GPT-2. `vocab_size` None = taken from the data manifest (or
    the Hugging Face weights). Llama-style = position_embedding rope, norm rmsnorm, mlp swiglu, bias false,
    n_kv_head < n_head (grouped-query attention; 1 = multi-query). `ffn_hidden` None = 4 x d_model for
    gelu, Llama's 8/3 x d_model rounded up to a multiple of 256 for swiglu; `n_kv_head` None = n_head."""

    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    context_length: int = 1024
    vocab_size: int | None = None
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    position_embedding: str = _choice("learned", "learned", "sinusoidal", "rope")
    rope_theta: float = 10000.0
    norm: str = _choice("layernorm", "layernorm", "rmsnorm")
    mlp: str = _choice("gelu", "gelu", "swiglu")
    ffn_hidden: int | None = None
    n_kv_head: int | None = None
    init_from: str = "scratch"  # scratch | hf:DIR | checkpoint:DIR

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads (n_kv_head, or n_head when unset)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def ffn_dim(self) -> int:
        """The MLP's hidden width (`ffn_hidden`, or the default of `mlp`)."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        if self.mlp == "swiglu":
            return 256 * -(-int(8 * self.d_model / 3) // 256)
        return 4 * self.d_model


# The ModelConfig keys that fix the weights' shapes: weights loaded through `model.init_from` bring their
# own (a differing config value is logged), and a resumed checkpoint must match them.
SHAPE_KEYS = (
    *("n_layer", "n_head", "d_model", "context_length", "vocab_size", "bias", "tie_embeddings"),
    *("position_embedding", "rope_theta", "norm", "mlp", "ffn_hidden", "n_kv_head"),
)


@dataclass
class BlendSource:
    """One corpus of a blend: a build output directory, its weight (normalised over the blend) and the
    name its metrics are reported under ("" = the directory's name)."""

    path: str = ""
    weight: float = 1.0
    name: str = ""


@dataclass
class DataConfig:
    """Where the tokens come from: a `data_pipeline/build.py` output directory (`path`), or a weighted
    `blend` of several (then `path` is not used). As an override, `data.blend=PATH:W,PATH:W`.
    `max_open_shards` bounds the shard memory maps open at once per process."""

    path: str = ""
    blend: list[BlendSource] = field(default_factory=list)
    train_split: str = "train"
    val_split: str = "val"
    verify_checksums: bool = True
    max_open_shards: int = 64


@dataclass
class OptimConfig:
    """AdamW with linear warmup then a decay to `min_lr` (decay_steps None = train.max_steps)."""

    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    schedule: str = _choice("cosine", "cosine", "linear", "constant")
    decay_steps: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    """The loop. `global_batch_size` counts sequences over all data-parallel ranks and accumulation steps;
    None = micro_batch_size x data-parallel size. `global_batch_tokens`, if set, is the same in tokens."""

    max_steps: int = 1000
    micro_batch_size: int = 8
    global_batch_size: int | None = None
    global_batch_tokens: int | None = None
    precision: str = _choice("fp32", "fp32", "bf16", "fp16")
    seed: int = 1337
    log_interval: int = 10
    eval_interval: int = 200
    eval_iters: int = 20
    save_interval: int = 1000
    keep_last: int = 3
    async_save: bool = True  # write checkpoints in the background (the loop only copies its state)
    sample_interval: int = 0
    sample_prompt: str = "\n"
    sample_tokens: int = 64
    max_skipped_steps: int = 5
    peak_flops: float | None = None
    compile: bool = False  # torch.compile each transformer block (gptforge.model.compile: where it works)


@dataclass
class ParallelConfig:
    """Layout: dp = world size / (tp x pp). `pp_partition`: uniform | parameters | ranges like "0-3,4-11"."""

    tp: int = 1
    pp: int = 1
    zero_stage: int = 0
    offload_optimizer: str = _choice("none", "none", "cpu")
    offload_params: bool = False
    pp_partition: str = "uniform"
    activation_checkpointing: bool = False


@dataclass
class RunConfig:
    """Where a run writes (config.yaml, metrics.jsonl, tensorboard/, checkpoints/) and how it talks."""

    dir: str = "runs/default"
    dist_backend: str = _choice("auto", "auto", "gloo", "nccl")
    dist_timeout_s: int = 600
    tensorboard: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ---------------------------------------------------------------------------------------------- schema


def _sections(cls: type = Config) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _fields(section_cls: type) -> dict[str, tuple[Any, dataclasses.Field]]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(section_cls)}


def _nearest(name: str, candidates: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(sorted(candidates))}"


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, f: dataclasses.Field, where: str) -> Any:
    """Check `value` against the annotation `tp`; the only conversions are int->float and '6e-4'->float."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list:
        return _coerce_list(value, args[0], where)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], f, where)
    ok: Any = None
    if tp is bool:
        ok = value if isinstance(value, bool) else None
    elif tp is int:
        ok = value if isinstance(value, int) and not isinstance(value, bool) else None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            ok = float(value)
        elif isinstance(value, str):
            try:
                ok = float(value)
            except ValueError:
                ok = None
    elif tp is str:
        ok = value if isinstance(value, str) else None
    if ok is None:
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    choices = f.metadata.get("choices")
    if choices and ok not in choices:
        raise ConfigError(f"{where}: {ok!r} is not one of {', '.join(choices)}{_nearest(str(ok), choices)}")
    return ok


def _coerce_list(value: Any, item: type, where: str) -> list[Any]:
    """A list of `item` dataclasses: YAML gives a list of mappings (each key checked), an override the
    short form `PATH:WEIGHT,PATH:WEIGHT` (a blend)."""
    if isinstance(value, str):
        value = [_short_item(part.strip(), where) for part in value.split(",") if part.strip()]
    if not isinstance(value, list):
        raise ConfigError(
            f"{where}: expected a list of {{path, weight, name}} or PATH:WEIGHT,PATH:WEIGHT, got {value!r}"
        )
    fields = _fields(item)
    out = []
    for k, entry in enumerate(value):
        if isinstance(entry, item):
            entry = dataclasses.asdict(entry)
        if not isinstance(entry, dict):
            raise ConfigError(
                f"{where}, item {k}: expected a mapping like {{path: DIR, weight: 0.5}}, got {entry!r}"
            )
        checked = {}
        for key, v in entry.items():
            if key not in fields:
                raise ConfigError(f"{where}, item {k}: unknown key '{key}'{_nearest(key, list(fields))}")
            tp, f = fields[key]
            checked[key] = _coerce(v, tp, f, f"{where}, item {k}, '{key}'")
        out.append(item(**checked))
    return out


def _short_item(text: str, where: str) -> dict[str, Any]:
    path, sep, weight = text.rpartition(":")
    try:
        return {"path": path, "weight": float(weight)} if sep and path else {"path": text}
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not PATH:WEIGHT (e.g. data/web:0.7)") from None


def _check_section(section: str, values: Any, source: str, cls: type = Config) -> dict[str, Any]:
    sections = _sections(cls)
    if section not in sections:
        raise ConfigError(f"{source}: unknown section '{section}'{_nearest(section, list(sections))}")
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section '{section}' must be a mapping of keys, got {values!r}")
    fields = _fields(sections[section])
    checked = {}
    for key, value in values.items():
        if key not in fields:
            dotted = [f"{section}.{k}" for k in fields]
            raise ConfigError(
                f"{source}: unknown key '{section}.{key}'{_nearest(f'{section}.{key}', dotted)}"
            )
        tp, f = fields[key]
        checked[key] = _coerce(value, tp, f, f"{source}: key '{section}.{key}'")
    return checked


# ---------------------------------------------------------------------------------------------- loading


def _read_yaml(path: Path, seen: tuple[Path, ...] = (), cls: type = Config) -> dict[str, dict[str, Any]]:
    """One file and its `base:` chain, merged key by key, each key checked where it was written."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    merged: dict[str, dict[str, Any]] = {}
    base = raw.pop("base", None)
    if base is not None:
        bases = [base] if isinstance(base, str) else base
        for b in bases:
            for section, values in _read_yaml(path.parent / b, (*seen, path), cls).items():
                merged.setdefault(section, {}).update(values)
    for section, values in raw.items():
        merged.setdefault(section, {}).update(_check_section(section, values or {}, str(path), cls))
    return merged


def parse_override(text: str) -> tuple[str, str, Any]:
    """`model.n_layer=4` -> ('model', 'n_layer', 4); the value is parsed as YAML (so `null`, `true`, `1e-3`)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key.sub=value (e.g. train.max_steps=100)")
    key, _, raw_value = text.partition("=")
    if key.count(".") != 1:
        raise ConfigError(f"override '{text}': key must be section.key, e.g. optim.lr=3e-4")
    section, name = key.strip().split(".")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value
    return section, name, value


def config_from_dict(values: dict[str, Any], source: str = "<dict>", cls: type = Config) -> Any:
    """Build a checked config object (of `cls`) from a nested dict."""
    sections = _sections(cls)
    built = {}
    for section, section_values in values.items():
        checked = _check_section(section, section_values or {}, source, cls)
        built[section] = sections[section](**checked)
    return cls(**built)


def load_config(path: str | Path | None, overrides: Sequence[str] = (), cls: type = Config) -> Any:
    """Load a YAML config (with its `base:` chain), apply `key.sub=value` overrides, validate."""
    merged = _read_yaml(Path(path), cls=cls) if path else {}
    for text in overrides:
        section, name, value = parse_override(text)
        checked = _check_section(section, {name: value}, f"override '{text}'", cls)
        merged.setdefault(section, {}).update(checked)
    cfg = config_from_dict(merged, str(path or "<defaults>"), cls)
    validate(cfg)
    return cfg


def validate(cfg: Any) -> None:
    """Cross-key rules that no single key's type can express."""
    m = getattr(cfg, "model", None)
    if m is not None:
        for key in ("n_layer", "n_head", "d_model", "context_length"):
            if getattr(m, key) < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {getattr(m, key)}")
        if m.d_model % m.n_head:
            raise ConfigError(
                f"model.d_model ({m.d_model}) must be divisible by model.n_head ({m.n_head}); "
                f"try n_head={_nearest_divisor(m.d_model, m.n_head)}"
            )
        if not 0.0 <= m.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
        _validate_model_options(m)
        if not (m.init_from == "scratch" or m.init_from.startswith(("hf:", "checkpoint:"))):
            raise ConfigError(
                f"model.init_from: {m.init_from!r} is not one of scratch, hf:DIR, checkpoint:DIR"
            )
    d = getattr(cfg, "data", None)
    if d is not None:
        _validate_blend(d)
    p = getattr(cfg, "parallel", None)
    if p is not None:
        if p.tp < 1 or p.pp < 1:
            raise ConfigError(f"parallel.tp and parallel.pp must be >= 1, got tp={p.tp} pp={p.pp}")
        if p.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}")
        if p.offload_params and p.zero_stage != 3:
            raise ConfigError("parallel.offload_params needs parallel.zero_stage=3")


def _validate_model_options(m: ModelConfig) -> None:
    """The architecture options (position, norm, MLP, grouped-query attention) and their combinations."""
    kv = m.kv_heads
    if kv < 1 or m.n_head % kv:
        ok = [d for d in range(1, m.n_head + 1) if m.n_head % d == 0]
        raise ConfigError(
            f"model.n_kv_head={kv}: model.n_head ({m.n_head}) must be a multiple of it (each key/value head "
            f"serves a group of query heads); use n_kv_head in {ok}"
        )
    if m.position_embedding == "rope" and m.head_dim % 2:
        raise ConfigError(
            f"model.position_embedding=rope needs an even head size, got d_model/n_head = "
            f"{m.d_model}/{m.n_head} = {m.head_dim}; change d_model or n_head"
        )
    if m.position_embedding == "sinusoidal" and m.d_model % 2:
        raise ConfigError(f"model.position_embedding=sinusoidal needs an even model.d_model, got {m.d_model}")
    if m.rope_theta <= 0:
        raise ConfigError(f"model.rope_theta must be > 0, got {m.rope_theta}")
    if m.ffn_hidden is not None and m.ffn_hidden < 1:
        raise ConfigError(f"model.ffn_hidden must be >= 1 (or null for the default), got {m.ffn_hidden}")
    if m.layer_norm_eps <= 0:
        raise ConfigError(f"model.layer_norm_eps must be > 0, got {m.layer_norm_eps}")


def _validate_blend(d: DataConfig) -> None:
    names = [s.name or Path(s.path).name for s in d.blend]
    for s, name in zip(d.blend, names, strict=True):
        if not s.path:
            raise ConfigError(f"data.blend: source {name or '?'} has no path (a build output directory)")
        if not s.weight > 0:
            raise ConfigError(f"data.blend: source {name} has weight {s.weight}; weights must be > 0")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"data.blend: two sources are named {twice[0]!r}; give each a distinct `name`")
    if d.max_open_shards < 1:
        raise ConfigError(f"data.max_open_shards must be >= 1, got {d.max_open_shards}")


def _nearest_divisor(n: int, near: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - near))


# ---------------------------------------------------------------------------------------------- dumping


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any, path: str | Path | None = None) -> str:
    """The resolved config as YAML (written to `path` if given); `load_config` of it gives an equal object."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    if path is not None:
        Path(path).write_text(text)
    return text


def _main(argv: list[str]) -> int:
    """`python -m gptforge.config CFG [key=value ...]` prints the resolved config."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m gptforge.config CONFIG.yaml [section.key=value ...]")
        return 0
    print(dump_config(load_config(argv[0], argv[1:])), end="")
    return 0


if __name__ == "__main__":
    from gptforge.cli import run_cli

    run_cli(_main)
