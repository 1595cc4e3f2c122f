"""What a training run did to each metric it evaluated before and after: the paired change with its interval.

Reads the ``before`` / ``after`` records an ``unlearn`` run stores in ``eval.json`` (each with its
``per_item`` results, ``analyses.uncertainty.PER_ITEM``), so ``unlearn`` can say at the end, with
n and a 95 % interval, whether forget NLL went up and retain NLL stayed put.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from analyses.uncertainty import PER_ITEM, Estimate, change_estimate, point_value


def changes(before: Mapping, after: Mapping) -> dict[str, Estimate]:
    """``{metric: after - before}``, paired over the same items, for every metric with per-item results in both."""
    ours, theirs = (record.get(PER_ITEM) or {} for record in (before, after))
    return {metric: change_estimate(ours[metric], theirs[metric]) for metric in ours
            if metric in theirs and ours[metric] and theirs[metric]}


def change_lines(before: Mapping, after: Mapping, metrics: Sequence[str] | None = None) -> list[str]:
    """One line per metric (every one measured, or those of ``metrics`` that were):
    ``forget_nll: 2.310 -> 2.850, change +0.540 [0.410, 0.660], n = 40``, and ``(inside the noise)``
    where the change's interval contains 0."""
    lines = []
    for metric, change in changes(before, after).items():
        if metrics is not None and metric not in metrics:
            continue
        old, new = (point_value(record[PER_ITEM][metric]) for record in (before, after))
        sign = "+" if change.value > 0 else ""
        noise = " (inside the noise)" if change.contains(0.0) else ""
        lines.append(f"{metric}: {old:.3f} -> {new:.3f}, change {sign}{change.text(3)}{noise}")
    return lines
