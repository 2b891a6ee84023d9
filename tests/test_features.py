"""Tests for content features (raypack/data/features.py): tf-idf sketches, k-means, pack similarity.

Run: .venv/bin/pytest tests/test_features.py -q

Synthetic topics stand in for real text: each topic draws most of its tokens
from a vocabulary of its own and the rest from a pool shared by every topic (like
function words), both Zipf-weighted, and bigrams are random, so two samples of one
topic have a tf-idf cosine of only about 0.18 (about 0.02 across topics).
"""

import doctest
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from raypack.data import features
from raypack.data.compose import plan_composed
from raypack.data.features import (
    assign_clusters,
    auto_num_clusters,
    document_frequency,
    fit_kmeans,
    pack_similarity,
    tfidf_vectors,
)
from raypack.data.pack import PackPlan, plan_pack

TOPIC_VOCAB = 100
TOPIC_SHARE = 0.8  # of a sample's tokens from its topic's own vocabulary
COMMON_VOCAB = 500


def topic_samples(num_topics, per_topic, seed, min_len=50, max_len=200):
    """(samples, topic of each sample), topics interleaved in a shuffled order."""
    rng = np.random.default_rng(seed)
    topic = rng.permutation(np.repeat(np.arange(num_topics), per_topic))
    zipf = 1.0 / np.arange(1, max(TOPIC_VOCAB, COMMON_VOCAB) + 1)
    topic_p = zipf[:TOPIC_VOCAB] / zipf[:TOPIC_VOCAB].sum()
    common_p = zipf[:COMMON_VOCAB] / zipf[:COMMON_VOCAB].sum()
    samples = []
    for t in topic:
        n = int(rng.integers(min_len, max_len + 1))
        own = COMMON_VOCAB + t * TOPIC_VOCAB + rng.choice(TOPIC_VOCAB, n, p=topic_p)
        common = rng.choice(COMMON_VOCAB, n, p=common_p)
        samples.append(np.where(rng.random(n) < TOPIC_SHARE, own, common).astype(np.int32))
    return samples, topic


def vectors_of(samples, dim=256, seed=0):
    return tfidf_vectors(samples, document_frequency(samples), len(samples), dim=dim, seed=seed)


# ---------------------------------------------------------------- tf-idf sketches


def test_vectors_are_unit_and_deterministic():
    samples, _ = topic_samples(3, 20, seed=0)
    samples.append(np.zeros(0, dtype=np.int32))
    first, second = vectors_of(samples), vectors_of([s.copy() for s in samples])
    assert first.dtype == np.float32 and first.shape == (61, 256)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(np.linalg.norm(first[:-1], axis=1), 1.0, atol=1e-5)
    assert not first[-1].any()  # an empty sample has a zero row
    assert not np.array_equal(first, vectors_of(samples, seed=1))  # the seed picks the projection


def test_document_frequency_counts_each_term_once_per_sample_and_sums_over_batches():
    samples, _ = topic_samples(2, 10, seed=1)
    df = document_frequency(samples, num_buckets=4096)
    assert df.dtype == np.int64 and df.shape == (4096,)
    np.testing.assert_array_equal(df, document_frequency(samples[:7], 4096) + document_frequency(samples[7:], 4096))
    assert df.max() <= len(samples)
    # A sample repeated in itself holds the same terms (plus the bigram across the seam), once each.
    doubled = document_frequency([np.concatenate([samples[0], samples[0]])], 4096)
    assert 0 <= doubled.sum() - document_frequency(samples[:1], 4096).sum() <= 1


def test_hash_is_the_same_in_another_process_and_pulls_in_no_heavy_library():
    """Buckets must agree across data workers (Python's hash() is salted per process).

    numba's first compiled call imports scipy when it is installed, so only what our modules add is checked.
    """
    code = ("import sys, hashlib, numpy as np, numba; numba.njit(lambda x: x)(1); before = set(sys.modules); "
            "from raypack.data import features, compose; "
            "df = features.document_frequency([np.arange(50, dtype=np.int32), np.array([7, 7, 9], dtype=np.int32)]); "
            "print(hashlib.sha256(np.flatnonzero(df).tobytes()).hexdigest()); "
            "print(','.join(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in "
            "('torch', 'ray', 'sklearn', 'scipy'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    digest, heavy = out.stdout.split("\n")[:2]
    here = document_frequency([np.arange(50, dtype=np.int32), np.array([7, 7, 9], dtype=np.int32)])
    assert digest == hashlib.sha256(np.flatnonzero(here).tobytes()).hexdigest()
    assert heavy == "", f"features/compose pull in {heavy}"


def test_buckets_are_pinned():
    # Changing the hash would silently mix df counts from old and new batches; this pins it.
    df = document_frequency([np.array([0, 1, 2], dtype=np.int32)])
    assert np.flatnonzero(df).tolist() == [554816, 572414, 722405, 960906, 971326]  # 3 unigrams, 2 bigrams


def test_same_topic_is_closer_than_different_topics():
    samples, topic = topic_samples(4, 50, seed=2)
    vectors = vectors_of(samples)
    cosine = vectors @ vectors.T
    same = topic[:, None] == topic[None, :]
    off_diagonal = ~np.eye(len(samples), dtype=bool)
    same_mean, different_mean = cosine[same & off_diagonal].mean(), cosine[~same].mean()
    assert same_mean > different_mean + 0.1
    # Sample by sample too: each is closer on average to its own topic.
    own = (cosine * (same & off_diagonal)).sum(1) / (same & off_diagonal).sum(1)
    other = (cosine * ~same).sum(1) / (~same).sum(1)
    assert np.mean(own > other) > 0.99


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 2\*\*31\)"):
        document_frequency([np.array([3, -1])])
    with pytest.raises(ValueError, match="1-D array of token ids"):
        document_frequency([np.array([[1, 2]])])
    with pytest.raises(ValueError, match="num_buckets must be an int >= 1"):
        document_frequency([np.array([1])], num_buckets=0)
    with pytest.raises(ValueError, match="df must be the 1-D integer array"):
        tfidf_vectors([np.array([1])], np.zeros(4, dtype=np.float32), 1)
    with pytest.raises(ValueError, match="num_docs must be an int >= 1"):
        tfidf_vectors([np.array([1])], np.zeros(4, dtype=np.int64), 0)


def test_module_docstring_examples_are_true():
    assert doctest.testmod(features).failed == 0


# ---------------------------------------------------------------- clusters


def adjusted_rand_index(a, b):
    """ARI of two labelings (Hubert and Arabie 1985), from the contingency table."""
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)

    def pairs(x):
        return (x * (x - 1) / 2).sum()

    index, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / pairs(np.array([len(a)]))
    return (index - expected) / ((rows + cols) / 2 - expected)


def purity(labels, truth):
    """Share of samples whose cluster's majority topic is their own topic."""
    return sum(np.bincount(truth[labels == c]).max() for c in np.unique(labels)) / len(truth)


def test_kmeans_recovers_planted_topics():
    samples, topic = topic_samples(8, 150, seed=3)
    vectors = vectors_of(samples)
    centroids = fit_kmeans(vectors, 8, seed=0, batch_size=256)
    labels = assign_clusters(vectors, centroids)
    assert centroids.shape == (8, 256) and centroids.dtype == np.float32 and labels.dtype == np.int32
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    assert purity(labels, topic) > 0.9 and purity(topic, labels) > 0.9
    assert adjusted_rand_index(labels, topic) > 0.9


def test_kmeans_is_deterministic_by_seed_and_reduces_k_to_n():
    samples, _ = topic_samples(3, 30, seed=4)
    vectors = vectors_of(samples)
    np.testing.assert_array_equal(fit_kmeans(vectors, 3, seed=5), fit_kmeans(vectors.copy(), 3, seed=5))
    assert not np.array_equal(fit_kmeans(vectors, 3, seed=5), fit_kmeans(vectors, 3, seed=6))
    assert fit_kmeans(vectors[:4], 10).shape == (4, 256)
    # Batched assignment equals one big batch.
    centroids = fit_kmeans(vectors, 3)
    np.testing.assert_array_equal(assign_clusters(vectors, centroids, batch=7), assign_clusters(vectors, centroids))


def test_auto_num_clusters_rule():
    assert [auto_num_clusters(n) for n in (0, 100, 20_000, 326_000, 1_200_000, 10**9)] == [2, 2, 32, 128, 245, 256]


def test_cluster_inputs_are_checked():
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        fit_kmeans(np.ones((3, 4), dtype=np.float32), 0)
    with pytest.raises(ValueError, match="non-empty 2-D float array"):
        fit_kmeans(np.ones(4, dtype=np.float32), 2)
    with pytest.raises(ValueError, match="same dim"):
        assign_clusters(np.ones((3, 4), dtype=np.float32), np.ones((2, 5), dtype=np.float32))


# ---------------------------------------------------------------- similarity inside packs


def test_pack_similarity_on_hand_made_vectors():
    # Samples 0, 1 point one way, 2, 3 the other; rows [0, 1, 2] and [3].
    vectors = np.array([[1, 0], [1, 0], [0, 1], [0, 2]], dtype=np.float32)
    plan = PackPlan(piece_sample=np.array([0, 1, 2, 3]), piece_start=np.zeros(4, dtype=np.int64),
                    piece_end=np.ones(4, dtype=np.int64), row_offsets=np.array([0, 3, 4]))
    result = pack_similarity(vectors, plan)
    assert result["num_pairs"] == 3
    assert result["within_pack_cosine"] == pytest.approx(1 / 3)  # pairs (0,1)=1, (0,2)=0, (1,2)=0
    # Pairs across rows: (0,3)=0, (1,3)=0, (2,3)=1, drawn uniformly: the mean is near 1/3.
    assert 0.0 <= result["across_pack_cosine"] <= 1.0
    big = pack_similarity(vectors, plan, seed=1)
    assert big["within_pack_cosine"] == result["within_pack_cosine"]  # every within pair is used


def test_pack_similarity_counts_pairs_of_distinct_samples_only():
    # Row 0 holds sample 0 twice (a split) and sample 1: one pair. Padding: no pair at all.
    vectors = np.eye(3, dtype=np.float32)
    plan = PackPlan(piece_sample=np.array([0, 0, 1, 2]), piece_start=np.array([0, 2, 0, 0]),
                    piece_end=np.array([2, 3, 1, 1]), row_offsets=np.array([0, 3, 4]))
    assert pack_similarity(vectors, plan) == {"within_pack_cosine": 0.0, "across_pack_cosine": 0.0, "num_pairs": 1}
    padding = plan_pack(np.array([1, 1, 1]), 4, "padding")
    assert pack_similarity(vectors, padding) == {"within_pack_cosine": None, "across_pack_cosine": None,
                                                 "num_pairs": 0}
    with pytest.raises(ValueError, match="one vector per sample"):
        pack_similarity(vectors[:2], plan)


def test_pack_similarity_sees_grouping_by_topic_and_not_its_absence():
    samples, topic = topic_samples(8, 100, seed=5)
    vectors = vectors_of(samples)
    lengths = np.array([len(s) for s in samples])
    related = pack_similarity(vectors, plan_composed(lengths, 1024, "bfd", grouping="related", clusters=topic))
    ignored = pack_similarity(vectors, plan_composed(lengths, 1024, "bfd"))  # negative control
    related_gap = related["within_pack_cosine"] - related["across_pack_cosine"]
    ignored_gap = ignored["within_pack_cosine"] - ignored["across_pack_cosine"]
    assert related_gap > 0.1
    assert abs(ignored_gap) < 0.03 and abs(ignored_gap) < 0.1 * related_gap
    # Sampling: fewer pairs give the same picture, and the seed fixes the draw.
    few = pack_similarity(vectors, plan_composed(lengths, 1024, "bfd", grouping="related", clusters=topic),
                          max_pairs=500, seed=3)
    assert few["num_pairs"] == 500 and few["within_pack_cosine"] - few["across_pack_cosine"] > 0.1
    assert few == pack_similarity(vectors, plan_composed(lengths, 1024, "bfd", grouping="related", clusters=topic),
                                  max_pairs=500, seed=3)
