"""raypack.stats against scipy.stats and against textbook values worked by hand (pure, no Ray).

    .venv/bin/pytest tests/test_stats.py -q
"""

import doctest
import math

import pytest
import scipy.stats

from raypack import stats
from raypack.stats import estimate, welch

SAMPLES = [([2.1, 2.5, 1.9, 2.8], [2.9, 3.3, 3.0]), ([0.5, 0.7], [0.1, 0.9, 0.4, 0.6, 0.2]),
           ([-2.7, -2.4, -3.0], [-0.1, -0.2, 0.05]), ([1.0, 1.0, 1.0], [1.3, 0.9, 1.1])]


@pytest.mark.parametrize("a, b", SAMPLES)
def test_welch_is_scipys_ttest_ind_with_unequal_variances(a, b):
    d, ref = welch(a, b), scipy.stats.ttest_ind(a, b, equal_var=False)
    assert d.t == pytest.approx(ref.statistic, rel=1e-12) and d.df == pytest.approx(ref.df, rel=1e-12)
    assert d.ci == pytest.approx(tuple(ref.confidence_interval(0.95)), rel=1e-9)
    assert d.significant == (ref.pvalue < 0.05)
    # Negative control: Student's pooled test (equal_var=True) is a different test with other df and interval.
    pooled = scipy.stats.ttest_ind(a, b, equal_var=True)
    assert d.df != pytest.approx(pooled.df, rel=1e-3)


@pytest.mark.parametrize("a", [a for sample in SAMPLES for a in sample if len(set(a)) > 1])
def test_estimate_is_scipys_t_interval(a):
    e = estimate(a)
    assert e.se == pytest.approx(scipy.stats.sem(a), rel=1e-12)
    assert e.ci == pytest.approx(scipy.stats.t.interval(0.95, len(a) - 1, loc=e.mean, scale=e.se), rel=1e-12)


def test_textbook_values_by_hand():
    """Worked on paper with the t table (t(0.975; 2) = 4.303, t(0.975; 4) = 2.776), not with scipy."""
    e = estimate([2.0, 4.0, 6.0])  # sd 2, se 2 / sqrt(3) = 1.1547, half-width 4.303 * 1.1547 = 4.968
    assert (e.n, e.mean, e.sd) == (3, 4.0, 2.0) and e.se == pytest.approx(1.1547, abs=1e-4)
    assert e.ci == pytest.approx((4 - 4.968, 4 + 4.968), abs=1e-3)
    d = welch([5.0, 6.0, 7.0], [1.0, 2.0, 3.0])  # se sqrt(1/3 + 1/3) = 0.8165; df (2/3)^2 / (2 (1/3)^2 / 2) = 4
    assert (d.diff, d.df) == (4.0, pytest.approx(4.0)) and d.t == pytest.approx(4 / 0.8165, abs=1e-3)
    assert d.ci == pytest.approx((4 - 2.776 * 0.8165, 4 + 2.776 * 0.8165), abs=1e-3) and d.significant
    # Unequal variances: va/na = 4/2 = 2, vb/nb = 0.25/5 = 0.05; df = 2.05^2 / (2^2/1 + 0.05^2/4) = 1.0503.
    d = welch([1.0, 3.82842712474619], [0.0, 0.0, 0.5, 1.0, 1.0])
    assert d.df == pytest.approx(2.05**2 / (4 + 0.05**2 / 4), rel=1e-9)


def test_overlapping_arms_are_not_significant_and_separated_ones_are_with_their_sign():
    lower, higher, overlapping = [1.0, 1.1, 0.9], [2.0, 2.1, 1.9], [1.05, 0.85, 1.15]
    assert welch(lower, higher).significant is True and welch(lower, higher).diff < 0
    assert welch(higher, lower).t > 0 and welch(higher, lower).ci[0] > 0
    negative = welch(lower, overlapping)  # the negative control: the interval includes 0
    assert negative.significant is False and negative.ci[0] < 0 < negative.ci[1]
    assert negative.note == "not significant" and stats.format_difference(negative).endswith(", not significant")


def test_one_value_no_values_nan_and_no_spread():
    assert estimate([3.0]) == stats.Estimate(1, 3.0, None, None, None)
    assert estimate([None, float("nan")]).n == 0 and math.isnan(estimate([]).mean)
    assert estimate([1.0, None, 3.0, float("nan")]) == estimate([1.0, 3.0])  # left out, not zeros
    one = welch([1.0], [2.0, 3.0])
    assert one.diff == -1.5 and one.ci is None and one.significant is None and "study.seeds >= 2" in one.note
    flat = welch([2.0, 2.0, 2.0], [1.0, 1.0])  # no spread in either arm: said so, no division by zero
    assert flat.diff == 1.0 and flat.se == 0.0 and flat.t is None and flat.ci is None and "SE 0" in flat.note
    half_flat = welch([2.0, 2.0, 2.0], [1.0, 1.2])  # one flat arm: the other's spread alone, df = nb - 1
    assert half_flat.df == pytest.approx(1.0) and half_flat.ci is not None
    assert estimate([2.0, 2.0]).ci == (2.0, 2.0)  # one arm alone with no spread: a zero-width interval
    assert math.isnan(welch([], [1.0]).diff)
    with pytest.raises(ValueError, match="df > 0"):
        stats.t_quantile(0)


def test_examples_in_the_docstrings():
    assert doctest.testmod(stats).failed == 0
