"""The pieces that wire a layout into the trainer, without processes: which layouts the trainer accepts,
DeepSpeed's config for ZeRO and offload, weight decay and the gradient norm under tensor/pipeline
parallelism, block recomputation, and the old (format-1) universal checkpoint files."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gptforge.config import ModelConfig, load_config
from gptforge.errors import CheckpointError, ConfigError
from gptforge.model import GPT
from gptforge.model.tensor_parallel import VocabParallelEmbedding
from gptforge.parallel.parallelize import checkpoint_blocks, counts_in_grad_norm
from gptforge.train.batch import plan_batch
from gptforge.train.distributed import check_layout
from gptforge.train.engine import deepspeed_config
from gptforge.train.optim import AdamW, param_groups


def _cfg(*overrides: str):
    return load_config(None, ["model.vocab_size=50", "model.n_head=4", "model.d_model=32", *overrides])


@pytest.mark.parametrize(
    "overrides,world",
    [
        (
            [
                "parallel.tp=2",
                "parallel.pp=2",
                "parallel.zero_stage=1",
                "parallel.activation_checkpointing=true",
            ],
            8,
        ),
        (["parallel.tp=2", "parallel.zero_stage=3", "parallel.offload_params=true"], 4),
        (["parallel.zero_stage=2", "parallel.offload_optimizer=cpu"], 2),
        (["parallel.pp=4", "parallel.pp_partition=0-2,3-5,6-8,9-11"], 4),
    ],
)
def test_the_trainer_takes_every_valid_layout(overrides, world):
    check_layout(_cfg(*overrides), world, model_parallel=True)


def test_invalid_layouts_are_refused_before_any_process_group():
    with pytest.raises(ConfigError, match=r"zero_stage=2 with parallel.pp=2: DeepSpeed's pipeline engine"):
        check_layout(_cfg("parallel.pp=2", "parallel.zero_stage=2"), 4, model_parallel=True)
    with pytest.raises(ConfigError, match=r"model.n_head=4 is not divisible by parallel.tp=8"):
        check_layout(_cfg("parallel.tp=8"), 8, model_parallel=True)
    # callers whose model is used as is (fine-tuning) still run data parallel with ZeRO 0/1 only
    with pytest.raises(ConfigError, match="tensor parallelism"):
        check_layout(_cfg("parallel.tp=2"), 2)


def test_deepspeed_config_for_zero_and_offload():
    cfg = _cfg(
        "parallel.zero_stage=3",
        "parallel.offload_optimizer=cpu",
        "parallel.offload_params=true",
        "optim.grad_clip=0.7",
        "train.micro_batch_size=2",
        "train.global_batch_size=8",
    )
    ds = deepspeed_config(cfg, plan_batch(cfg, 2), "fp32")
    assert ds["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "cpu"},
    }
    assert ds["zero_force_ds_cpu_optimizer"] is False  # our AdamW on the offloaded states
    assert ds["gradient_clipping"] == 0.7  # ZeRO computes the norm and clips
    assert ds["gradient_accumulation_steps"] == 2  # = the pipeline's micro-batches per step
    zero0 = _cfg("optim.grad_clip=0.7")
    assert (
        deepspeed_config(zero0, plan_batch(zero0, 1), "fp32")["gradient_clipping"] == 0.0
    )  # our AdamW clips


def test_vocab_parallel_embedding_is_not_decayed():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = VocabParallelEmbedding(256, 8, group=None)
            self.proj = nn.Linear(8, 8)

    model = Tiny()
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([8, 8])]
    assert any(p is model.wte.weight for p in no_decay["params"])


def test_grad_norm_counts_each_weight_once():
    shard, replica, tied_copy = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    shard.tensor_model_parallel = True
    tied_copy.tensor_model_parallel, tied_copy.ds_pipe_replicated = False, True
    assert counts_in_grad_norm(shard, 0) and counts_in_grad_norm(shard, 1)
    assert counts_in_grad_norm(replica, 0) and not counts_in_grad_norm(replica, 1)
    assert not counts_in_grad_norm(tied_copy, 0)

    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))
    a.grad, b.grad = torch.full((3,), 2.0), torch.full((4,), 100.0)
    opt = AdamW([a, b], lr=0.0, guard=True, max_grad_norm=1.0, norm_counts=lambda p: p is a)
    opt.step()
    assert float(opt._global_grad_norm) == pytest.approx(12**0.5)  # b (counted elsewhere) left out
    assert float(b.grad[0]) == pytest.approx(100.0 / 12**0.5, rel=1e-6)  # but clipped by the global norm


def test_recomputed_blocks_give_the_same_gradients():
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=16, context_length=8, vocab_size=50, dropout=0.0)
    torch.manual_seed(0)
    plain = GPT(cfg)
    recomputed = copy.deepcopy(plain)
    checkpoint_blocks(recomputed)
    assert recomputed.state_dict().keys() == plain.state_dict().keys()
    idx = torch.randint(0, 50, (2, 8))
    for model in (plain, recomputed):
        model(idx, idx)[1].backward()
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    with torch.no_grad():  # evaluation and generation run the blocks as they are
        assert torch.equal(recomputed(idx)[0], plain(idx)[0])


def test_old_universal_files_must_be_complete(tmp_path):
    """Format-1 checkpoints (DeepSpeed's files + universal/) stay readable for their weights."""
    import dataclasses
    import json

    from safetensors.torch import save_file

    from gptforge import checkpoint_format as fmt

    cfg = ModelConfig(n_layer=1, n_head=2, d_model=8, context_length=8, vocab_size=16)
    meta = {"format": fmt.FORMAT, "version": 1, "step": 1, "model": dataclasses.asdict(cfg), "tokenizer": {}}
    (tmp_path / fmt.META_FILE).write_text(json.dumps(meta))
    (tmp_path / "universal").mkdir()
    save_file(
        {"transformer.wte.weight": torch.ones(16, 8)},
        str(tmp_path / "universal" / "model-00001-of-00002.safetensors"),
    )
    with pytest.raises(CheckpointError, match="1 model file\\(s\\) for 2 pipeline stage\\(s\\): incomplete"):
        fmt.load_checkpoint_weights(tmp_path)
    (tmp_path / "universal" / "model-00002-of-00002.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        fmt.load_checkpoint_weights(tmp_path)
