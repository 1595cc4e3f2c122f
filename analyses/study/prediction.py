"""Does a signature predict recovery? Leave-one-method-out prediction, scored on held-out predictions.

For one recovery target (an attack's recovery of one metric, one value per unlearned model), every
method in turn is held out: a model is fitted on the other methods' models only and predicts the
held-out method's. Three predictors are compared on the same folds:

- ``signatures``: ridge regression on the standardised signature metrics, its penalty chosen inside
  the training methods (leave-one-method-out again among them; leave-one-model-out when only one
  method trains). Imputation (training medians), standardisation and the penalty are all fitted on
  the training rows, and a column enters only if it is finite and not constant there;
- ``behaviour``: the same model on the behavioural effect of unlearning alone (forget / retain NLL
  and accuracy change): what a signature must beat to be worth reading;
- ``mean``: the training methods' mean recovery.

Each is scored on the pooled held-out predictions by Spearman ρ (exact p below 10 models) and out-of-
sample R² = 1 - SSE / SST, with 95 % percentile-bootstrap intervals that resample whole methods
(models of one method are not independent); the differences R²(signatures) - R²(behaviour) and
R²(signatures) - R²(mean) get the same paired intervals, and the verdict is "yes" only where the
difference's interval lies above 0. Which signatures carry the prediction: the standardised
coefficients of the ridge fitted to every model (penalty chosen by leave-one-method-out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from analyses.uncertainty import CONFIDENCE, cluster_resample_indices, percentile_interval, spearman

#: Ridge penalties searched inside the training folds (on standardised columns).
ALPHAS = tuple(float(a) for a in np.logspace(-3, 3, 13))
#: The three predictors compared, in the table's order.
PREDICTORS = ("signatures", "behaviour", "mean")
#: Fewest models with a finite recovery (and methods) a target needs to be predicted at all.
MIN_MODELS, MIN_METHODS = 4, 2
#: Fewest methods whose resampling gives an interval (two methods give three distinct resamples).
MIN_METHODS_FOR_INTERVAL = 4
#: How many of the largest coefficients a sentence names, and the smallest |coefficient| named.
TOP_COEFFICIENTS, SMALLEST_COEFFICIENT = 3, 0.005


@dataclass
class Fitted:
    """A model fitted on training rows: ``predict(X)`` of new rows, the columns it used and their
    standardised coefficients (none for the mean), and the penalty chosen."""

    predict: Callable[[np.ndarray], np.ndarray]
    columns: list[str] = field(default_factory=list)
    coefficients: list[float] = field(default_factory=list)
    alpha: float = float("nan")


Fit = Callable[[np.ndarray, np.ndarray, np.ndarray, Sequence[str]], Fitted]


def fit_mean(X: np.ndarray, y: np.ndarray, groups: np.ndarray, names: Sequence[str] = ()) -> Fitted:
    """The training mean, whatever the row."""
    value = float(np.mean(y))
    return Fitted(lambda Z: np.full(len(Z), value))


def inner_splits(groups: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The folds the penalty is chosen on: leave one training method out (leave one model out when one
    method trains)."""
    from sklearn.model_selection import LeaveOneGroupOut, LeaveOneOut

    splitter = LeaveOneGroupOut() if len(set(groups.tolist())) >= 2 else LeaveOneOut()
    return list(splitter.split(np.zeros((len(groups), 1)), groups=groups))


def _standardised_ridge(X: np.ndarray, y: np.ndarray, alpha: float):
    """Training medians for missing values, standardisation and ridge, all fitted on ``X``, ``y``."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(SimpleImputer(strategy="median"), StandardScaler(), Ridge(alpha=alpha)).fit(X, y)


def ridge_path(X: np.ndarray, y: np.ndarray, alphas: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``(intercepts (A,), coefficients (A, p))`` of ridge regression with an intercept for every penalty at
    once, from one SVD of the centred ``X``: what ``sklearn.linear_model.Ridge(alpha).fit(X, y)`` gives
    (a test checks it), at the cost of one fit for the whole grid."""
    x_mean, y_mean = X.mean(axis=0), float(y.mean())
    u, singular, vt = np.linalg.svd(X - x_mean, full_matrices=False)
    shrink = singular / (singular ** 2 + np.asarray(alphas, dtype=float)[:, None])
    coefficients = (shrink * (u.T @ (y - y_mean))) @ vt
    return y_mean - coefficients @ x_mean, coefficients


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Columns centred and scaled by ``train``'s mean and standard deviation (1 where it is 0), as
    ``StandardScaler`` does."""
    mean, scale = train.mean(axis=0), train.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    return [(x - mean) / scale for x in (train, *others)]


def choose_alpha(X: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    """The penalty of ``ALPHAS`` with the least squared error over ``inner_splits`` (the smallest on ties);
    each inner fold standardises on its own training rows."""
    errors = np.zeros(len(ALPHAS))
    for train, test in inner_splits(groups):
        inner, held = _standardise(X[train], X[test])
        intercepts, coefficients = ridge_path(inner, y[train], ALPHAS)
        predicted = held @ coefficients.T + intercepts  # (test rows, alphas)
        errors += np.sum((y[test][:, None] - predicted) ** 2, axis=0)
    return ALPHAS[int(np.argmin(errors))]


def fit_ridge(X: np.ndarray, y: np.ndarray, groups: np.ndarray, names: Sequence[str]) -> Fitted:
    """Ridge on the standardised usable columns (finite and not constant in these rows), penalty by
    ``choose_alpha`` on these rows only; the training mean if no column is usable."""
    usable = np.all(np.isfinite(X), axis=0) & (np.ptp(np.where(np.isfinite(X), X, 0.0), axis=0) > 0)
    if not usable.any() or len(y) < 3:
        return fit_mean(X, y, groups)
    alpha = choose_alpha(X[:, usable], y, groups)
    model = _standardised_ridge(X[:, usable], y, alpha)
    return Fitted(lambda Z: model.predict(Z[:, usable]), [n for n, u in zip(names, usable) if u],
                  [float(c) for c in model[-1].coef_], alpha)


def leave_one_method_out(X: np.ndarray, y: np.ndarray, methods: np.ndarray, fit: Fit,
                         names: Sequence[str] = ()) -> np.ndarray:
    """Each method's predictions from a model fitted on the other methods' rows only."""
    predictions = np.full(len(y), np.nan)
    for method in dict.fromkeys(methods.tolist()):
        test = methods == method
        fitted = fit(X[~test], y[~test], methods[~test], names)
        predictions[test] = fitted.predict(X[test])
    return predictions


def r_squared(y: np.ndarray, predicted: np.ndarray) -> float:
    """Out-of-sample R² = 1 - SSE / SST (SST around the measured values' mean); NaN when y is constant."""
    total = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - predicted) ** 2)) / total if total > 0 else float("nan")


def bootstrap_scores(y: np.ndarray, predicted: np.ndarray, resamples: Sequence[np.ndarray]) -> np.ndarray:
    """``(resamples, 2)``: R² and Spearman ρ of each resample of rows (NaN where undefined), computed
    for all resamples of one length at once."""
    from scipy.stats import rankdata

    out = np.full((len(resamples), 2), np.nan)
    by_length: dict[int, list[int]] = {}
    for i, index in enumerate(resamples):
        by_length.setdefault(len(index), []).append(i)
    for members in by_length.values():
        index = np.stack([resamples[i] for i in members])
        measured, guess = y[index], predicted[index]
        with np.errstate(invalid="ignore", divide="ignore"):
            total = np.sum((measured - measured.mean(axis=1, keepdims=True)) ** 2, axis=1)
            out[members, 0] = np.where(total > 0, 1 - np.sum((measured - guess) ** 2, axis=1) / total, np.nan)
            a, b = (rankdata(v, axis=1) for v in (measured, guess))
            a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
            norm = np.sqrt(np.sum(a * a, axis=1) * np.sum(b * b, axis=1))
            out[members, 1] = np.where(norm > 0, np.sum(a * b, axis=1) / norm, np.nan)
    return out


def verdict(low: float, high: float) -> str:
    """Plain words for an interval of a difference: "yes" only when it lies above 0."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "undetermined (no interval)"
    if low > 0:
        return "yes"
    if high < 0:
        return "no (worse)"
    return "no (interval contains 0)"


def carried_by(fitted: Fitted, top: int = TOP_COEFFICIENTS) -> str:
    """``"a (+0.41), b (-0.20)"``: the columns with the largest standardised coefficients."""
    ranked = sorted(zip(fitted.columns, fitted.coefficients), key=lambda pair: -abs(pair[1]))[:top]
    return ", ".join(f"{name} ({value:+.2f})" for name, value in ranked if abs(value) >= SMALLEST_COEFFICIENT)


@dataclass
class TargetData:
    """One recovery target: ``y`` per model, each model's method, and both predictor matrices."""

    target: str
    y: np.ndarray
    methods: np.ndarray
    signatures: np.ndarray
    signature_names: list[str]
    behaviour: np.ndarray
    behaviour_names: list[str]
    models: list[str] = field(default_factory=list)


def _matrices(data: TargetData) -> dict[str, tuple[np.ndarray, list[str], Fit]]:
    return {"signatures": (data.signatures, data.signature_names, fit_ridge),
            "behaviour": (data.behaviour, data.behaviour_names, fit_ridge),
            "mean": (np.zeros((len(data.y), 0)), [], fit_mean)}


def predict_target(data: TargetData, confidence: float = CONFIDENCE) -> tuple[list[dict], list[dict]]:
    """(one row per predictor: scores with intervals, verdicts and what carries the prediction;
    one row per model: measured and held-out predicted recovery). Models with no finite recovery
    are left out; a target with too few models or methods gets rows with a note only."""
    keep = np.isfinite(data.y)
    y, methods = data.y[keep], data.methods[keep]
    models = [m for m, k in zip(data.models or [""] * len(keep), keep) if k]
    n_methods = len(set(methods.tolist()))
    base = {"target": data.target, "n_models": int(keep.sum()), "n_methods": n_methods}
    if keep.sum() < MIN_MODELS or n_methods < MIN_METHODS:
        note = (f"too few models with a recovery ({int(keep.sum())} of {len(keep)}, {n_methods} method(s); "
                f"needs {MIN_MODELS} and {MIN_METHODS})")
        return [{**base, "predictors": name, "note": note} for name in PREDICTORS], []
    predicted, fitted_all = {}, {}
    for name, (X, names, fit) in _matrices(data).items():
        predicted[name] = leave_one_method_out(X[keep], y, methods, fit, names)
        fitted_all[name] = fit(X[keep], y, methods, names)
    resamples = cluster_resample_indices(methods) if n_methods >= MIN_METHODS_FOR_INTERVAL else []
    draws = {name: bootstrap_scores(y, p, resamples) for name, p in predicted.items()}
    note = "" if resamples else f"no interval: fewer than {MIN_METHODS_FOR_INTERVAL} methods to resample"
    rows = []
    for name in PREDICTORS:
        correlation = spearman(y, predicted[name])
        r2_low, r2_high = percentile_interval(draws[name][:, 0], confidence)
        rho_low, rho_high = percentile_interval(draws[name][:, 1], confidence)
        row = {**base, "predictors": name, "spearman": correlation.rho, "spearman_low": rho_low,
               "spearman_high": rho_high, "spearman_p": correlation.p, "spearman_p_method": correlation.method,
               "r2": r_squared(y, predicted[name]), "r2_low": r2_low, "r2_high": r2_high,
               "alpha": fitted_all[name].alpha, "carried_by": carried_by(fitted_all[name]), "interval_note": note}
        if name == "signatures":
            for other in ("behaviour", "mean"):
                difference = draws["signatures"][:, 0] - draws[other][:, 0]
                low, high = percentile_interval(difference, confidence)
                row.update({f"r2_minus_{other}": row["r2"] - r_squared(y, predicted[other]),
                            f"r2_minus_{other}_low": low, f"r2_minus_{other}_high": high,
                            f"beats_{other}": verdict(low, high)})
        rows.append(row)
    per_model = [{"target": data.target, "model": model, "method": method, "measured": float(value),
                  **{f"predicted_{name}": float(predicted[name][i]) for name in PREDICTORS}}
                 for i, (model, method, value) in enumerate(zip(models, methods.tolist(), y))]
    return rows, per_model
