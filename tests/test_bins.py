"""The bin-packing kernels (raypack/data/bins.py) against plain-Python references.

The packers that use them are tested in test_pack.py (greedy, bfd) and
test_compose.py (grouping unrelated); these check the kernels' own contracts.

    .venv/bin/pytest tests/test_bins.py -q
"""

import doctest
from itertools import pairwise

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raypack.data import bins
from raypack.data.bins import fit_rows, next_pow2, tree_leftmost, tree_next, tree_set

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_docstring_examples():
    assert doctest.testmod(bins).failed == 0


@SETTINGS
@given(st.lists(st.integers(0, 9), min_size=1, max_size=40), st.integers(1, 10), st.integers(0, 45))
def test_tree_search_matches_a_scan(leaves, value, start):
    """(The tree's leaves past the last are 0, so values >= 1, as lengths are, never find them.)"""
    tree = np.zeros(2 * next_pow2(len(leaves)), dtype=np.int32)
    for leaf, v in enumerate(leaves):
        tree_set(tree, leaf, v)
    assert tree[1] == max(leaves)
    scan = [i for i, v in enumerate(leaves) if v >= value and i >= start]
    assert tree_next(tree, value, start) == (scan[0] if scan else -1)
    if max(leaves) >= value:
        assert tree_leftmost(tree, value) == next(i for i, v in enumerate(leaves) if v >= value)


@SETTINGS
@given(st.lists(st.integers(1, 16), max_size=60), st.integers(0, 25), st.booleans())
def test_clusters_all_distinct_change_nothing(lengths, window, best_fit):
    """With a cluster per sample no row ever holds the sample's cluster, so the cluster-aware search
    picks what the plain rule picks: both paths of the kernels agree."""
    lengths = np.array(lengths, dtype=np.int64)
    plain = fit_rows(lengths, 16, window, best_fit)
    apart = fit_rows(lengths, 16, window, best_fit, clusters=np.arange(len(lengths)), max_skips=1000)
    assert [a.tolist() for a in plain] == [a.tolist() for a in apart]
    # and the plan is whole: every sample once, no row over capacity
    piece_sample, row_offsets = plain
    assert sorted(piece_sample.tolist()) == list(range(len(lengths)))
    assert all(lengths[piece_sample[a:b]].sum() <= 16 for a, b in pairwise(row_offsets))


def test_one_cluster_everywhere_falls_back_to_the_plain_rule():
    """Negative control for the test above: clusters do change the rows when a row holds the sample's one."""
    lengths = np.array([5, 5, 5, 2, 2, 1])
    plain = fit_rows(lengths, 8, 0, True)
    same = fit_rows(lengths, 8, 0, True, clusters=np.zeros(6, dtype=np.int64), max_skips=1000)
    alternating = fit_rows(lengths, 8, 0, True, clusters=np.array([0, 1, 0, 1, 0, 1]), max_skips=1000)
    assert [a.tolist() for a in same] == [a.tolist() for a in plain]
    assert alternating[0].tolist() != plain[0].tolist()
