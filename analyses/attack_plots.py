"""Plots of the attack results: best recovery per attack, and ablation recovery per layer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from analyses.plotting import panel_plot
from analyses.recovery import METRICS


def _finite(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def recovery_bar_plot(path: str | Path, rows: Sequence[Mapping], title: str) -> Path:
    """Grouped bars: per attack, the best recovery of each metric over its settings (modified rows)."""
    import numpy as np

    from analyses.io import atomic_save_figure
    from analyses.plotting import subplots

    attacks = list(dict.fromkeys(r["attack"] for r in rows if r["target"] == "modified"))
    figure, ax = subplots(figsize=(max(5.0, 1.8 * len(attacks) + 2), 3.8))
    width = 0.8 / len(METRICS)
    for i, metric in enumerate(METRICS):
        best = []
        for attack in attacks:
            values = [_finite(r[f"recovery_{metric}"]) for r in rows
                      if r["attack"] == attack and r["target"] == "modified"]
            values = [v for v in values if not math.isnan(v)]
            best.append(max(values) if values else math.nan)
        ax.bar(np.arange(len(attacks)) + (i - (len(METRICS) - 1) / 2) * width, best, width, label=metric)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="back at the base")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(attacks)), attacks)
    ax.set_ylabel("best recovery (0 = modified, 1 = base)")
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
                             [_finite(r[f"recovery_{metric}"]) for r in chosen if int(r["k"]) == k]) for k in ks}
        panels.append((f"recovery, {metric}", series, None))
    return panel_plot(path, title, "residual layer (0 = embedding output)", panels)
