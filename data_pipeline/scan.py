"""The scan: read -> decode -> normalize -> [gutenberg] -> filters -> exact hash -> minhash -> tokens, on
`--workers` processes of every rank, streamed into the rank's files (never held in memory).

Per document: id, removal reason, input bytes. Per survivor of the filters: its local index, 128-bit hash,
MinHash signature, text bytes and tokens (tokenized here, in one pass over the text, so that the later stages
never read text again and a resumed build redoes little; the shards take the tokens of the documents that
the dedup keeps). Every file is append-only; every few MB the
rank commits (flushes and records the files' sizes and the batches done in `scan-RANK.json`), so a killed scan
resumes from its last commit: the files are cut back to the committed sizes and the committed batches skipped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.base import Doc, Step, StepStats, merge_stats
from data_pipeline.context import BuildContext, Stage, rank_file
from data_pipeline.dedup_exact import ExactHasher
from data_pipeline.dedup_minhash import MinHasher
from data_pipeline.distributed import WorkerPool, agree
from data_pipeline.filters import build_filters
from data_pipeline.normalize import GutenbergStripper, Normalizer
from data_pipeline.readers import Decoder, Source, read_source
from data_pipeline.spill import Appender
from data_pipeline.stats import Progress
from data_pipeline.tokenization import encode_documents
from gptforge.errors import DataError
from gptforge.tokenizer import Tokenizer, get_tokenizer

log = logging.getLogger("data_pipeline")
BATCH_BYTES = 1 << 20  # records per worker task: large enough to amortise IPC, small enough to balance
BATCH_DOCS = 2000
COMMIT_BYTES = 2 << 20  # input bytes between commits: what a killed scan redoes at most
# What the scan writes per rank (rank_file(tmp, kind, rank)): kind -> its records.
FILES = {
    "ids": "per document: its id, UTF-8, back to back",
    "idend": "per document: <i8 end offset of its id",
    "reason": "per document: <i2 0 (survivor) or k (reasons[k - 1])",
    "nbytes": "per document: <i8 input bytes",
    "surv": "per survivor: <i8 its local document index",
    "hash": "per survivor: 16-byte BLAKE2b (exact dedup only)",
    "sig": "per survivor: num_perm <u4 MinHash values (near dedup only)",
    "textlen": "per survivor: <i8 bytes of its normalised UTF-8 text",
    "tokens": "per survivor: its tokens and end-of-text (none for a known exact duplicate)",
    "tokend": "per survivor: <i8 end offset of its tokens",
}


# ---------------------------------------------------------------------------------------------- workers

_STEPS: list[Step] = []
_TOKENIZER: tuple[Tokenizer, np.dtype] | None = None


def worker_steps(opts: dict[str, Any]) -> list[Step]:
    """The per-document steps, in order, from the options a worker needs."""
    steps: list[Step] = [Decoder(opts["text_field"], opts["utf8_errors"], opts["on_error"]), Normalizer()]
    if opts["strip_gutenberg"]:
        steps.append(GutenbergStripper())
    steps += build_filters(opts["filters"])
    if opts["exact"]:
        steps.append(ExactHasher(opts["seen_limit"]))
    if opts["minhash"]:
        steps.append(MinHasher(**opts["minhash"]))
    return steps


def init_worker(opts: dict[str, Any]) -> None:
    global _STEPS, _TOKENIZER
    _STEPS = worker_steps(opts)
    _TOKENIZER = get_tokenizer(opts["tokenizer"]), np.dtype(opts["dtype"]).newbyteorder("<")


@dataclass
class BatchResult:
    """What a worker sends back for a batch: per document id/reason/bytes; per survivor hash, signature, text
    bytes and tokens (none for a document already known to be an exact duplicate)."""

    ids: list[str]
    reasons: list[str | None]
    nbytes: list[int]
    hashes: bytes
    signatures: np.ndarray | None
    text_lens: list[int]
    tokens: np.ndarray
    token_lens: np.ndarray
    tokenize_seconds: float
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
            texts.append(None if doc.cache.get("seen") else doc.text)
            lens.append(len(doc.cache.get("utf8") or doc.text.encode("utf-8")))
    t0 = time.perf_counter()
    tokens, token_lens = encode_documents(*_TOKENIZER, texts)
    return BatchResult(
        ids,
        reasons,
        nbytes,
        b"".join(hashes),
        np.stack(sigs) if sigs else None,
        lens,
        tokens,
        token_lens,
        time.perf_counter() - t0,
        [step.take_stats() for step in _STEPS],
    )


def _records(sources: list[Source], text_field: str, read: StepStats, skip: int) -> Iterator[list[tuple]]:
    """Batches of raw records (plain tuples: cheap to pickle), timing the reading itself. The first `skip`
    batches (committed by an earlier, killed scan) are read but not yielded or counted."""
    batch: list[tuple] = []
    size = 0
    done = 0
    for src in sources:
        it = read_source(src, text_field)
        while True:
            t0 = time.perf_counter()
            doc = next(it, None)
            if done >= skip:
                read.seconds += time.perf_counter() - t0
            if doc is None:
                break
            batch.append((doc.source, doc.index, doc.line, doc.kind, doc.raw, doc.nbytes, doc.id or None))
            size += doc.nbytes
            if size >= BATCH_BYTES or len(batch) >= BATCH_DOCS:
                if done >= skip:
                    _count(read, batch)
                    yield batch
                done += 1
                batch, size = [], 0
    if batch and done >= skip:
        _count(read, batch)
        yield batch


def _count(read: StepStats, batch: list[tuple]) -> None:
    nbytes = sum(r[5] for r in batch)
    read.docs_in += len(batch)
    read.docs_out += len(batch)
    read.bytes_in += nbytes
    read.bytes_out += nbytes


# ---------------------------------------------------------------------------------------------- the rank's scan


@dataclass
class RankScan:
    """What one rank's scan left on disk, and its counters."""

    docs: int = 0
    survivors: int = 0
    batches: int = 0
    reasons: list[str] = field(default_factory=list)
    tokenize_seconds: float = 0.0
    sizes: dict[str, int] = field(default_factory=dict)
    stats: dict[str, StepStats] = field(default_factory=dict)
    done: bool = False

    def to_json(self) -> dict[str, Any]:
        return {**vars(self), "stats": [st.state() for st in self.stats.values()]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RankScan:
        return cls(**{**data, "stats": {r["name"]: StepStats.from_state(r) for r in data["stats"]}})


def load_scan(tmp: Path, rank: int) -> RankScan | None:
    path = tmp / f"scan-{rank:05d}.json"
    try:
        return RankScan.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None


class ScanFiles:
    """One rank's scan files, appended to a batch at a time; id and token end offsets run on from a resumed
    scan's committed sizes."""

    def __init__(self, tmp: Path, rank: int, state: RankScan, worker_opts: dict[str, Any]) -> None:
        kinds = [
            k
            for k in FILES
            if (k != "hash" or worker_opts["exact"]) and (k != "sig" or worker_opts["minhash"])
        ]
        self.files = {k: Appender(rank_file(tmp, k, rank), state.sizes.get(k, 0)) for k in kinds}
        self.reason_code = {r: i + 1 for i, r in enumerate(state.reasons)}
        self.id_end = state.sizes.get("ids", 0)
        self.token_end = state.sizes.get("tokens", 0) // np.dtype(worker_opts["dtype"]).itemsize

    def append(self, res: BatchResult, state: RankScan) -> None:
        """Write a batch's rows to every file and count it in `state`."""
        files = self.files
        enc = [i.encode("utf-8") for i in res.ids]
        files["ids"].write(b"".join(enc))
        ends = self.id_end + np.cumsum([len(e) for e in enc], dtype=np.int64)
        self.id_end = int(ends[-1]) if len(ends) else self.id_end
        files["idend"].write(ends.astype("<i8"))
        codes = np.array(
            [
                0 if r is None else self.reason_code.setdefault(r, len(self.reason_code) + 1)
                for r in res.reasons
            ],
            dtype="<i2",
        )
        state.reasons = list(self.reason_code)
        files["reason"].write(codes)
        files["nbytes"].write(np.array(res.nbytes, dtype="<i8"))
        files["surv"].write((state.docs + np.flatnonzero(codes == 0)).astype("<i8"))
        if "hash" in files:
            files["hash"].write(res.hashes)
        if "sig" in files and res.signatures is not None:
            files["sig"].write(res.signatures.astype("<u4"))
        files["textlen"].write(np.array(res.text_lens, dtype="<i8"))
        files["tokens"].write(res.tokens)
        tends = self.token_end + np.cumsum(res.token_lens)
        self.token_end = int(tends[-1]) if len(tends) else self.token_end
        files["tokend"].write(tends.astype("<i8"))
        state.tokenize_seconds += res.tokenize_seconds
        state.docs += len(res.ids)
        state.survivors += int(np.count_nonzero(codes == 0))
        state.batches += 1

    def commit(self, tmp: Path, rank: int, state: RankScan) -> None:
        """Sync the files, then record their sizes with the state: a resumed scan truncates to these."""
        state.sizes = {k: f.size for k, f in self.files.items()}
        for f in self.files.values():
            f.sync()
        path = tmp / f"scan-{rank:05d}.json"
        part = path.with_suffix(".json.tmp")
        part.write_text(json.dumps(state.to_json()))
        os.replace(part, path)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def scan(
    worker_opts: dict[str, Any],
    sources: list[Source],
    text_field: str,
    workers: int,
    tmp: Path,
    rank: int,
    show: bool,
    fork: bool,
) -> RankScan:
    """Scan this rank's sources into its files, resuming a committed partial scan."""
    state = load_scan(tmp, rank) or RankScan()
    if state.done:
        return state
    if state.batches:
        log.info(
            "rank %d: resuming the scan after %d committed batches (%d documents)",
            rank,
            state.batches,
            state.docs,
        )
    out = ScanFiles(tmp, rank, state, worker_opts)
    read = state.stats.pop("read", StepStats("read"))
    stats: dict[str, StepStats] = {"read": read, **state.stats}
    total = (
        None
        if any(s.compressed or s.kind in ("hf", "parquet") for s in sources)
        else sum(s.size for s in sources)
    )
    since_commit = 0
    try:
        with (
            WorkerPool(workers, init_worker, (worker_opts,), fork=fork) as pool,
            Progress(show, "scan", total) as bar,
        ):
            for res in pool.imap(process_batch, _records(sources, text_field, read, state.batches)):
                out.append(res, state)
                merge_stats(stats, res.stats)
                state.stats = stats
                batch_bytes = sum(res.nbytes)
                bar.update(batch_bytes, len(res.ids))
                since_commit += batch_bytes
                if since_commit >= COMMIT_BYTES:
                    out.commit(tmp, rank, state)
                    since_commit = 0
        state.stats = stats
        state.done = True
        out.commit(tmp, rank, state)
    finally:
        out.close()
    return state


class Scan(Stage):
    """Every rank scans its sources; then the ranks' document and survivor counts give the global index
    bounds (exclusive prefix sums over ranks)."""

    name = "scan"
    values = ("scan", "doc_bounds", "survivor_bounds")

    def __init__(self, worker_opts: dict[str, Any], sources: list[Source], fork: bool) -> None:
        super().__init__()
        self.stats = None
        self.worker_opts, self.sources, self.fork = worker_opts, sources, fork
        self._stats: list[StepStats] = []

    def all_stats(self) -> list[StepStats]:
        return self._stats

    def run(self, ctx: BuildContext) -> None:
        opts = ctx.opts
        state = agree(
            ctx.comm,
            lambda: scan(
                self.worker_opts,
                self.sources,
                opts.text_field,
                opts.workers,
                ctx.tmp,
                ctx.rank,
                ctx.show,
                self.fork,
            ),
        )
        self._stats = list(state.stats.values())
        counts = np.array(ctx.comm.allgather((state.docs, state.survivors)), dtype=np.int64).reshape(-1, 2)
        ctx.values["doc_bounds"] = [0, *np.cumsum(counts[:, 0]).tolist()]
        ctx.values["survivor_bounds"] = [0, *np.cumsum(counts[:, 1]).tolist()]
        ctx.values["scan"] = {
            "docs": state.docs,
            "survivors": state.survivors,
            "reasons": state.reasons,
            "tokenize_seconds": state.tokenize_seconds,
        }
        if not counts[:, 0].sum():
            raise DataError(f"the corpus is empty: no documents in {', '.join(opts.inputs)}")
