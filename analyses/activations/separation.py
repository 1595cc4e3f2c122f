"""Forget / retain separation (``activation_separation/``): centroid cosine distance, held-out AUC, variance ratio.

- centroids: mean of the masked token states of each split (token-weighted), per layer;
- cosine distance = 1 - cos(centroid_forget, centroid_retain);
- AUC: the probe classifier (standardised logistic regression, fixed seed) trained on a stratified
  70/30 split of the last-token states and scored on the held-out 30%;
- variance ratio (Fisher-style, trace form) over token states: between-class variance
  sum_c n_c ||mu_c - mu||^2 / n divided by within-class variance sum_c tr(m2_c) / n.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from analyses.activations.probes import labelled, make_classifier
from analyses.activations.reductions import Moments

COLUMNS = ["layer", "model", "role", "cosine_distance", "auc", "variance_ratio", "between_variance",
           "within_variance"]
DEFINITIONS = {
    "cosine_distance": "1 - cos(mean forget token state, mean retain token state)",
    "auc": "held-out ROC AUC of StandardScaler+LogisticRegression on last-token states (stratified 70/30 split)",
    "variance_ratio": "between-class / within-class variance of token states (trace form)",
}


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    """1 - cosine similarity; 0 when either vector is zero."""
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return 0.0 if norm == 0 else float(1.0 - np.dot(a, b) / norm)


def variance_ratio(forget: Moments, retain: Moments, layer: int) -> tuple[float, float, float]:
    """``(ratio, between, within)`` for one layer from the two splits' token moments."""
    n = forget.n + retain.n
    mu = (forget.n * forget.mean[layer] + retain.n * retain.mean[layer]) / n
    between = (forget.n * np.sum((forget.mean[layer] - mu) ** 2)
               + retain.n * np.sum((retain.mean[layer] - mu) ** 2)) / n
    within = (forget.m2_trace[layer] + retain.m2_trace[layer]) / n
    ratio = float(between / within) if within > 0 else float("inf") if between > 0 else float("nan")
    return ratio, float(between), float(within)


def heldout_auc(forget: np.ndarray, retain: np.ndarray, C: float = 1.0, max_iter: int = 1000,
                seed: int = 0, test_size: float = 0.3) -> float:
    """Held-out AUC of the linear classifier; nan when a class has fewer than 2 samples."""
    if min(len(forget), len(retain)) < 2:
        return float("nan")
    X, y = labelled(forget, retain)
    n_test = max(2, int(round(test_size * len(y))))
    n_test = min(n_test, len(y) - 2)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=n_test, stratify=y, random_state=seed)
    if len(np.unique(y_test)) < 2 or len(np.unique(y_train)) < 2:
        return float("nan")
    classifier = make_classifier(C, max_iter, seed).fit(X_train, y_train)
    return float(roc_auc_score(y_test, classifier.decision_function(X_test)))


def layer_aucs(last_forget: np.ndarray, last_retain: np.ndarray, C: float = 1.0, max_iter: int = 1000,
               seed: int = 0, map_layers=map) -> list[float]:
    """Held-out AUC at every layer of (layer, sample, hidden) last-token states (``map_layers`` as in
    ``probes.probe_rows``)."""
    return list(map_layers(partial(heldout_auc, C=C, max_iter=max_iter, seed=seed), last_forget, last_retain))


def separation_rows(model: str, role: str, forget: Moments, retain: Moments, aucs: list[float],
                    layers: Sequence[int] | None = None) -> list[dict]:
    """One row per layer for one model (``role`` is ``a`` for the base, ``b`` for the modified);
    ``layers``: the cached layers' numbers (default 0, 1, ...)."""
    layers = list(range(forget.mean.shape[0])) if layers is None else list(layers)
    rows = []
    for i, layer in enumerate(layers):
        ratio, between, within = variance_ratio(forget, retain, i)
        rows.append({
            "layer": int(layer), "model": model, "role": role,
            "cosine_distance": cosine_distance(forget.mean[i], retain.mean[i]),
            "auc": aucs[i], "variance_ratio": ratio, "between_variance": between, "within_variance": within,
        })
    return rows
