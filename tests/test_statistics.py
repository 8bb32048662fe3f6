"""seg/analysis/statistics.py: scipy.stats' t interval, paired t-test and exact Wilcoxon give the
numbers of the hand-written statistics they replaced; ties, zeros and the exact test's floor."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from seg.analysis.statistics import (
    EXACT_WITH_TIES_UP_TO,
    paired_t_test,
    smallest_wilcoxon_p,
    t_interval,
    t_quantile,
    wilcoxon_signed_rank,
)

# What the hand-written statistics (Student's t by the incomplete beta's continued fraction, its
# quantile by bisection, the exact signed-rank distribution by subset sums over doubled ranks)
# gave before scipy.stats replaced them, printed by that code at commit 9e779bd:
# (candidate, baseline, (t, p), 95% interval of the differences, (W, p, pairs)).
PAIRED = {
    "five folds": (
        [0.431, 0.405, 0.468, 0.387, 0.441],
        [0.412, 0.398, 0.455, 0.391, 0.42],
        (2.4772941491413296, 0.06840928941500819),
        (-0.001352479966496404, 0.023752479966496425),
        (1.0, 0.125, 5),
    ),
    "three folds": (
        [0.52, 0.49, 0.55],
        [0.5, 0.5, 0.51],
        (1.1470786693528086, 0.3700592116512885),
        (-0.04584942812709111, 0.07918276146042447),
        (1.0, 0.5, 3),
    ),
    "two folds": ([0.61, 0.58], [0.6, 0.59], (0.0, 1.0), (-0.127062047361747, 0.127062047361747), (1.5, 1.0, 2)),
    "ten folds": (
        [0.4, 0.40900000000000003, 0.41800000000000004, 0.439, 0.448, 0.457, 0.47800000000000004, 0.487, 0.496, 0.517],
        [
            0.4,
            0.41000000000000003,
            0.42000000000000004,
            0.43000000000000005,
            0.44,
            0.45,
            0.46,
            0.47000000000000003,
            0.48000000000000004,
            0.49,
        ],
        (3.2860336110777317, 0.009437909440678877),
        (0.003084684466950067, 0.016715315533049918),
        (3.0, 0.01953125, 9),
    ),
}
TIES = [
    ([1.0, -2.0, 2.0, 4.0, 5.0], (2.5, 0.25, 5)),
    ([0.0, 1.0, -1.0, 2.0, 2.0, -3.0, 0.0], (6.5, 0.9375, 5)),
    ([0.5, 0.5, 0.5, -0.5, 1.0, 1.0], (2.5, 0.15625, 6)),
    ([-3.0, -1.0, -1.0, 2.0, 3.0, 3.0, 3.0, 1.0, -2.0, 2.0], (17.5, 0.35546875, 10)),
]
T_975 = {1: 12.706204736174689, 2: 4.30265272974946, 4: 2.776445105197794, 9: 2.262157162798204}


@pytest.mark.parametrize("name", sorted(PAIRED))
def test_scipys_statistics_equal_the_hand_written_ones_they_replace(name):
    candidate, baseline, t_test, interval, wilcoxon = PAIRED[name]
    differences = [b - a for a, b in zip(baseline, candidate, strict=True)]
    assert paired_t_test(candidate, baseline) == pytest.approx(t_test, rel=1e-12, abs=1e-15)
    assert t_interval(differences) == pytest.approx(interval, rel=1e-12)
    assert wilcoxon_signed_rank(differences) == pytest.approx((*wilcoxon, "exact"), rel=1e-12)


def test_the_exact_wilcoxon_with_ties_and_the_t_quantiles_equal_the_hand_written_ones():
    for differences, (w, p, n) in TIES:
        assert wilcoxon_signed_rank(differences) == (w, pytest.approx(p, rel=1e-12), n, "exact")
    for df, t in T_975.items():
        assert t_quantile(0.975, df) == pytest.approx(t, rel=1e-12)


def test_many_tied_pairs_get_the_normal_approximation_and_say_so():
    n = EXACT_WITH_TIES_UP_TO + 1
    w, p, used, how = wilcoxon_signed_rank([1.0, 1.0, -2.0] + [float(k) for k in range(3, n)])
    assert (used, how) == (n, "approximate") and 0.0 < p < 1.0 and w == 3.0


@pytest.mark.filterwarnings("ignore:Precision loss occurred:RuntimeWarning")  # scipy, on constant differences
def test_wilcoxon_is_exact_with_ties_and_zeros_and_knows_its_floor():
    # the smallest two-sided p with 5 pairs: all five of one sign, 2 / 2^5
    assert smallest_wilcoxon_p(5) == 0.0625 == stats.wilcoxon([0.01, 0.02, 0.03, 0.04, 0.05]).pvalue
    assert wilcoxon_signed_rank([0.01, 0.02, 0.03, 0.04, 0.05])[:2] == (0.0, 0.0625)
    # ties share their mean rank and the distribution counts every sign assignment exactly
    rng = np.random.default_rng(1)
    for _ in range(20):
        d = rng.choice([-3.0, -1.0, 1.0, 2.0, 3.0, 0.0], size=7)
        w, p, n, how = wilcoxon_signed_rank(d)
        kept = d[d != 0]
        ranks = stats.rankdata(np.abs(kept))
        if len(kept) == 0:
            assert math.isnan(p) and n == 0
            continue
        observed = ranks[kept > 0].sum()
        sums = [sum(r for r, s in zip(ranks, signs, strict=True) if s)
                for signs in itertools.product((0, 1), repeat=len(kept))]  # fmt: skip
        tail = min(sum(s <= observed for s in sums), sum(s >= observed for s in sums)) / len(sums)
        assert p == pytest.approx(min(1.0, 2 * tail), rel=1e-12)
        assert w == min(observed, ranks.sum() - observed) and n == len(kept) and how == "exact"
    # scipy's method="exact" assumes no ties: 0.3125 here, where counting the assignments gives 0.25
    assert wilcoxon_signed_rank([1.0, -2.0, 2.0, 4.0, 5.0])[:2] == (2.5, 0.25)
    # equal non-zero differences: t is infinite and p 0, as scipy says; all zero: undefined
    assert paired_t_test([1.5, 2.5, 3.5], [1.0, 2.0, 3.0]) == (math.inf, 0.0)
    expected = stats.ttest_rel([1.5, 2.5, 3.5], [1.0, 2.0, 3.0])
    assert (expected.statistic, expected.pvalue) == (math.inf, 0.0)
    assert all(math.isnan(x) for x in paired_t_test([1.0, 2.0], [1.0, 2.0]))
