"""The training data loader: windows, order, data-parallel slices, dtypes, checksums, compatibility."""

from __future__ import annotations

import os

import numpy as np
import pytest
from train_helpers import write_build

from gptforge.data.format import read_manifest
from gptforge.data.loader import (
    WindowDataset,
    check_tokenizer,
    eval_batches,
    remember_verified,
    shards_to_verify,
    verify_shards,
)
from gptforge.data.order import RankBatches
from gptforge.errors import DataError

TOK = {"name": "synthetic", "vocab_size": 1000, "eot_id": 999}


def _docs(rng: np.random.Generator, n: int, max_len: int = 40) -> list[np.ndarray]:
    return [np.append(rng.integers(0, 999, rng.integers(1, max_len)), 999) for _ in range(n)]


@pytest.fixture
def build(tmp_path):
    rng = np.random.default_rng(0)
    train, val = _docs(rng, 60), _docs(rng, 8)
    manifest = write_build(tmp_path / "data", {"train": train, "val": val}, TOK, shard_docs=7)
    return manifest, np.concatenate(train), np.concatenate(val)


def test_windows_run_across_documents_and_shards(build):
    manifest, stream, _ = build
    assert len(manifest.splits["train"].shards) == 9  # 60 docs, 7 per shard
    T = 16
    data = WindowDataset(read_manifest(manifest.root), "train", T, seed=1)
    assert len(data) == (len(stream) - 1) // T
    for i in range(len(data)):  # every window, including those that straddle a shard boundary
        np.testing.assert_array_equal(data.window(i), stream[i * T : i * T + T + 1])
    x, y = data.stack([3, 0])
    assert x.dtype == y.dtype == __import__("torch").int64 and tuple(x.shape) == (2, T)
    np.testing.assert_array_equal(x[0].numpy(), stream[3 * T : 4 * T])
    np.testing.assert_array_equal(y[0].numpy(), stream[3 * T + 1 : 4 * T + 1])


def test_order_is_a_pure_function_of_seed_and_epoch(build):
    manifest, _, _ = build
    a = WindowDataset(manifest, "train", 16, seed=7)
    b = WindowDataset(read_manifest(manifest.root), "train", 16, seed=7)
    n = len(a)
    np.testing.assert_array_equal(np.sort(a.order(0)), np.arange(n))
    np.testing.assert_array_equal(a.order(3), b.order(3))
    assert not np.array_equal(a.order(0), a.order(1))
    assert not np.array_equal(a.order(0), WindowDataset(manifest, "train", 16, seed=8).order(0))
    # positions continue into the next epoch's order
    pos = a.positions(n - 2, 4)
    np.testing.assert_array_equal(pos, np.concatenate([a.order(0)[n - 2 :], a.order(1)[:2]]))


@pytest.mark.parametrize("dp,accum", [(2, 1), (2, 3), (4, 1)])
def test_data_parallel_ranks_take_slices_of_the_same_global_batch(build, dp, accum):
    manifest, _, _ = build
    data = WindowDataset(manifest, "train", 8, seed=3)
    global_batch = 2 * accum * dp
    single = RankBatches(data, global_batch, 1, 0, 1)
    for consumed in (0, global_batch * 5, len(data) - 3):  # the last one spans an epoch boundary
        whole = next(single.step(consumed))[0]
        parts = []
        for r in range(dp):
            ranks = RankBatches(data, 2, accum, r, dp)
            micro = list(ranks.step(consumed))
            assert len(micro) == accum and all(x.shape[0] == 2 for x, _ in micro)
            parts += [x for x, _ in micro]
        np.testing.assert_array_equal(np.concatenate(parts), whole.numpy())


@pytest.mark.parametrize("dtype", ["uint16", "int32", "uint32"])
def test_token_dtypes(tmp_path, dtype):
    rng = np.random.default_rng(1)
    big = 70000 if dtype != "uint16" else 999  # ids beyond uint16 need 32 bits
    docs = [np.append(rng.integers(0, big, 50), big) for _ in range(5)]
    manifest = write_build(
        tmp_path / dtype, {"train": docs}, {**TOK, "vocab_size": big + 1, "eot_id": big}, dtype=dtype
    )
    data = WindowDataset(read_manifest(manifest.root), "train", 10, seed=0)
    np.testing.assert_array_equal(data.window(4), np.concatenate(docs)[40:51])
    assert int(data.stack([4])[0].max()) < big + 1


def test_checksums_verified_once_and_again_after_a_change(build):
    manifest, _, _ = build
    todo = shards_to_verify(manifest, ["train", "val"])
    assert len(todo) == 11  # 9 train + 2 val shards
    # two ranks share the work: disjoint halves, no problems
    assert verify_shards(manifest, todo, 0, 2) == [] and verify_shards(manifest, todo, 1, 2) == []
    remember_verified(manifest, todo)
    assert shards_to_verify(manifest, ["train", "val"]) == []
    # a corrupted shard (same size, new mtime) is checked again and fails
    shard = manifest.splits["train"].shards[2]
    path = manifest.root / shard.bin
    raw = bytearray(path.read_bytes())
    raw[5] ^= 0xFF
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    todo = shards_to_verify(manifest, ["train"])
    assert todo == [shard]
    problems = verify_shards(manifest, todo)
    assert len(problems) == 1 and "is corrupt: sha256" in problems[0] and shard.bin in problems[0]


def test_truncated_shard_is_refused(build):
    manifest, _, _ = build
    shard = manifest.splits["train"].shards[0]
    path = manifest.root / shard.bin
    path.write_bytes(path.read_bytes()[:-6])
    problems = verify_shards(manifest, [shard])
    assert len(problems) == 1 and "truncated or corrupt" in problems[0]
    # found when read (nothing is opened at start-up): the error names the shard and the missing offset
    data = WindowDataset(manifest, "train", 8, seed=0)
    with pytest.raises(
        DataError, match=rf"shard .*{shard.bin} is truncated or corrupt.* from offset {shard.tokens - 3}"
    ):
        data.window(0)


def test_tokenizer_and_vocab_mismatch_refused(build):
    manifest, _, _ = build
    check_tokenizer(manifest, 1000)
    check_tokenizer(manifest, 1024, dict(TOK))  # a padded vocabulary is fine
    with pytest.raises(DataError, match=r"model.vocab_size is 512"):
        check_tokenizer(manifest, 512)
    with pytest.raises(DataError, match="not the one the starting weights"):
        check_tokenizer(manifest, 50257, {"name": "gpt2", "vocab_size": 50257, "eot_id": 50256})


def test_missing_split_and_too_short_split(build, tmp_path):
    manifest, _, _ = build
    with pytest.raises(DataError, match="no split 'test'"):
        WindowDataset(manifest, "test", 8, seed=0)
    tiny = write_build(tmp_path / "tiny", {"train": [np.array([1, 2, 999])]}, TOK)
    data = WindowDataset(tiny, "train", 8, seed=0)
    assert len(data) == 0
    with pytest.raises(DataError, match="not one window"):
        RankBatches(data, 1, 1, 0, 1)


def test_eval_batches_are_fixed_and_shared_by_ranks(build):
    manifest, _, _ = build
    data = WindowDataset(manifest, "val", 8, seed=0)
    whole = np.concatenate([x.numpy() for x, _ in eval_batches(data, 12, 4, 0, 1)])
    assert whole.shape == (min(12, len(data)), 8)
    again = np.concatenate([x.numpy() for x, _ in eval_batches(data, 12, 4, 0, 1)])
    np.testing.assert_array_equal(whole, again)
    halves = [np.concatenate([x.numpy() for x, _ in eval_batches(data, 12, 4, r, 2)]) for r in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), whole)
    # spread over the split: the first and the last window are in
    np.testing.assert_array_equal(whole[0], data.window(0)[:-1])
    np.testing.assert_array_equal(whole[-1], data.window(len(data) - 1)[:-1])
