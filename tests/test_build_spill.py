"""Unit tests of the corpus build's bounded-memory pieces: the external merge sort (`SortedRuns`), the
chunked LSH bucket pairing (`BucketStream`) and the chunked first occurrence of exact hashes
(`FirstOccurrence`). Each is checked against a whole-in-memory reference, whatever the budget or the chunk
cuts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import spill
from data_pipeline.dedup_exact import ENTRY, FirstOccurrence
from data_pipeline.dedup_minhash import ALL_PAIRS, KEY, BucketStream, bucket_pairs
from data_pipeline.spill import MIN_BLOCK, SortedRuns, record_order

TOP = np.uint64(1 << 63)


# ----------------------------------------------------------------------------------------------------------
# helpers


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def budget_for(capacity: int, dtype: np.dtype) -> int:
    """The budget that gives `SortedRuns` this capacity (records held at a time)."""
    return capacity * 4 * np.dtype(dtype).itemsize


def key_records(rng: np.random.Generator, n: int, distinct: int | None = None) -> np.ndarray:
    """KEY records: u64 keys half of them >= 2**63, signed members with negatives."""
    rec = np.empty(n, dtype=KEY)
    if distinct is None:
        rec["k"] = rng.integers(0, 1 << 64, size=n, dtype=np.uint64, endpoint=False)
    else:
        pool = rng.integers(0, 1 << 64, size=distinct, dtype=np.uint64, endpoint=False)
        pool[: distinct // 2] |= TOP
        rec["k"] = pool[rng.integers(0, distinct, size=n)]
    rec["s"] = rng.integers(-(1 << 62), 1 << 62, size=n, dtype=np.int64)
    return rec


def entry_records(rng: np.random.Generator, n: int, h0_values: int, h1_values: int) -> np.ndarray:
    rec = np.empty(n, dtype=ENTRY)
    h0 = rng.integers(0, 1 << 64, size=h0_values, dtype=np.uint64, endpoint=False) | TOP
    h0[: h0_values // 2] &= ~TOP
    h1 = rng.integers(0, 1 << 64, size=h1_values, dtype=np.uint64, endpoint=False) | TOP
    rec["h0"] = h0[rng.integers(0, h0_values, size=n)]
    rec["h1"] = h1[rng.integers(0, h1_values, size=n)]
    rec["s"] = rng.integers(-1000, 1 << 40, size=n, dtype=np.int64)
    return rec


def reference_sort(rec: np.ndarray) -> np.ndarray:
    """A full in-memory sort by all fields, the first field first (independent of `record_order`)."""
    return rec[np.lexsort([rec[f] for f in reversed(rec.dtype.names)])]


def sort_all(tmp: Path, rec: np.ndarray, budget: int, size: int, batch: int, name: str = "t"):
    """Feed `rec` to a SortedRuns in batches of `batch`; return (the runs object, its chunks, files seen
    before reading)."""
    runs = SortedRuns(tmp, name, rec.dtype, budget)
    for lo in range(0, len(rec), batch):
        runs.add(rec[lo : lo + batch])
    before = files_under(tmp)
    chunks = list(runs.chunks(size))
    return runs, chunks, before


def check_chunks(chunks: list[np.ndarray], count: int, size: int) -> None:
    assert len(chunks) == math.ceil(count / size)
    for c in chunks[:-1]:
        assert len(c) == size
    if chunks:
        assert 1 <= len(chunks[-1]) <= size
        assert len(chunks[-1]) == count - size * (len(chunks) - 1)


def pair_set(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pairs as a sorted (n, 2) int64 array (a multiset)."""
    p = np.stack([np.asarray(u, np.int64), np.asarray(v, np.int64)], axis=1).reshape(-1, 2)
    return p[np.lexsort((p[:, 1], p[:, 0]))]


# ----------------------------------------------------------------------------------------------------------
# SortedRuns


def test_record_order_is_lexicographic_with_top_bit_and_negatives() -> None:
    rec = np.array(
        [(1 << 63, -5), (1, 3), ((1 << 64) - 1, -(1 << 63)), (1 << 63, -6), (1, -3), (0, 7)], dtype=KEY
    )
    got = rec[record_order(rec)].tolist()
    assert got == sorted(rec.tolist())
    assert got[0] == (0, 7) and got[-1] == ((1 << 64) - 1, -(1 << 63))


@pytest.mark.parametrize(
    "n, capacity, size, batch, kind",
    [
        (0, MIN_BLOCK, 5, 100, "memory"),
        (1, MIN_BLOCK, 5, 100, "memory"),
        (3000, MIN_BLOCK, 7, 250, "memory"),
        (MIN_BLOCK - 1, MIN_BLOCK, MIN_BLOCK, 1000, "memory"),  # one short of a run
        (40_000, 4 * MIN_BLOCK, 1000, 1000, "runs"),  # runs 17000, 17000, 6000: fan-in 4, one merge
        (40_000, 4 * MIN_BLOCK, 40_000, 1000, "runs"),  # one chunk, exactly the count
        (40_000, 4 * MIN_BLOCK, 1 << 20, 1000, "runs"),  # one chunk, shorter than size
        (30_000, 4 * MIN_BLOCK, 4097, 30_000, "runs"),  # one add past capacity: a single run
        (20_000, MIN_BLOCK, 333, 500, "passes"),  # capacity = MIN_BLOCK: fan-in 2, five runs
        (25_000, MIN_BLOCK, 1, 700, "passes"),  # chunks of one record
        (20_000, 2 * MIN_BLOCK, 4096, 100, "passes"),  # fan-in 2, three runs
    ],
)
def test_sorted_runs_match_full_sort(tmp_path: Path, n: int, capacity: int, size: int, batch: int, kind: str):
    rng = np.random.default_rng([n, capacity, size, batch])
    rec = key_records(rng, n, distinct=max(1, n // 3))  # repeated keys: ties broken by the member
    budget = budget_for(capacity, KEY)
    root = tmp_path / "spill"
    runs, chunks, before = sort_all(root, rec, budget, size, batch)
    assert runs.capacity == capacity
    assert runs.count == n
    check_chunks(chunks, n, size)
    got = np.concatenate(chunks) if chunks else np.zeros(0, KEY)
    assert got.dtype == KEY
    np.testing.assert_array_equal(got, reference_sort(rec))
    nbytes = n * KEY.itemsize
    if kind == "memory":
        assert runs.spilled == 0
        assert not root.exists()  # no run file was ever made
    elif kind == "runs":
        assert before and all(p.suffix == ".run" and p.name.startswith("t-") for p in before)
        assert len(before) <= max(2, capacity // MIN_BLOCK)
        assert runs.spilled == nbytes  # every record written once: merged straight from the first runs
    else:
        assert max(2, capacity // MIN_BLOCK) == 2
        assert len(before) >= 2  # (a last, partial run is written when the chunks are read)
        assert runs.spilled >= 2 * nbytes  # more runs than the fan-in: merged in passes, written again
    runs.close()
    assert files_under(tmp_path) == []


def test_sorted_runs_unsigned_top_bit_and_negative_members(tmp_path: Path) -> None:
    """Keys on both sides of 2**63 and members on both sides of 0, spilled and merged in passes."""
    rng = np.random.default_rng(7)
    n = 5 * MIN_BLOCK + 17
    rec = np.empty(n, dtype=KEY)
    rec["k"] = rng.choice(
        np.array([0, 1, (1 << 63) - 1, 1 << 63, (1 << 63) + 1, (1 << 64) - 1], dtype=np.uint64), size=n
    )
    rec["s"] = rng.integers(-(1 << 63), (1 << 63) - 1, size=n, dtype=np.int64)
    rec["s"][:10] = [-(1 << 63), (1 << 63) - 1, -1, 0, 1, -(1 << 63), (1 << 63) - 1, -1, 0, 1]
    runs, chunks, before = sort_all(tmp_path, rec, 0, 1000, 512)
    assert len(before) >= 3 and runs.spilled > 0
    got = np.concatenate(chunks)
    np.testing.assert_array_equal(got, reference_sort(rec))
    assert got.tolist() == sorted(rec.tolist())  # Python's int comparison: no wrap-around at 2**63
    k = got["k"]
    assert np.all(k[1:] >= k[:-1])
    assert k[0] == 0 and k[-1] == np.uint64((1 << 64) - 1)
    same = k[1:] == k[:-1]
    assert np.all(got["s"][1:][same] >= got["s"][:-1][same])
    runs.close()
    assert files_under(tmp_path) == []


def test_sorted_runs_three_fields(tmp_path: Path) -> None:
    """ENTRY records (h0, h1, s): equal h0 sorted by h1, equal (h0, h1) by s."""
    rng = np.random.default_rng(11)
    rec = entry_records(rng, 3 * MIN_BLOCK + 5, h0_values=40, h1_values=3)
    runs, chunks, before = sort_all(tmp_path, rec, 0, 999, 301)
    assert before and runs.spilled > 0
    check_chunks(chunks, len(rec), 999)
    got = np.concatenate(chunks)
    np.testing.assert_array_equal(got, reference_sort(rec))
    assert got.tolist() == sorted(rec.tolist())
    runs.close()
    assert files_under(tmp_path) == []


def test_sorted_runs_heavy_skew(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """95% of the records share one key: still sorted (by member within it), still exact chunks, and the
    merge holds no more than `capacity` records of its runs at a time: with fan-in 2 and eight runs, every
    merge is of two runs, so a run's block is at most half the capacity."""
    rng = np.random.default_rng(3)
    n = 70_000  # capacity 8192, adds of 1000: seven runs of 9000 then 7000 more, the eighth
    rec = key_records(rng, n, distinct=500)
    hot = rng.random(n) < 0.95
    rec["k"][hot] = np.uint64(0xDEADBEEF) | TOP
    assert hot.mean() >= 0.9
    reads: list[int] = []
    real = spill.read_array

    def spy(path, dtype, lo=0, hi=None, width=1):
        out = real(path, dtype, lo, hi, width)
        if Path(path).suffix == ".run":
            reads.append(len(out))
        return out

    monkeypatch.setattr(spill, "read_array", spy)
    size = 1234
    runs, chunks, before = sort_all(tmp_path, rec, budget_for(2 * MIN_BLOCK, KEY), size, 1000)
    assert runs.capacity == 2 * MIN_BLOCK
    assert len(before) == 7 and runs.spilled == 3 * n * KEY.itemsize  # eight runs, merged 8 -> 4 -> 2 -> out
    check_chunks(chunks, n, size)
    np.testing.assert_array_equal(np.concatenate(chunks), reference_sort(rec))
    assert reads and max(reads) <= runs.capacity // 2
    runs.close()
    assert files_under(tmp_path) == []


def test_sorted_runs_all_records_equal(tmp_path: Path) -> None:
    """One key and one member for everything (identical records): the merge still progresses."""
    n = 3 * MIN_BLOCK + 1
    rec = np.zeros(n, dtype=KEY)
    rec["k"], rec["s"] = TOP, -1
    runs, chunks, before = sort_all(tmp_path, rec, 0, 4000, 2000)
    assert runs.spilled > 0 and before
    check_chunks(chunks, n, 4000)
    np.testing.assert_array_equal(np.concatenate(chunks), rec)
    runs.close()
    assert files_under(tmp_path) == []


def test_sorted_runs_close_removes_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    rec = key_records(rng, 6 * MIN_BLOCK)
    # closed before reading: the runs written by add() go
    runs = SortedRuns(tmp_path, "a", KEY, 0)
    for lo in range(0, len(rec), 1000):
        runs.add(rec[lo : lo + 1000])
    assert len(files_under(tmp_path)) == 5
    runs.close()
    assert files_under(tmp_path) == []
    # closed with the chunks half read (after the merge passes): the final runs go
    runs = SortedRuns(tmp_path, "b", KEY, 0)
    for lo in range(0, len(rec), 1000):
        runs.add(rec[lo : lo + 1000])
    it = runs.chunks(100)
    first = next(it)
    assert len(first) == 100
    assert files_under(tmp_path)
    runs.close()
    assert files_under(tmp_path) == []
    # in memory: nothing to remove, and close is harmless
    runs = SortedRuns(tmp_path, "c", KEY, 1 << 30)
    runs.add(rec[:10])
    assert [len(c) for c in runs.chunks(4)] == [4, 4, 2]
    runs.close()
    assert files_under(tmp_path) == []


def test_sorted_runs_two_instances_share_root(tmp_path: Path) -> None:
    """Two sorts under one root (the product's bands and pairs per rank) keep to their own files."""
    rng = np.random.default_rng(9)
    a_rec, b_rec = key_records(rng, 3 * MIN_BLOCK), key_records(rng, 4 * MIN_BLOCK)
    a = SortedRuns(tmp_path, "bands-00000", KEY, 0)
    b = SortedRuns(tmp_path, "pairs-00000", KEY, 0)
    for lo in range(0, 4 * MIN_BLOCK, 500):
        a.add(a_rec[lo : lo + 500])
        b.add(b_rec[lo : lo + 500])
    a_got = np.concatenate(list(a.chunks(777)))
    a.close()
    assert files_under(tmp_path) and all(p.name.startswith("pairs-00000-") for p in files_under(tmp_path))
    b_got = np.concatenate(list(b.chunks(777)))
    b.close()
    np.testing.assert_array_equal(a_got, reference_sort(a_rec))
    np.testing.assert_array_equal(b_got, reference_sort(b_rec))
    assert files_under(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------
# BucketStream


def stream(rng: np.random.Generator, sizes: list[int]) -> np.ndarray:
    """KEY entries sorted by (k, s): one bucket per size, distinct members."""
    n = sum(sizes)
    keys = np.zeros(0, np.uint64)
    while len(keys) < len(sizes):  # distinct keys, about half of them >= 2**63
        more = rng.integers(0, 1 << 64, size=len(sizes) - len(keys), dtype=np.uint64, endpoint=False)
        keys = np.unique(np.concatenate([keys, more]))
    rec = np.empty(n, dtype=KEY)
    rec["k"] = np.repeat(keys[: len(sizes)], sizes)
    rec["s"] = rng.choice(1 << 40, size=n, replace=False).astype(np.int64) - (1 << 20)
    return rec[record_order(rec)]


def feed_all(rec: np.ndarray, cuts: list[int], pad: int = 0, pad_open: int = 0):
    """Feed rec cut at `cuts` (sorted, may repeat: empty chunks); `pad_open` empty chunks with last=False
    after the last real chunk, then one final empty chunk with last=True if there were any, then `pad`
    empty chunks with last=True. Returns the pairs of every call."""
    bounds = [0, *cuts, len(rec)]
    pieces = [rec[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    pieces += [rec[:0]] * pad_open
    s = BucketStream()
    out = [s.feed(p, last=i == len(pieces) - 1) for i, p in enumerate(pieces)]
    out += [s.feed(np.zeros(0, KEY), last=True) for _ in range(pad)]
    return out


def check_stream(rec: np.ndarray, out: list[tuple[np.ndarray, np.ndarray]]) -> None:
    want = np.unique(pair_set(*bucket_pairs(rec["k"], rec["s"])), axis=0)
    for u, v in out:
        assert u.dtype == np.int64 and v.dtype == np.int64 and len(u) == len(v)
        assert np.all(u < v)
    got = np.unique(
        pair_set(np.concatenate([u for u, _ in out]), np.concatenate([v for _, v in out])), axis=0
    )
    np.testing.assert_array_equal(got, want)  # the same set of pairs, whatever the cuts


def test_bucket_pairs_reference_shape() -> None:
    """The reference itself: all pairs up to ALL_PAIRS, star and chain past it."""
    rng = np.random.default_rng(0)
    for size, count in [(1, 0), (2, 1), (3, 3), (ALL_PAIRS, ALL_PAIRS * (ALL_PAIRS - 1) // 2)]:
        rec = stream(rng, [size])
        assert len(bucket_pairs(rec["k"], rec["s"])[0]) == count
    for size in (ALL_PAIRS + 1, 100):
        rec = stream(rng, [size])
        u, v = bucket_pairs(rec["k"], rec["s"])
        m = rec["s"]
        want = {(int(m[0]), int(x)) for x in m[1:]} | {
            (int(a), int(b)) for a, b in zip(m[:-1], m[1:], strict=True)
        }
        assert set(zip(u.tolist(), v.tolist(), strict=True)) == want
        assert len(want) == 2 * (size - 1) - 1  # (head, second) is in both the star and the chain


@pytest.mark.parametrize(
    "sizes, cuts",
    [
        ([], []),
        ([], [0, 0]),  # only empty chunks
        ([1], [0, 1]),
        ([1, 1, 1], [1, 2]),  # singletons cut between
        ([2], [1]),  # a pair cut in the middle
        ([2, 1, 2], [0, 0, 1, 1, 3, 4, 4]),
        ([ALL_PAIRS], [1, 16, 31]),  # a bucket of exactly ALL_PAIRS cut three times
        ([ALL_PAIRS, 5], [ALL_PAIRS]),  # cut right after it
        ([ALL_PAIRS + 1], [ALL_PAIRS]),  # held at 32, then grows to 33
        ([ALL_PAIRS + 1], [ALL_PAIRS + 1]),  # the whole bucket then an empty last chunk
        ([ALL_PAIRS + 1, 1], [ALL_PAIRS + 1]),
        ([3, ALL_PAIRS + 1, 3], [2 + ALL_PAIRS, 3 + ALL_PAIRS]),  # 32 held, its 33rd member alone
        ([150], [40, 80, 80, 120, 149]),  # a big bucket over 5 chunks with an empty one between
        ([1, 150, 2], [34, 35, 36, 100, 152]),  # opened large by a 33-member tail, then one at a time
        ([10, 200, 1, 40, 2], [5, 50, 50, 150, 211, 212, 230, 253]),
    ],
)
def test_bucket_stream_hand_cases(sizes: list[int], cuts: list[int]) -> None:
    rec = stream(np.random.default_rng(len(sizes) * 100 + sum(sizes)), sizes)
    for pad_open in (0, 2):
        out = feed_all(rec, cuts, pad=0, pad_open=pad_open)
        check_stream(rec, out)
        out = feed_all(rec, cuts, pad=3, pad_open=pad_open)
        assert all(len(u) == 0 and len(v) == 0 for u, v in out[-3:])  # padding after the end adds nothing
        check_stream(rec, out)


def test_bucket_stream_big_bucket_pairs_made_as_it_goes() -> None:
    """A large bucket's pairs come with the chunks that bring its members, not all at the end."""
    rec = stream(np.random.default_rng(1), [100, 1])
    out = feed_all(rec, [40, 60, 80])
    assert all(len(u) > 0 for u, _ in out[:4])
    check_stream(rec, out)


def test_bucket_stream_product_padding() -> None:
    """As `NearGrouping._pairs` feeds it: chunk i gets last = i >= mine - 1, then empty padding chunks, also
    with last=True, up to the largest chunk count of all ranks."""
    rng = np.random.default_rng(2)
    rec = stream(rng, [3, 70, 1, 33, 2, 1, 5])
    chunk = 16
    mine = -(-len(rec) // chunk)
    s = BucketStream()
    out = []
    for i in range(mine + 4):
        piece = rec[i * chunk : (i + 1) * chunk] if i < mine else np.zeros(0, KEY)
        out.append(s.feed(piece, last=i >= mine - 1))
    assert all(len(u) == 0 for u, _ in out[mine:])
    check_stream(rec, out)
    # a rank with no entries at all: only padding, all with last=True
    s = BucketStream()
    assert all(len(s.feed(np.zeros(0, KEY), last=True)[0]) == 0 for _ in range(3))


def test_bucket_stream_random() -> None:
    rng = np.random.default_rng(20240611)
    choices = np.array([1, 1, 1, 2, 2, 3, 5, ALL_PAIRS - 1, ALL_PAIRS, ALL_PAIRS + 1, ALL_PAIRS + 2, 64, 120])
    for _ in range(400):
        sizes = rng.choice(choices, size=int(rng.integers(0, 9))).tolist()
        rec = stream(rng, sizes)
        n = len(rec)
        ncuts = int(rng.integers(0, 12))
        cuts = sorted(rng.integers(0, n + 1, size=ncuts).tolist())  # repeats: empty chunks
        pad_open = int(rng.integers(0, 3))
        pad = int(rng.integers(0, 3))
        out = feed_all(rec, cuts, pad=pad, pad_open=pad_open)
        if pad:
            assert all(len(u) == 0 for u, _ in out[-pad:])
        check_stream(rec, out)


def test_bucket_stream_random_small_chunks() -> None:
    """Every chunk of 1 to 4 entries: buckets of 100+ span dozens of chunks."""
    rng = np.random.default_rng(77)
    for _ in range(40):
        sizes = rng.choice([1, 2, ALL_PAIRS, ALL_PAIRS + 1, 130], size=int(rng.integers(1, 5))).tolist()
        rec = stream(rng, sizes)
        cuts = np.cumsum(rng.integers(0, 5, size=len(rec))).tolist()
        cuts = [c for c in cuts if c <= len(rec)]
        check_stream(rec, feed_all(rec, cuts, pad=1))


# ----------------------------------------------------------------------------------------------------------
# FirstOccurrence


def first_reference(rec: np.ndarray) -> np.ndarray:
    """Whole-stream answer as a sorted (n, 2) array of (index, first index of its run), by a plain loop."""
    rows, prev, first = [], None, None
    for h0, h1, s in rec.tolist():
        if (h0, h1) != prev:
            prev, first = (h0, h1), s
        else:
            rows.append((s, first))
    return pair_set(*(np.array(c, np.int64) for c in zip(*rows, strict=True))) if rows else pair_set([], [])


def feed_first(rec: np.ndarray, cuts: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    bounds = [0, *cuts, len(rec)]
    f = FirstOccurrence()
    return [f.feed(rec[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def check_first(rec: np.ndarray, out: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for s, of in out:
        assert len(s) == len(of)
        assert np.all(of <= s)  # sorted by index within a run: the first is the smallest
    got = pair_set(np.concatenate([s for s, _ in out]), np.concatenate([of for _, of in out]))
    np.testing.assert_array_equal(got, first_reference(rec))


def entries(runs: list[tuple[int, int, int]], rng: np.random.Generator) -> np.ndarray:
    """Runs (h0, h1, length), each with distinct sorted indices, in (h0, h1, s) order."""
    n = sum(r[2] for r in runs)
    rec = np.empty(n, dtype=ENTRY)
    rec["h0"] = np.repeat(np.array([r[0] for r in runs], np.uint64), [r[2] for r in runs])
    rec["h1"] = np.repeat(np.array([r[1] for r in runs], np.uint64), [r[2] for r in runs])
    rec["s"] = rng.choice(1 << 40, size=n, replace=False).astype(np.int64)
    return rec[record_order(rec)]


@pytest.mark.parametrize(
    "runs, cuts",
    [
        ([], []),
        ([], [0, 0]),
        ([(1, 1, 1)], [0, 1, 1]),
        ([(1, 1, 3)], [1, 2]),  # a run over three chunks of one
        ([(1, 1, 2), (1, 2, 2), (1, 3, 2)], [2, 4]),  # runs that differ only in h1, cut at their edges
        ([(1, 1, 2), (1, 2, 2), (1, 3, 2)], [1, 3, 5]),  # ... and inside them
        ([(5, 1 << 63, 2), (5, (1 << 64) - 1, 3), (1 << 63, 1 << 63, 2)], [2, 3, 3, 5, 6]),
        ([(7, 7, 50)], [1, 2, 10, 10, 20, 30, 49]),  # one run over many chunks, an empty one between
        ([(2, 9, 1), (3, 9, 40), (3, 10, 1), (4, 0, 3)], [1, 11, 21, 41, 42, 43]),
    ],
)
def test_first_occurrence_hand_cases(runs: list[tuple[int, int, int]], cuts: list[int]) -> None:
    rec = entries(runs, np.random.default_rng(len(runs)))
    check_first(rec, feed_first(rec, cuts))
    check_first(rec, feed_first(rec, []))


def test_first_occurrence_differs_only_in_h1_across_a_cut() -> None:
    """The chunk boundary falls between (h0, a) and (h0, b): the second is a new run, not a duplicate."""
    rec = entries([(9, 1, 2), (9, 2, 2)], np.random.default_rng(0))
    out = feed_first(rec, [2])
    assert out[1][0].tolist() == [rec["s"][3]] and out[1][1].tolist() == [rec["s"][2]]
    check_first(rec, out)


def test_first_occurrence_random() -> None:
    rng = np.random.default_rng(4242)
    for _ in range(300):
        n = int(rng.integers(0, 200))
        rec = entry_records(rng, n, h0_values=int(rng.integers(1, 6)), h1_values=int(rng.integers(1, 4)))
        rec["s"] = rng.permutation(n) - 50  # distinct indices
        rec = rec[record_order(rec)]
        cuts = sorted(rng.integers(0, n + 1, size=int(rng.integers(0, 15))).tolist())
        check_first(rec, feed_first(rec, cuts))


def test_first_occurrence_from_sorted_runs(tmp_path: Path) -> None:
    """As ExactDedup uses it: chunks of a spilled SortedRuns, then empty padding chunks."""
    rng = np.random.default_rng(8)
    rec = entry_records(rng, 3 * MIN_BLOCK + 11, h0_values=30, h1_values=2)
    rec["s"] = rng.permutation(len(rec))
    runs = SortedRuns(tmp_path, "exact-00000", ENTRY, 0)
    for lo in range(0, len(rec), 1000):
        runs.add(rec[lo : lo + 1000])
    first = FirstOccurrence()
    out = [first.feed(c) for c in runs.chunks(1500)]
    out += [first.feed(np.zeros(0, ENTRY)) for _ in range(2)]
    assert runs.spilled > 0
    runs.close()
    check_first(reference_sort(rec), out)
    assert files_under(tmp_path) == []
