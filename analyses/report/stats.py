"""The report's numbers: finite floats from CSV rows, mean / median, Spearman ρ, and their text.

``fmt`` and ``fmt_pair`` are the one place a missing value becomes a dash.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

#: the text of a correlation over fewer than three comparisons
NEEDS_THREE = "needs >= 3 comparisons"


def floats(rows: Sequence[dict], column: str, where: Callable[[dict], bool] = lambda r: True) -> list[float]:
    """The finite values of ``column`` in the rows ``where`` accepts (blanks and NaN left out)."""
    values = []
    for row in rows:
        if where(row):
            try:
                value = float(row[column])
            except (KeyError, TypeError, ValueError):
                continue
            if math.isfinite(value):
                values.append(value)
    return values


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def median(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def fmt(value: float | None, digits: int = 3) -> str:
    """Numbers for people: 3 significant digits, scientific when tiny or huge, a dash when missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if value == 0:
        return "0"
    if abs(value) < 1e-3 or abs(value) >= 1e5:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def fmt_pair(first: float | None, second: float | None, separator: str, need_both: bool = False) -> str:
    """``"first separator second"``; one dash when both are missing (or either, with ``need_both``)."""
    missing = (first is None or second is None) if need_both else (first is None and second is None)
    return fmt(None) if missing else f"{fmt(first)} {separator} {fmt(second)}"


def spearman_text(xs: Sequence[float | None], ys: Sequence[float | None]) -> str:
    """Spearman ρ over the comparisons that have both values; a note when fewer than three."""
    import warnings

    from scipy.stats import spearmanr

    pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
    if len(pairs) < 3:
        return NEEDS_THREE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = spearmanr([p[0] for p in pairs], [p[1] for p in pairs])
    rho, p_value = float(result.statistic), float(result.pvalue)
    if not math.isfinite(rho):
        return f"— (constant, n = {len(pairs)})"
    return f"ρ = {rho:.2f} (p = {fmt(p_value, 2)}, n = {len(pairs)})"
