"""Tokenization, in the scan's worker processes (the tokenizers are the throughput bottleneck, so they run
wherever the scan runs, `--workers` at a time): each document's ids followed by the end-of-text id, back to
back in one array per batch. (Not `tokenize.py`: that name would shadow the standard library's module for a
script run from this directory.)
"""

from __future__ import annotations

import numpy as np

from gptforge.tokenizer import Tokenizer


def encode_documents(
    tokenizer: Tokenizer, dtype: np.dtype, texts: list[str | None]
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, tokens per document): each text's ids and end-of-text; None (a document not worth tokenizing)
    gets no tokens."""
    todo = [t for t in texts if t is not None]
    ids = iter(tokenizer.encode_batch(todo, num_threads=1) if todo else [])
    lengths = np.zeros(len(texts), dtype=np.int64)
    parts = []
    for i, text in enumerate(texts):
        if text is not None:
            doc = next(ids)
            parts.append(np.array(doc, dtype=dtype))
            parts.append(np.array([tokenizer.eot_id], dtype=dtype))
            lengths[i] = len(doc) + 1
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)), lengths
