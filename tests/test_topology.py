"""The dp x pp x tp topology: rank order, groups, validation (before any process group), vocab padding."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from gptforge.config import ModelConfig, ParallelConfig
from gptforge.errors import ConfigError
from gptforge.parallel.topology import Topology, padded_vocab_size, parse_pp_partition, validate_layout


def test_rank_order_is_pipe_data_model_like_gpt_neox():
    topo = Topology(tp=2, pp=2, dp=2)
    ds = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=2)
    assert all(
        topo.get_rank(pipe=p, data=d, model=m) == ds.get_rank(pipe=p, data=d, model=m)
        for p in range(2)
        for d in range(2)
        for m in range(2)
    )
    assert [topo.coords(r) for r in range(8)] == [(r // 4, r // 2 % 2, r % 2) for r in range(8)]
    assert topo.all_groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert topo.all_groups("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert topo.all_groups("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert topo.all_groups("model") == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert topo.group_ranks("dp", 5) == [5, 7] and topo.group_ranks("model", 5) == [0, 1, 4, 5]


def test_one_pipeline_stage_per_node():
    """dp * tp = GPUs per node (8): stage s is exactly node s, tp groups never leave a node."""
    topo = Topology(tp=2, pp=4, dp=4)
    gpus_per_node = 8
    for stage in range(4):
        assert {r // gpus_per_node for r in topo.stage_ranks(stage)} == {stage}
    assert all(len({r // gpus_per_node for r in g}) == 1 for g in topo.all_groups("tp"))
    # pipeline neighbours are on different nodes: only p2p activations cross nodes
    assert all(len({r // gpus_per_node for r in g}) == 4 for g in topo.all_groups("pp"))


def test_mpu_methods_need_groups_first():
    topo = Topology(tp=2)
    assert topo.get_tensor_model_parallel_world_size() == 2  # pure arithmetic works
    with pytest.raises(RuntimeError, match="init_process_groups"):
        topo.get_tensor_model_parallel_group()


@pytest.mark.parametrize(
    ("vocab", "tp", "padded"),
    [(50257, 1, 50304), (50257, 2, 50432), (50257, 4, 50688), (50257, 8, 51200), (256, 2, 256)],
)
def test_vocab_padding_like_megatron(vocab, tp, padded):
    assert padded_vocab_size(vocab, tp) == padded
    assert padded % (128 * tp) == 0 and padded - vocab < 128 * tp


def model(**kw) -> ModelConfig:
    base = dict(n_layer=12, n_head=12, d_model=768, vocab_size=50257)
    base.update(kw)
    return ModelConfig(**base)


def test_valid_layout_returns_dp():
    assert validate_layout(16, ParallelConfig(tp=2, pp=2, zero_stage=1), model()) == 4
    topo = Topology.from_config(ParallelConfig(tp=2, pp=2), 8, model())
    assert (topo.tp, topo.pp, topo.dp) == (2, 2, 2)


@pytest.mark.parametrize(
    ("world", "parallel", "cfg", "message"),
    [
        (6, dict(tp=4), {}, r"world size 6 is not divisible by parallel.tp x parallel.pp = 4 x 1"),
        (
            8,
            dict(tp=8),
            dict(n_head=12),
            r"n_head=12 is not divisible by parallel.tp=8.*\[1, 2, 3, 4, 6, 12\]",
        ),
        (8, dict(pp=8), dict(n_layer=4, n_head=4, d_model=64), r"n_layer=4 is fewer than parallel.pp=8"),
        (
            4,
            dict(pp=2, zero_stage=2),
            {},
            r"zero_stage=2 with parallel.pp=2.*pipeline engine does not support",
        ),
        (4, dict(pp=2, zero_stage=3), {}, r"zero_stage=3 with parallel.pp=2"),
        (4, dict(offload_optimizer="cpu"), {}, r"offload_optimizer=cpu needs parallel.zero_stage >= 1"),
    ],
)
def test_invalid_layouts_fail_before_any_process_group(world, parallel, cfg, message):
    assert not dist.is_initialized()
    with pytest.raises(ConfigError, match=message):
        Topology.from_config(ParallelConfig(**parallel), world, model(**cfg))
    assert not dist.is_initialized()


def test_zero3_with_pp1_and_tp_is_fine():
    assert validate_layout(8, ParallelConfig(tp=2, zero_stage=3, offload_params=True), model()) == 4


def test_explicit_ranges_parse():
    assert parse_pp_partition("0-3,4-11", 12, 2) == [(0, 3), (4, 11)]
    assert parse_pp_partition(" 0-0 , 1-2,3 ", 4, 3) == [(0, 0), (1, 2), (3, 3)]
    assert parse_pp_partition("uniform", 12, 2) is None and parse_pp_partition("parameters", 12, 2) is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0-3,5-11", r"stage 1 starts at layer 5: layers 4-4 are in no stage"),
        ("0-4,4-11", r"stage 1 starts at layer 4: layer 4 is already in stage 0"),
        ("0-3,4-10", r"layers 11-11 are in no stage"),
        ("0-3,4-12", r"layer 12 does not exist \(model.n_layer=12\)"),
        ("0-11", r"1 range\(s\) for parallel.pp=2 stages.*'0-5,6-11'"),
        ("1-5,6-11", r"stage 0 starts at layer 1: layers 0-0 are in no stage"),
        ("0-3;4-11", r"'0-3;4-11' is not a layer range"),
        ("5-3,4-11", r"range '5-3' ends before it starts"),
        ("balanced", r"'balanced' is not a layer range; use uniform, parameters"),
    ],
)
def test_explicit_ranges_must_cover_every_layer_once(spec, message):
    with pytest.raises(ConfigError, match=message):
        validate_layout(4, ParallelConfig(pp=2, pp_partition=spec), model())
