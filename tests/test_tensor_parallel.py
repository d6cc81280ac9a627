"""Megatron-style tensor parallelism: sharding rules, and real 2-process gloo runs against the serial model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import torchrun

from gptforge.model import tensor_parallel as tpl

TOL = 1e-5


def test_qkv_shard_holds_each_ranks_q_k_and_v_heads():
    C, tp = 8, 2  # 4 heads of 2: rank r gets heads 2r, 2r+1 of q, of k and of v
    full = torch.arange(3 * C).float().unsqueeze(1).expand(3 * C, C)
    rows = [tpl.shard_tensor("h.0.attn.c_attn.weight", full, r, tp)[:, 0].tolist() for r in range(tp)]
    assert rows[0] == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]
    assert rows[1] == [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_then_merge_is_identity(tp):
    torch.manual_seed(0)
    full = {
        "transformer.wte.weight": torch.randn(300, 16),
        "lm_head.weight": torch.randn(300, 16),
        "transformer.h.0.attn.c_attn.weight": torch.randn(48, 16),
        "transformer.h.0.attn.c_attn.bias": torch.randn(48),
        "transformer.h.0.attn.c_proj.weight": torch.randn(16, 16),
        "transformer.h.0.attn.c_proj.bias": torch.randn(16),
        "transformer.h.0.mlp.c_fc.weight": torch.randn(64, 16),
        "transformer.h.0.mlp.c_fc.bias": torch.randn(64),
        "transformer.h.0.mlp.c_proj.weight": torch.randn(16, 64),
        "transformer.h.0.ln_1.weight": torch.randn(16),
    }
    shards = [tpl.shard_state_dict(full, r, tp) for r in range(tp)]
    if tp > 1:
        assert shards[0]["transformer.wte.weight"].shape == (512 // tp, 16)  # padded to 128*tp rows
        assert (
            shards[-1]["transformer.wte.weight"][300 - 512 + 512 // tp :].abs().sum() == 0
        )  # padding is zero
        assert shards[0]["transformer.h.0.mlp.c_proj.weight"].shape == (16, 64 // tp)
        assert shards[0]["transformer.h.0.attn.c_proj.bias"] is full["transformer.h.0.attn.c_proj.bias"]
    for name, tensor in full.items():
        merged = tpl.merge_shards(name, [s[name] for s in shards], vocab_size=300)
        assert torch.equal(merged, tensor), name


def test_rng_tracker_fork_restores_the_default_stream():
    tracker = tpl.get_rng_tracker()
    tracker.reset()
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    tracker.add("x", 11)
    with tracker.fork("x"):
        inside = torch.rand(4)
    assert torch.equal(torch.rand(4), expected)  # the default stream did not move
    with tracker.fork("x"):
        assert not torch.equal(torch.rand(4), inside)  # the tracked stream continues where it stopped
    saved = tracker.get_states()
    with tracker.fork("x"):
        a = torch.rand(4)
    tracker.set_states(saved)
    with tracker.fork("x"):
        assert torch.equal(torch.rand(4), a)  # get/set_states resume it exactly
    with pytest.raises(Exception, match="is not added"), tracker.fork("y"):
        pass
    tracker.reset()


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("tp") / "tp.json"
    proc = torchrun("tp_equivalence.py", 2, str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(Path(out).read_text())


@pytest.mark.slow
def test_topology_is_a_working_mpu(tp_results):
    assert tp_results["mpu"] is True


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["column", "row", "embedding", "cross_entropy"])
def test_parallel_layers_equal_serial(tp_results, layer):
    assert tp_results[layer] < TOL
    assert tp_results["padded_vocab"] == 512
    assert tp_results["cross_entropy_pad_grad"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["gpt_tied", "gpt_untied"])
def test_parallelized_gpt_equals_serial(tp_results, variant):
    r = tp_results[variant]
    assert r["loss"] < TOL and r["grads"] < TOL, r
    assert r["state_dict"] == 0.0 and r["reloaded_loss"] == 0.0  # gathered weights load into the serial GPT
    assert (r["local_heads"], r["local_qkv_rows"], r["wte_rows"]) == (2, 48, 256)
    assert r["pad_grad"] == 0.0
    assert r["head_is_wte"] is (variant == "gpt_tied")
    assert r["tp_marked"] == (13 if variant == "gpt_tied" else 14)  # 6 per block + embedding (+ head)


@pytest.mark.slow
def test_dropout_rng_per_tp_rank_shared_across_dp(tp_results):
    r = tp_results["rng"]
    assert r["tracked_equal_across_tp"] is False  # attention dropout differs per tp rank
    assert r["default_equal_across_tp"] is True  # replicated activations drop the same elements
    assert r["tracked_equal_across_dp"] is True and r["default_equal_across_dp"] is True
    assert r["residual_equal_across_tp"] is True and r["loss_finite"] and r["tracker_advanced"]
    # recomputation under deepspeed.checkpointing replays the tracked masks (torch.utils.checkpoint would not)
    assert r["checkpointed_grads"] < TOL
