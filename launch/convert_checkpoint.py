"""Convert a training checkpoint of any parallel layout, offline, on CPU: into one consolidated model, or
re-sharded for another layout.

    python launch/convert_checkpoint.py --checkpoint runs/gpt2-1.5b --output models/gpt2-1.5b
    python launch/convert_checkpoint.py --checkpoint runs/gpt2-1.5b/checkpoints/step_20000 --to hf --output hf/1.5b
    python launch/convert_checkpoint.py --checkpoint runs/gpt2-774m --to checkpoint --tp 2 --pp 2 --dp 4 \\
        --output runs/gpt2-774m-tp2pp2/checkpoints/step_20000 [--pp-partition 0-17,18-35] [--workers 8]

`--checkpoint` takes a run directory (its latest checkpoint), its checkpoints/ directory or one step_<N>
directory, written under any (dp, tp, pp, ZeRO) layout; no GPU, process group or the original number of
ranks is needed.

`--to gptforge` (default) writes our consolidated model directory (model.safetensors + gptforge.json),
which generate, eval, export and `model.init_from` read; `--to hf` a Hugging Face directory (what
launch/export.py writes). Both go tensor by tensor (tp shards merged, vocabulary padding dropped, renamed
and transposed for HF) into the output file, so the process holds about one tensor at a time.

`--to checkpoint` writes the checkpoint as the `--pp` x `--dp` x `--tp` ranks of that layout would have
written it (each rank file: the tensors of its stage, of each its tp shard's dp-th flat range), `--workers`
processes writing rank files in parallel; a resume then reads each rank's part directly (the RNG streams
are seeded afresh, as for any layout change). Checkpoints of the old format (DeepSpeed's files +
universal/) convert to models too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptforge.cli import output_dir, run_cli, setup_logging
from gptforge.errors import CheckpointError, GptforgeError

if TYPE_CHECKING:
    from gptforge.config import ModelConfig, ParallelConfig

log = logging.getLogger("convert")


def describe_source(spec: str) -> str:
    """`step 5 of a 4-rank run: dp 1 x pp 2 x tp 2, ZeRO-0` for a training checkpoint, else the path."""
    from gptforge import checkpoint_format as fmt

    try:
        step_dir = fmt.resolve(spec)
        meta = fmt.read_meta(step_dir)
    except GptforgeError:
        return spec
    layout = meta["layout"]
    return (
        f"{step_dir} (step {meta['step']} of a {layout['world_size']}-rank run: dp {layout['dp']} x "
        f"pp {layout['pp']} x tp {layout['tp']}, ZeRO-{layout['zero_stage']})"
    )


def _streamable(spec: str) -> Path | None:
    """The step directory when the weights can be written one tensor at a time: a fragment-format
    checkpoint of a plain GPT (fine-tuned ones need LoRA merged or are classifiers: loaded whole)."""
    from gptforge import checkpoint_format as fmt

    try:
        step_dir = fmt.resolve(spec.removeprefix("checkpoint:"))
        meta = fmt.read_meta(step_dir)
    except GptforgeError:
        return None
    return step_dir if meta["version"] == fmt.FORMAT_VERSION and not meta.get("finetune") else None


def stream_weights(step_dir: Path, out: Path, to: str) -> tuple[Any, int]:
    """A consolidated model directory (`to` "gptforge": model.safetensors + gptforge.json, a tied LM head
    stored once, as `save_model_dir` does) or a Hugging Face one (`to` "hf": what `save_hf` writes), from
    the fragments, one tensor in memory at a time. Returns (model config, parameters)."""
    import torch

    from gptforge import checkpoint_format as fmt
    from gptforge import hf
    from gptforge.model import GPT
    from gptforge.weights import MODEL_META_FILE, WEIGHTS_FILE

    tmp = out.with_name(out.name + ".tmp")  # nothing half-written under OUT if a fragment is bad
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with fmt.Checkpoint(step_dir) as ckpt:
            cfg = ckpt.model_cfg
            names = [n for n in ckpt.names(fmt.WEIGHTS) if n not in ckpt.index.get("aliases", {})]
            shapes = {n: ckpt.tensors[fmt.WEIGHTS + n].shape for n in names}
            params = sum(ckpt.tensors[fmt.WEIGHTS + n].numel for n in names)

            def read(name: str) -> torch.Tensor:
                return ckpt.tensor(fmt.WEIGHTS + name)

            if to == "hf":
                hf.write_hf_files(cfg, tmp, ckpt.meta["tokenizer"])  # refuses a shape HF cannot express
                with torch.device("meta"):  # shapes only: nothing allocated
                    skeleton = {n: torch.empty(shape) for n, shape in shapes.items()}
                    biases = hf.hf_zero_biases(GPT(cfg), cfg)
                hf_shapes = {k: tuple(t.shape) for k, t in hf.hf_tensors(names, skeleton.__getitem__, cfg)}
                hf_shapes.update({k: tuple(t.shape) for k, t in biases.items()})
                tensors = itertools.chain(hf.hf_tensors(names, read, cfg), biases.items())
                fmt.write_safetensors(tmp / hf.WEIGHTS_FILE, hf_shapes, tensors)
            else:
                fmt.write_safetensors(tmp / WEIGHTS_FILE, shapes, ((n, read(n)) for n in names))
                meta = {"model": ckpt.meta["model"], "tokenizer": ckpt.meta["tokenizer"]}
                (tmp / MODEL_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return cfg, params


# ---------------------------------------------------------------------------------------------- re-shard


def stage_of(name: str, cfg: ModelConfig, parts: list[int] | None) -> int:
    """The pipeline stage holding tensor `name` (a weight or `<moment>/<weight>`): the one whose spec range
    has the weight's layer, as the trainer assigns them (a tied head is stored once, with the embedding)."""
    from gptforge.model.pipeline import serial_spec_index

    if parts is None:
        return 0
    spec = serial_spec_index(name.split("/", 1)[1] if "/" in name else name, cfg)
    return next(s for s in range(len(parts) - 1) if parts[s] <= spec < parts[s + 1])


def _rank_part(
    step_dir: str, rank: int, layout: tuple[int, int], parts: list[int] | None, out: str
) -> list[tuple[Any, ...]]:
    """Rank `rank` of pp x dp x tp (rank order pipe, data, model; `layout` = (dp, tp), `parts` the stage
    boundaries): its fragments of every tensor of its stage, read from the source and written to its file.
    Index entries (name, shape, tp_rank, tp, start, stop, offset) back."""
    from gptforge import checkpoint_format as fmt

    dp, tp = layout
    stage, dp_rank, tp_rank = rank // (dp * tp), rank // tp % dp, rank % tp
    todo: dict[str, Any] = {}
    with fmt.Checkpoint(step_dir) as ckpt:
        for i, name in enumerate(sorted(ckpt.tensors)):
            if stage_of(name, ckpt.model_cfg, parts) != stage:
                continue
            entry = ckpt.tensors[name]
            sharded = tp > 1 and not ckpt._unsharded(name)
            if not sharded and i % tp != tp_rank:  # replicated over tp: one tp rank writes it
                continue
            spec = (tp_rank, tp) if sharded else (0, 1)
            numel = ckpt._shard_numel(name, entry, *spec)
            part = -(-numel // dp)
            start, stop = min(dp_rank * part, numel), min((dp_rank + 1) * part, numel)
            if start < stop:
                todo[f"{name}@{spec[0]}.{start}"] = (name, list(entry.shape), *spec, start, stop)
        tensors = {key: ckpt.read(n, r, t, a, b) for key, (n, _, r, t, a, b) in todo.items()}
    offsets = fmt.write_fragments(Path(out) / fmt.rank_file(rank), tensors)
    return [(*todo[key], offsets[key]) for key in todo]


def reshard(step_dir: Path, out: Path, target: ParallelConfig, dp: int, workers: int) -> int:
    """Write `step_dir` as a checkpoint of the `target` layout (tp, pp, its partition, the ZeRO stage to
    record) at `dp` data-parallel ranks into `out`; returns the ranks written."""
    from gptforge import checkpoint_format as fmt
    from gptforge.parallel.parallelize import pp_parts
    from gptforge.parallel.topology import validate_layout

    meta = fmt.read_meta(step_dir)
    if meta["version"] != fmt.FORMAT_VERSION:
        raise CheckpointError(f"{step_dir}: only checkpoints of the fragment format are re-sharded")
    with fmt.Checkpoint(step_dir) as ckpt:
        index = dict(ckpt.index)
    cfg = fmt.model_config(step_dir, meta)
    ranks = target.pp * dp * target.tp
    validate_layout(ranks, target, cfg)  # heads, the MLP and the stages must split (one error line if not)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    saved = meta["layout"]
    layout = {
        **saved,
        "world_size": ranks,
        "dp": dp,
        "tp": target.tp,
        "pp": target.pp,
        "pp_parts": pp_parts(cfg, target),
        "zero_stage": target.zero_stage,
    }
    with ProcessPoolExecutor(max_workers=max(1, min(workers, ranks))) as pool:
        parts = list(
            pool.map(
                _rank_part,
                [str(step_dir)] * ranks,
                range(ranks),
                [(dp, target.tp)] * ranks,
                [layout["pp_parts"]] * ranks,
                [str(tmp)] * ranks,
            )
        )
    tensors: dict[str, Any] = {}
    for rank, entries in enumerate(parts):
        for name, shape, tp_rank, t, start, stop, offset in entries:
            tensors.setdefault(name, {"shape": shape, "dtype": "float32", "fragments": []})[
                "fragments"
            ].append(
                {"file": fmt.rank_file(rank), "offset": offset, "shard": [tp_rank, t], "flat": [start, stop]}
            )
    index.update({"format": fmt.INDEX_FORMAT, "rng": {}, "tensors": dict(sorted(tensors.items()))})
    (tmp / fmt.INDEX_FILE).write_text(json.dumps(index) + "\n")
    (tmp / fmt.META_FILE).write_text(
        json.dumps({**meta, "layout": layout, "resharded_from": saved}, indent=2) + "\n"
    )
    tmp.rename(out)
    return ranks


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="run directory or checkpoint")
    parser.add_argument("--output", required=True, metavar="OUT", help="directory to write")
    parser.add_argument(
        "--to",
        choices=("gptforge", "hf", "checkpoint"),
        default="gptforge",
        help="output (default: gptforge)",
    )
    parser.add_argument("--tp", type=int, default=1, help="--to checkpoint: tensor-parallel degree")
    parser.add_argument("--pp", type=int, default=1, help="--to checkpoint: pipeline stages")
    parser.add_argument(
        "--pp-partition",
        default="uniform",
        help="--to checkpoint: stage boundaries, as parallel.pp_partition (default: uniform)",
    )
    parser.add_argument("--dp", type=int, default=1, help="--to checkpoint: data-parallel ranks")
    parser.add_argument("--zero-stage", type=int, default=None, help="--to checkpoint: ZeRO stage to record")
    parser.add_argument(
        "--workers", type=int, default=4, help="--to checkpoint: processes writing rank files"
    )
    parser.add_argument("--overwrite", action="store_true", help="write into an existing non-empty OUT")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    setup_logging()
    if min(args.tp, args.pp, args.dp, args.workers) < 1:
        raise GptforgeError(
            f"--tp, --pp, --dp and --workers must be >= 1 (got {args.tp}, {args.pp}, {args.dp}, {args.workers})"
        )

    out = output_dir(args.output, args.overwrite)
    if args.to == "checkpoint":
        from gptforge import checkpoint_format as fmt
        from gptforge.cli import quiet_deepspeed
        from gptforge.config import ParallelConfig

        quiet_deepspeed()  # the stage boundaries come from DeepSpeed's partitioner

        step_dir = fmt.resolve(args.checkpoint)
        zero = fmt.read_meta(step_dir)["layout"]["zero_stage"] if args.zero_stage is None else args.zero_stage
        target = ParallelConfig(tp=args.tp, pp=args.pp, zero_stage=zero, pp_partition=args.pp_partition)
        if out.exists():
            shutil.rmtree(out)
        ranks = reshard(step_dir, out, target, args.dp, args.workers)
        stages = f" x pp {args.pp}" if args.pp > 1 else ""
        log.info(
            "wrote %s (%d ranks: dp %d x tp %d%s) from %s",
            out,
            ranks,
            args.dp,
            args.tp,
            stages,
            describe_source(args.checkpoint),
        )
        return 0
    kind = "Hugging Face" if args.to == "hf" else "gptforge consolidated model"
    step_dir = _streamable(args.checkpoint)
    if step_dir is not None:
        cfg, params = stream_weights(step_dir, out, args.to)
    else:
        from gptforge.hf import save_hf
        from gptforge.weights import load_model, save_model_dir

        model, cfg, tok = load_model(args.checkpoint)
        if args.to == "hf":
            save_hf(model, cfg, out, tok.describe())
        else:
            save_model_dir(model, cfg, tok.describe(), out)
        params = sum(p.numel() for p in model.parameters())
    log.info(
        "wrote %s (%s, %s parameters, vocabulary %d) from %s",
        out,
        kind,
        f"{params:,}",
        cfg.vocab_size,
        describe_source(args.checkpoint),
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
