"""A manifest from outside is checked before anything is read: shard paths that leave the data directory,
token dtypes that are not integer ids, malformed splits; a SentencePiece model is compared by sha256."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from train_helpers import TRAIN, run, write_build

from gptforge.data.format import read_manifest
from gptforge.data.loader import check_tokenizer
from gptforge.errors import DataError

TOK = {"name": "synthetic", "vocab_size": 1000, "eot_id": 999}


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(0, 999, 30), 999) for _ in range(6)]
    write_build(tmp_path / "data", {"train": docs, "val": docs[:2]}, TOK)
    return tmp_path / "data"


def _edit(root, change) -> None:
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _shard(m):
    return m["splits"]["train"]["shards"][0]


BAD = {
    "absolute bin": (
        lambda m: _shard(m).update(bin="/etc/passwd"),
        r"splits.train.shards\[0\].bin' is '/etc/passwd'",
    ),
    "bin leaves": (
        lambda m: _shard(m).update(bin="../other/train.bin"),
        r"'../other/train.bin': shard paths must",
    ),
    "idx leaves": (lambda m: _shard(m).update(idx="a/../../x.idx"), r"shards\[0\].idx' is 'a/../../x.idx'"),
    "bogus dtype": (
        lambda m: m.update(dtype="uint12"),
        r"'dtype' is 'uint12'; token ids are stored as one of",
    ),
    "float16": (lambda m: m.update(dtype="float16"), r"'dtype' is 'float16'"),
    "splits list": (lambda m: m.update(splits=[]), r"'splits' must be an object of splits"),
    "splits empty": (lambda m: m.update(splits={}), r"'splits' must be an object of splits"),
    "shard not object": (
        lambda m: m["splits"]["train"].update(shards=[1]),
        r"shards\[0\]' must be an object",
    ),
    "tokens string": (lambda m: _shard(m).update(tokens="many"), r"shards\[0\].tokens' is 'many'"),
    "no tokenizer": (lambda m: m.pop("tokenizer"), r"'tokenizer' must be an object"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_manifest_is_one_clear_error(data, case):
    change, message = BAD[case]
    _edit(data, change)
    with pytest.raises(DataError, match=message) as info:
        read_manifest(data)
    assert str(data / "manifest.json") in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("case", ["absolute bin", "float16", "splits list"])
def test_the_trainer_refuses_it_with_exit_2(data, tmp_path, case):
    _edit(data, BAD[case][0])
    result = run(
        [
            sys.executable,
            TRAIN,
            "--config",
            "configs/tiny.yaml",
            f"data.path={data}",
            f"run.dir={tmp_path / 'run'}",
        ]
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing written


def test_sentencepiece_model_compared_by_sha256(data):
    sp = {"name": "sentencepiece", "vocab_size": 1000, "eot_id": 999, "model": "tokenizer.model"}
    _edit(data, lambda m: m.update(tokenizer={**sp, "sha256": "a" * 64}))
    manifest = read_manifest(data)
    check_tokenizer(manifest, 1000, {**sp, "sha256": "a" * 64})
    check_tokenizer(
        manifest, 1000, {"name": "sentencepiece", "vocab_size": 1000, "eot_id": 999}
    )  # no sha known
    with pytest.raises(DataError, match=r"'sha256': 'aaaaaaaaaaaa'.* 'sha256': 'bbbbbbbbbbbb'"):
        check_tokenizer(manifest, 1000, {**sp, "sha256": "b" * 64})
