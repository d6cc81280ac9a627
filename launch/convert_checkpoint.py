"""Convert a training checkpoint of any parallel layout, offline, on CPU: into one consolidated model, or
re-sharded for another layout.

    python launch/convert_checkpoint.py --checkpoint runs/gpt2-1.5b --output models/gpt2-1.5b
    python launch/convert_checkpoint.py --checkpoint runs/gpt2-1.5b/checkpoints/step_20000 --to hf --output hf/1.5b
    python launch/convert_checkpoint.py --checkpoint runs/gpt2-1.5b --to checkpoint --tp 2 --dp 8 \\
        --output runs/gpt2-1.5b-tp2/checkpoints/step_20000 [--workers 8]

`--checkpoint` takes a run directory (its latest checkpoint), its checkpoints/ directory or one step_<N>
directory, written under any (dp, tp, pp, ZeRO) layout; no GPU, process group or the original number of
ranks is needed.

`--to gptforge` (default) writes our consolidated model directory (model.safetensors + gptforge.json),
which generate, eval, export and `model.init_from` read: tensor by tensor (tp shards merged, vocabulary
padding dropped) into the output file, so the process holds about one tensor at a time. `--to hf` writes
a Hugging Face directory (what launch/export.py writes). `--to checkpoint` writes the checkpoint as `--tp`
x `--dp` ranks of that layout would have written it (each rank file its tp shard's dp-th flat range),
`--workers` processes writing rank files in parallel; a resume then reads each rank's part directly (the
RNG streams are seeded afresh, as for any layout change). Checkpoints of the old format (DeepSpeed's files
+ universal/) convert to models too.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from gptforge.cli import output_dir, run_cli, setup_logging
from gptforge.errors import CheckpointError, GptforgeError

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


def stream_model_dir(step_dir: Path, out: Path) -> tuple[Any, int]:
    """model.safetensors + gptforge.json from the fragments, one tensor in memory at a time (a tied LM
    head stored once, as `save_model_dir` does). Returns (model config, parameters)."""
    from gptforge import checkpoint_format as fmt
    from gptforge.weights import MODEL_META_FILE, WEIGHTS_FILE

    tmp = out.with_name(out.name + ".tmp")  # nothing half-written under OUT if a fragment is bad
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with fmt.Checkpoint(step_dir) as ckpt:
            names = [n for n in ckpt.names(fmt.WEIGHTS) if n not in ckpt.index.get("aliases", {})]
            shapes = {n: ckpt.tensors[fmt.WEIGHTS + n].shape for n in names}
            tensors = ((n, ckpt.tensor(fmt.WEIGHTS + n)) for n in names)
            fmt.write_safetensors(tmp / WEIGHTS_FILE, shapes, tensors)
            meta = {"model": ckpt.meta["model"], "tokenizer": ckpt.meta["tokenizer"]}
            (tmp / MODEL_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            cfg, params = ckpt.model_cfg, sum(ckpt.tensors[fmt.WEIGHTS + n].numel for n in names)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return cfg, params


# ---------------------------------------------------------------------------------------------- re-shard


def _rank_part(step_dir: str, rank: int, tp: int, dp: int, out: str) -> list[tuple[Any, ...]]:
    """Rank `rank` of tp x dp: its fragments of every tensor, read from the source and written to its
    file. Index entries (name, shape, tp_rank, tp, start, stop, offset) back."""
    from gptforge import checkpoint_format as fmt

    tp_rank, dp_rank = rank % tp, rank // tp
    todo: dict[str, Any] = {}
    with fmt.Checkpoint(step_dir) as ckpt:
        for i, name in enumerate(sorted(ckpt.tensors)):
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


def reshard(step_dir: Path, out: Path, tp: int, dp: int, zero_stage: int | None, workers: int) -> int:
    """Write `step_dir` as a checkpoint of tp x dp ranks into `out`; returns the ranks written."""
    from gptforge import checkpoint_format as fmt
    from gptforge.config import ParallelConfig
    from gptforge.parallel.topology import validate_layout

    meta = fmt.read_meta(step_dir)
    if meta["version"] != fmt.FORMAT_VERSION:
        raise CheckpointError(f"{step_dir}: only checkpoints of the fragment format are re-sharded")
    with fmt.Checkpoint(step_dir) as ckpt:
        index = dict(ckpt.index)
    if tp > 1:  # heads and the MLP must split over tp (one error line if not)
        validate_layout(tp * dp, ParallelConfig(tp=tp), fmt.model_config(step_dir, meta))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ranks = tp * dp
    with ProcessPoolExecutor(max_workers=max(1, min(workers, ranks))) as pool:
        parts = list(
            pool.map(
                _rank_part,
                [str(step_dir)] * ranks,
                range(ranks),
                [tp] * ranks,
                [dp] * ranks,
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
    saved = meta["layout"]
    layout = {
        **saved,
        "world_size": ranks,
        "dp": dp,
        "tp": tp,
        "pp": 1,
        "pp_parts": None,
        "zero_stage": saved["zero_stage"] if zero_stage is None else zero_stage,
    }
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
    if args.tp < 1 or args.dp < 1 or args.workers < 1:
        raise GptforgeError(
            f"--tp, --dp and --workers must be >= 1 (got {args.tp}, {args.dp}, {args.workers})"
        )

    out = output_dir(args.output, args.overwrite)
    if args.to == "checkpoint":
        from gptforge import checkpoint_format as fmt

        if out.exists():
            shutil.rmtree(out)
        ranks = reshard(fmt.resolve(args.checkpoint), out, args.tp, args.dp, args.zero_stage, args.workers)
        log.info(
            "wrote %s (%d ranks: dp %d x tp %d) from %s",
            out,
            ranks,
            args.dp,
            args.tp,
            describe_source(args.checkpoint),
        )
        return 0
    step_dir = _streamable(args.checkpoint) if args.to == "gptforge" else None
    if step_dir is not None:
        cfg, params = stream_model_dir(step_dir, out)
        kind = "gptforge consolidated model"
    else:
        from gptforge.hf import save_hf
        from gptforge.weights import load_model, save_model_dir

        model, cfg, tok = load_model(args.checkpoint)
        if args.to == "hf":
            save_hf(model, cfg, out, tok.describe())
        else:
            save_model_dir(model, cfg, tok.describe(), out)
        params = sum(p.numel() for p in model.parameters())
        kind = "Hugging Face" if args.to == "hf" else "gptforge consolidated model"
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
