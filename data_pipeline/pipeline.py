"""The build: a list of stages run by every rank (context.py's executor), then the manifest (rank 0, last).

    scan:        read -> decode -> normalize -> [gutenberg] -> filters -> exact hash -> minhash   (--workers)
    exact_dedup: hashes to their owner ranks, first occurrence in global input order
    near_dedup:  band keys to their owner ranks, candidate pairs confirmed, connected components
    decide:      reasons, removed.jsonl (every rank its byte range), kept flags, val split
    tokenize:    the kept documents (--workers threads)
    write:       every rank the shards that start in its token stream
    manifest:    rank 0, from the ranks' shard descriptions and counters

No rank holds another rank's documents: the global stages exchange numpy buffers (distributed.py), spill to
disk past `--memory-per-rank` (spill.py), and decide on global indices (position in input order), so the
bytes of the output do not depend on the number of ranks or workers.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.base import StepStats, merge_stats
from data_pipeline.context import BuildContext, Stage, memory, run_stages
from data_pipeline.dedup_exact import ExactDedup
from data_pipeline.dedup_minhash import NearDedup, minhash_permutations
from data_pipeline.distributed import Comm, agree, get_comm, split_sources
from data_pipeline.options import BuildOptions
from data_pipeline.output import TOKENIZER_MODEL, discard, fingerprint, prepare, tmp_dir
from data_pipeline.readers import expand_inputs
from data_pipeline.removed import Decide
from data_pipeline.scan import Scan, worker_steps
from data_pipeline.stats import summary_table
from data_pipeline.writer import WriteShards
from gptforge.data.format import Manifest, file_sha256, token_dtype, write_manifest
from gptforge.errors import GptforgeError
from gptforge.tokenizer import get_tokenizer

log = logging.getLogger("data_pipeline")


@dataclass
class BuildResult:
    manifest: Manifest | None  # None: the output was already built with these options (or not rank 0)
    stats: dict[str, StepStats]
    seconds: float


def worker_options(opts: BuildOptions, dtype: str) -> dict:
    """What the scan's worker processes need (plain data: it is sent to spawned processes)."""
    return {
        "text_field": opts.text_field,
        "utf8_errors": opts.utf8_errors,
        "on_error": opts.on_error,
        "strip_gutenberg": opts.strip_gutenberg,
        "filters": opts.filter_config,
        "exact": "exact" in opts.dedup,
        "seen_limit": max(1024, opts.memory_per_rank // 1024 // opts.workers),
        "tokenizer": opts.tokenizer,
        "dtype": dtype,
        "minhash": {
            "num_perm": opts.num_perm,
            "ngram": opts.ngram,
            "seed": opts.seed,
            "permutations": minhash_permutations(opts.num_perm, opts.seed),
        }
        if "minhash" in opts.dedup
        else None,
    }


def stages(opts: BuildOptions, ctx: BuildContext, sources: list) -> list[Stage]:
    steps: list[Stage] = [Scan(worker_options(opts, ctx.values["dtype"]), sources, fork=ctx.comm.size == 1)]
    if "exact" in opts.dedup:
        steps.append(ExactDedup())
    if "minhash" in opts.dedup:
        steps.append(NearDedup(opts.minhash_threshold, opts.num_perm))
    return [*steps, Decide(), WriteShards()]


def run_build(opts: BuildOptions, comm: Comm | None = None) -> BuildResult:
    comm = comm or get_comm()
    rank0 = comm.rank == 0
    t0 = time.perf_counter()
    out = Path(opts.output)
    tmp = tmp_dir(out, opts.tmp_dir)
    config = opts.resolved()
    sources = comm.bcast(agree(comm, lambda: expand_inputs(opts.inputs) if rank0 else None))
    fresh = comm.bcast(
        agree(
            comm, lambda: prepare(out, tmp, config, fingerprint(sources), opts.overwrite) if rank0 else None
        )
    )
    if not fresh:
        if rank0:
            log.info("%s is already built with these options: nothing to do", out)
        return BuildResult(None, {}, time.perf_counter() - t0)
    try:
        return _build(opts, comm, out, tmp, config, sources, t0)
    except GptforgeError:
        if rank0:
            discard(out, tmp)
        raise
    except Exception:
        if comm.size > 1:  # the others may wait in a collective: end them (the files stay, to resume)
            log.exception("rank %d crashed; aborting all ranks", comm.rank)
            comm.abort(1)
        raise


def _build(
    opts: BuildOptions, comm: Comm, out: Path, tmp: Path, config: dict, sources: list, t0: float
) -> BuildResult:
    rank0 = comm.rank == 0
    mine = split_sources(sources, comm.size)[comm.rank] if sources else []
    log.info(
        "rank %d/%d (pid %d): %d of %d input files, %.1f MB, %d workers, %.0f MB memory",
        comm.rank,
        comm.size,
        os.getpid(),
        len(mine),
        len(sources),
        sum(s.size for s in mine) / 1e6,
        opts.workers,
        opts.memory_per_rank / 1e6,
    )
    comm.barrier()  # rank 0 made the directories
    tokenizer = get_tokenizer(opts.tokenizer)
    ctx = BuildContext(
        opts,
        comm,
        out,
        tmp,
        budget=opts.memory_per_rank // 2,
        show=rank0 and opts.progress,
        values={"dtype": token_dtype(tokenizer.vocab_size), "eot": tokenizer.eot_id},
    )
    plan = stages(opts, ctx, mine)
    before = memory()[1]
    run_stages(ctx, plan)
    scan = ctx.values["scan"]
    log.info(
        "rank %d: scanned and tokenized %d documents in %.1f s; %s",
        comm.rank,
        scan["docs"],
        ctx.seconds["scan"],
        ", ".join(f"{k} {v:.1f} s" for k, v in ctx.seconds.items() if k != "scan"),
    )
    log.info(
        "rank %d: peak RSS %.1f MB (per stage, MB above its start: %s), sent %.3f MB to other ranks, CPU s %s",
        comm.rank,
        max(before, *(peak for _, peak in ctx.rss.values())) / 1e6,
        " ".join(f"{k}={(peak - start) / 1e6:.1f}" for k, (start, peak) in ctx.rss.items()),
        comm.bytes_sent / 1e6,
        " ".join(f"{k}={v:.3f}" for k, v in ctx.cpu.items()),
    )
    gathered = comm.gather(list(ctx.stats.values()))
    if not rank0:
        return BuildResult(None, {}, time.perf_counter() - t0)
    order = ["read", *(s.name for s in worker_steps(worker_options(opts, ctx.values["dtype"])))]
    order += [st.name for s in plan[1:] for st in s.all_stats()]
    merged: dict[str, StepStats] = {}
    for rank_stats in gathered:
        merge_stats(merged, rank_stats)
    stats = {name: merged[name] for name in order if name in merged}
    log.info("deduplicated: %d documents kept", ctx.values["kept"])
    return _finish(opts, ctx, stats, tokenizer, config, len(sources), t0)


def _finish(
    opts, ctx: BuildContext, stats: dict, tokenizer, config: dict, n_files: int, t0: float
) -> BuildResult:
    """The manifest, last and atomically (rank 0): with a SentencePiece model copied beside the shards."""
    out = ctx.out
    described = tokenizer.describe()
    if described.get("name") == "sentencepiece":
        shutil.copyfile(tokenizer.path, out / TOKENIZER_MODEL)
        described = {**described, "model": TOKENIZER_MODEL, "sha256": file_sha256(out / TOKENIZER_MODEL)}
    read = stats["read"]
    splits = ctx.values["splits"]
    seconds = time.perf_counter() - t0
    manifest = Manifest(
        root=out,
        tokenizer=described,
        dtype=ctx.values["dtype"],
        splits=splits,
        stats={
            "input_files": n_files,
            "input_documents": read.docs_in,
            "kept_documents": ctx.values["kept"],
            "removed": ctx.values["removed"],
            "input_bytes": read.bytes_in,
            "tokens": sum(s.tokens for s in splits.values()),
            "val_split": "tail" if ctx.values["tail"] else "hash",
            "seconds": round(seconds, 3),
            "steps": {name: st.to_json() for name, st in stats.items()},
        },
        config=config,
    )
    shutil.rmtree(ctx.tmp, ignore_errors=True)
    write_manifest(manifest)
    if opts.progress:
        print(summary_table(stats, read.bytes_in, seconds), flush=True)
    return BuildResult(manifest, stats, seconds)
