from pathlib import Path

import pytest

from gptforge.config import Config, config_from_dict, config_to_dict, dump_config, load_config
from gptforge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.mark.parametrize("name", ["tiny", "gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1.5b"])
def test_shipped_configs_load_and_round_trip(name, tmp_path):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert isinstance(cfg, Config)
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_openai_shapes():
    shapes = {
        n: load_config(CONFIGS / f"{n}.yaml").model
        for n in ["gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1.5b"]
    }
    assert [(m.n_layer, m.n_head, m.d_model) for m in shapes.values()] == [
        (12, 12, 768),
        (24, 16, 1024),
        (36, 20, 1280),
        (48, 25, 1600),
    ]
    assert all(m.context_length == 1024 and m.vocab_size == 50257 for m in shapes.values())


def test_base_chain_merges_key_by_key(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  n_layer: 3\n  d_model: 64\n  n_head: 4\ntrain:\n  seed: 7\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nmodel:\n  n_layer: 5\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.train.seed) == (5, 64, 7)


def test_overrides_are_typed():
    cfg = load_config(CONFIGS / "tiny.yaml", ["optim.lr=3e-4", "train.max_steps=7", "model.vocab_size=null"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_steps == 7 and cfg.model.vocab_size is None
    with pytest.raises(ConfigError, match=r"train.max_steps.*expected int"):
        load_config(CONFIGS / "tiny.yaml", ["train.max_steps=1.5"])
    with pytest.raises(ConfigError, match=r"expected bool"):
        load_config(CONFIGS / "tiny.yaml", ["model.bias=maybe"])


def test_typo_names_file_key_and_nearest(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: " + str(CONFIGS / "tiny.yaml") + "\noptim:\n  warmup_step: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert str(bad) in msg and "optim.warmup_step" in msg and "did you mean 'optim.warmup_steps'" in msg
    with pytest.raises(ConfigError, match=r"unknown section 'modle'; did you mean 'model'"):
        load_config(None, ["modle.n_layer=2"])


def test_wrong_type_in_file_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  precision: bf61\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: key 'train.precision'.*did you mean 'bf16'"):
        load_config(bad)


def test_cross_key_validation():
    with pytest.raises(ConfigError, match="divisible by model.n_head"):
        load_config(CONFIGS / "tiny.yaml", ["model.n_head=3"])


def test_cli_prints_one_line_error(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "gptforge.config", str(CONFIGS / "tiny.yaml"), "model.n_layers=2"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "did you mean 'model.n_layer'" in out.stderr
    assert "Traceback" not in out.stderr
