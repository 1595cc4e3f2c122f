"""The study's figure: held-out predicted vs measured recovery, one panel per target, coloured by method."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from matplotlib.lines import Line2D

from analyses.io import atomic_save_figure
from analyses.plotting import finite_or_nan, subplots

COLUMNS = 4


def prediction_plot(path: str | Path, per_model: Sequence[Mapping], scores: Sequence[Mapping],
                    predictors: str = "signatures") -> Path:
    """Per target, each model's held-out prediction from ``predictors`` against its measured recovery
    (the diagonal: a perfect prediction), one colour per method; the title gives R² and ρ."""
    targets = list(dict.fromkeys(r["target"] for r in per_model)) or ["(no target with enough models)"]
    methods = sorted({r["method"] for r in per_model})
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    score = {r["target"]: r for r in scores if r.get("predictors") == predictors}
    rows = math.ceil(len(targets) / COLUMNS)
    columns = min(COLUMNS, len(targets))
    figure, axes = subplots(rows, columns, figsize=(3.6 * columns, 3.4 * rows), squeeze=False)
    for axis, target in zip(axes.flat, targets):
        points = [r for r in per_model if r["target"] == target]
        for method in methods:
            chosen = [r for r in points if r["method"] == method]
            if chosen:
                axis.scatter([finite_or_nan(r["measured"]) for r in chosen],
                             [finite_or_nan(r[f"predicted_{predictors}"]) for r in chosen], color=colours[method],
                             label=method, s=18)
        values = [finite_or_nan(r[k]) for r in points for k in ("measured", f"predicted_{predictors}")]
        values = [v for v in values if not math.isnan(v)]
        if values:
            low, high = min(values), max(values)
            axis.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1)
        s = score.get(target, {})
        axis.set_title(f"{target}\nR² {finite_or_nan(s.get('r2')):.2f}, ρ {finite_or_nan(s.get('spearman')):.2f}", fontsize=8)
        axis.set_xlabel("measured recovery", fontsize=8)
        axis.set_ylabel(f"predicted ({predictors}, held out)", fontsize=8)
    for axis in list(axes.flat)[len(targets):]:
        axis.set_visible(False)
    if methods:  # one legend for the figure: a panel shows only the methods with a recovery there
        handles = [Line2D([], [], marker="o", linestyle="", color=colours[m], label=m) for m in methods]
        figure.legend(handles=handles, loc="lower center", ncol=min(len(methods), 8), fontsize=8, title="method",
                      title_fontsize=8, frameon=False)
    figure.suptitle("Leave-one-method-out prediction of recovery from the signatures")
    figure.tight_layout(rect=(0, 0.08 / rows if methods else 0, 1, 1))
    return atomic_save_figure(figure, path)
