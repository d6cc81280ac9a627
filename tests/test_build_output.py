"""Corpus pipeline output (the format of the README's "Corpus pipeline"): CLI, manifest, Megatron-readable
shards holding exactly the kept documents, val split."""

from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from build_helpers import (
    CORPORA,
    chunk_documents,
    megatron_documents,
    run_build,
    shared_text,
    write_jsonl,
)

from data_pipeline import BuildOptions
from data_pipeline import run_build as build
from data_pipeline.output import clean
from data_pipeline.writer import (
    ShardFile,
    grid_cells,
    in_val,
    name_width,
    number_shards,
    shard_name,
    tail_cut,
)
from gptforge.data.format import file_sha256, open_shard, read_index, read_manifest, verify_shard
from gptforge.tokenizer import get_tokenizer, tokenizer_from_manifest

OPTIONS = [
    "--input",
    "--output",
    "--tokenizer",
    "--text-field",
    "--dedup",
    "--minhash-threshold",
    "--num-perm",
    "--ngram",
    "--filters",
    "--strip-gutenberg",
    "--utf8-errors",
    "--val-fraction",
    "--shard-tokens",
    "--workers",
    "--seed",
    "--on-error",
    "--overwrite",
    "--no-progress",
    "--memory-per-rank",
    "--tmp-dir",
]


def opts(inputs: list, out: Path, **kw) -> BuildOptions:
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return BuildOptions(inputs=[str(i) for i in inputs], output=str(out), **kw)


def split_docs(out: Path, split: str) -> list[np.ndarray]:
    manifest = read_manifest(out)
    docs = []
    for shard in manifest.splits[split].shards:
        docs += megatron_documents(out / shard.bin[: -len(".bin")])
    return docs


@pytest.fixture(scope="module")
def demo(tmp_path_factory, shared_dir) -> tuple[Path, Path]:
    """The demo corpus (gzipped tinyshakespeare) and Grimm's tales, default options, through the CLI."""
    tmp = tmp_path_factory.mktemp("demo")
    gz = tmp / "tinyshakespeare.txt.gz"
    gz.write_bytes(gzip.compress((CORPORA / "tinyshakespeare.txt").read_bytes()))
    grimm = tmp / "grimm_tales.txt"
    shutil.copy(CORPORA / "grimm_tales.txt", grimm)
    out = tmp / "out"
    proc = run_build("--input", str(gz), str(grimm), "--output", str(out), "--workers", "1")
    assert "end to end" in proc.stdout  # the summary table
    return tmp, out


def test_help_documents_every_option_with_default():
    text = run_build("--help").stdout
    for option in OPTIONS:
        assert option in text, option
    for default in (
        "default: gpt2",
        "default: exact,minhash",
        "default: 0.8",
        "default: 128",
        "default: 5",
        "default: 0.01",
        "default: 1234",
        "default: fail",
        "default: 100000000",
    ):
        assert default in text, default


def test_manifest_fields_exactly_as_contract(demo):
    _, out = demo
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "gptforge-tokens" and m["version"] == 1
    assert m["tokenizer"] == {"name": "gpt2", "vocab_size": 50257, "eot_id": 50256}
    assert m["dtype"] == "uint16"
    assert set(m["splits"]) == {"train", "val"}
    for split in m["splits"].values():
        assert set(split) == {"tokens", "documents", "shards"}
        for shard in split["shards"]:
            assert set(shard) == {"bin", "idx", "tokens", "documents", "sha256"}
            assert not Path(shard["bin"]).is_absolute()
        assert split["tokens"] == sum(s["tokens"] for s in split["shards"])
    st = m["stats"]
    assert st["input_documents"] == 2 and st["kept_documents"] == 2 and st["removed"] == {}
    assert (
        st["input_bytes"]
        == (CORPORA / "tinyshakespeare.txt").stat().st_size + (CORPORA / "grimm_tales.txt").stat().st_size
    )
    assert st["seconds"] > 0
    cfg = m["config"]
    assert cfg["dedup"] == ["exact", "minhash"] and cfg["minhash"]["threshold"] == 0.8
    assert cfg["minhash"]["num_perm"] == 128 and cfg["minhash"]["ngram"] == 5
    assert cfg["tokenizer"] == "gpt2" and cfg["val_fraction"] == 0.01 and "workers" not in cfg
    assert (out / "removed.jsonl").read_text() == ""
    assert not (out / ".build").exists()
    # the trainer's reading path accepts it
    manifest = read_manifest(out)
    for split in manifest.splits.values():
        for shard in split.shards:
            verify_shard(out, shard)
            assert len(open_shard(out, shard, manifest.dtype)) == shard.tokens
            assert read_index(out / shard.idx).dtype == "uint16"


def test_shards_decode_to_exactly_the_kept_documents_and_tail_val(demo):
    """One big document per file: val is the tail of the token stream (the last document split in two)."""
    _, out = demo
    tok = get_tokenizer("gpt2")
    shakespeare = shared_text("tinyshakespeare.txt")
    grimm = shared_text("grimm_tales.txt").replace("\r\n", "\n").lstrip("\ufeff")
    train, val = split_docs(out, "train"), split_docs(out, "val")
    assert all(int(d[-1]) == tok.eot_id for d in train + val)
    assert len(train) == 2 and len(val) == 1
    # inputs in sorted path order: grimm_tales.txt < tinyshakespeare.txt.gz
    assert tok.decode(train[0][:-1].tolist()) == grimm
    assert tok.decode(np.concatenate([train[1][:-1], val[0][:-1]]).tolist()) == shakespeare
    assert np.concatenate([train[1][:-1], val[0][:-1]]).tolist() == tok.encode(shakespeare)
    total = sum(len(d) for d in train + val) - 1  # the split document gained one end-of-text
    assert len(val[0]) == math.ceil(0.01 * total)
    m = read_manifest(out)
    assert m.splits["val"].tokens == len(val[0]) and m.stats["val_split"] == "tail"


def test_hash_val_split_many_documents(tmp_path):
    docs = chunk_documents(shared_text("grimm_tales.txt"), words=200)
    src = write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(docs)])
    out = tmp_path / "out"
    result = build(opts([src], out, val_fraction=0.2, filters="none", dedup=()))
    tok = get_tokenizer("gpt2")
    expected_val = [t for i, t in enumerate(docs) if in_val(1234, f"d{i}", 0.2)]
    expected_train = [t for i, t in enumerate(docs) if not in_val(1234, f"d{i}", 0.2)]
    assert 0.1 < len(expected_val) / len(docs) < 0.3
    assert [tok.decode(d[:-1].tolist()) for d in split_docs(out, "val")] == expected_val
    assert [tok.decode(d[:-1].tolist()) for d in split_docs(out, "train")] == expected_train
    assert result.manifest.stats["val_split"] == "hash"


def test_shards_roll_at_token_count(tmp_path):
    docs = chunk_documents(shared_text("tinyshakespeare.txt"), words=300, limit=40)
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in docs])
    out = tmp_path / "out"
    build(opts([src], out, filters="none", dedup=(), val_fraction=0.0, shard_tokens=2000))
    m = read_manifest(out)
    shards = m.splits["train"].shards
    assert len(shards) > 3 and m.splits["val"].shards == [] and m.splits["val"].tokens == 0
    start, previous = 0, -1
    for shard in shards:  # whole documents; a shard starts at the first one at or after each 2,000 tokens
        lengths = read_index(out / shard.idx).lengths
        cells = set(((start + np.cumsum(lengths) - lengths) // 2000).tolist())
        assert len(cells) == 1 and min(cells) > previous  # one stretch each, in order
        start, previous = start + shard.tokens, min(cells)
    tok = get_tokenizer("gpt2")
    assert [tok.decode(d[:-1].tolist()) for d in split_docs(out, "train")] == docs


def test_int32_shards_for_large_vocabularies(tmp_path):
    """MMIDIDX has no uint32: a vocabulary past 65536 is stored as int32 (dtype code 4)."""
    shard = ShardFile(tmp_path, "train-00000", "int32")
    docs = [np.array([70000, 5, 99999], dtype=np.int64), np.array([100000, 1], dtype=np.int64)]
    shard.write(np.concatenate(docs))
    shard.add_lengths(np.array([3, 2]))
    info = shard.close()
    assert info.documents == 2 and info.tokens == 5
    assert read_index(tmp_path / "train-00000.idx").dtype == "int32"
    got = megatron_documents(tmp_path / "train-00000")
    assert [d.tolist() for d in got] == [d.tolist() for d in docs]


def test_tail_cut_keeps_a_token_on_both_sides():
    assert tail_cut(np.array([1000]), 0.01) == 990
    assert tail_cut(np.array([1000]), 0.0001) == 998  # never a val piece of only end-of-text
    assert tail_cut(np.array([500, 500]), 0.5) == 500  # on a document boundary: no split
    assert tail_cut(np.array([2]), 0.5) == 0  # too short to split: all of it


def test_sentencepiece_tokenizer(tmp_path, monkeypatch):
    from gptforge.tokenizer import train_sentencepiece

    model = train_sentencepiece([CORPORA / "grimm_tales.txt"], tmp_path / "sp", vocab_size=400)
    docs = chunk_documents(shared_text("grimm_tales.txt"), words=300, limit=20)
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in docs])
    out = tmp_path / "out"
    result = build(opts([src], out, tokenizer=f"sentencepiece:{model}", filters="none", val_fraction=0.0))
    m = result.manifest
    assert m.dtype == "uint16" and m.tokenizer["name"] == "sentencepiece"
    assert m.tokenizer["vocab_size"] == 400 and m.tokenizer["sha256"]
    tok = get_tokenizer(f"sentencepiece:{model}")
    assert [tok.decode(d[:-1].tolist()) for d in split_docs(out, "train")] == docs
    # the model travels with the build: a moved build directory finds it from any working directory
    assert m.tokenizer["model"] == "tokenizer.model"
    assert m.tokenizer["sha256"] == tok.model_sha256 == file_sha256(out / "tokenizer.model")
    moved = shutil.move(out, tmp_path / "elsewhere" / "data")
    model.unlink()
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = tokenizer_from_manifest(read_manifest(moved).tokenizer, moved)
    assert again.encode(docs[0]) == tok.encode(docs[0]) and again.model_sha256 == tok.model_sha256


def _numbered(parts: list[np.ndarray], shard_tokens: int) -> list[int]:
    """Shard numbers of pieces of these sizes cut over ranks as `parts`, as the ranks compute them: the
    cells from an exclusive prefix sum, numbered from every rank's (first, last, distinct)."""
    starts = np.concatenate(([0], np.cumsum([int(p.sum()) for p in parts])[:-1]))
    cells = [grid_cells(p, int(a), shard_tokens) for p, a in zip(parts, starts, strict=True)]
    table = [(int(c[0]), int(c[-1]), len(np.unique(c))) if len(c) else (-1, -1, 0) for c in cells]
    spans, count = number_shards(table)
    out = []
    for c, span in zip(cells, spans, strict=True):
        out += (span.first + np.unique(c, return_inverse=True)[1]).tolist() if len(c) else []
    assert len(set(out)) == count
    return out


def test_shard_placement_is_a_prefix_sum_the_same_over_any_ranks():
    """A shard starts at the first piece starting at or after each multiple of the shard size (pieces longer
    than it get one of their own); the shard numbers are consecutive, and the same however the pieces are
    cut over ranks (empty ranks too)."""
    lengths = np.random.default_rng(0).integers(1, 300, 500)
    lengths[[40, 41, 300]] = [2500, 1200, 999]  # pieces longer than a shard
    whole = _numbered([lengths], 1000)
    assert whole == sorted(whole) and sorted(set(whole)) == list(range(len(set(whole))))
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    for k in range(max(whole) + 1):
        first = whole.index(k)
        cell = starts[first] // 1000
        assert all(starts[i] // 1000 == cell for i, s in enumerate(whole) if s == k)  # one stretch each
        assert first == 0 or starts[first - 1] // 1000 < cell  # its first piece is the first in the stretch
    sizes = np.bincount(whole, weights=lengths)
    assert abs(sizes.mean() - 1000) < 100 and sizes[whole[40]] >= 2500
    for cuts in ([100, 101, 400], [0, 250, 250, 499], [40, 41, 42], list(range(1, 500, 7))):
        assert _numbered(np.split(lengths, cuts), 1000) == whole


def test_shard_names_sort_past_a_million_and_are_cleaned_up(tmp_path):
    width = name_width(1_000_001)
    names = [shard_name("train", i, width) for i in (0, 99_999, 100_000, 1_000_000)]
    assert names == sorted(names) and names[-1] == "train-1000000"
    assert shard_name("val", 7, name_width(100_000)) == "val-00007"  # five digits up to 100,000 shards
    for name in names:
        (tmp_path / f"{name}.bin").write_bytes(b"")
        (tmp_path / f"{name}.idx").write_bytes(b"")
    (tmp_path / "notes-1000000.bin").write_bytes(b"mine")
    clean(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes-1000000.bin"]
