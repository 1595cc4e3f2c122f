"""The report's numbers: finite floats from CSV rows, mean / median, Spearman tests, and their text.

``fmt`` and ``fmt_pair`` are the one place a missing value becomes a dash. Correlations are computed
from numbers (``analyses.uncertainty.spearman``: exact permutation p below 10 pairs) in families
(``spearman_family``: every test of one table, Holm-adjusted together), never from formatted cells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Hashable, Mapping, Sequence

from analyses.uncertainty import EXACT_SPEARMAN_BELOW, Correlation, holm, spearman

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


@dataclass(frozen=True)
class Tested:
    """One Spearman test of a family: its correlation and its Holm-adjusted p over the whole family."""

    correlation: Correlation
    holm_p: float


def spearman_family(pairs: Mapping[Hashable, tuple[Sequence[float | None], Sequence[float | None]]]
                    ) -> dict[Hashable, Tested]:
    """Spearman ρ of each ``(xs, ys)`` (pairs with both values finite; exact permutation p below
    ``EXACT_SPEARMAN_BELOW`` pairs) and its Holm-adjusted p over every test of the family that has a p."""
    results = {key: spearman([_float(x) for x in xs], [_float(y) for y in ys]) for key, (xs, ys) in pairs.items()}
    keys = list(results)
    adjusted = holm([results[k].p for k in keys])
    return {k: Tested(results[k], adjusted[i]) for i, k in enumerate(keys)}


def tested_count(family: Mapping[Hashable, Tested]) -> int:
    """How many correlations of a family have a p-value (the number Holm adjusts for)."""
    return sum(1 for t in family.values() if math.isfinite(t.correlation.p))


def family_note(family: Mapping[Hashable, Tested]) -> str:
    """The sentence every correlation table carries: how many were tested and how p was computed."""
    count = tested_count(family)
    return (f"{count} correlation{'s' if count != 1 else ''} tested here; each p is two-sided (exact, over every "
            f"permutation, below {EXACT_SPEARMAN_BELOW} pairs; scipy's t approximation above), and Holm p adjusts it "
            f"for all {count}.")


def spearman_cell(tested: Tested | None) -> str:
    """``ρ = 0.80 (p = 0.33 exact, Holm p = 1, n = 4)``; a note below three pairs or for a constant."""
    if tested is None:
        return NEEDS_THREE
    c = tested.correlation
    if c.n < 3:
        return NEEDS_THREE
    if not math.isfinite(c.rho):
        return f"— (constant, n = {c.n})"
    return f"ρ = {c.rho:.2f} (p = {fmt(c.p, 2)} {c.method}, Holm p = {fmt(tested.holm_p, 2)}, n = {c.n})"


def _float(value) -> float:
    try:
        return float(value) if value is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")
