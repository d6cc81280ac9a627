import shutil

import pytest
import tiktoken

from gptforge.errors import GptforgeError
from gptforge.tokenizer import (
    GPT2_BPE_SHA256,
    GPT2Tokenizer,
    SentencePieceTokenizer,
    get_tokenizer,
    train_sentencepiece,
)

HARD_CASES = [
    "",
    " ",
    "héllo wörld — naïve café, 東京, Ελληνικά, emoji 🧪🚀 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "   leading, trailing   \n\n\n\t\t  whitespace runs     ",
    "before<|endoftext|>after <|endoftext|><|endoftext|>",
    "line\r\nwindows\rold mac\n",
    "\x00 nul and \u200b zero-width and \ufeff bom",
    "1234567890 3.14159 1e-10 0x1F",
]


@pytest.fixture(scope="module")
def r50k(tmp_path_factory, shared_dir):
    """tiktoken's own r50k_base, loaded offline from its cache name (sha1 of the download URL)."""
    cache = tmp_path_factory.mktemp("tiktoken_cache")
    shutil.copy(
        shared_dir / "tokenizers" / "gpt2.tiktoken", cache / "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4"
    )
    import os

    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        enc = tiktoken.get_encoding("r50k_base")
    finally:
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR")
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old
    return enc


def test_gpt2_round_trip_and_ids_match_r50k(shared_dir, r50k):
    tok = get_tokenizer("gpt2")
    assert (tok.vocab_size, tok.eot_id, tok.name) == (50257, 50256, "gpt2")
    for path in sorted((shared_dir / "corpora").glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        ids = tok.encode(text)
        assert ids == r50k.encode_ordinary(text)
        assert tok.decode(ids) == text
    for text in HARD_CASES:
        ids = tok.encode(text)
        assert ids == r50k.encode_ordinary(text)
        assert tok.decode(ids) == text
        assert tok.encode(text, allow_special=True) == r50k.encode(text, allowed_special="all")


def test_endoftext_handling():
    tok = get_tokenizer("gpt2")
    assert tok.eot_id not in tok.encode("a<|endoftext|>b")
    assert tok.encode("a<|endoftext|>b", allow_special=True).count(tok.eot_id) == 1
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"


def test_batch_encode_equals_single(shared_dir):
    tok = get_tokenizer("gpt2")
    texts = (shared_dir / "corpora" / "grimm_tales.txt").read_text().split("\n\n")[:200] + HARD_CASES
    assert tok.encode_batch(texts, num_threads=2) == [tok.encode(t) for t in texts]


def test_corrupt_ranks_file_is_refused(tmp_path, shared_dir):
    bad = tmp_path / "gpt2.tiktoken"
    data = bytearray((shared_dir / "tokenizers" / "gpt2.tiktoken").read_bytes())
    data[100] ^= 1
    bad.write_bytes(bytes(data))
    with pytest.raises(GptforgeError, match=f"corrupt.*expected {GPT2_BPE_SHA256}"):
        GPT2Tokenizer(bad)


def test_unknown_tokenizer():
    with pytest.raises(GptforgeError, match="unknown tokenizer 'bpe50k'"):
        get_tokenizer("bpe50k")


def test_sentencepiece_train_load_round_trip(tmp_path, shared_dir):
    model = train_sentencepiece(
        [shared_dir / "corpora" / "tinyshakespeare.txt"], tmp_path / "sp", vocab_size=1000
    )
    tok = get_tokenizer(f"sentencepiece:{model}")
    assert tok.vocab_size == 1000 and tok.eot_id == 2
    text = (shared_dir / "corpora" / "grimm_tales.txt").read_text()[:50_000]
    for t in [text, *HARD_CASES]:
        assert tok.decode(tok.encode(t)) == t
    assert tok.encode("a<|endoftext|>b", allow_special=True).count(tok.eot_id) == 1
    assert tok.encode_batch(HARD_CASES, 2) == [tok.encode(t) for t in HARD_CASES]
    assert tok.describe()["sha256"]


def test_sentencepiece_bad_file(tmp_path):
    junk = tmp_path / "junk.model"
    junk.write_text("not a model")
    with pytest.raises(GptforgeError, match="not a SentencePiece model"):
        SentencePieceTokenizer(junk)
