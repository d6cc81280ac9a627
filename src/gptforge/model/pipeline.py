"""The same GPT as DeepSpeed `PipelineModule` layer specs, for pipeline parallelism.

Spec order (index: layer):

    0          TiedLayerSpec "embed": token embedding (wte)          } always on the first stage
    1          PositionPipe: + position embedding (wpe), dropout     }   (adds nothing for rope)
    2..L+1     BlockPipe: transformer block i-2 (tensor-parallel inside when tp > 1)
    L+2        FinalNormPipe: ln_f (LayerNorm or RMSNorm)            } always on the last stage
    L+3        TiedLayerSpec "embed" again, run as the LM head       }   (HeadPipe when untied)

The embedding and the head are one tied module: DeepSpeed builds it on the first and the last stage and
all-reduces its gradient between them. `pp_partition` chooses which blocks each stage runs: `uniform`
(equal block counts: DeepSpeed's `type:BlockPipe`), `parameters` (DeepSpeed's `parameters`: balanced
parameter counts, the tied embedding counted on both ends), or explicit inclusive block ranges such as
`"0-3,4-11"`. DeepSpeed has no explicit-ranges method, so `GPTPipelineModule` takes the stage boundaries
(`parts`, spec indices) computed here for all three methods, which also makes the logged layout the one used.

Weights convert to and from the serial `GPT` state dict, so a pipeline run starts from the serial init and
its checkpoints export like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from deepspeed.runtime import utils as ds_utils
from deepspeed.runtime.pipe.module import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn

from gptforge.config import ModelConfig
from gptforge.errors import CheckpointError
from gptforge.model.gpt import POSITIONS, Block, LMLoss
from gptforge.model.size import norm_parameters, parameters_per_layer, position_parameters
from gptforge.model.tensor_parallel import (
    VocabParallelCrossEntropy,
    VocabParallelEmbedding,
    copy_to_tp_region,
    parallelize_block,
    qkv_sizes,
    shard_tensor,
)
from gptforge.parallel.topology import Topology, padded_vocab_size, parse_pp_partition

FIRST_BLOCK = 2  # spec index of block 0


def _tp(topology: Topology | None) -> tuple[int, int, Any]:
    if topology is None or topology.tp == 1:
        return 1, 0, None
    return topology.tp, topology.get_tensor_model_parallel_rank(), topology.get_tensor_model_parallel_group()


class EmbeddingPipe(nn.Module):
    """Token embedding; the same module, tied, is the LM head on the last stage (`lm_head_forward`)."""

    def __init__(self, cfg: ModelConfig, topology: Topology | None = None):
        super().__init__()
        tp, rank, group = _tp(topology)
        if tp == 1:
            self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        else:
            self.wte = VocabParallelEmbedding(padded_vocab_size(cfg.vocab_size, tp), cfg.d_model, group, rank)
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.wte(ids)


def lm_head_forward(embedding: EmbeddingPipe, x: torch.Tensor) -> torch.Tensor:
    """The tied head: logits (this rank's vocabulary slice under tp) from the embedding's weight."""
    if embedding.group is not None:
        x = copy_to_tp_region(x, embedding.group)
    return F.linear(x, embedding.wte.weight)


class HeadPipe(nn.Module):
    """The LM head when embeddings are not tied (`model.tie_embeddings: false`)."""

    def __init__(self, cfg: ModelConfig, topology: Topology | None = None):
        super().__init__()
        tp, _, group = _tp(topology)
        rows = cfg.vocab_size if tp == 1 else padded_vocab_size(cfg.vocab_size, tp) // tp
        self.weight = nn.Parameter(torch.empty(rows, cfg.d_model))
        if group is not None:
            self.weight.tensor_model_parallel, self.weight.partition_dim, self.weight.partition_stride = (
                True,
                0,
                1,
            )
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            x = copy_to_tp_region(x, self.group)
        return F.linear(x, self.weight)


class PositionPipe(nn.Module):
    """Adds position embeddings to the token embeddings, then embedding dropout (as `GPT.embed`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wpe = POSITIONS[cfg.position_embedding][0](cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        return self.drop(self.wpe(tok, torch.arange(tok.size(1), device=tok.device)))


class BlockPipe(Block):
    """A GPT block as a pipeline layer, sharded across the tp group when the topology has tp > 1."""

    def __init__(self, cfg: ModelConfig, topology: Topology | None = None):
        super().__init__(cfg)
        tp, rank, group = _tp(topology)
        if tp > 1:
            parallelize_block(self, group, rank, tp, cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # one tensor in, one out: the pipeline contract
        return super().forward(x)


class FinalNormPipe(nn.LayerNorm):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)


class FinalRMSNormPipe(nn.RMSNorm):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.d_model, eps=cfg.layer_norm_eps)


FINAL_NORMS = {"layernorm": FinalNormPipe, "rmsnorm": FinalRMSNormPipe}  # DeepSpeed builds classes only


def layer_specs(cfg: ModelConfig, topology: Topology | None = None) -> list[LayerSpec]:
    """The GPT as pipeline layer specs (see the module docstring for the order)."""
    embed = TiedLayerSpec("embed", EmbeddingPipe, cfg, topology, tied_weight_attr=["wte.weight"])
    if cfg.tie_embeddings:
        head = TiedLayerSpec(
            "embed", EmbeddingPipe, cfg, topology, forward_fn=lm_head_forward, tied_weight_attr=["wte.weight"]
        )
    else:
        head = LayerSpec(HeadPipe, cfg, topology)
    blocks = [LayerSpec(BlockPipe, cfg, topology) for _ in range(cfg.n_layer)]
    return [embed, LayerSpec(PositionPipe, cfg), *blocks, LayerSpec(FINAL_NORMS[cfg.norm], cfg), head]


def loss_fn(cfg: ModelConfig, topology: Topology | None = None) -> nn.Module:
    """The serial criterion, or the vocab-parallel cross-entropy under tp."""
    tp, rank, group = _tp(topology)
    if tp == 1:
        return LMLoss()
    return VocabParallelCrossEntropy(
        group, rank * padded_vocab_size(cfg.vocab_size, tp) // tp, cfg.vocab_size
    )


# ---------------------------------------------------------------------------------------------- partition


def _spec_weights(cfg: ModelConfig, method: str) -> list[int]:
    """What DeepSpeed balances: `type:BlockPipe` -> 1 per block; `parameters` -> trainable params per spec
    (as its `_count_layer_params` counts them, the tied embedding on both ends)."""
    n = cfg.n_layer
    if method == "uniform":
        return [0, 0] + [1] * n + [0, 0]
    d, v = cfg.d_model, cfg.vocab_size
    return [v * d, position_parameters(cfg)] + [parameters_per_layer(cfg)] * n + [norm_parameters(cfg), v * d]


def stage_parts(cfg: ModelConfig, pp: int, partition: str = "uniform") -> list[int]:
    """Stage boundaries in spec indices (DeepSpeed's `parts`): stage s runs specs [parts[s], parts[s+1])."""
    ranges = parse_pp_partition(partition, cfg.n_layer, pp)
    if ranges is None:
        parts = [
            int(p) for p in ds_utils.partition_balanced(weights=_spec_weights(cfg, partition), num_parts=pp)
        ]
    else:
        parts = [0] + [FIRST_BLOCK + start for start, _ in ranges[1:]] + [cfg.n_layer + 4]
    return parts


@dataclass(frozen=True)
class StageLayout:
    stage: int
    first_layer: int  # block indices, inclusive; last < first = no block on this stage
    last_layer: int
    extras: tuple[str, ...]  # the non-block layers this stage runs
    ranks: tuple[int, ...]

    def describe(self) -> str:
        layers = (
            f"layers {self.first_layer}-{self.last_layer}"
            if self.last_layer >= self.first_layer
            else "no layers"
        )
        more = f" (+ {', '.join(self.extras)})" if self.extras else ""
        return f"stage {self.stage}: {layers}{more}, ranks {','.join(str(r) for r in self.ranks)}"


def stage_layout(cfg: ModelConfig, topology: Topology, partition: str = "uniform") -> list[StageLayout]:
    """Which blocks (and embedding/head pieces) and which ranks each stage has, for the start-of-run log."""
    parts = stage_parts(cfg, topology.pp, partition)
    n = cfg.n_layer
    names = {0: "embedding", 1: "position embedding", FIRST_BLOCK + n: "ln_f", FIRST_BLOCK + n + 1: "head"}
    out = []
    for s in range(topology.pp):
        start, stop = parts[s], parts[s + 1]
        first, last = max(start - FIRST_BLOCK, 0), min(stop - FIRST_BLOCK, n) - 1
        extras = tuple(names[i] for i in range(start, stop) if i in names)
        out.append(StageLayout(s, first, last, extras, tuple(topology.stage_ranks(s))))
    return out


def describe_stages(cfg: ModelConfig, topology: Topology, partition: str = "uniform") -> list[str]:
    """Lines like `stage 0: layers 0-5 (+ embedding, position embedding), ranks 0,1`."""
    return [s.describe() for s in stage_layout(cfg, topology, partition)]


class GPTPipelineModule(PipelineModule):
    """DeepSpeed's PipelineModule with stage boundaries given (`stage_parts`) instead of recomputed, so that
    explicit layer ranges work and the logged layout is the one DeepSpeed builds."""

    def __init__(self, layers: list[LayerSpec], parts: list[int], **kwargs: Any):
        self._given_parts = list(parts)  # read by _partition_layers during PipelineModule.__init__
        super().__init__(layers, partition_method="gptforge", **kwargs)
        self._mark_norm_owners()

    def _mark_norm_owners(self) -> None:
        """Make DeepSpeed's gradient norm count every weight exactly once over all stages and tp ranks.

        DeepSpeed sums per-rank norms over the model-parallel group (pp x tp) and counts a parameter on a
        rank if it is tensor-parallel or the rank "owns" replicas: tp rank 0 (ZeRO, bf16) or model-parallel
        rank 0 (fp32 `clip_grad_norm_`, which would drop every later stage). So: the tied embedding's copy
        on a later stage is a replica (`ds_pipe_replicated`, not tensor-parallel), and the other weights
        of tp rank 0 on later stages are marked `model_parallel` so the fp32 path counts them too.
        """
        stage = self._topo.get_coord(self.global_rank).pipe
        if stage == 0:
            return
        tp_rank = self._grid.get_slice_parallel_rank()
        tied = {id(p) for m in self.tied_modules.values() for p in m.parameters()}
        for p in self.parameters():
            if id(p) in tied:
                p.ds_pipe_replicated = True
                p.tensor_model_parallel = False
            elif tp_rank == 0:
                p.model_parallel = True

    def _partition_layers(self, method: str = "gptforge") -> None:
        if len(self._given_parts) != self.num_stages + 1 or self._given_parts[-1] != len(self._layer_specs):
            raise ValueError(
                f"parts {self._given_parts} do not split {len(self._layer_specs)} specs "
                f"into {self.num_stages} stages"
            )
        self.parts = self._given_parts
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])


def build_pipeline(
    cfg: ModelConfig,
    topology: Topology,
    partition: str = "uniform",
    activation_checkpointing: bool = False,
    **kwargs: Any,
) -> GPTPipelineModule:
    """This rank's stage of the GPT. Collective: needs `deepspeed.init_distributed()` and, for tp > 1,
    `topology.init_process_groups()`. Weights are uninitialized: load them with `load_serial_state_dict`.
    Pass the result to `deepspeed.initialize(model=..., mpu=None)`: its grid, built from `topology`, is
    the mpu (DeepSpeed requires that for pipelines)."""
    return GPTPipelineModule(
        layer_specs(cfg, topology),
        stage_parts(cfg, topology.pp, partition),
        topology=topology,
        loss_fn=loss_fn(cfg, topology),
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
        checkpointable_layers=["BlockPipe"],
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------- weights


def pipeline_to_serial_name(name: str, cfg: ModelConfig) -> str:
    """`tied_modules.embed.wte.weight` -> `transformer.wte.weight`, `5.attn.c_attn.weight` ->
    `transformer.h.3.attn.c_attn.weight`, ... (PipelineModule names its layers by spec index)."""
    if name.startswith("tied_modules.embed."):
        return "transformer." + name.removeprefix("tied_modules.embed.")
    index, _, rest = name.partition(".")
    i, n = int(index), cfg.n_layer
    if i == 1:
        return f"transformer.{rest}"
    if FIRST_BLOCK <= i < FIRST_BLOCK + n:
        return f"transformer.h.{i - FIRST_BLOCK}.{rest}"
    if i == FIRST_BLOCK + n:
        return f"transformer.ln_f.{rest}"
    if i == FIRST_BLOCK + n + 1:
        return "lm_head.weight"
    raise KeyError(f"{name} is not a GPT pipeline parameter")


def serial_spec_index(name: str, cfg: ModelConfig) -> int:
    """The spec index of serial weight `name` (`pipeline_to_serial_name` the other way): embedding 0,
    positions 1, block i FIRST_BLOCK + i, then ln_f and the untied head; a tied head is the embedding's."""
    if name.startswith("transformer.wte.") or (name == "lm_head.weight" and cfg.tie_embeddings):
        return 0
    if name.startswith("transformer.h."):
        return FIRST_BLOCK + int(name.split(".")[2])
    if name.startswith("transformer.ln_f."):
        return FIRST_BLOCK + cfg.n_layer
    if name == "lm_head.weight":
        return FIRST_BLOCK + cfg.n_layer + 1
    if name.startswith("transformer."):
        return 1
    raise KeyError(f"{name} is not a GPT parameter")


@torch.no_grad()
def load_serial_state_dict(
    module: nn.Module, serial: dict[str, torch.Tensor], cfg: ModelConfig, topology: Topology | None = None
) -> None:
    """Copy a serial GPT state dict into this rank's stage (sharding it for tp). Every local tensor must
    be found: a missing key is an error, not a silently random weight."""
    tp, rank, _ = _tp(topology)
    for name, tensor in module.state_dict().items():
        serial_name = pipeline_to_serial_name(name, cfg)
        if serial_name not in serial:
            raise CheckpointError(
                f"the serial state dict has no {serial_name} (needed for pipeline weight {name}); "
                f"is it a checkpoint of this model shape?"
            )
        tensor.copy_(shard_tensor(serial_name, serial[serial_name], rank, tp, qkv_sizes(cfg)))
