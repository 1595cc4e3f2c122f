"""Intervals, exact Spearman tests and Holm adjustment (analyses.uncertainty) against known answers
and independent computations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from analyses import uncertainty as U


def _brute_force_spearman_p(x, y) -> float:
    """Two-sided exact p by enumerating every permutation of x (scipy's two-sided rule: twice the smaller tail)."""
    observed = stats.spearmanr(x, y).statistic
    values = np.array([stats.spearmanr(np.array(x)[list(p)], y).statistic for p in itertools.permutations(range(len(x)))])
    greater = np.mean(values >= observed - 1e-12)
    less = np.mean(values <= observed + 1e-12)
    return min(1.0, 2 * min(greater, less))


def test_exact_spearman_p_for_three_identical_ranks_is_one_third():
    result = U.spearman([1, 2, 3], [10, 20, 30])
    assert result.rho == pytest.approx(1.0)
    assert result.p == pytest.approx(1 / 3)
    assert (result.n, result.method) == (3, "exact")
    assert stats.spearmanr([1, 2, 3], [10, 20, 30]).pvalue == 0  # what the t approximation says


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_spearman_p_equals_an_enumeration_of_every_permutation(seed):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=6), rng.normal(size=6)
    y = y + (seed - 1) * x  # negative, none, positive association
    result = U.spearman(x, y)
    assert result.method == "exact"
    assert result.p == pytest.approx(_brute_force_spearman_p(x, y), abs=1e-12)


def test_spearman_from_ten_pairs_is_scipys_asymptotic_and_skips_missing_values():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=12), rng.normal(size=12)
    x_missing = list(x) + [float("nan"), None]
    y_missing = list(y) + [1.0, 2.0]
    result = U.spearman(x_missing, y_missing)
    expected = stats.spearmanr(x, y)
    assert (result.n, result.method) == (12, "asymptotic")
    assert result.rho == pytest.approx(expected.statistic)
    assert result.p == pytest.approx(expected.pvalue)


def test_spearman_is_undefined_for_constant_or_too_few_values():
    assert U.spearman([1, 2], [3, 4]).method == "undefined"
    assert math.isnan(U.spearman([1, 1, 1, 1], [1, 2, 3, 4]).rho)


def _holm_by_hand(p):
    """Holm (1979): sort ascending, multiply the i-th smallest (0-based) by m - i, running maximum, cap at 1."""
    order = np.argsort(p)
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted


def test_holm_equals_the_step_down_formula_and_keeps_nan():
    p = [0.01, 0.04, 0.03, 0.2, float("nan"), 0.005]
    adjusted = U.holm(p)
    finite = [v for v in p if not math.isnan(v)]
    expected = _holm_by_hand(np.array(finite))
    assert np.allclose([a for a in adjusted if not math.isnan(a)], expected)
    assert math.isnan(adjusted[4])


def test_accuracy_interval_matches_scipys_percentile_bootstrap_and_covers_the_value():
    correct = [1] * 26 + [0] * 14
    estimate = U.accuracy_estimate(correct)
    assert estimate.value == pytest.approx(26 / 40)
    assert estimate.n == 40
    assert estimate.low < estimate.value < estimate.high
    reference = stats.bootstrap((np.array(correct, float),), np.mean, method="percentile", n_resamples=20000,
                                random_state=np.random.default_rng(1)).confidence_interval
    assert estimate.low == pytest.approx(reference.low, abs=0.03)
    assert estimate.high == pytest.approx(reference.high, abs=0.03)
    assert U.accuracy_estimate(correct) == estimate  # seeded
    assert "0.65 [" in estimate.text() and "n = 40" in estimate.text()


def test_nll_estimate_is_the_token_weighted_mean_and_an_empty_record_says_so():
    record = {"sum": [2.0, 9.0, 4.0], "count": [1, 3, 4]}
    estimate = U.metric_estimate(record)
    assert estimate.value == pytest.approx(15 / 8)
    assert estimate.low <= 15 / 8 <= estimate.high
    empty = U.metric_estimate({"correct": []})
    assert math.isnan(empty.value) and empty.n == 0 and empty.note


def test_recovery_known_answers():
    base = {"correct": [1] * 30 + [0] * 10}
    modified = {"correct": [0] * 30 + [0] * 10}
    full = U.recovery_estimate(base, modified, base)  # attacked back at the base, question for question
    assert (full.value, full.low, full.high) == (1.0, 1.0, 1.0)
    none = U.recovery_estimate(modified, modified, base)
    assert (none.value, none.low, none.high) == (0.0, 0.0, 0.0)
    half = U.recovery_estimate({"correct": [1] * 15 + [0] * 25}, modified, base)
    assert half.value == pytest.approx(0.5)
    assert half.low < 0.5 < half.high


def test_recovery_whose_gap_is_inside_the_noise_is_nan_with_a_note():
    base = {"correct": [1] * 21 + [0] * 19}
    modified = {"correct": [1] * 20 + [0] * 20}  # one question of 40 apart
    attacked = {"correct": [1] * 22 + [0] * 18}  # would read as recovery 2.0
    estimate = U.recovery_estimate(attacked, modified, base)
    assert math.isnan(estimate.value)
    assert "noise" in estimate.note
    assert estimate.n == 40


def test_recovery_of_nlls_resamples_texts_paired():
    modified = {"sum": [30.0, 40.0, 50.0, 60.0], "count": [10, 10, 10, 10]}
    base = {"sum": [20.0, 30.0, 40.0, 50.0], "count": [10, 10, 10, 10]}
    attacked = {"sum": [25.0, 35.0, 45.0, 55.0], "count": [10, 10, 10, 10]}
    estimate = U.recovery_estimate(attacked, modified, base)
    assert estimate.value == pytest.approx(0.5)
    assert estimate.low == pytest.approx(0.5) and estimate.high == pytest.approx(0.5)  # every text moved by half
    with pytest.raises(ValueError, match="same items"):
        U.recovery_estimate(attacked, modified, {"sum": [1.0], "count": [1]})


def test_change_of_the_same_items_is_paired():
    before = {"correct": [1, 0, 1, 0, 1, 1, 0, 0]}
    change = U.change_estimate(before, before)
    assert (change.value, change.low, change.high) == (0.0, 0.0, 0.0)
    after = {"correct": [1, 1, 1, 1, 1, 1, 1, 1]}
    change = U.change_estimate(before, after)
    assert change.value == pytest.approx(0.5)
    assert change.contains(0.5) and not change.contains(0.0)


@pytest.mark.parametrize("n, seed", [(4, 0), (5, 1), (6, 2), (7, 3)])
def test_exact_spearman_p_equals_scipys_permutation_test_with_ties(n, seed):
    """The vectorised enumeration against scipy's ``permutation_test`` (every pairing), ties included."""
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, 4, size=n).astype(float), rng.normal(size=n)  # x has ties
    y = y + x
    reference = stats.permutation_test((x,), lambda a: stats.spearmanr(a, y).statistic, permutation_type="pairings",
                                       n_resamples=np.inf, alternative="two-sided").pvalue
    assert U.spearman(x, y).p == pytest.approx(min(1.0, reference), abs=1e-12)

