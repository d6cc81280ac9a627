"""Tokenization: the throughput bottleneck, so batched and threaded (the tokenizers release the GIL).

Only documents that survived filtering and deduplication are tokenized. Batches are encoded on a thread pool
with a bounded window of batches in flight, and come back in input order as one token array per batch (each
document's ids followed by the end-of-text id) plus per-document lengths.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from data_pipeline.base import StepStats
from gptforge.tokenizer import Tokenizer, get_tokenizer


class Tokenize:
    """Encode batches of texts with `threads` threads; yields (tokens, lengths) per batch, in order."""

    name = "tokenize"

    def __init__(self, spec: str, dtype: str, threads: int = 1) -> None:
        self.tokenizer: Tokenizer = get_tokenizer(spec)
        self.eot = self.tokenizer.eot_id
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.threads = max(1, threads)
        self.stats = StepStats(self.name)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = self.tokenizer.encode_batch(texts, num_threads=1)
        flat: list[int] = []
        for doc in ids:
            flat.extend(doc)
            flat.append(self.eot)
        return np.array(flat, dtype=self.dtype), np.array([len(d) + 1 for d in ids], dtype=np.int64)

    def run(self, batches: Iterable[tuple[list[str], int]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """`batches` yields (texts, their input bytes); results keep that order."""
        st = self.stats
        t0 = time.perf_counter()
        with ThreadPoolExecutor(self.threads) as pool:
            window: deque[tuple[Future, int, int]] = deque()
            for texts, nbytes in batches:
                window.append((pool.submit(self.encode, texts), len(texts), nbytes))
                while len(window) > 4 * self.threads:
                    yield self._done(window.popleft())
            while window:
                yield self._done(window.popleft())
        st.seconds += time.perf_counter() - t0

    def _done(self, item: tuple[Future, int, int]) -> tuple[np.ndarray, np.ndarray]:
        fut, ndocs, nbytes = item
        tokens, lengths = fut.result()
        st = self.stats
        st.docs_in += ndocs
        st.docs_out += ndocs
        st.bytes_in += nbytes
        st.bytes_out += nbytes
        return tokens, lengths
