"""Property tests for the packing engine (raypack/data/pack.py).

Run: .venv/bin/pytest tests/test_pack.py -q

Samples reveal their origin: token j of sample i is ``(i + 1) * TOKEN_BASE + j``,
so every packed token says which sample and which position it came from, and a
lost, duplicated, reordered or misplaced token is visible without trusting the plan.
"""

import doctest

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import raypack.data.pack as pack
from raypack.config import STRATEGIES
from raypack.data.pack import (
    ATTENTIONS,
    PackPlan,
    pack_rows,
    plan_pack,
    plan_stats,
    row_supervised_tokens,
)
from raypack.data.tokenize import IGNORE_INDEX

TOKEN_BASE = 1000  # sample lengths stay below this, so token // TOKEN_BASE is the sample
PROPERTY_SETTINGS = settings(max_examples=40, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])


def make_samples(lengths, seed):
    """Samples whose tokens encode (sample, position), with a random supervised mask."""
    rng = np.random.default_rng(seed)
    samples = []
    for i, length in enumerate(lengths):
        ids = ((i + 1) * TOKEN_BASE + np.arange(length)).astype(np.int32)
        labels = np.where(rng.random(length) < 0.6, ids, IGNORE_INDEX).astype(np.int32)
        labels[0] = IGNORE_INDEX  # a first token has no predecessor
        samples.append({"input_ids": ids, "labels": labels, "source": f"s{i}"})
    return samples


@st.composite
def cases(draw, over_length=False):
    """(lengths, max_seq_len, window, seed); over_length allows samples up to 3x max_seq_len."""
    max_seq_len = draw(st.integers(1, 24))
    longest = 3 * max_seq_len if over_length else max_seq_len
    lengths = draw(st.lists(st.integers(1, longest), max_size=14))
    window = draw(st.sampled_from([0, 1, 2, 3, 5]))
    return lengths, max_seq_len, window, draw(st.integers(0, 2**32 - 1))


def split_pieces(row):
    """The row's pieces as (sample, first position, ids, labels), cut at seq_lens."""
    bounds = np.cumsum(row["seq_lens"])[:-1]
    pieces = []
    for ids, labels in zip(np.split(row["input_ids"], bounds), np.split(row["labels"], bounds)):
        sample = int(ids[0]) // TOKEN_BASE - 1
        pieces.append((sample, int(ids[0]) % TOKEN_BASE, ids, labels))
    return pieces


def count_supervised(arrays):
    return sum(int(np.count_nonzero(a != IGNORE_INDEX)) for a in arrays)


# ---------------------------------------------------------------- properties, every strategy x attention


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("strategy", STRATEGIES)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_rows_rebuild_the_samples_exactly(strategy, attention, data):
    lengths, max_seq_len, window, seed = data.draw(cases(over_length=strategy == "random"))
    samples = make_samples(lengths, seed)
    plan = plan_pack(np.array(lengths, dtype=np.int64), max_seq_len, strategy, window)
    rows = pack_rows(plan, samples, attention)
    assert len(rows) == plan.num_rows

    pieces_of = {i: [] for i in range(len(samples))}
    lost_targets = 0
    for row in rows:
        assert all(row[k].dtype == np.int32 for k in ("input_ids", "labels", "position_ids", "seq_lens"))
        assert 0 < len(row["input_ids"]) <= max_seq_len  # capacity respected, no empty rows
        assert row["seq_lens"].sum() == len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"])
        check_positions(row, attention)
        for index_in_row, (sample, first, ids, labels) in enumerate(split_pieces(row)):
            source = samples[sample]
            # A piece is one contiguous run of one sample.
            np.testing.assert_array_equal(ids, source["input_ids"][first: first + len(ids)])
            # No target crosses a piece boundary; every other label is the sample's own.
            assert labels[0] == IGNORE_INDEX
            np.testing.assert_array_equal(labels[1:], source["labels"][first + 1: first + len(ids)])
            if first > 0:  # only a row start can fall inside a sample
                assert strategy == "random" and index_in_row == 0
                lost_targets += int(source["labels"][first] != IGNORE_INDEX)
            pieces_of[sample].append((first, ids))
        if window:
            assert len({s // window for s, *_ in split_pieces(row)}) == 1, "a row mixes two windows"

    # Nothing lost or duplicated: each sample's pieces, in order, are exactly the sample.
    for i, pieces in pieces_of.items():
        rebuilt = np.concatenate([ids for _, ids in sorted(pieces, key=lambda p: p[0])])
        np.testing.assert_array_equal(rebuilt, samples[i]["input_ids"])

    # The supervised-token rule stated in the module docstring, exactly.
    supervised_in = count_supervised(s["labels"] for s in samples)
    supervised_out = count_supervised(r["labels"] for r in rows)
    assert supervised_out == supervised_in - lost_targets
    assert row_supervised_tokens(rows).sum() == supervised_out

    check_strategy_shape(strategy, plan, rows, samples, lengths, max_seq_len, window)


def check_positions(row, attention):
    if attention == "isolated":
        expected = np.concatenate([np.arange(n) for n in row["seq_lens"]])
    else:
        expected = np.arange(len(row["input_ids"]))
    np.testing.assert_array_equal(row["position_ids"], expected)


def check_strategy_shape(strategy, plan, rows, samples, lengths, max_seq_len, window):
    """What distinguishes each strategy."""
    total = sum(lengths)
    lower_bound = -(-total // max_seq_len)
    if strategy == "padding":
        assert plan.piece_sample.tolist() == list(range(len(samples)))
        assert [len(r["input_ids"]) for r in rows] == lengths
    elif strategy == "random":
        flat_rows = np.concatenate([r["input_ids"] for r in rows]) if rows else np.empty(0)
        flat_samples = np.concatenate([s["input_ids"] for s in samples]) if samples else np.empty(0)
        np.testing.assert_array_equal(flat_rows, flat_samples)
        if window == 0:  # every row is full but the last
            assert [len(r["input_ids"]) for r in rows[:-1]] == [max_seq_len] * (len(rows) - 1)
            assert len(rows) == lower_bound
    else:  # greedy and bfd never split, and cannot beat the lower bound
        assert sorted(plan.piece_sample.tolist()) == list(range(len(samples)))
        assert np.all(plan.piece_start == 0)
        assert len(rows) >= lower_bound


@pytest.mark.parametrize("strategy", STRATEGIES)
@settings(max_examples=25, deadline=None)
@given(case=cases(over_length=True))
def test_same_input_gives_identical_output(strategy, case):
    lengths, max_seq_len, window, seed = case
    if strategy != "random":
        lengths = [min(n, max_seq_len) for n in lengths]
    lengths = np.array(lengths, dtype=np.int64)
    first = plan_pack(lengths, max_seq_len, strategy, window)
    second = plan_pack(lengths.copy(), max_seq_len, strategy, window)
    for field in ("piece_sample", "piece_start", "piece_end", "row_offsets"):
        np.testing.assert_array_equal(getattr(first, field), getattr(second, field))
    rows_a = pack_rows(first, make_samples(lengths, seed), "isolated")
    rows_b = pack_rows(second, make_samples(lengths, seed), "isolated")
    for a, b in zip(rows_a, rows_b, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


# ---------------------------------------------------------------- the fit rules themselves


def reference_plan(lengths, max_seq_len, strategy, window):
    """Plain-Python first fit / best fit decreasing, O(n * rows), to check the trees against.

    Best fit breaks ties between rows with equal room by the row that reached that
    room first, as the module docstring states.
    """
    n = len(lengths)
    window = window or max(n, 1)
    rows = []
    for lo in range(0, n, window):
        order = sorted(range(lo, min(lo + window, n)), key=lambda i: -lengths[i])  # stable
        members, room, reached = [], [], []
        for step, i in enumerate(order):
            fits = [r for r in range(len(members)) if room[r] >= lengths[i]]
            if not fits:
                members.append([])
                room.append(max_seq_len)
                reached.append(step)
                fits = [len(members) - 1]
            if strategy == "greedy":
                row = fits[0]
            else:
                row = min(fits, key=lambda r: (room[r], reached[r]))
            members[row].append(i)
            room[row] -= lengths[i]
            reached[row] = step
        rows.extend(members)
    return rows


def plan_as_rows(plan):
    return [plan.piece_sample[a:b].tolist() for a, b in zip(plan.row_offsets[:-1], plan.row_offsets[1:])]


@pytest.mark.parametrize("strategy", ["greedy", "bfd"])
@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_fit_matches_plain_python_reference(strategy, case):
    lengths, max_seq_len, window, _ = case
    plan = plan_pack(np.array(lengths, dtype=np.int64), max_seq_len, strategy, window)
    assert plan_as_rows(plan) == reference_plan(lengths, max_seq_len, strategy, window)


def test_best_fit_and_first_fit_on_a_hand_made_example():
    # Sorted: sample 2 (5), 0 (3), 3 (3), 1 (1). After three samples the rows have
    # room 2 (row 0: sample 2) and 1 (row 1: samples 0, 3). The last sample (1 token)
    # fits both: first fit takes row 0, best fit the tighter row 1.
    lengths = np.array([3, 1, 5, 3])
    greedy = plan_pack(lengths, 7, "greedy")
    assert greedy.piece_sample.tolist() == [2, 1, 0, 3]
    assert greedy.row_offsets.tolist() == [0, 2, 4]
    bfd = plan_pack(lengths, 7, "bfd")
    assert bfd.piece_sample.tolist() == [2, 0, 3, 1]
    assert bfd.row_offsets.tolist() == [0, 1, 4]
    for plan in (greedy, bfd):
        assert plan.piece_start.tolist() == [0, 0, 0, 0]
        assert plan.piece_end.tolist() == lengths[plan.piece_sample].tolist()


def test_best_fit_ties_go_to_the_row_that_reached_the_room_first():
    # Rows 0 and 1 both have room 4 after the two 6s; the 3 goes to row 0, then the 2 to row 1.
    plan = plan_pack(np.array([6, 6, 3, 2]), 10, "bfd")
    assert plan_as_rows(plan) == [[0, 2], [1, 3]]


def test_windows_are_planned_independently():
    lengths = np.array([2, 2, 2, 2, 2, 2])
    assert plan_as_rows(plan_pack(lengths, 8, "bfd", window=0)) == [[0, 1, 2, 3], [4, 5]]
    assert plan_as_rows(plan_pack(lengths, 8, "bfd", window=3)) == [[0, 1, 2], [3, 4, 5]]
    random = plan_pack(lengths, 5, "random", window=3)
    assert random.piece_sample.tolist() == [0, 1, 2, 2, 3, 4, 5, 5]
    assert random.piece_start.tolist() == [0, 0, 0, 1, 0, 0, 0, 1]
    assert random.row_offsets.tolist() == [0, 3, 4, 7, 8]


def test_module_docstring_examples_are_true():
    assert doctest.testmod(pack).failed == 0


# ---------------------------------------------------------------- statistics


def test_stats_on_a_hand_made_plan():
    lengths = np.array([3, 6, 2, 4])
    plan = plan_pack(lengths, 8, "random")  # rows of 8 and 7 tokens, sample 1 split
    stats = plan_stats(plan, lengths, 8, micro_batch_size=2)
    assert stats == {
        "num_samples": 4, "num_rows": 2, "num_tokens": 15, "num_capacity_tokens": 16,
        "efficiency": 15 / 16, "num_batch_tokens": 16, "padding_fraction": 1 - 15 / 16,
        "lower_bound_rows": 2, "rows_over_lower_bound": 1.0, "num_split_samples": 1, "max_row_len": 8,
    }
    padded = plan_stats(plan_pack(lengths, 8, "padding"), lengths, 8, micro_batch_size=3)
    assert padded["num_batch_tokens"] == 3 * 6 + 4  # batches [3, 6, 2] and [4]
    assert padded["rows_over_lower_bound"] == 2.0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_row_supervised_tokens_count_each_rows_targets(strategy):
    lengths = np.array([5, 9, 1, 7, 3, 8, 2])
    samples = make_samples(lengths, seed=0)
    plan = plan_pack(lengths, 9, strategy)
    rows = pack_rows(plan, samples, "isolated")
    got = row_supervised_tokens(rows)
    assert got.dtype == np.int64 and got.tolist() == [sum(int(t != IGNORE_INDEX) for t in r["labels"]) for r in rows]
    assert row_supervised_tokens([]).tolist() == []


def test_empty_input_gives_no_rows():
    for strategy in STRATEGIES:
        plan = plan_pack(np.array([], dtype=np.int64), 8, strategy)
        assert plan.num_rows == 0 and plan.row_offsets.tolist() == [0]
        assert pack_rows(plan, [], "cross") == []
        assert plan_stats(plan, np.array([], dtype=np.int64), 8)["rows_over_lower_bound"] == 1.0


# ---------------------------------------------------------------- errors that tell the user what to change


def test_unknown_strategy_and_attention_list_the_valid_values():
    with pytest.raises(ValueError, match="'padding', 'random', 'greedy', 'bfd'"):
        plan_pack(np.array([3]), 8, "knapsack")
    plan = plan_pack(np.array([3]), 8, "padding")
    with pytest.raises(ValueError, match="'isolated', 'cross'"):
        pack_rows(plan, make_samples([3], 0), "causal")


@pytest.mark.parametrize("strategy", ["padding", "greedy", "bfd"])
def test_over_length_samples_are_refused_with_count_and_longest(strategy):
    with pytest.raises(ValueError, match=r"2 samples .*longest: 12 tokens.*over-length policy"):
        plan_pack(np.array([3, 9, 12, 8]), 8, strategy)


def test_random_accepts_over_length_samples():
    plan = plan_pack(np.array([3, 20]), 8, "random")
    assert plan.row_offsets.tolist() == [0, 2, 3, 4]
    assert plan_stats(plan, np.array([3, 20]), 8)["num_split_samples"] == 1


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="drop empty samples"):
        plan_pack(np.array([3, 0]), 8, "bfd")
    with pytest.raises(ValueError, match="1-D integer array"):
        plan_pack(np.array([3.5]), 8, "bfd")
    with pytest.raises(ValueError, match="max_seq_len must be an int >= 1"):
        plan_pack(np.array([3]), 0, "bfd")
    with pytest.raises(ValueError, match="window must be an int >= 0"):
        plan_pack(np.array([3]), 8, "bfd", window=-1)
    samples = make_samples([3, 4], 0)
    with pytest.raises(ValueError, match="plan does not match"):
        pack_rows(plan_pack(np.array([3, 5]), 8, "bfd"), samples, "isolated")
    samples[1]["labels"] = samples[1]["input_ids"].copy()
    with pytest.raises(ValueError, match="target at position 0"):
        pack_rows(plan_pack(np.array([3, 4]), 8, "bfd"), samples, "isolated")


def test_plan_is_frozen():
    plan = plan_pack(np.array([3]), 8, "bfd")
    assert isinstance(plan, PackPlan)
    with pytest.raises(AttributeError):
        plan.row_offsets = np.array([0])


def test_bench_runs_and_prints_every_strategy():
    from raypack.bench.pack import bench_pack, format_pack_table
    from raypack.data.synth import sample_lengths

    lengths = sample_lengths("opensource-1.2m", 300, seed=0)
    result = bench_pack(lengths, 1024, window=50, micro_batch_size=2, trl=False)
    assert result["trl"] is None
    assert result["strategies"]["random"]["num_truncated"] == 0
    assert result["strategies"]["bfd"]["num_truncated"] == int((lengths > 1024).sum())
    assert result["strategies"]["bfd"]["num_rows"] >= result["strategies"]["bfd"]["lower_bound_rows"]
    table = format_pack_table(result)
    assert all(strategy in table for strategy in STRATEGIES)
