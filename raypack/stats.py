"""Statistics over seeds, the one rule every report uses (the study report, `raypack report`, the sweep analysis):
an arm's mean, standard error and 95% Student-t interval, and Welch's difference of two arms (pure: numbers in,
numbers out; scipy only for the t quantile).

Values that are None or NaN (a run that has no such figure) are left out. One value has a mean and no interval
(an interval needs at least 2 seeds); a difference has an interval only when each arm has 2 values or more, and
none when neither arm varies over its seeds (its standard error is 0: said so, not divided by). A difference
whose interval includes 0 is "not significant".

>>> e = estimate([2.0, 4.0, 6.0, None])          # t(0.975, 2 df) = 4.3027
>>> e.n, e.mean, e.sd, round(e.se, 4), [round(x, 3) for x in e.ci]
(3, 4.0, 2.0, 1.1547, [-0.968, 8.968])
>>> estimate([5.0]).ci is None                   # one seed: no interval
True
>>> d = welch([5.0, 6.0, 7.0], [1.0, 2.0, 3.0])  # SE sqrt(1/3 + 1/3), 4 df, t(0.975, 4) = 2.7764
>>> d.diff, round(d.se, 4), d.df, round(d.t, 3), [round(x, 3) for x in d.ci], d.significant
(4.0, 0.8165, 4.0, 4.899, [1.733, 6.267], True)
>>> format_difference(welch([1.0, 2.0], [1.5, 2.5]), 2)  # SE sqrt(1/2), 2 df, t(0.975, 2) = 4.3027
'-0.50 [-3.54, +2.54], -0.7 SE, not significant'
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

LEVEL = 0.95
ONE_SEED = "no interval: it needs 2 seeds or more (study.seeds >= 2)"
NO_SPREAD = "SE 0: every seed gave the same value in both arms, so there is no interval and no t"


def clean(values) -> list[float]:
    """The values as floats, None and NaN left out.

    >>> clean([1, None, float("nan"), 2.5])
    [1.0, 2.5]
    """
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def t_quantile(df: float, level: float = LEVEL) -> float:
    """The two-sided Student-t critical value: P(|T| <= q) = level with df degrees of freedom (df may be
    fractional, as Welch's is).

    >>> round(t_quantile(1), 3), round(t_quantile(4), 4), round(t_quantile(1e9), 3)
    (12.706, 2.7764, 1.96)
    """
    from scipy.special import stdtrit  # the inverse of Student's t CDF

    if not 0 < level < 1 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < level < 1 and df > 0, got level={level}, df={df}")
    return float(stdtrit(df, 0.5 + level / 2))


@dataclass(frozen=True)
class Estimate:
    """One arm's figure over seeds: n values, their mean, sample sd, standard error of the mean and 95% interval
    (mean ± t(n-1) * se); sd, se and ci are None with fewer than 2 values, mean NaN with none."""

    n: int
    mean: float
    sd: float | None
    se: float | None
    ci: tuple[float, float] | None

    def to_dict(self) -> dict:
        return asdict(self)


def estimate(values, level: float = LEVEL) -> Estimate:
    """Mean, sd, standard error and Student-t interval of the values given (None and NaN left out)."""
    x = clean(values)
    if not x:
        return Estimate(0, math.nan, None, None, None)
    mean = statistics.fmean(x)
    if len(x) < 2:
        return Estimate(1, mean, None, None, None)
    sd = statistics.stdev(x)
    se = sd / math.sqrt(len(x))
    half = t_quantile(len(x) - 1, level) * se
    return Estimate(len(x), mean, sd, se, (mean - half, mean + half))


@dataclass(frozen=True)
class Difference:
    """Welch's difference of two arms' means (a - b): its standard error sqrt(va/na + vb/nb), the
    Welch-Satterthwaite degrees of freedom, the 95% interval diff ± t(df) * se, t = diff / se (how many standard
    errors) and `significant` (False when the interval includes 0). Without an interval (an arm with one value,
    or no spread in either arm) se/df/ci/t/significant are None and `note` says why."""

    n_a: int
    n_b: int
    diff: float
    se: float | None
    df: float | None
    ci: tuple[float, float] | None
    t: float | None
    significant: bool | None
    note: str

    def to_dict(self) -> dict:
        return asdict(self)


def welch(a, b, level: float = LEVEL) -> Difference:
    """Welch's two-sample difference mean(a) - mean(b), None and NaN left out of each arm."""
    x, y = clean(a), clean(b)
    if not x or not y:
        return Difference(len(x), len(y), math.nan, None, None, None, None, None, "no values in one arm")
    diff = statistics.fmean(x) - statistics.fmean(y)
    if len(x) < 2 or len(y) < 2:
        return Difference(len(x), len(y), diff, None, None, None, None, None, ONE_SEED)
    va, vb = statistics.variance(x) / len(x), statistics.variance(y) / len(y)
    if va + vb == 0:
        return Difference(len(x), len(y), diff, 0.0, None, None, None, None, NO_SPREAD)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(x) - 1) + vb ** 2 / (len(y) - 1))
    half = t_quantile(df, level) * se
    lo, hi = diff - half, diff + half
    significant = not lo <= 0 <= hi
    return Difference(len(x), len(y), diff, se, df, (lo, hi), diff / se, significant,
                      "" if significant else "not significant")


def within(ci, lo: float, hi: float) -> list[float] | None:
    """An interval intersected with [lo, hi] (None stays None): a proportion's mean lies in [0, 1] whatever the
    seeds gave, so its t interval cut there covers it as often.

    >>> within((0.87, 1.03), 0.0, 1.0), within(None, 0.0, 1.0)
    ([0.87, 1.0], None)
    """
    return [max(ci[0], lo), min(ci[1], hi)] if ci else None


def _num(value: float, digits: int, sign: bool) -> str:
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def format_estimate(e: Estimate, digits: int = 4) -> str:
    """'mean [lo, hi]', or the mean alone with one value, '-' with none.

    >>> format_estimate(estimate([2.0, 4.0, 6.0]), 2), format_estimate(estimate([3.0])), format_estimate(estimate([]))
    ('4.00 [-0.97, 8.97]', '3.0000', '-')
    """
    if e.n == 0:
        return "-"
    text = _num(e.mean, digits, False)
    return text + (f" [{_num(e.ci[0], digits, False)}, {_num(e.ci[1], digits, False)}]" if e.ci else "")


def format_difference(d: Difference, digits: int = 4) -> str:
    """'diff [lo, hi], t SE' and ', not significant' when the interval includes 0; the difference and why there
    is no interval otherwise.

    >>> format_difference(welch([5.0, 6.0, 7.0], [1.0, 2.0, 3.0]), 2)
    '+4.00 [+1.73, +6.27], 4.9 SE'
    >>> format_difference(welch([5.0], [1.0, 2.0]), 2)
    '+3.50 (no interval: one seed)'
    >>> format_difference(welch([5.0, 5.0], [1.0, 1.0]), 2)
    '+4.00 (SE 0: no spread over seeds)'
    """
    if math.isnan(d.diff):
        return "-"
    text = _num(d.diff, digits, True)
    if d.ci is None:
        return text + (" (SE 0: no spread over seeds)" if d.se == 0 else " (no interval: one seed)")
    text += f" [{_num(d.ci[0], digits, True)}, {_num(d.ci[1], digits, True)}], {d.t:.1f} SE"
    return text + ("" if d.significant else ", not significant")
