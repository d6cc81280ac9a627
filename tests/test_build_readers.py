"""Readers: every input format, sorted order, ids, decode and parse errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import zstandard
from build_helpers import megatron_documents, run_build, write_jsonl
from test_build_output import opts

from data_pipeline import run_build as build
from data_pipeline.readers import expand_inputs
from gptforge.errors import DataError
from gptforge.tokenizer import get_tokenizer

TEXTS = [
    "Once upon a time there was a king who had three daughters, and the youngest was the fairest of all.",
    "The miller's son went out into the wide world to seek his fortune with nothing but a cat and a sack.",
    "In the forest stood a little house made of bread, with a roof of cake and windows of clear sugar.",
    "A fisherman lived with his wife in a pigsty close by the sea, and every day he went out fishing.",
    "The brave little tailor sat by the window, sewing with all his might, when a peasant woman came by.",
    "Snow was falling like feathers as the queen sat sewing at an ebony window frame and pricked her finger.",
]


def build_kept(tmp_path: Path, inputs: list, **kw) -> tuple[list[str], list[dict]]:
    """Texts of the kept documents in output order, and the removed.jsonl records."""
    out = tmp_path / "out"
    kw.setdefault("filters", "none")
    kw.setdefault("dedup", ())
    build(opts(inputs, out, val_fraction=0.0, **kw))
    tok = get_tokenizer("gpt2")
    texts = [tok.decode(d[:-1].tolist()) for d in megatron_documents(out / "train-00000")]
    removed = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    return texts, removed


def test_every_format_in_sorted_path_order(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text(TEXTS[0])
    (d / "b.txt.gz").write_bytes(gzip.compress(TEXTS[1].encode()))
    (d / "c.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(TEXTS[2].encode()))
    write_jsonl(d / "sub" / "d.jsonl.gz", [{"text": TEXTS[3]}], compress=True)
    (d / "sub" / "e.json.zst").write_bytes(
        zstandard.ZstdCompressor().compress((json.dumps({"text": TEXTS[4]}) + "\n").encode())
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [TEXTS[5]], "id": ["p0"]}), d / "sub" / "f.parquet")
    (d / "notes.md").write_text("not an input")  # unsupported files inside a directory are skipped
    texts, _ = build_kept(tmp_path, [d])
    assert texts == TEXTS


def test_upper_case_suffixes_are_decompressed_too(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "A.TXT.GZ").write_bytes(gzip.compress(TEXTS[0].encode()))
    (d / "B.Txt.Zst").write_bytes(zstandard.ZstdCompressor().compress(TEXTS[1].encode()))
    write_jsonl(d / "C.JSONL.GZ", [{"text": TEXTS[2]}], compress=True)
    (d / "D.JSONL.ZST").write_bytes(
        zstandard.ZstdCompressor().compress((json.dumps({"text": TEXTS[3]}) + "\n").encode())
    )
    assert all(s.compressed for s in expand_inputs([str(d)]))
    texts, removed = build_kept(tmp_path, [d])
    assert texts == TEXTS[:4] and removed == []


def test_ids_paths_as_given_and_id_fields(tmp_path):
    src = write_jsonl(
        tmp_path / "x.jsonl", [{"text": TEXTS[0], "id": 7}, {"text": "   "}, {"text": TEXTS[1]}]
    )
    (tmp_path / "y.txt").write_text("\n\n")
    _, removed = build_kept(tmp_path, [src, tmp_path / "y.txt"])
    assert removed == [
        {"id": f"{src}:1", "reason": "empty", "duplicate_of": None},
        {"id": f"{tmp_path / 'y.txt'}:0", "reason": "empty", "duplicate_of": None},
    ]


def test_globs_and_blank_lines(tmp_path):
    for i in range(3):
        (tmp_path / f"p{i}.jsonl").write_text("\n" + json.dumps({"text": TEXTS[i]}) + "\n\n")
    sources = expand_inputs([str(tmp_path / "p*.jsonl")])
    assert [s.path for s in sources] == [str(tmp_path / f"p{i}.jsonl") for i in range(3)]
    texts, _ = build_kept(tmp_path, [tmp_path / "p*.jsonl"])
    assert texts == TEXTS[:3]


def test_hf_dataset_from_disk(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"body": TEXTS[:3]}).save_to_disk(str(tmp_path / "ds"))
    spec = f"hf:{tmp_path / 'ds'}:train"
    texts, _ = build_kept(tmp_path, [spec], text_field="body")
    assert texts == TEXTS[:3]


def test_missing_inputs_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="input not found"):
        expand_inputs([str(tmp_path / "nope.txt")])
    with pytest.raises(DataError, match="matches no files"):
        expand_inputs([str(tmp_path / "*.jsonl")])
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        expand_inputs([str(tmp_path / "a.csv")])


def test_invalid_utf8_is_decode_error_or_repaired(tmp_path):
    (tmp_path / "good.txt").write_text(TEXTS[0])
    (tmp_path / "bad.txt").write_bytes(TEXTS[1].encode() + b" \xff\xfe broken")
    lines = [
        json.dumps({"text": TEXTS[2]}).encode(),
        b'{"text": "caf\xe9 au lait"}',
        json.dumps({"text": "lone \ud800 surrogate"}).encode(),
    ]
    (tmp_path / "c.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    texts, removed = build_kept(tmp_path, [tmp_path])
    assert texts == [TEXTS[2], TEXTS[0]]  # bad.txt < c.jsonl < good.txt
    assert [(r["id"].split("/")[-1], r["reason"]) for r in removed] == [
        ("bad.txt:0", "decode_error"),
        ("c.jsonl:1", "decode_error"),
        ("c.jsonl:2", "decode_error"),
    ]
    texts, removed = build_kept(
        tmp_path / "r", [tmp_path / "bad.txt", tmp_path / "c.jsonl"], utf8_errors="replace"
    )
    assert removed == []
    assert texts == [
        TEXTS[1] + " \ufffd\ufffd broken",
        TEXTS[2],
        "caf\ufffd au lait",
        "lone \ufffd surrogate",
    ]


def test_malformed_json_fails_with_file_line_or_is_skipped(tmp_path):
    src = tmp_path / "m.jsonl"
    src.write_text(
        json.dumps({"text": TEXTS[0]}) + "\n\n" + '{"text": "unterminated\n' + json.dumps({"t": 1}) + "\n"
    )
    proc = run_build("--input", str(src), "--output", str(tmp_path / "out"), "--workers", "1", check=False)
    assert proc.returncode == 2
    err = next(line for line in proc.stderr.splitlines() if line.startswith("error:"))
    assert err.startswith(f"error: {src}:3: malformed JSON") and "--on-error skip" in err
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()
    texts, removed = build_kept(tmp_path, [src], on_error="skip")
    assert texts == [TEXTS[0]]
    assert [(r["id"], r["reason"]) for r in removed] == [
        (f"{src}:1", "parse_error"),
        (f"{src}:2", "parse_error"),
    ]
