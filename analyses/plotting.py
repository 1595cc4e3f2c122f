"""Small matplotlib helpers: figures without pyplot, titled PNG panels, atomic saves.

Figures are ``matplotlib.figure.Figure`` objects drawn straight to PNG, never through pyplot: no
global backend is switched, so importing the package in a notebook keeps its inline figures, and
no figure is left open in pyplot's registry.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from analyses.io import atomic_save_figure


def finite_or_nan(value) -> float:
    """A CSV cell or number as a float to plot; NaN (not drawn) for text, blanks and infinities."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def subplots(*grid: int, figsize: tuple[float, float], layout: str | None = None, **kwargs):
    """``(figure, axes)`` as ``pyplot.subplots`` returns them, made without pyplot (see the module)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, layout=layout)
    return figure, figure.subplots(*grid, **kwargs)


Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]


def panel_plot(path: str | Path, title: str, xlabel: str, panels: Sequence[tuple[str, Series, float | None]],
               log_y: bool = False) -> Path:
    """One row of panels; each panel is ``(ylabel, {label: (x, y)}, optional reference line)``."""
    figure, axes = subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (ylabel, series, reference) in zip(axes[0], panels):
        for label, (x, y) in series.items():
            ax.plot(list(x), [float(v) if v is not None else np.nan for v in y], marker="o", markersize=3,
                    label=label)
        if reference is not None:
            ax.axhline(reference, color="grey", linestyle="--", linewidth=1, label=f"chance ({reference:g})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.suptitle(title)
    _fixed_margins(figure, len(panels), top=0.86)  # tight_layout / bbox_inches="tight" cost seconds
    return atomic_save_figure(figure, path, tight=False)


def _fixed_margins(figure, n_panels: int, top: float) -> None:
    """Margins that fit the titles, labels and tick labels of a row of ``n_panels`` panels."""
    figure.subplots_adjust(left=0.07 if n_panels > 1 else 0.14, right=0.98, wspace=0.3, top=top, bottom=0.14)


def by(rows: Sequence[Mapping], x: str, y: str, **where) -> tuple[list, list]:
    """``(xs, ys)`` of the rows matching every ``column=value`` in ``where``."""
    chosen = [row for row in rows if all(row[k] == v for k, v in where.items())]
    return [row[x] for row in chosen], [row[y] for row in chosen]


def spectra_plot(path: str | Path, title: str, spectra: Mapping[str, np.ndarray], layers: Sequence[int]) -> Path:
    """Eigenvalue spectra (log scale) at a few layers, one panel per layer."""
    figure, axes = subplots(1, len(layers), figsize=(4.5 * len(layers), 3.6), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        for label, values in spectra.items():
            v = np.asarray(values[layer])
            ax.plot(np.arange(1, len(v) + 1), np.where(v > 0, v, np.nan), label=label)
        ax.set_yscale("log")
        ax.set_xlabel("eigenvalue index")
        ax.set_ylabel("eigenvalue")
        ax.set_title(f"layer {layer}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.suptitle(title)
    _fixed_margins(figure, len(layers), top=0.84)
    return atomic_save_figure(figure, path, tight=False)
