"""Property tests for pack composition (raypack/data/compose.py): grouping by cluster, single-turn-only packing.

Run: .venv/bin/pytest tests/test_compose.py -q

Plans are checked from their pieces alone: every token of every sample is in
exactly one piece, rows respect capacity, and the composition rules hold row by
row. The cluster-aware fit is also checked against a plain-Python reference.
"""

import doctest
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raypack.config import STRATEGIES
from raypack.data import compose
from raypack.data.compose import GROUPINGS, composition_stats, plan_composed
from raypack.data.pack import PackPlan, plan_pack
from raypack.data.synth import sample_lengths

PROPERTY_SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
COMBINATIONS = [(s, g) for s in STRATEGIES for g in GROUPINGS if s != "padding" or g == "none"]


@st.composite
def cases(draw, over_length=False):
    """(lengths, max_seq_len, window, clusters, multi_turn)."""
    max_seq_len = draw(st.integers(1, 24))
    longest = 3 * max_seq_len if over_length else max_seq_len
    n = draw(st.integers(0, 16))
    lengths = draw(st.lists(st.integers(1, longest), min_size=n, max_size=n))
    clusters = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    multi_turn = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    window = draw(st.sampled_from([0, 1, 2, 3, 5]))
    return (np.array(lengths, dtype=np.int64), max_seq_len, window, np.array(clusters, dtype=np.int64),
            np.array(multi_turn, dtype=bool))


def plan_rows(plan):
    """Each row as a list of (sample, start, end) pieces."""
    return [list(zip(plan.piece_sample[a:b].tolist(), plan.piece_start[a:b].tolist(), plan.piece_end[a:b].tolist()))
            for a, b in zip(plan.row_offsets[:-1], plan.row_offsets[1:])]


# ---------------------------------------------------------------- properties, every strategy x grouping x multi_turn


@pytest.mark.parametrize("use_multi_turn", [False, True])
@pytest.mark.parametrize(("strategy", "grouping"), COMBINATIONS)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_plans_cover_every_token_once_and_follow_the_rules(strategy, grouping, use_multi_turn, data):
    lengths, max_seq_len, window, clusters, multi_turn = data.draw(cases(over_length=strategy == "random"))
    if not use_multi_turn:
        multi_turn = np.zeros(len(lengths), dtype=bool)
    plan = plan_composed(lengths, max_seq_len, strategy, window, grouping,
                         clusters=None if grouping == "none" else clusters,
                         multi_turn=multi_turn if use_multi_turn else None)
    rows = plan_rows(plan)

    # Nothing lost or duplicated: a sample's pieces, by start, tile 0..len exactly.
    pieces_of = {i: [] for i in range(len(lengths))}
    for row in rows:
        assert 0 < sum(end - start for _, start, end in row) <= max_seq_len
        for sample, start, end in row:
            assert 0 <= start < end
            pieces_of[sample].append((start, end))
    for i, pieces in pieces_of.items():
        pieces.sort()
        assert pieces[0][0] == 0 and pieces[-1][1] == lengths[i]
        assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))
    if strategy != "random":  # never split
        assert np.all(plan.piece_start == 0)
        assert sorted(plan.piece_sample.tolist()) == list(range(len(lengths)))

    # Multi-turn samples are alone in their rows, and those rows come after every packed row.
    multi_rows = [any(multi_turn[s] for s, _, _ in row) for row in rows]
    for row, has_multi in zip(rows, multi_rows):
        if has_multi:
            assert len({s for s, _, _ in row}) == 1
    assert multi_rows == sorted(multi_rows)

    if grouping == "related":
        # Only the repacked tails mix clusters: from each cluster, at most one row's worth of samples.
        in_mixed = {}
        for row in rows:
            if len({clusters[s] for s, _, _ in row}) > 1:
                assert strategy in ("greedy", "bfd")
                for s, start, end in row:
                    in_mixed[clusters[s]] = in_mixed.get(clusters[s], 0) + end - start
        assert all(tokens <= 0.9 * max_seq_len for tokens in in_mixed.values())
    if strategy == "padding":
        order = np.concatenate([np.flatnonzero(~multi_turn), np.flatnonzero(multi_turn)])
        assert [row[0][0] for row in rows] == order.tolist() and all(len(row) == 1 for row in rows)
    if window and (grouping == "none" or grouping == "unrelated" and strategy != "random"):
        # Windows cut the single-turn samples in input order (unrelated random: in round-robin order).
        window_of = np.full(len(lengths), -1)
        window_of[np.flatnonzero(~multi_turn)] = np.arange(int((~multi_turn).sum())) // window
        for row, has_multi in zip(rows, multi_rows):
            if not has_multi:
                assert len({window_of[s] for s, _, _ in row}) == 1, "a row mixes two windows"
    if strategy in ("greedy", "bfd"):
        assert plan.num_rows >= -(-int(lengths.sum()) // max_seq_len)


@pytest.mark.parametrize(("strategy", "grouping"), COMBINATIONS)
def test_same_input_gives_identical_output(strategy, grouping):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, 500)
    clusters = rng.integers(0, 7, 500)
    multi_turn = rng.random(500) < 0.3
    plans = [plan_composed(lengths.copy(), 256, strategy, 64, grouping, None if grouping == "none" else clusters.copy(),
                           multi_turn.copy()) for _ in range(2)]
    for field in ("piece_sample", "piece_start", "piece_end", "row_offsets"):
        np.testing.assert_array_equal(getattr(plans[0], field), getattr(plans[1], field))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_grouping_none_without_multi_turn_is_plan_pack(strategy):
    lengths = np.random.default_rng(1).integers(1, 100, 300)
    ours, theirs = plan_composed(lengths, 128, strategy, 50), plan_pack(lengths, 128, strategy, 50)
    assert plan_rows(ours) == plan_rows(theirs)


def test_related_plans_each_cluster_with_plan_pack_then_repacks_the_tails():
    rng = np.random.default_rng(2)
    lengths, clusters = rng.integers(1, 60, 200), rng.choice([7, 2, 40], 200)
    plan = plan_composed(lengths, 64, "bfd", 20, "related", clusters)
    expected, tails = [], []
    for label in (2, 7, 40):
        members = np.flatnonzero(clusters == label)
        rows = [[(int(members[s]), a, b) for s, a, b in row] for row in plan_rows(plan_pack(lengths[members], 64,
                                                                                             "bfd", 20))]
        fill = [sum(b - a for _, a, b in row) for row in rows]
        tail = int(np.argmin(fill))
        if fill[tail] <= 0.9 * 64:
            tails += [s for s, _, _ in rows.pop(tail)]
        expected += rows
    assert tails, "the case must exercise the repacking"
    tails = np.array(tails)
    expected += [[(int(tails[s]), a, b) for s, a, b in row] for row in plan_rows(plan_pack(lengths[tails], 64, "bfd",
                                                                                            20))]
    assert plan_rows(plan) == expected
    unpooled = sum(plan_pack(lengths[clusters == c], 64, "bfd", 20).num_rows for c in (2, 7, 40))
    assert plan.num_rows <= unpooled


def test_unrelated_random_goes_round_robin_over_clusters():
    lengths = np.array([3, 3, 3, 3, 3, 3])
    clusters = np.array([1, 1, 1, 0, 0, 2])
    plan = plan_composed(lengths, 6, "random", grouping="unrelated", clusters=clusters)
    assert plan.piece_sample.tolist() == [3, 0, 5, 4, 1, 2]  # clusters 0 1 2 | 0 1 | 1


# ---------------------------------------------------------------- the cluster-aware fit rule itself


def reference_apart(lengths, clusters, max_seq_len, strategy, window, strict=False):
    """Plain-Python first fit / best fit decreasing that keeps a cluster out of rows holding it, O(n * rows);
    failing that, the plain rule's row, or with ``strict`` a new row.

    Best fit ties go to the row that reached that room first, as in plan_pack.
    """
    n = len(lengths)
    window = window or max(n, 1)
    rows = []
    for lo in range(0, n, window):
        order = sorted(range(lo, min(lo + window, n)), key=lambda i: -lengths[i])  # stable
        members, room, reached = [], [], []
        for step, i in enumerate(order):
            fits = [r for r in range(len(members)) if room[r] >= lengths[i]]
            apart = [r for r in fits if all(clusters[j] != clusters[i] for j in members[r])]
            fits = apart if strict else apart or fits
            if not fits:
                members.append([])
                room.append(max_seq_len)
                reached.append(step)
                fits = [len(members) - 1]
            row = fits[0] if strategy == "greedy" else min(fits, key=lambda r: (room[r], reached[r]))
            members[row].append(i)
            room[row] -= lengths[i]
            reached[row] = step
        rows.extend(members)
    return rows


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("strategy", ["greedy", "bfd"])
@settings(max_examples=80, deadline=None)
@given(case=cases())
def test_unrelated_fit_matches_plain_python_reference(strategy, strict, case):
    lengths, max_seq_len, window, clusters, _ = case
    plan = plan_composed(lengths, max_seq_len, strategy, window, "unrelated", clusters, strict=strict)
    rows = [[s for s, _, _ in row] for row in plan_rows(plan)]
    assert rows == reference_apart(lengths.tolist(), clusters.tolist(), max_seq_len, strategy, window, strict)
    if strict:  # whatever the clusters: no row holds one twice
        assert all(len({clusters[s] for s in row}) == len(row) for row in rows)


@pytest.mark.parametrize("strategy", ["random", "greedy", "bfd"])
@PROPERTY_SETTINGS
@given(case=cases())
def test_strict_related_is_each_cluster_planned_on_its_own(strategy, case):
    """strict related = plan_pack of each cluster in label order, nothing pooled: every row holds one cluster."""
    lengths, max_seq_len, window, clusters, _ = case
    plan = plan_composed(lengths, max_seq_len, strategy, window, "related", clusters, strict=True)
    expected = []
    for label in sorted(set(clusters.tolist())):
        members = np.flatnonzero(clusters == label)
        expected += [[(int(members[s]), a, b) for s, a, b in row]
                     for row in plan_rows(plan_pack(lengths[members], max_seq_len, strategy, window))]
    assert plan_rows(plan) == expected
    assert all(len({clusters[s] for s, _, _ in row}) == 1 for row in expected)


def facts_like(num_topics: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Lengths and topics of facts-like data: num_topics topics of 4 short samples (18-30 tokens), shuffled."""
    rng = np.random.default_rng(seed)
    return rng.integers(18, 31, 4 * num_topics), rng.permutation(np.repeat(np.arange(num_topics), 4))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("strategy", ["random", "greedy", "bfd"])
def test_strict_grouping_keeps_topics_apart_on_facts_like_data(strategy, seed):
    """Topics of 4 samples that fit one 128-token row: strict related rows hold one topic each, where pooling the
    tails (one-row topics: every row is a tail) mixes nearly every row; strict unrelated rows never hold a topic
    twice, at no cost in rows, where the plain fallback repeats some (the negative control)."""
    lengths, topics = facts_like(300, seed)
    stats = lambda grouping, strict: composition_stats(plan_composed(
        lengths, 128, strategy, grouping=grouping, clusters=topics, strict=strict), topics)
    related, pooled = stats("related", True), stats("related", False)
    assert related["num_mixed_cluster_rows"] == 0 and related["num_clusters_used"] == 300
    if strategy == "random":  # random never pools: strict changes nothing
        assert pooled == related
    else:
        assert pooled["mixed_cluster_row_fraction"] > 0.9
    unrelated, plain = stats("unrelated", True), stats("unrelated", False)
    assert unrelated["num_repeated_cluster_rows"] == 0
    assert unrelated["num_rows"] == plain["num_rows"]
    if strategy != "random":
        assert plain["num_repeated_cluster_rows"] > 0


@pytest.mark.parametrize("strategy", ["random", "greedy", "bfd"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unrelated_mixes_more_and_repeats_less_than_none(strategy, seed):
    # Feasible: 50 clusters, and long samples whose rows keep room for many short ones, so the fit has a
    # choice of rows (sorted unimodal lengths leave few rows with room: there greedy and bfd change little).
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([rng.integers(33, 61, 500), rng.integers(1, 9, 1500)])
    clusters = rng.integers(0, 50, 2000)
    none = composition_stats(plan_composed(lengths, 64, strategy), clusters)
    unrelated = composition_stats(plan_composed(lengths, 64, strategy, grouping="unrelated", clusters=clusters),
                                  clusters)
    assert unrelated["mixed_cluster_row_fraction"] >= none["mixed_cluster_row_fraction"]
    assert unrelated["repeated_cluster_row_fraction"] < 0.5 * none["repeated_cluster_row_fraction"]


@pytest.mark.parametrize("grouping", ["related", "unrelated"])
@pytest.mark.parametrize("strategy", ["greedy", "bfd"])
def test_grouping_costs_bfd_almost_no_rows(strategy, grouping):
    """Quality, not timing: measured 1.0025 (related) and 1.0000 (unrelated) x the lower bound, greedy and bfd."""
    lengths = np.minimum(sample_lengths("tulu-326k", 20000), 4096)
    clusters = np.random.default_rng(0).integers(0, 16, len(lengths))
    plan = plan_composed(lengths, 4096, strategy, 0, grouping, clusters)
    lower_bound = -(-int(lengths.sum()) // 4096)
    assert plan.num_rows <= 1.01 * lower_bound


def test_the_skip_bound_only_changes_where_rows_with_the_cluster_are_many(monkeypatch):
    # Forty 1s of cluster 0 fit one per row, but after six rows hold cluster 0 and still have room,
    # a bound of 5 skips sends the next 1 into one of them.
    lengths = np.array([4] * 40 + [1] * 40)
    clusters = np.array(list(range(1, 41)) + [0] * 40)
    full = plan_composed(lengths, 6, "bfd", grouping="unrelated", clusters=clusters)
    assert composition_stats(full, clusters)["repeated_cluster_row_fraction"] == 0.0
    monkeypatch.setattr(compose, "MAX_SKIPS", 5)
    bounded = plan_composed(lengths, 6, "bfd", grouping="unrelated", clusters=clusters)
    assert composition_stats(bounded, clusters)["repeated_cluster_row_fraction"] > 0.0
    # strict: past the bound a new row, never a repeat.
    strict = plan_composed(lengths, 6, "bfd", grouping="unrelated", clusters=clusters, strict=True)
    assert composition_stats(strict, clusters)["repeated_cluster_row_fraction"] == 0.0
    assert strict.num_rows > full.num_rows


def test_module_docstring_examples_are_true():
    assert doctest.testmod(compose).failed == 0


# ---------------------------------------------------------------- statistics


def test_composition_stats_on_a_hand_made_plan():
    plan = PackPlan(piece_sample=np.array([0, 1, 2, 3, 4, 4, 5]), piece_start=np.array([0, 0, 0, 0, 0, 2, 0]),
                    piece_end=np.array([2, 2, 2, 2, 2, 3, 2]), row_offsets=np.array([0, 3, 4, 6, 7]))
    clusters = np.array([5, 5, 9, 9, 1, 9])
    multi_turn = np.array([False, False, False, False, True, False])
    stats = composition_stats(plan, clusters, multi_turn)
    assert stats == {
        "num_rows": 4, "num_packed_rows": 1, "mean_samples_per_packed_row": 3.0,
        "num_clusters_used": 3, "num_mixed_cluster_rows": 1, "num_repeated_cluster_rows": 1,
        "mean_clusters_per_packed_row": 2.0,
        "mixed_cluster_row_fraction": 1.0,
        "repeated_cluster_row_fraction": 1.0, "num_single_turn_samples": 5, "num_multi_turn_samples": 1,
        "num_multi_turn_rows": 1, "num_packed_rows_with_multi_turn": 0,
    }
    assert composition_stats(plan) == {"num_rows": 4, "num_packed_rows": 1, "mean_samples_per_packed_row": 3.0}


def test_empty_input_gives_no_rows():
    for strategy, grouping in COMBINATIONS:
        empty = np.array([], dtype=np.int64)
        plan = plan_composed(empty, 8, strategy, 0, grouping, None if grouping == "none" else empty,
                             np.array([], dtype=bool))
        assert plan.num_rows == 0 and plan.row_offsets.tolist() == [0]


# ---------------------------------------------------------------- errors that tell the user what to change


def test_bad_inputs_are_refused_with_what_to_change():
    lengths = np.array([3, 4])
    with pytest.raises(ValueError, match="padding has one sample per row"):
        plan_composed(lengths, 8, "padding", grouping="related", clusters=np.array([0, 1]))
    with pytest.raises(ValueError, match="'none', 'related', 'unrelated'"):
        plan_composed(lengths, 8, "bfd", grouping="topical")
    with pytest.raises(ValueError, match="'padding', 'random', 'greedy', 'bfd'"):
        plan_composed(lengths, 8, "knapsack")
    with pytest.raises(ValueError, match="needs clusters"):
        plan_composed(lengths, 8, "bfd", grouping="unrelated")
    with pytest.raises(ValueError, match=r"one label per sample \(2\)"):
        plan_composed(lengths, 8, "bfd", grouping="related", clusters=np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="1-D int array"):
        plan_composed(lengths, 8, "bfd", grouping="related", clusters=np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="must be >= 0"):
        plan_composed(lengths, 8, "bfd", grouping="related", clusters=np.array([0, -1]))
    with pytest.raises(ValueError, match="multi_turn must be a 1-D bool array"):
        plan_composed(lengths, 8, "bfd", multi_turn=np.array([0, 1]))
    with pytest.raises(ValueError, match="over-length policy"):
        plan_composed(np.array([3, 9]), 8, "bfd", grouping="related", clusters=np.array([0, 1]))
    with pytest.raises(ValueError, match="window must be an int >= 0"):
        plan_composed(lengths, 8, "bfd", window=-1)
    with pytest.raises(ValueError, match="but clusters has 1 entries"):
        composition_stats(plan_composed(lengths, 8, "bfd"), clusters=np.array([0]))


def test_bench_grouping_runs_and_prints_every_grouping():
    from raypack.bench.pack import bench_grouping, format_grouping_table

    lengths = sample_lengths("tulu-326k", 300, seed=0)
    result = bench_grouping(lengths, 1024, window=100, k=4, seed=0)
    assert set(result["groupings"]) == set(GROUPINGS)
    assert result["groupings"]["related"]["mixed_cluster_row_fraction"] < 0.05  # the 4 clusters' repacked tails
    assert all(e["num_rows"] >= e["lower_bound_rows"] for e in result["groupings"].values())
    assert all(g in format_grouping_table(result) for g in GROUPINGS)
