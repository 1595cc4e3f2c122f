"""Linear probes (``linear_probes/``) and the shared linear classifier used by the separation AUC.

A probe is ``StandardScaler`` + ``LogisticRegression(C, max_iter)`` on last-token states, forget
(label 1) vs retain (label 0), scored by stratified k-fold cross-validation (5 folds, fewer when a
class has fewer than 5 samples) with a fixed seed: accuracy, selectivity (accuracy minus the
majority-class rate) and AUC of the out-of-fold decision values.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from unlearn_lens.core.errors import UserError

COLUMNS = ["layer", "accuracy", "accuracy_std", "majority_baseline", "selectivity", "auc", "n_forget",
           "n_retain", "n_folds"]


def make_classifier(C: float = 1.0, max_iter: int = 1000, seed: int = 0) -> Pipeline:
    """Standardised logistic regression with a fixed seed."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))


def labelled(forget: np.ndarray, retain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stack two (n, d) arrays into ``(X, y)`` with forget = 1, retain = 0, in float64."""
    X = np.concatenate([forget, retain]).astype(np.float64)
    y = np.concatenate([np.ones(len(forget), int), np.zeros(len(retain), int)])
    return X, y


def probe_layer(forget: np.ndarray, retain: np.ndarray, C: float = 1.0, max_iter: int = 1000,
                seed: int = 0) -> dict:
    """Cross-validated probe metrics for one layer's last-token states."""
    smallest = min(len(forget), len(retain))
    if smallest < 2:
        raise UserError(f"linear probes need at least 2 forget and 2 retain samples, got {len(forget)} and "
                        f"{len(retain)}")
    X, y = labelled(forget, retain)
    folds = StratifiedKFold(n_splits=min(5, smallest), shuffle=True, random_state=seed)
    # one fit per fold: out-of-fold decision values give both the fold accuracies and the AUC
    decision = cross_val_predict(make_classifier(C, max_iter, seed), X, y, cv=folds, method="decision_function")
    predicted = (decision > 0).astype(int)  # LogisticRegression.predict's rule for labels {0, 1}
    accuracy = np.array([(predicted[test] == y[test]).mean() for _, test in folds.split(X, y)])
    majority = max(len(forget), len(retain)) / len(y)
    return {"accuracy": float(accuracy.mean()), "accuracy_std": float(accuracy.std()),
            "majority_baseline": float(majority), "selectivity": float(accuracy.mean() - majority),
            "auc": float(roc_auc_score(y, decision)), "n_forget": len(forget), "n_retain": len(retain),
            "n_folds": folds.get_n_splits()}


def probe_rows(last_forget: np.ndarray, last_retain: np.ndarray, C: float = 1.0, max_iter: int = 1000,
               seed: int = 0, map_layers=map, layers: Sequence[int] | None = None) -> list[dict]:
    """One row per layer; ``last_*`` are (layer, sample, hidden). ``map_layers`` has ``map``'s signature
    (function, then one iterable per argument) and may run the layers in parallel, in processes too.
    ``layers``: the cached layers' numbers (default 0, 1, ...)."""
    fits = map_layers(partial(probe_layer, C=C, max_iter=max_iter, seed=seed), last_forget, last_retain)
    layers = range(len(last_forget)) if layers is None else layers
    return [{"layer": int(layer), **fit} for layer, fit in zip(layers, fits)]


def summarise(rows: list[dict]) -> dict:
    """Headline numbers: the most selective layer and the mean selectivity."""
    best = max(rows, key=lambda row: (row["selectivity"], row["auc"]))
    return {"best_layer": best["layer"], "best_accuracy": best["accuracy"], "best_selectivity": best["selectivity"],
            "best_auc": best["auc"], "mean_selectivity": float(np.mean([r["selectivity"] for r in rows])),
            "n_layers": len(rows)}
