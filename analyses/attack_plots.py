"""Plots of the attack results: the headline recovery per attack with its interval, and ablation recovery per layer."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from analyses.plotting import finite_or_nan, panel_plot
from analyses.recovery import METRICS, interval_columns


def recovery_bar_plot(path: str | Path, headline: Sequence[Mapping], title: str) -> Path:
    """Grouped bars: per attack, the headline recovery of each metric against the base (``headline.csv``
    rows: the setting chosen on half the items, scored on the other half) with its 95 % interval as
    whiskers; a metric whose gap is inside the noise has no bar."""
    import numpy as np

    from analyses.io import atomic_save_figure
    from analyses.plotting import subplots

    low_column, high_column = interval_columns("recovery")
    rows = {(r["attack"], r["metric"]): r for r in headline if r["against"] == "base"}
    attacks = list(dict.fromkeys(attack for attack, _ in rows))
    figure, ax = subplots(figsize=(max(5.0, 1.8 * len(attacks) + 2), 3.8))
    width = 0.8 / len(METRICS)
    for i, metric in enumerate(METRICS):
        chosen = [rows.get((attack, metric), {}) for attack in attacks]
        values = np.array([finite_or_nan(r.get("recovery")) for r in chosen])
        low = np.array([finite_or_nan(r.get(low_column)) for r in chosen])
        high = np.array([finite_or_nan(r.get(high_column)) for r in chosen])
        errors = np.nan_to_num(np.vstack([values - low, high - values]), nan=0.0).clip(min=0)
        ax.bar(np.arange(len(attacks)) + (i - (len(METRICS) - 1) / 2) * width, values, width, yerr=errors,
               capsize=2, label=metric)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="back at the base")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(attacks)), attacks)
    ax.set_ylabel("recovery, 95% interval (0 = modified, 1 = base)")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return atomic_save_figure(figure, path)


def ablation_layer_plot(path: str | Path, rows: Sequence[Mapping], title: str) -> Path:
    """Recovery per layer of single-layer ablation, one panel per metric, one line per k."""
    chosen = sorted((r for r in rows if r["attack"] == "ablate" and r["target"] == "modified"
                     and r.get("mode") == "single"), key=lambda r: int(r["layer"]))
    ks = sorted({int(r["k"]) for r in chosen})
    panels = []
    for metric in METRICS:
        series = {f"k={k}": ([int(r["layer"]) for r in chosen if int(r["k"]) == k],
                             [finite_or_nan(r[f"recovery_{metric}"]) for r in chosen if int(r["k"]) == k]) for k in ks}
        panels.append((f"recovery, {metric}", series, None))
    return panel_plot(path, title, "residual layer (0 = embedding output)", panels)
