"""The statistics of a comparison over cross-validation folds, from scipy.stats: the
t-interval of a mean, the paired t-test and the exact Wilcoxon signed-rank test."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
# With tied |differences| scipy's exact signed-rank distribution (method="exact") assumes
# integer ranks and gives a wrong p; its permutation method counts all 2^n sign flips
# instead, exact with ties but exponential: 4 s at 12 pairs on one core, 67 s at 16. Beyond
# this many pairs with ties, scipy's normal approximation (tie-corrected) is used and said so.
EXACT_WITH_TIES_UP_TO = 12


def t_quantile(q: float, df: int) -> float:
    """Student's t quantile: the t with P(T <= t) = q."""
    return float(stats.t.ppf(q, df))


def t_interval(values: list[float] | np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The ``confidence`` t-interval of the mean of ``values`` (NaN with fewer than two; the
    mean itself, twice, when they are all equal)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return math.nan, math.nan
    mean, sem = float(values.mean()), float(stats.sem(values))
    if sem == 0.0:  # scipy refuses a zero scale
        return mean, mean
    low, high = stats.t.interval(confidence, len(values) - 1, loc=mean, scale=sem)
    return float(low), float(high)


def paired_t_test(candidate: list[float] | np.ndarray, baseline: list[float] | np.ndarray) -> tuple[float, float]:
    """(t, two-sided p) of the paired t-test of candidate - baseline against 0
    (scipy.stats.ttest_rel): t is +-inf and p 0 when the differences are equal and non-zero,
    both NaN when they are all zero or there are fewer than two."""
    d = np.asarray(candidate, dtype=float) - np.asarray(baseline, dtype=float)
    if len(d) < 2:
        return math.nan, math.nan
    if d.std() == 0.0:  # scipy's answer, without its precision-loss warning on constant input
        mean = float(d.mean())
        return (math.nan, math.nan) if mean == 0.0 else (math.copysign(math.inf, mean), 0.0)
    result = stats.ttest_rel(candidate, baseline)
    return float(result.statistic), float(result.pvalue)


def wilcoxon_signed_rank(differences: list[float] | np.ndarray) -> tuple[float, float, int, str]:
    """(statistic min(W+, W-), two-sided p, pairs used, how p was computed) of the Wilcoxon
    signed-rank test (scipy.stats.wilcoxon): zero differences are dropped, tied absolute
    values share their mean rank. p is exact (``exact``: scipy's exact distribution without
    ties, its permutation over every sign assignment with them), or, with ties and more than
    EXACT_WITH_TIES_UP_TO pairs, the normal approximation (``approximate``). NaN when no
    difference is non-zero."""
    d = np.asarray(differences, dtype=float)
    d = d[d != 0.0]
    n = len(d)
    if n == 0:
        return math.nan, math.nan, 0, "exact"
    tied = len(np.unique(np.abs(d))) < n
    if not tied or n == 1:
        method, how = "exact", "exact"
    elif n <= EXACT_WITH_TIES_UP_TO:
        method, how = stats.PermutationMethod(n_resamples=math.inf), "exact"  # every one of the 2^n assignments
    else:
        method, how = "approx", "approximate"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # scipy's note that it fell back: said by ``how``
        result = stats.wilcoxon(d, method=method)
    return float(result.statistic), float(result.pvalue), n, how


def smallest_wilcoxon_p(n: int) -> float:
    """The smallest two-sided p the exact signed-rank test can give with ``n`` pairs: 2 / 2^n."""
    return min(1.0, 2.0 / 2**n) if n > 0 else math.nan


def mean_and_interval(values: list[float]) -> dict[str, Any]:
    """n, mean, standard deviation (n-1) and the 95% t-interval of the mean."""
    array = np.asarray(values, dtype=float)
    n = len(array)
    low, high = t_interval(array)
    return {
        "n": n,
        "mean": float(array.mean()) if n else math.nan,
        "std": float(array.std(ddof=1)) if n > 1 else math.nan,
        "ci": [low, high],
    }
