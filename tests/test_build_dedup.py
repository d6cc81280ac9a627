"""Exact and MinHash near deduplication: hashing against references, grouping, and quality on planted copies."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
from build_helpers import chunk_documents, jaccard, near_copy, shared_text, write_jsonl
from datasketch import MinHash
from test_build_output import opts

from data_pipeline import run_build as build
from data_pipeline import textfeatures
from data_pipeline.components import components
from data_pipeline.dedup_minhash import PAIR, MinHasher, NearGrouping, bucket_pairs, lsh_params, near_groups
from data_pipeline.distributed import Comm
from data_pipeline.spill import Spool

M64 = (1 << 64) - 1


def _fmix64(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & M64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & M64
    return h ^ (h >> 33)


def reference_shingles(text: str, n: int) -> list[int]:
    """The documented shingle hash, one word at a time in plain Python integers."""
    words = [w for w in re.split(rb"[\s!-/:-@\[-`{-~]+", text.lower().encode()) if w]
    hashes = []
    for w in words:
        poly = sum((b + 1) * pow(0x100000001B3, i, 1 << 64) for i, b in enumerate(w)) & M64
        hashes.append(_fmix64(poly ^ ((len(w) * 0x9E3779B97F4A7C15) & M64)))
    out = []
    for i in range(max(len(hashes) - n + 1, 1)):
        h = hashes[i]
        for j in range(1, min(n, len(hashes))):
            h = (h * 0x2545F4914F6CDD1D + hashes[i + j]) & M64
        out.append(_fmix64(h) >> 32)
    return out


TEXT = "Thou art a villain!  Good-morrow, COUSIN; café naïve—are you well?\n\tYes... 42 times, my lord."


def test_shingle_hashes_match_the_reference():
    for n in (1, 3, 5, 30):
        assert textfeatures.shingle_hashes(TEXT.lower().encode(), n).tolist() == reference_shingles(TEXT, n)


def test_chunking_does_not_change_word_hashes(monkeypatch):
    text = shared_text("grimm_tales.txt")[:20000].lower().encode()
    whole = textfeatures.word_hashes(text)[0]
    monkeypatch.setattr(textfeatures, "_CHUNK", 100)
    monkeypatch.setattr(textfeatures, "_POWERS", None)
    chunked = textfeatures.word_hashes(text)[0]
    assert np.array_equal(whole, chunked)


def test_signature_equals_datasketch_minhash():
    text = shared_text("tinyshakespeare.txt")[:30000]
    hasher = MinHasher(num_perm=64, ngram=5, seed=7)
    ref = MinHash(num_perm=64, seed=7, hashfunc=lambda h: h)  # identity: feed our 32-bit shingle hashes
    ref.update_batch(reference_shingles(text, 5))
    assert ref.scheme == "affine32"
    assert np.array_equal(hasher.signature(text), ref.hashvalues)


def test_estimated_jaccard_tracks_true_jaccard():
    rng = random.Random(3)
    docs = chunk_documents(shared_text("grimm_tales.txt"), words=500, limit=30)
    hasher = MinHasher()
    errors = []
    for k, doc in enumerate(docs):
        other = near_copy(doc, rng, edits=2 + 3 * k)
        est = np.mean(hasher.signature(doc) == hasher.signature(other))
        errors.append(est - jaccard(doc, other))
    assert abs(np.mean(errors)) < 0.02 and np.max(np.abs(errors)) < 0.15


def test_lsh_bands_rows_follow_the_threshold():
    assert lsh_params(0.8, 128) == (12, 10)
    b, r = lsh_params(0.5, 128)
    assert b * r <= 128 and r < 10  # a lower threshold: fewer rows per band


def test_near_grouping_spills_buckets_pairs_and_links_with_the_same_groups(tmp_path):
    """300 groups of 10 copies: over a 64 KB budget the band entries, candidate pairs and confirmed links
    (more than their quarter of the budget) all go to disk, the links read back a chunk per propagation
    round, and the groups are the unbounded ones: every copy points at its group's first document."""
    rng = np.random.default_rng(3)
    groups = rng.permutation(3000) % 300
    sigs = rng.integers(0, 2**32, (300, 128), dtype=np.uint32)[groups]
    first: dict[int, int] = {}
    for i, g in enumerate(groups.tolist()):
        first.setdefault(g, i)
    expected = [-1 if first[g] == i else first[g] for i, g in enumerate(groups.tolist())]
    budget, spill = 64 << 10, tmp_path / "spill"
    grouping = NearGrouping(0.8, 128)
    near_of = np.full(3000, -1)

    def found(dups: np.ndarray, kept: np.ndarray) -> None:
        near_of[dups] = kept

    grouping.run(
        Comm(), np.array([0, 3000]), lambda lo, hi: np.ones(hi - lo, bool), lambda lo, hi: sigs[lo:hi],
        lambda r, rows: sigs[rows], budget, spill, found,
    )  # fmt: skip
    assert near_of.tolist() == expected == near_groups(sigs)
    assert grouping.confirmed * PAIR.itemsize > budget // 4 and grouping.spilled > 0
    assert list(spill.iterdir()) == []  # every spill file removed


def test_union_find_chains_keep_the_first():
    """A~B and B~C but not A~C: one group, kept A, both others point at A."""
    base = np.arange(100, dtype=np.uint32)
    a = base.copy()
    b = base.copy()
    b[:8] += 1000  # J(a, b) = 0.92
    c = b.copy()
    c[8:16] += 1000  # J(b, c) = 0.92, J(a, c) = 0.84
    d = base + 5000  # unrelated
    assert near_groups(np.stack([a, d, b, c]), threshold=0.9, num_perm=100) == [-1, -1, 0, 0]


def test_bucket_pairs_all_pairs_in_small_buckets_star_and_chain_in_large():
    keys = np.array([1, 1, 1, 2, 3, 3], dtype=np.uint64)
    u, v = bucket_pairs(keys, np.array([10, 11, 12, 13, 14, 15]))
    assert sorted(zip(u.tolist(), v.tolist(), strict=True)) == [(10, 11), (10, 12), (11, 12), (14, 15)]
    big = np.arange(40)
    u, v = bucket_pairs(np.zeros(40, dtype=np.uint64), big)
    pairs = set(zip(u.tolist(), v.tolist(), strict=True))
    assert {(0, i) for i in range(1, 40)} <= pairs and {(i, i + 1) for i in range(39)} <= pairs
    assert len(pairs) == 39 + 38


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Distinct literary documents plus exact copies and near copies (5-gram Jaccard >= 0.9) in other files."""
    tmp = tmp_path_factory.mktemp("planted")
    rng = random.Random(11)
    docs = chunk_documents(shared_text("tinyshakespeare.txt"), words=500) + chunk_documents(
        shared_text("grimm_tales.txt"), words=500
    )
    files: list[list[dict]] = [[], [], []]
    for i, text in enumerate(docs):
        files[0].append({"id": f"orig{i}", "text": text})
    exact, near = {}, {}
    for k, i in enumerate(rng.sample(range(len(docs)), 140)):
        if k < 40:
            exact[f"exact{k}"] = f"orig{i}"
            files[1].append({"id": f"exact{k}", "text": docs[i]})
        else:
            while True:
                copy = near_copy(docs[i], rng, edits=rng.randint(1, 4))
                if jaccard(docs[i], copy) >= 0.9:
                    break
            near[f"near{k}"] = f"orig{i}"
            files[2].append({"id": f"near{k}", "text": copy})
    # an exact copy of a near copy points at the kept original
    first_near = next(iter(near))
    files[2].append(
        {"id": "exact_of_near", "text": next(r["text"] for r in files[2] if r["id"] == first_near)}
    )
    for n, recs in enumerate(files):
        write_jsonl(tmp / f"f{n}.jsonl", recs)
    out = tmp / "out"
    build(opts([tmp / f"f{n}.jsonl" for n in range(3)], out, filters="none"))
    removed = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    return exact, near, first_near, removed


def test_exact_duplicates_all_found(planted):
    exact, _, _, removed = planted
    found = {r["id"]: r["duplicate_of"] for r in removed if r["reason"] == "exact_duplicate"}
    assert {k: v for k, v in found.items() if k != "exact_of_near"} == exact


def test_near_duplicate_recall_and_precision(planted):
    _, near, first_near, removed = planted
    found = {r["id"]: r["duplicate_of"] for r in removed if r["reason"] == "near_duplicate"}
    true_pos = [k for k in found if k in near]
    recall = len(true_pos) / len(near)
    precision = len(true_pos) / len(found)
    assert recall >= 0.95, recall
    assert precision >= 0.99, precision
    assert all(found[k] == near[k] for k in true_pos)  # duplicate_of names the kept original
    of_near = next(r for r in removed if r["id"] == "exact_of_near")
    assert of_near["reason"] == "exact_duplicate" and of_near["duplicate_of"] == near[first_near]


def test_batch_signatures_equal_one_document_at_a_time():
    """Signatures are computed for a whole batch at once; each must equal the document's own, whatever the
    batch (short documents, no words, documents larger than a hashing chunk)."""
    from data_pipeline.base import STR_TEXT, Doc

    texts = chunk_documents(shared_text("grimm_tales.txt"), words=150, limit=80)
    texts += ["", "!!! ???", "two words", "exactly five words here now", shared_text("tinyshakespeare.txt")]
    docs = []
    for t in texts:
        d = Doc("s", 0, 0, STR_TEXT, None, len(t))
        d.text = t
        docs.append(d)
    hasher = MinHasher()
    assert len(hasher.run(docs)) == len(docs)
    for d in docs:
        assert np.array_equal(d.signature, hasher.signature(d.text)), d.text[:40]
    for batch in (texts, [*texts[:5], ""], ["", "a"]):
        stats = textfeatures.batch_word_stats([t.encode() for t in batch])
        assert stats == [textfeatures.word_stats(t.encode()) for t in batch]
        hashes = textfeatures.batch_word_hashes([t.encode() for t in batch])
        assert all(
            np.array_equal(h[0], textfeatures.word_hashes(t.encode())[0])
            for h, t in zip(hashes, batch, strict=True)
        )


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    """Originals; near copies at 5-gram Jaccard 0.85-0.97; hard negatives at Jaccard 0.5-0.65 (share many
    shingles, so they collide in LSH bands often, but are not duplicates at the 0.8 threshold)."""
    tmp = tmp_path_factory.mktemp("hard")
    rng = random.Random(23)
    docs = chunk_documents(shared_text("grimm_tales.txt"), words=400) + chunk_documents(
        shared_text("tinyshakespeare.txt"), words=400
    )
    near, negatives = {}, {}
    recs = [{"id": f"orig{i}", "text": t} for i, t in enumerate(docs)]
    for k, i in enumerate(rng.sample(range(len(docs)), 240)):
        lo, hi, edits = (0.85, 0.97, 2) if k % 2 else (0.5, 0.65, 20)
        while True:
            copy = near_copy(docs[i], rng, edits=edits)
            j = jaccard(docs[i], copy)
            if lo <= j <= hi:
                break
            edits = max(1, edits + (1 if j > hi else -1))
        (near if k % 2 else negatives)[f"copy{k}"] = f"orig{i}"
        recs.append({"id": f"copy{k}", "text": copy})
    src = write_jsonl(tmp / "docs.jsonl", recs)
    out = tmp / "out"
    build(opts([src], out, filters="none"))
    removed = {
        json.loads(line)["id"]: json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()
    }
    return near, negatives, removed


def test_near_recall_and_precision_with_hard_negatives_kept(hard):
    near, negatives, removed = hard
    found = {k: r["duplicate_of"] for k, r in removed.items() if r["reason"] == "near_duplicate"}
    true_pos = [k for k in found if k in near]
    assert len(true_pos) / len(near) >= 0.97
    assert len(true_pos) / len(found) >= 0.99
    assert all(found[k] == near[k] for k in true_pos)
    assert sum(k in removed for k in negatives) <= 0.01 * len(negatives)  # hard negatives are kept


def test_components_of_a_giant_star_and_a_long_path_spill_and_keep_the_smallest(tmp_path):
    """One node linked to 20,000 others and a path of 3,000 nodes, under a 64 KB budget: the label tables,
    reverse copies and proposals go to disk, and every node is labelled with its component's smallest node."""
    star = (
        np.arange(1, 20_001) * 3
    )  # the star's centre, 20_000 * 3 + 7, is its largest node: labels must fall
    path = np.arange(100_000, 103_000)
    u = np.concatenate([star, path[:-1]])
    v = np.concatenate([np.full(len(star), 60_007), path[1:]])
    edges = np.empty(len(u), dtype=PAIR)
    edges["u"], edges["v"] = u, v
    budget = 64 << 10
    links = Spool(tmp_path, "links", PAIR, budget // 4)
    for part in np.array_split(edges, 7):
        links.add(part)
    table, rounds = components(Comm(), np.array([0, 200_000]), links, 1024, tmp_path, budget)
    labels = np.concatenate(list(table.chunks(1024)))
    assert table.spilled > 0 and rounds > 1
    expected = {int(n): 3 for n in star} | {60_007: 3} | {int(n): 100_000 for n in path}
    assert dict(zip(labels["n"].tolist(), labels["l"].tolist(), strict=True)) == expected
    table.close()
    links.close()
    assert list(tmp_path.iterdir()) == []
