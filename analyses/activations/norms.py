"""Activation norms (``activation_stats/``): mean per-token L1/L2 norms of each model and of their difference.

Means are over real tokens (attention mask), at every cached layer 0..L, all taken before the
final norm; the difference dh = h_b - h_a is taken on identical tokens (the caches hold the same
input_ids, checked before any reduction).
"""

from __future__ import annotations

from typing import Sequence

from analyses.activations.reductions import Moments

COLUMNS = ["layer", "split", "model_a_norm_L1", "model_a_norm_L2", "model_b_norm_L1", "model_b_norm_L2",
           "mean_dh_L1", "mean_dh_L2"]


def norm_rows(split: str, moments_a: Moments, moments_b: Moments, difference: dict,
              layers: Sequence[int] | None = None) -> list[dict]:
    """One row per layer of ``activation_stats.csv`` for one split (``layers``: the cached layers'
    numbers, default 0, 1, ...; a capture with ``--layers`` keeps some of them only)."""
    n = max(difference["n"], 1.0)
    layers = list(range(len(moments_a.l1))) if layers is None else list(layers)
    rows = []
    for i, layer in enumerate(layers):
        rows.append({
            "layer": int(layer), "split": split,
            "model_a_norm_L1": float(moments_a.mean_l1[i]), "model_a_norm_L2": float(moments_a.mean_l2[i]),
            "model_b_norm_L1": float(moments_b.mean_l1[i]), "model_b_norm_L2": float(moments_b.mean_l2[i]),
            "mean_dh_L1": float(difference["l1"][i] / n), "mean_dh_L2": float(difference["l2"][i] / n),
        })
    return rows
