"""dp x pp x tp: which rank does what, and every process group, in one object that DeepSpeed takes as `mpu`.

Rank order (GPT-NeoX's `PipeModelDataParallelTopology`, axes `pipe, data, model`, row-major):

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

tp is innermost, so a tensor-parallel group is `tp` consecutive ranks: on one node (NVLink), where its
per-layer all-reduces belong. dp comes next, pp is outermost: the ranks of one pipeline stage are the
`dp * tp` consecutive ranks `[s * dp * tp, (s + 1) * dp * tp)`. Launchers give each node consecutive
ranks, so with `dp * tp` = GPUs per node every stage is exactly one node, and only the pipeline's
point-to-point activations (the smallest traffic) cross nodes. With `dp * tp` = 2 nodes' GPUs a stage
spans two nodes, and so on.

Group semantics follow DeepSpeed's `PipelineParallelGrid` (which `PipelineModule` builds from this same
topology): "tensor model parallel" (= Megatron's, DeepSpeed's "slice") is the tp group; "model parallel" is
every rank holding a different part of one model replica (pp x tp: same dp index), which DeepSpeed uses to
sum gradient norms and to name checkpoint files uniquely; "data parallel" is the ranks holding the same part.

Validation (`validate_layout`) needs no process group, so a bad layout fails before any is made.
"""

from __future__ import annotations

import re
from typing import Any

from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from gptforge.config import ModelConfig, ParallelConfig
from gptforge.errors import ConfigError

VOCAB_MULTIPLE = 128  # Megatron's --make-vocab-size-divisible-by default

_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def padded_vocab_size(vocab_size: int, tp: int = 1, multiple: int = VOCAB_MULTIPLE) -> int:
    """Megatron's padding: the smallest multiple of `multiple * tp` >= vocab_size.

    Each tp rank then holds an equal vocabulary slice whose size is a multiple of 128 (fast GEMMs);
    the extra rows are never targets (the vocab-parallel loss masks them) and gathered state dicts drop them.
    """
    step = multiple * tp
    return -(-vocab_size // step) * step


def parse_pp_partition(spec: str, n_layer: int, pp: int) -> list[tuple[int, int]] | None:
    """`uniform`/`parameters` -> None (computed later); `"0-3,4-11"` -> [(0, 3), (4, 11)] (inclusive).

    Explicit ranges are block indices, one range per stage in stage order, together covering every block
    exactly once. (The embedding always lives on the first stage and the head on the last.)
    """
    if spec in ("uniform", "parameters"):
        return None
    where = f"parallel.pp_partition '{spec}'"
    example = ",".join(f"{a}-{b}" for a, b in even_ranges(n_layer, pp)) if n_layer >= pp else "0-5,6-11"
    ranges = []
    for part in spec.split(","):
        m = _RANGE.match(part)
        if not m:
            raise ConfigError(
                f"{where}: '{part}' is not a layer range; use uniform, parameters or one inclusive "
                f"range per stage like '{example}'"
            )
        start, end = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if end < start:
            raise ConfigError(f"{where}: range '{part.strip()}' ends before it starts")
        ranges.append((start, end))
    if len(ranges) != pp:
        raise ConfigError(
            f"{where}: {len(ranges)} range(s) for parallel.pp={pp} stages; give one per stage, e.g. '{example}'"
        )
    expected = 0
    for stage, (start, end) in enumerate(ranges):
        if start != expected:
            problem = (
                f"layers {expected}-{start - 1} are in no stage"
                if start > expected
                else f"layer {start} is already in stage {stage - 1}"
            )
            raise ConfigError(
                f"{where}: stage {stage} starts at layer {start}: {problem}; the ranges must cover layers "
                f"0-{n_layer - 1} exactly once, in stage order, e.g. '{example}'"
            )
        expected = end + 1
    if expected != n_layer:
        problem = (
            f"layers {expected}-{n_layer - 1} are in no stage"
            if expected < n_layer
            else f"layer {expected - 1} does not exist (model.n_layer={n_layer})"
        )
        raise ConfigError(
            f"{where}: {problem}; the ranges must cover layers 0-{n_layer - 1} exactly once, e.g. '{example}'"
        )
    return ranges


def even_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    bounds = [n * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(parts)]


def validate_layout(world_size: int, parallel: ParallelConfig, model: ModelConfig | None = None) -> int:
    """Check a layout before any process group exists; return dp. Every failure says what and how to fix."""
    tp, pp, zero = parallel.tp, parallel.pp, parallel.zero_stage
    if tp < 1 or pp < 1:
        raise ConfigError(f"parallel.tp and parallel.pp must be >= 1, got tp={tp} pp={pp}")
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp x parallel.pp = {tp} x {pp} = {tp * pp}; "
            f"launch a multiple of {tp * pp} processes or change tp/pp (dp = world size / (tp x pp))"
        )
    if pp > 1 and zero >= 2:
        raise ConfigError(
            f"parallel.zero_stage={zero} with parallel.pp={pp}: DeepSpeed's pipeline engine does not support "
            f"ZeRO-2/3 (it reduces gradients itself after the last micro-batch, while ZeRO-2/3 partition them "
            f"during backward); use zero_stage 0 or 1 with pipeline parallelism, or pp=1 with ZeRO-2/3"
        )
    if parallel.offload_optimizer != "none" and zero == 0:
        raise ConfigError("parallel.offload_optimizer=cpu needs parallel.zero_stage >= 1 (ZeRO-Offload)")
    if parallel.offload_params and zero != 3:
        raise ConfigError(
            "parallel.offload_params needs parallel.zero_stage=3 (only ZeRO-3 partitions weights)"
        )
    if model is not None:
        if model.n_head % tp:
            ok = [d for d in range(1, model.n_head + 1) if model.n_head % d == 0]
            raise ConfigError(
                f"model.n_head={model.n_head} is not divisible by parallel.tp={tp}: tensor parallelism splits "
                f"whole attention heads across tp ranks; use tp in {ok}"
            )
        if model.kv_heads % tp or model.ffn_dim % tp:
            ok = [
                d for d in range(1, model.kv_heads + 1) if model.kv_heads % d == 0 and model.ffn_dim % d == 0
            ]
            raise ConfigError(
                f"model.n_kv_head={model.kv_heads} / model.ffn_hidden={model.ffn_dim} not divisible by "
                f"parallel.tp={tp}: tensor parallelism gives each rank whole key/value heads (never split or "
                f"replicated) and an equal part of the MLP width; use tp in {ok}"
            )
        if model.n_layer < pp:
            raise ConfigError(
                f"model.n_layer={model.n_layer} is fewer than parallel.pp={pp} pipeline stages; "
                f"every stage needs at least one block: use pp <= {model.n_layer}"
            )
        parse_pp_partition(parallel.pp_partition, model.n_layer, pp)
    return world_size // (tp * pp)


class Topology(PipeModelDataParallelTopology):
    """The one dp x pp x tp layout of a run: rank arithmetic, then (after `init_process_groups`) every
    process group, with the `mpu` methods DeepSpeed and Megatron-style code call.

    It *is* a DeepSpeed `ProcessTopology`, so `PipelineModule(topology=topo)` accepts it directly.
    """

    def __init__(self, tp: int = 1, pp: int = 1, dp: int = 1):
        if min(tp, pp, dp) < 1:
            raise ConfigError(f"tp, pp and dp must be >= 1, got tp={tp} pp={pp} dp={dp}")
        super().__init__(num_pp=pp, num_mp=tp, num_dp=dp)
        self.tp, self.pp, self.dp = tp, pp, dp
        self.rank: int | None = None
        self._groups: dict[str, Any] = {}
        self._group_ranks: dict[str, list[int]] = {}

    @classmethod
    def from_config(
        cls, parallel: ParallelConfig, world_size: int, model: ModelConfig | None = None
    ) -> Topology:
        """Validate (before any process group exists), then build the layout."""
        dp = validate_layout(world_size, parallel, model)
        return cls(tp=parallel.tp, pp=parallel.pp, dp=dp)

    @property
    def size(self) -> int:
        return self.tp * self.pp * self.dp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of a global rank, without a scan over the mapping."""
        if not 0 <= rank < self.size:
            raise ValueError(f"rank {rank} is outside this topology of {self.size} ranks")
        return rank // (self.dp * self.tp), rank // self.tp % self.dp, rank % self.tp

    def stage_ranks(self, stage: int) -> list[int]:
        """Every rank of a pipeline stage: consecutive, `dp * tp` of them (one node when that = GPUs/node)."""
        return list(range(stage * self.dp * self.tp, (stage + 1) * self.dp * self.tp))

    def group_ranks(self, kind: str, rank: int) -> list[int]:
        """The ranks of `rank`'s group of `kind`: tp | dp | pp | model (= pp x tp, one model replica)."""
        pp_rank, dp_rank, tp_rank = self.coords(rank)
        if kind == "tp":
            return self.filter_match(pipe=pp_rank, data=dp_rank)
        if kind == "dp":
            return self.filter_match(pipe=pp_rank, model=tp_rank)
        if kind == "pp":
            return self.filter_match(data=dp_rank, model=tp_rank)
        if kind == "model":
            return self.filter_match(data=dp_rank)
        raise ValueError(f"unknown group kind {kind!r}; expected tp, dp, pp or model")

    def all_groups(self, kind: str) -> list[list[int]]:
        """Every group of `kind`, in the fixed order all ranks create them."""
        if kind == "model":
            return [self.filter_match(data=d) for d in range(self.dp)]
        axis = {"tp": "model", "dp": "data", "pp": "pipe"}[kind]
        return self.get_axis_comm_lists(axis)

    def describe(self) -> str:
        return (
            f"{self.size} ranks = dp {self.dp} x pp {self.pp} x tp {self.tp} "
            f"(rank = pp_rank*{self.dp * self.tp} + dp_rank*{self.tp} + tp_rank)"
        )

    def __repr__(self) -> str:
        return f"Topology(tp={self.tp}, pp={self.pp}, dp={self.dp})"

    # ------------------------------------------------------------------------------- process groups

    def init_process_groups(self) -> Topology:
        """Create every group (tp, dp, pp, model) once. Collective: all ranks call it, in the same order.

        `torch.distributed` must be initialized with a world of exactly `self.size` processes.
        """
        import torch.distributed as dist

        if self._groups:
            return self
        if not dist.is_initialized():
            raise RuntimeError("init_process_groups needs torch.distributed initialized first")
        if dist.get_world_size() != self.size:
            raise ConfigError(
                f"world size {dist.get_world_size()} does not match the topology {self.describe()}"
            )
        self.rank = dist.get_rank()
        for kind in ("tp", "dp", "pp", "model"):
            for ranks in self.all_groups(kind):
                group = dist.new_group(ranks=ranks)
                if self.rank in ranks:
                    self._groups[kind], self._group_ranks[kind] = group, ranks
        return self

    def _group(self, kind: str) -> Any:
        if not self._groups:
            raise RuntimeError("process groups are not made yet: call topology.init_process_groups() first")
        return self._groups[kind]

    def _rank_in(self, kind: str) -> int:
        self._group(kind)
        return self._group_ranks[kind].index(self.rank)

    # ------------------------------------------------------------------------------- the mpu interface
    # Names as DeepSpeed (engine, ZeRO, pipeline, checkpointing) and Megatron-style code call them.

    def get_global_rank(self) -> int:
        self._group("tp")
        return self.rank

    def get_tensor_model_parallel_group(self) -> Any:
        return self._group("tp")

    def get_tensor_model_parallel_rank(self) -> int:
        return self._rank_in("tp")

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of tp rank 0 in this rank's tp group (what a tp broadcast starts from)."""
        self._group("tp")
        return self._group_ranks["tp"][0]

    get_slice_parallel_group = get_tensor_model_parallel_group
    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size

    def get_data_parallel_group(self) -> Any:
        return self._group("dp")

    def get_data_parallel_rank(self) -> int:
        return self._rank_in("dp")

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_group_ranks(self) -> list[int]:
        self._group("dp")
        return list(self._group_ranks["dp"])

    def get_pipe_parallel_group(self) -> Any:
        return self._group("pp")

    def get_pipe_parallel_rank(self) -> int:
        return self._rank_in("pp")

    def get_pipe_parallel_world_size(self) -> int:
        return self.pp

    get_pipeline_model_parallel_group = get_pipe_parallel_group
    get_pipeline_model_parallel_rank = get_pipe_parallel_rank
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size

    def get_model_parallel_group(self) -> Any:
        """pp x tp: the ranks of one model replica (DeepSpeed sums grad norms and names checkpoints by it)."""
        return self._group("model")

    def get_model_parallel_rank(self) -> int:
        return self._rank_in("model")

    def get_model_parallel_world_size(self) -> int:
        return self.pp * self.tp

    def is_first_stage(self) -> bool:
        return self.get_pipe_parallel_rank() == 0

    def is_last_stage(self) -> bool:
        return self.get_pipe_parallel_rank() == self.pp - 1
