"""The build, wired: scan (per rank, on worker processes) -> global dedup (rank 0) -> tokenize (per rank) ->
write shards + manifest (rank 0).

    reader -> decode -> normalize -> [gutenberg] -> filters -> exact hash -> minhash      (scan, every rank)
    exact dedup -> near dedup -> val split -> removed.jsonl                              (rank 0)
    tokenize the kept documents                                                          (every rank)
    shard writer -> manifest.json                                                        (rank 0)

Scanning keeps each surviving document's normalised text in a per-rank temporary file, so only documents that
are kept get tokenized, and memory holds the dedup index (hashes, signatures, ids), never the corpus text.
Everything the output depends on is decided in global input order on rank 0, so the bytes do not depend on
the number of ranks or workers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.base import Doc, Step, StepStats, merge_stats
from data_pipeline.dedup_exact import ExactDedup, ExactHasher
from data_pipeline.dedup_minhash import MinHasher, NearDedup, minhash_permutations
from data_pipeline.distributed import Comm, WorkerPool, agree, get_comm, split_sources
from data_pipeline.filters import build_filters
from data_pipeline.normalize import GutenbergStripper, Normalizer
from data_pipeline.options import BuildOptions
from data_pipeline.output import REMOVED, TMP_DIR, prepare
from data_pipeline.readers import Decoder, Source, expand_inputs, read_source
from data_pipeline.stats import Progress, summary_table
from data_pipeline.tokenize import Tokenize
from data_pipeline.writer import SplitWriter, in_val, tail_cut
from gptforge.data.format import Manifest, token_dtype, write_manifest
from gptforge.errors import DataError, GptforgeError
from gptforge.tokenizer import get_tokenizer

log = logging.getLogger("data_pipeline")

BATCH_BYTES = 1 << 20  # records per worker task: large enough to amortise IPC, small enough to balance
BATCH_DOCS = 2000
TOKENIZE_BATCH_BYTES = 1 << 20


# ---------------------------------------------------------------------------------------------- scan (workers)

_STEPS: list[Step] = []


def worker_steps(opts: dict[str, Any]) -> list[Step]:
    """The per-document steps, in order, from the options a worker needs."""
    steps: list[Step] = [Decoder(opts["text_field"], opts["utf8_errors"], opts["on_error"]), Normalizer()]
    if opts["strip_gutenberg"]:
        steps.append(GutenbergStripper())
    steps += build_filters(opts["filters"])
    if opts["exact"]:
        steps.append(ExactHasher())
    if opts["minhash"]:
        steps.append(MinHasher(**opts["minhash"]))
    return steps


def init_worker(opts: dict[str, Any]) -> None:
    global _STEPS
    _STEPS = worker_steps(opts)


@dataclass
class BatchResult:
    """What a worker sends back for a batch: per document id/reason/bytes; per survivor hash, signature and
    text (UTF-8, empty for a document already known to be an exact duplicate)."""

    ids: list[str]
    reasons: list[str | None]
    nbytes: list[int]
    hashes: bytes
    signatures: np.ndarray | None
    text: bytes
    text_lens: list[int]
    stats: list[StepStats]


def process_batch(records: list[tuple]) -> BatchResult:
    ids, reasons, nbytes, hashes, sigs, texts, lens = [], [], [], [], [], [], []
    docs = []
    for rec in records:
        doc = Doc(*rec[:6])
        doc.id = rec[6] or ""
        docs.append(doc)
    alive = docs
    for step in _STEPS:
        alive = step.run(alive)
    for doc in docs:
        ids.append(doc.id)
        reasons.append(doc.removed)
        nbytes.append(doc.nbytes)
        if doc.removed is None:
            hashes.append(doc.hash)
            if doc.signature is not None:
                sigs.append(doc.signature)
            elif _STEPS and isinstance(_STEPS[-1], MinHasher):
                sigs.append(np.zeros(_STEPS[-1].num_perm, dtype=np.uint32))  # seen: never compared
            data = b"" if doc.cache.get("seen") else doc.cache.get("utf8") or doc.text.encode("utf-8")
            texts.append(data)
            lens.append(len(data))
    return BatchResult(
        ids,
        reasons,
        nbytes,
        b"".join(hashes),
        np.stack(sigs) if sigs else None,
        b"".join(texts),
        lens,
        [step.take_stats() for step in _STEPS],
    )


def _records(sources: list[Source], text_field: str, read: StepStats) -> Iterator[list[tuple]]:
    """Batches of raw records (plain tuples: cheap to pickle), timing the reading itself."""
    batch: list[tuple] = []
    size = 0
    for src in sources:
        it = read_source(src, text_field)
        while True:
            t0 = time.perf_counter()
            doc = next(it, None)
            read.seconds += time.perf_counter() - t0
            if doc is None:
                break
            read.docs_in += 1
            read.docs_out += 1
            read.bytes_in += doc.nbytes
            read.bytes_out += doc.nbytes
            batch.append((doc.source, doc.index, doc.line, doc.kind, doc.raw, doc.nbytes, doc.id or None))
            size += doc.nbytes
            if size >= BATCH_BYTES or len(batch) >= BATCH_DOCS:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


@dataclass
class RankScan:
    """One rank's scan: per document id/reason/bytes, per survivor hash, signature and text length."""

    ids: list[str] = field(default_factory=list)
    reasons: list[str | None] = field(default_factory=list)
    nbytes: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    signatures: list[np.ndarray] = field(default_factory=list)
    text_lens: list[int] = field(default_factory=list)
    stats: dict[str, StepStats] = field(default_factory=dict)

    def shared(self) -> tuple:
        """What rank 0 needs for the global decisions (no text)."""
        sigs = np.concatenate(self.signatures) if self.signatures else None
        return self.ids, self.reasons, self.nbytes, b"".join(self.hashes), sigs


def scan(opts: BuildOptions, sources: list[Source], tmp: Path, rank: int, show: bool, fork: bool) -> RankScan:
    worker_opts = {
        "text_field": opts.text_field,
        "utf8_errors": opts.utf8_errors,
        "on_error": opts.on_error,
        "strip_gutenberg": opts.strip_gutenberg,
        "filters": opts.filter_config,
        "exact": "exact" in opts.dedup,
        "minhash": {
            "num_perm": opts.num_perm,
            "ngram": opts.ngram,
            "seed": opts.seed,
            "permutations": minhash_permutations(opts.num_perm, opts.seed),
        }
        if "minhash" in opts.dedup
        else None,
    }
    out = RankScan()
    read = StepStats("read")
    total = (
        None
        if any(s.compressed or s.kind in ("hf", "parquet") for s in sources)
        else sum(s.size for s in sources)
    )
    with (
        WorkerPool(opts.workers, init_worker, (worker_opts,), fork=fork) as pool,
        Progress(show, "scan", total) as bar,
        open(tmp / f"text-{rank:05d}.bin", "wb") as text_file,
    ):
        for res in pool.imap(process_batch, _records(sources, opts.text_field, read)):
            out.ids += res.ids
            out.reasons += res.reasons
            out.nbytes += res.nbytes
            out.hashes.append(res.hashes)
            if res.signatures is not None:
                out.signatures.append(res.signatures)
            out.text_lens += res.text_lens
            text_file.write(res.text)
            merge_stats(out.stats, res.stats)
            bar.update(sum(res.nbytes), len(res.ids))
    out.stats = {"read": read, **out.stats}
    return out


# ---------------------------------------------------------------------------------------------- decide (rank 0)


@dataclass
class Decisions:
    keep: list[np.ndarray]  # per rank: bool per survivor of its scan
    val: np.ndarray  # per kept document (global order): in val by the hash split
    tail: bool  # val is the tail of the token stream instead
    kept: int
    removed: dict[str, int]
    stats: list[StepStats]


def decide(opts: BuildOptions, shared: list[tuple], out: Path) -> Decisions:
    """Exact then near dedup over all ranks' survivors in global order; removed.jsonl; the val split."""
    ids: list[str] = []
    reasons: list[str | None] = []
    nbytes: list[int] = []
    hashes: list[bytes] = []
    sigs = []
    rank_of: list[int] = []
    for rank, (r_ids, r_reasons, r_nbytes, r_hashes, r_sigs) in enumerate(shared):
        ids += r_ids
        reasons += r_reasons
        nbytes += r_nbytes
        hashes += [r_hashes[i : i + 16] for i in range(0, len(r_hashes), 16)]
        if r_sigs is not None:
            sigs.append(r_sigs)
        rank_of += [rank] * sum(r is None for r in r_reasons)
    if not ids:
        raise DataError(f"the corpus is empty: no documents in {', '.join(opts.inputs)}")
    survivors = [g for g, r in enumerate(reasons) if r is None]
    duplicate_of: dict[int, int] = {}
    stats: list[StepStats] = []
    alive = np.ones(len(survivors), dtype=bool)
    if "exact" in opts.dedup:
        exact = ExactDedup()
        for k, j in enumerate(exact.run(hashes, [nbytes[g] for g in survivors])):
            if j >= 0:
                g = survivors[k]
                reasons[g], duplicate_of[g], alive[k] = "exact_duplicate", survivors[j], False
        stats.append(exact.stats)
    if "minhash" in opts.dedup and alive.any():
        near = NearDedup(opts.minhash_threshold, opts.num_perm)
        cand = np.flatnonzero(alive)
        signatures = np.concatenate(sigs)[cand]
        for k, j in enumerate(near.run(signatures, [nbytes[survivors[c]] for c in cand])):
            if j >= 0:
                g = survivors[cand[k]]
                reasons[g], duplicate_of[g], alive[cand[k]] = "near_duplicate", survivors[cand[j]], False
        stats.append(near.stats)
    for g, d in duplicate_of.items():  # an exact copy of a near duplicate points at the group's kept one
        duplicate_of[g] = duplicate_of.get(d, d)
    _write_removed(out / REMOVED, ids, reasons, duplicate_of)

    removed: dict[str, int] = {}
    for r in reasons:
        if r is not None:
            removed[r] = removed.get(r, 0) + 1
    kept_ids = [ids[survivors[k]] for k in np.flatnonzero(alive)]
    if not kept_ids:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(removed.items(), key=lambda kv: -kv[1])[:5])
        raise DataError(
            f"all {len(ids)} documents were removed ({detail}); nothing to write. See {out / REMOVED}; "
            "relax the filters (--filters none or a YAML file) or the dedup (--dedup none)"
        )
    val = np.array([in_val(opts.seed, i, opts.val_fraction) for i in kept_ids], dtype=bool)
    tail = opts.val_fraction > 0 and (not val.any() or val.all())
    counts = np.bincount(rank_of, minlength=len(shared)) if rank_of else np.zeros(len(shared), dtype=np.int64)
    bounds = np.concatenate(([0], np.cumsum(counts)))
    keep = [alive[bounds[r] : bounds[r + 1]] for r in range(len(shared))]
    return Decisions(keep, val, tail, len(kept_ids), dict(sorted(removed.items())), stats)


def _write_removed(
    path: Path, ids: list[str], reasons: list[str | None], duplicate_of: dict[int, int]
) -> None:
    import json

    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for g, reason in enumerate(reasons):
            if reason is not None:
                dup = duplicate_of.get(g)
                f.write(
                    json.dumps(
                        {"id": ids[g], "reason": reason, "duplicate_of": None if dup is None else ids[dup]},
                        ensure_ascii=False,
                    )
                )
                f.write("\n")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------- tokenize


def tokenize(
    opts: BuildOptions, tmp: Path, rank: int, keep: np.ndarray, text_lens: list[int], dtype: str, show: bool
) -> tuple[np.ndarray, StepStats]:
    """Tokenize this rank's kept documents into `tokens-RANK.bin`; returns their token counts."""
    tok = Tokenize(opts.tokenizer, dtype, threads=opts.workers)
    offsets = np.concatenate(([0], np.cumsum(np.asarray(text_lens, dtype=np.int64))))
    kept = np.flatnonzero(keep)
    bar = Progress(show, "tokenize", int(sum(text_lens[i] for i in kept)))

    def batches() -> Iterator[tuple[list[str], int]]:
        with open(tmp / f"text-{rank:05d}.bin", "rb") as f:
            lo = 0
            while lo < len(kept):
                hi, size = lo, 0
                while hi < len(kept) and (size < TOKENIZE_BATCH_BYTES or hi == lo):
                    size += text_lens[kept[hi]]
                    hi += 1
                f.seek(offsets[kept[lo]])
                blob = f.read(int(offsets[kept[hi - 1] + 1] - offsets[kept[lo]]))
                base = offsets[kept[lo]]
                texts = [blob[offsets[i] - base : offsets[i + 1] - base].decode("utf-8") for i in kept[lo:hi]]
                yield texts, size
                lo = hi

    lengths = []
    done = 0
    with bar, open(tmp / f"tokens-{rank:05d}.bin", "wb") as f:
        for tokens, lens in tok.run(batches()):
            f.write(memoryview(tokens))
            lengths.append(lens)
            bar.update(tok.stats.bytes_in - done, len(lens))
            done = tok.stats.bytes_in
    return (np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)), tok.stats


# ---------------------------------------------------------------------------------------------- write (rank 0)


def write_output(
    opts: BuildOptions, out: Path, tmp: Path, dec: Decisions, lengths: list[np.ndarray], dtype: str, eot: int
) -> tuple[dict, StepStats]:
    writer = SplitWriter(out, dtype, opts.shard_tokens, eot)
    all_lengths = np.concatenate(lengths)
    cut = tail_cut(all_lengths, opts.val_fraction) if dec.tail else 0
    start, first = 0, 0
    for rank, lens in enumerate(lengths):
        path = tmp / f"tokens-{rank:05d}.bin"
        n = int(lens.sum())
        tokens = (
            np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r") if n else np.zeros(0, dtype)
        )
        if dec.tail:
            writer.write_part_tail(tokens, lens, start, cut)
        else:
            writer.write_part(tokens, lens, dec.val[first : first + len(lens)])
        start += n
        first += len(lens)
        del tokens
    splits = writer.close()
    if opts.val_fraction > 0 and (splits["val"].tokens == 0 or splits["train"].tokens == 0):
        raise DataError(
            f"the corpus is too small to split ({int(all_lengths.sum())} tokens): val or train would be "
            "empty; add text or pass --val-fraction 0"
        )
    return splits, writer.stats


# ---------------------------------------------------------------------------------------------- the build


@dataclass
class BuildResult:
    manifest: Manifest | None  # None: the output was already built with these options
    stats: dict[str, StepStats]
    seconds: float


def run_build(opts: BuildOptions, comm: Comm | None = None) -> BuildResult:
    comm = comm or get_comm()
    rank0 = comm.rank == 0
    t0 = time.perf_counter()
    out = Path(opts.output)
    tmp = out / TMP_DIR
    config = opts.resolved()
    fresh = comm.bcast(agree(comm, lambda: prepare(out, config, opts.overwrite) if rank0 else None))
    if not fresh:
        if rank0:
            log.info("%s is already built with these options: nothing to do", out)
        return BuildResult(None, {}, time.perf_counter() - t0)
    try:
        return _build(opts, comm, out, tmp, config, t0)
    except BaseException as exc:
        if rank0:
            _discard(out, tmp)
        if comm.size > 1 and not isinstance(exc, GptforgeError):
            log.exception("rank %d crashed; aborting all ranks", comm.rank)
            comm.abort(1)
        raise


def _discard(out: Path, tmp: Path) -> None:
    """A failed build leaves no manifest and no shards (removed.jsonl stays: it says why)."""
    import shutil

    for path in out.glob("*-[0-9][0-9][0-9][0-9][0-9].*"):
        path.unlink(missing_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)


def _build(opts: BuildOptions, comm: Comm, out: Path, tmp: Path, config: dict, t0: float) -> BuildResult:
    rank0 = comm.rank == 0
    show = rank0 and opts.progress
    sources = comm.bcast(agree(comm, lambda: expand_inputs(opts.inputs) if rank0 else None))
    mine = split_sources(sources, comm.size)[comm.rank] if sources else []
    log.info(
        "rank %d/%d: %d of %d input files, %.1f MB, %d workers",
        comm.rank,
        comm.size,
        len(mine),
        len(sources),
        sum(s.size for s in mine) / 1e6,
        opts.workers,
    )
    comm.barrier()  # rank 0 made the directory

    tokenizer = get_tokenizer(opts.tokenizer)
    dtype = token_dtype(tokenizer.vocab_size)

    phase = time.perf_counter()
    rank_scan = agree(comm, lambda: scan(opts, mine, tmp, comm.rank, show, fork=comm.size == 1))
    shared = comm.gather(rank_scan.shared())
    log.info("scanned %d documents in %.1f s", len(rank_scan.ids), time.perf_counter() - phase)
    phase = time.perf_counter()
    dec = agree(comm, lambda: decide(opts, shared, out) if rank0 else None)
    keep = comm.scatter(dec.keep if rank0 else None)
    if rank0:
        log.info("deduplicated in %.1f s: %d documents kept", time.perf_counter() - phase, dec.kept)
    phase = time.perf_counter()
    lengths, tok_stats = agree(
        comm, lambda: tokenize(opts, tmp, comm.rank, keep, rank_scan.text_lens, dtype, show)
    )
    log.info("tokenized %d documents in %.1f s", len(lengths), time.perf_counter() - phase)
    gathered = comm.gather((lengths, [*rank_scan.stats.values(), tok_stats]))
    result = agree(
        comm,
        lambda: (
            _finish(opts, out, tmp, dec, gathered, dtype, tokenizer, config, len(sources), t0)
            if rank0
            else None
        ),
    )
    comm.barrier()
    return result if rank0 else BuildResult(None, {}, time.perf_counter() - t0)


def _finish(
    opts: BuildOptions,
    out: Path,
    tmp: Path,
    dec: Decisions,
    gathered: list,
    dtype: str,
    tokenizer,
    config: dict,
    n_files: int,
    t0: float,
) -> BuildResult:
    import shutil

    lengths = [g[0] for g in gathered]
    splits, write_stats = write_output(opts, out, tmp, dec, lengths, dtype, tokenizer.eot_id)
    stats: dict[str, StepStats] = {}
    for _, rank_stats in gathered:
        merge_stats(stats, rank_stats[:-1])
    merge_stats(stats, dec.stats)
    merge_stats(stats, [g[1][-1] for g in gathered])
    merge_stats(stats, [write_stats])
    read = stats["read"]
    seconds = time.perf_counter() - t0
    manifest = Manifest(
        root=out,
        tokenizer=tokenizer.describe(),
        dtype=dtype,
        splits=splits,
        stats={
            "input_files": n_files,
            "input_documents": read.docs_in,
            "kept_documents": dec.kept,
            "removed": dec.removed,
            "input_bytes": read.bytes_in,
            "tokens": sum(s.tokens for s in splits.values()),
            "val_split": "tail" if dec.tail else "hash",
            "seconds": round(seconds, 3),
            "steps": {name: st.to_json() for name, st in stats.items()},
        },
        config=config,
    )
    shutil.rmtree(tmp, ignore_errors=True)
    write_manifest(manifest)
    if opts.progress:
        print(summary_table(stats, read.bytes_in, seconds), flush=True)
    return BuildResult(manifest, stats, seconds)
