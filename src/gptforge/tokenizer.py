"""One tokenizer interface over GPT-2 BPE (tiktoken) and SentencePiece.

GPT-2's BPE ranks ship inside the package (`assets/gpt2.tiktoken`, sha256-checked at load), so tokenizing
never touches the network. `encode` treats `<|endoftext|>` in the text as ordinary text, as OpenAI's
original GPT-2 encoder and tiktoken's `encode_ordinary` do (a corpus cannot smuggle in document breaks);
`encode(text, allow_special=True)` maps it to the end-of-text id, as Hugging Face's GPT-2 tokenizer does.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from gptforge.errors import GptforgeError

GPT2_BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
ENDOFTEXT = "<|endoftext|>"
# r50k_base / gpt2 pre-tokenization pattern (tiktoken_ext.openai_public.r50k_pat_str).
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class Tokenizer(ABC):
    """What the pipeline, trainer and generator need from a tokenizer."""

    name: str
    vocab_size: int
    eot_id: int

    @abstractmethod
    def encode(self, text: str, allow_special: bool = False) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        """Encode many texts; the underlying encoders release the GIL, so threads run in parallel."""
        if num_threads <= 1 or len(texts) < 2:
            return [self.encode(t) for t in texts]
        with ThreadPoolExecutor(num_threads) as pool:
            return list(pool.map(self.encode, texts))

    def describe(self) -> dict[str, Any]:
        """What a data manifest records, so a trainer can refuse data made with another tokenizer."""
        return {"name": self.name, "vocab_size": self.vocab_size, "eot_id": self.eot_id}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class GPT2Tokenizer(Tokenizer):
    """GPT-2 byte-level BPE through tiktoken, ids identical to tiktoken's `r50k_base`."""

    name = "gpt2"
    vocab_size = 50257
    eot_id = 50256

    def __init__(self, ranks_path: str | Path | None = None) -> None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        path = (
            Path(ranks_path)
            if ranks_path
            else Path(str(resources.files("gptforge") / "assets" / "gpt2.tiktoken"))
        )
        if not path.is_file():
            raise GptforgeError(
                f"GPT-2 BPE ranks file missing: {path} (reinstall gptforge: pip install -e .)"
            )
        digest = _sha256(path)
        if digest != GPT2_BPE_SHA256:
            raise GptforgeError(
                f"GPT-2 BPE ranks file {path} is corrupt: sha256 {digest}, expected {GPT2_BPE_SHA256} "
                "(reinstall gptforge)"
            )
        self._enc = tiktoken.Encoding(
            name="gpt2",
            pat_str=R50K_PATTERN,
            mergeable_ranks=load_tiktoken_bpe(str(path), expected_hash=GPT2_BPE_SHA256),
            special_tokens={ENDOFTEXT: self.eot_id},
            explicit_n_vocab=self.vocab_size,
        )

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if allow_special:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode_bytes(list(ids)).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self._enc.decode_bytes(list(ids))


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file; its EOS piece plays the role of end-of-text."""

    def __init__(self, model_path: str | Path) -> None:
        import sentencepiece as spm

        path = Path(model_path)
        if not path.is_file():
            raise GptforgeError(f"SentencePiece model not found: {path} (train one with train_sentencepiece)")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as exc:
            raise GptforgeError(f"{path}: not a SentencePiece model ({exc})") from None
        if self._sp.eos_id() < 0:
            raise GptforgeError(f"{path}: the SentencePiece model has no EOS piece; retrain with eos_id >= 0")
        self.path = path
        self.name = f"sentencepiece:{path}"
        self.vocab_size = self._sp.get_piece_size()
        self.eot_id = self._sp.eos_id()
        self.model_sha256 = _sha256(path)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if allow_special and ENDOFTEXT in text:
            parts = text.split(ENDOFTEXT)
            out: list[int] = []
            for i, part in enumerate(parts):
                if i:
                    out.append(self.eot_id)
                out.extend(self._sp.encode(part))
            return out
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "name": "sentencepiece",
            "model": str(self.path),
            "sha256": self.model_sha256,
        }


def train_sentencepiece(
    files: Sequence[str | Path],
    model_prefix: str | Path,
    vocab_size: int = 8000,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
    num_threads: int = 2,
) -> Path:
    """Train a SentencePiece model that round-trips text exactly (byte fallback, no normalisation, no
    dummy prefix, whitespace kept) and has an EOS piece for end-of-text. Returns the `.model` path."""
    import sentencepiece as spm

    for f in files:
        if not Path(f).is_file():
            raise GptforgeError(f"SentencePiece training file not found: {f}")
    spm.SentencePieceTrainer.train(
        input=",".join(str(f) for f in files),
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n", "\t"],
        pad_id=-1,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        num_threads=num_threads,
        minloglevel=2,
    )
    return Path(f"{model_prefix}.model")


@lru_cache(maxsize=8)
def get_tokenizer(spec: str = "gpt2") -> Tokenizer:
    """`gpt2` or `sentencepiece:PATH.model`."""
    if spec in ("gpt2", "r50k_base"):
        return GPT2Tokenizer()
    if spec.startswith("sentencepiece:"):
        return SentencePieceTokenizer(spec.split(":", 1)[1])
    raise GptforgeError(f"unknown tokenizer '{spec}': use gpt2 or sentencepiece:PATH.model")


def tokenizer_from_manifest(info: dict[str, Any], root: str | Path | None = None) -> Tokenizer:
    """The tokenizer a data manifest was built with (checking a SentencePiece model's hash). A relative model
    path (a build copies its model in as `tokenizer.model`) is resolved against the build directory `root`, so
    a build directory can move and be read from any working directory."""
    if info.get("name") == "sentencepiece":
        model = Path(info["model"])
        tok = SentencePieceTokenizer(model if model.is_absolute() or root is None else Path(root) / model)
        if info.get("sha256") and tok.model_sha256 != info["sha256"]:
            raise GptforgeError(
                f"SentencePiece model {info['model']} changed since the data was built (sha256 differs)"
            )
        return tok
    return get_tokenizer(info.get("name", "gpt2"))


# ---------------------------------------------------------------------------------------------- HF files
# GPT-2's vocab.json and merges.txt, as Hugging Face's GPT2Tokenizer reads them, derived offline from the
# shipped ranks file (an exported model directory then loads with AutoTokenizer, no download).


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (as in OpenAI's encoder.py)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-pair-encode `token` using only merges ranked below `max_rank`: for a vocabulary token this
    leaves exactly the two halves whose merge created it."""
    parts = [bytes([b]) for b in token]
    while True:
        best: tuple[int, int] | None = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[1]):
                best = (i, rank)
        if best is None:
            return parts
        i = best[0]
        parts = [*parts[:i], parts[i] + parts[i + 1], *parts[i + 2 :]]


@lru_cache(maxsize=1)
def _gpt2_ranks() -> dict[bytes, int]:
    from tiktoken.load import load_tiktoken_bpe

    return load_tiktoken_bpe(
        str(resources.files("gptforge") / "assets" / "gpt2.tiktoken"), expected_hash=GPT2_BPE_SHA256
    )


def _as_text(token: bytes) -> str:
    to_text = _byte_to_unicode()
    return "".join(to_text[b] for b in token)


def gpt2_vocab() -> dict[str, int]:
    """vocab.json of GPT-2, recovered from the tiktoken ranks file we ship."""
    vocab = {_as_text(token): rank for token, rank in _gpt2_ranks().items()}
    vocab[ENDOFTEXT] = GPT2Tokenizer.eot_id
    return vocab


def gpt2_merges() -> list[str]:
    """merges.txt of GPT-2: each multi-byte token in rank order, as the two parts its merge joined."""
    ranks = _gpt2_ranks()
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = _bpe_split(ranks, token, rank)
            merges.append(f"{_as_text(left)} {_as_text(right)}")
    return merges


def write_gpt2_tokenizer_files(out: Path, context_length: int) -> None:
    """vocab.json, merges.txt and tokenizer_config.json of GPT-2's tokenizer into directory `out`."""
    (out / "vocab.json").write_text(json.dumps(gpt2_vocab(), ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(gpt2_merges()) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "GPT2Tokenizer",
                "model_max_length": context_length,
                "bos_token": ENDOFTEXT,
                "eos_token": ENDOFTEXT,
                "unk_token": ENDOFTEXT,
                "add_prefix_space": False,
                "add_bos_token": False,
            },
            indent=2,
        )
        + "\n"
    )
