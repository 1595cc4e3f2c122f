"""Uncertainty of the numbers a user reads: intervals on accuracies, NLLs and recoveries, exact
Spearman tests and multiplicity control. Torch-free (numpy, scipy, statsmodels).

Every evaluation (``unlearn_lens.evaluation.evaluate``) keeps its per-item results under
``PER_ITEM``: for an accuracy ``{"correct": [0/1 per question]}``, for an NLL ``{"sum": [NLL summed
per text], "count": [predicted tokens per text]}``. Intervals resample those items (questions or
texts) with replacement, seeded: a percentile bootstrap of the statistic (the accuracy, the
token-weighted mean NLL, a recovery fraction). Evaluations of several models on the same items are
*paired*: one resample of item indices serves all of them, so a recovery's interval reflects which
questions moved, not two independent draws.

A recovery ``(attacked - modified) / (target - modified)`` is only defined where the gap
``target - modified`` is outside the evaluation noise: where the gap's own interval contains 0, the
recovery is NaN with a note (the noise floor), never a ratio of two noisy differences such as 1.8.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np

#: Key of an evaluation's per-item results (see the module docstring).
PER_ITEM = "per_item"
#: Coverage of every interval.
CONFIDENCE = 0.95
#: Bootstrap resamples per interval: the percentile's Monte Carlo error is about 0.005 at n = 40.
N_RESAMPLES = 2000
#: Seed of every resampling (results are reproducible run to run).
SEED = 0
#: Below this sample size a Spearman p-value is exact (every permutation); above, scipy's t approximation.
EXACT_SPEARMAN_BELOW = 10

NOISE_NOTE = "gap inside the evaluation noise (its {:.0%} interval contains 0): no recovery defined"


@dataclass(frozen=True)
class Estimate:
    """A value with its interval over ``n`` items; ``note`` says why a value is missing or weak."""

    value: float
    low: float
    high: float
    n: int
    note: str = ""

    def contains(self, x: float = 0.0) -> bool:
        """Whether ``x`` lies inside the interval (False when the interval is undefined)."""
        return bool(math.isfinite(self.low) and math.isfinite(self.high) and self.low <= x <= self.high)

    def text(self, digits: int = 2) -> str:
        """``0.62 [0.50, 0.75], n = 40``; a dash and the note where there is no value."""
        if not math.isfinite(self.value):
            return f"— (n = {self.n}{'; ' + self.note if self.note else ''})"
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return f"{self.value:.{digits}f}, n = {self.n}"
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}], n = {self.n}"

    def record(self) -> dict:
        """JSON-ready ``{value, low, high, n, note}``."""
        return asdict(self)


def nan_estimate(n: int = 0, note: str = "") -> Estimate:
    return Estimate(float("nan"), float("nan"), float("nan"), n, note)


# --- resampling ---------------------------------------------------------------------------------

def resample_indices(n: int, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """``(n_resamples, n)`` item indices drawn with replacement (one row per bootstrap resample)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def cluster_resample_indices(clusters: Sequence, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> list[np.ndarray]:
    """Row indices of each resample that draws whole clusters with replacement (as many as there are):
    the bootstrap of rows that are not independent within a cluster (a study's models of one method)."""
    labels = np.asarray(list(clusters), dtype=object)
    members = [np.flatnonzero(labels == label) for label in dict.fromkeys(labels.tolist())]
    draws = np.random.default_rng(seed).integers(0, len(members), size=(n_resamples, len(members)))
    return [np.concatenate([members[i] for i in draw]) for draw in draws]


def percentile_interval(draws: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The percentile interval of bootstrap draws of a statistic (non-finite draws left out)."""
    return _percentiles(np.asarray(draws, dtype=float), confidence)


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def _statistic(record: Mapping[str, Sequence[float]], index: np.ndarray | None = None) -> np.ndarray | float:
    """The metric of a per-item record (accuracy or token-weighted NLL), on every resample of ``index``."""
    if "correct" in record:
        correct = np.asarray(record["correct"], dtype=float)
        if index is None:
            return float(correct.mean()) if correct.size else float("nan")
        return correct[index].mean(axis=-1)
    sums, counts = np.asarray(record["sum"], dtype=float), np.asarray(record["count"], dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        if index is None:
            return float(sums.sum() / counts.sum()) if counts.sum() else float("nan")
        return sums[index].sum(axis=-1) / counts[index].sum(axis=-1)


def point_value(record: Mapping[str, Sequence[float]]) -> float:
    """The metric of a per-item record on all its items (accuracy or token-weighted NLL), no interval."""
    return float(_statistic(record))


def item_count(record: Mapping[str, Sequence[float]]) -> int:
    """Questions (accuracy) or texts (NLL) in a per-item record."""
    return len(record["correct"] if "correct" in record else record["sum"])


def metric_estimate(record: Mapping[str, Sequence[float]] | None, *, confidence: float = CONFIDENCE,
                    n_resamples: int = N_RESAMPLES, seed: int = SEED) -> Estimate:
    """The metric with its percentile-bootstrap interval over the record's items."""
    if not record or item_count(record) == 0:
        return nan_estimate(0, "no items")
    n = item_count(record)
    value = _statistic(record)
    low, high = _percentiles(np.asarray(_statistic(record, resample_indices(n, n_resamples, seed))), confidence)
    return Estimate(float(value), low, high, n)


def accuracy_estimate(correct: Sequence[int], **kwargs) -> Estimate:
    """Share correct over questions, with its bootstrap interval."""
    return metric_estimate({"correct": list(correct)}, **kwargs)


def _check_paired(records: Sequence[Mapping[str, Sequence[float]]]) -> int:
    sizes = {item_count(r) for r in records}
    if len(sizes) != 1:
        raise ValueError(f"paired records must hold the same items, got sizes {sorted(sizes)}")
    return sizes.pop()


def change_estimate(before: Mapping, after: Mapping, *, confidence: float = CONFIDENCE,
                    n_resamples: int = N_RESAMPLES, seed: int = SEED) -> Estimate:
    """``after - before`` on the same items, with its paired bootstrap interval."""
    n = _check_paired([before, after])
    if n == 0:
        return nan_estimate(0, "no items")
    index = resample_indices(n, n_resamples, seed)
    draws = np.asarray(_statistic(after, index)) - np.asarray(_statistic(before, index))
    low, high = _percentiles(draws, confidence)
    return Estimate(float(_statistic(after) - _statistic(before)), low, high, n)


def recovery_estimate(attacked: Mapping, modified: Mapping, target: Mapping, *, confidence: float = CONFIDENCE,
                      n_resamples: int = N_RESAMPLES, seed: int = SEED) -> Estimate:
    """``(attacked - modified) / (target - modified)`` with its paired bootstrap interval.

    ``target`` is the unattacked base (recovery) or the attacked base (recovery against the
    control). NaN with a note where the gap ``target - modified`` is inside the evaluation noise
    (its interval contains 0): the ratio would be a quotient of noise.
    """
    n = _check_paired([attacked, modified, target])
    if n == 0:
        return nan_estimate(0, "no items")
    index = resample_indices(n, n_resamples, seed)
    a, m, t = (np.asarray(_statistic(r, index)) for r in (attacked, modified, target))
    gap_low, gap_high = _percentiles(t - m, confidence)
    gap = _statistic(target) - _statistic(modified)
    if not math.isfinite(gap) or gap == 0 or not (gap_low > 0 or gap_high < 0):
        return nan_estimate(n, NOISE_NOTE.format(confidence))
    with np.errstate(invalid="ignore", divide="ignore"):
        draws = (a - m) / (t - m)
    low, high = _percentiles(draws, confidence)
    return Estimate(float((_statistic(attacked) - _statistic(modified)) / gap), low, high, n)


# --- correlations ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Correlation:
    """Spearman's rho over ``n`` pairs, its two-sided p-value and how it was computed."""

    rho: float
    p: float
    n: int
    method: str  # "exact" (every permutation), "asymptotic" (t approximation) or "undefined"

    def record(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=EXACT_SPEARMAN_BELOW)
def _permutations(n: int) -> np.ndarray:
    """Every permutation of ``range(n)`` as rows (n! x n; 362880 x 9 at most)."""
    return np.array(list(itertools.permutations(range(n))), dtype=np.int8).reshape(-1, n)


def exact_spearman_p(xs: np.ndarray, ys: np.ndarray) -> float:
    """Two-sided p of Spearman's rho over every pairing of ``xs`` with ``ys``: scipy ``permutation_test``'s
    rule (``permutation_type="pairings"``, ``n_resamples=inf``: twice the smaller tail, at most 1, with its
    tolerance), computed at once as the correlation of the ranks under each permutation (n = 9 in well under
    a second, where one spearmanr call per permutation takes a minute)."""
    from scipy.stats import rankdata

    rx, ry = (rankdata(v) for v in (xs, ys))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    null = rx[_permutations(len(rx))] @ ry / math.sqrt(float(rx @ rx) * float(ry @ ry))
    observed = float(rx @ ry / math.sqrt(float(rx @ rx) * float(ry @ ry)))
    gamma = abs(np.finfo(float).eps * 100 * observed)
    less, greater = np.mean(null <= observed + gamma), np.mean(null >= observed - gamma)
    return float(min(1.0, 2 * min(less, greater)))


def spearman(x: Sequence[float], y: Sequence[float]) -> Correlation:
    """Spearman's rho of the pairs where both values are finite; exact permutation p below 10 pairs.

    The exact p enumerates every pairing (``exact_spearman_p``): for n = 3 with identical ranks it is
    2/6 = 1/3, where the t approximation says 0.
    """
    from scipy import stats

    pairs = np.array([(a, b) for a, b in zip(x, y) if a is not None and b is not None
                      and math.isfinite(float(a)) and math.isfinite(float(b))], dtype=float).reshape(-1, 2)
    n = len(pairs)
    if n < 3 or np.ptp(pairs[:, 0]) == 0 or np.ptp(pairs[:, 1]) == 0:
        return Correlation(float("nan"), float("nan"), n, "undefined")
    xs, ys = pairs[:, 0], pairs[:, 1]
    rho = float(stats.spearmanr(xs, ys).statistic)
    if n < EXACT_SPEARMAN_BELOW:
        return Correlation(rho, exact_spearman_p(xs, ys), n, "exact")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = float(stats.spearmanr(xs, ys).pvalue)
    return Correlation(rho, p, n, "asymptotic")


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (statsmodels ``multipletests``) over the finite ones; NaN stays NaN."""
    from statsmodels.stats.multitest import multipletests

    values = np.asarray(p_values, dtype=float)
    adjusted = np.full(values.shape, np.nan)
    finite = np.isfinite(values)
    if finite.any():
        adjusted[finite] = multipletests(values[finite], method="holm")[1]
    return adjusted.tolist()
