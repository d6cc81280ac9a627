"""What flows through the pipeline (`Doc`) and what every step is (`Step`, with its own `StepStats`).

Steps are small classes with one job each, like datatrove's pipeline steps. A per-document step looks at
one `Doc` and either lets it through or marks it removed with a reason (one of `removed.jsonl`'s: `exact_duplicate`,
`near_duplicate`, `filter:<name>`, `empty`, `decode_error`, `parse_error`). Its counters travel with
batch results from worker processes and MPI ranks and are summed into the manifest's `stats`.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Record kinds a reader yields; the worker-side `Decoder` turns each into text.
RAW_TEXT = "text"  # bytes of a whole document (.txt)
RAW_JSON = "json"  # bytes of one JSON line
STR_TEXT = "str"  # already-decoded text (parquet, hf datasets)


@dataclass(slots=True)
class Doc:
    """One document on its way through the steps.

    `raw` is what the reader read (bytes or str); the decoder fills `text` and `id`. `cache` holds derived
    features (lines, words, word hashes) that several steps share, computed once per document.
    """

    source: str  # the input path as given (or the hf: spec)
    index: int  # 0-based record index within the source
    line: int  # 1-based line number for line-oriented inputs, else 0
    kind: str
    raw: bytes | str | None
    nbytes: int  # size of the raw record, for MB/s
    id: str = ""
    text: str = ""
    removed: str | None = None
    hash: bytes = b""
    signature: np.ndarray | None = None
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def default_id(self) -> str:
        return f"{self.source}:{self.index}"


@dataclass
class StepStats:
    """Counters of one step: documents and bytes in and out, removals by reason, seconds spent.

    Bytes are the documents' input-record bytes, so every step's MB/s is measured against the same corpus.
    """

    name: str
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    removed: Counter = field(default_factory=Counter)

    def merge(self, other: StepStats) -> None:
        self.docs_in += other.docs_in
        self.docs_out += other.docs_out
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.seconds += other.seconds
        self.removed.update(other.removed)

    def state(self) -> dict[str, Any]:
        """Everything, seconds too (a resumed build keeps its finished stages' counters)."""
        return {**vars(self), "removed": dict(self.removed)}

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> StepStats:
        return cls(**{**data, "removed": Counter(data["removed"])})

    def to_json(self) -> dict[str, Any]:
        """Deterministic counters only (no seconds): the manifest is the same for any worker count."""
        out: dict[str, Any] = {
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }
        if self.removed:
            out["removed"] = dict(sorted(self.removed.items()))
        return out


class Step:
    """A per-document step: `apply` returns a removal reason, or None to keep the document.

    Steps run batch by batch (`run`). A step whose work is numeric overrides `prepare` to compute its features
    for the whole batch in a few numpy passes (thousands of small documents would otherwise pay numpy's
    per-call overhead thousands of times); the per-document decision stays in `apply`.
    """

    name = "step"

    def __init__(self) -> None:
        self.stats = StepStats(self.name)

    def prepare(self, docs: list[Doc]) -> None:
        """Batch-wide feature computation before `apply` sees the documents one by one."""

    def apply(self, doc: Doc) -> str | None:
        raise NotImplementedError

    def run(self, docs: list[Doc]) -> list[Doc]:
        """The documents of `docs` that go on; the others are marked removed and counted."""
        st = self.stats
        t0 = time.perf_counter()
        self.prepare(docs)
        kept = []
        for doc in docs:
            st.docs_in += 1
            st.bytes_in += doc.nbytes
            reason = self.apply(doc)
            if reason is None:
                st.docs_out += 1
                st.bytes_out += doc.nbytes
                kept.append(doc)
            else:
                doc.removed = reason
                st.removed[reason] += 1
        st.seconds += time.perf_counter() - t0
        return kept

    def __call__(self, doc: Doc) -> bool:
        """Run on one document; whether it goes on."""
        return bool(self.run([doc]))

    def take_stats(self) -> StepStats:
        """The counters since the last call (a worker sends these deltas with each batch)."""
        st, self.stats = self.stats, StepStats(self.name)
        return st


def merge_stats(into: dict[str, StepStats], stats: list[StepStats]) -> None:
    """Sum step counters by name, keeping the order in which steps first appear."""
    for st in stats:
        if st.name in into:
            into[st.name].merge(st)
        else:
            into[st.name] = StepStats(st.name)
            into[st.name].merge(st)
