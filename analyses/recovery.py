"""Torch-free recovery fractions of attacks: how much of the unlearning an attack undoes.

For a metric m, with the unattacked base and modified (unlearned) models evaluated on the same
data, ``recovery = (m_attacked - m_modified) / (m_base - m_modified)``: 0 = the attack changed
nothing, 1 = the attacked model is back at the base's value (above 1 = past it). It is NaN where
``|m_base - m_modified| < RECOVERY_EPS`` (nothing to recover; the note says so).
``recovery_vs_control = (m_attacked - m_modified) / (m_control_attacked - m_modified)`` compares
with the base under the same attack (the attack may move the base too): 1 = the attacked modified
model matches the attacked base. Control rows themselves get NaN recoveries.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

#: Metrics of every attack row (keys of ``unlearn_lens.evaluation.evaluate``).
METRICS = ("letter_accuracy", "cloze_accuracy", "forget_nll", "retain_nll")
#: Below this absolute gap (accuracies are fractions, NLLs nats/token) there is nothing to recover:
#: float32 evaluations of the same model agree far below it, and one question out of 1e6 is 1e-6.
RECOVERY_EPS = 1e-6
BASE_COLUMNS = ("attack", "setting", "target", *METRICS, *(f"recovery_{m}" for m in METRICS),
                *(f"recovery_vs_control_{m}" for m in METRICS), "seconds", "note")


def recovery(attacked: float, modified: float, target: float, eps: float = RECOVERY_EPS) -> float:
    """``(attacked - modified) / (target - modified)``; NaN when the gap is below ``eps`` or a value is NaN."""
    values = [float(v) for v in (attacked, modified, target)]
    if not all(math.isfinite(v) for v in values):
        return float("nan")
    gap = values[2] - values[1]
    if abs(gap) < eps:
        return float("nan")
    return (values[0] - values[1]) / gap


def _key(row: Mapping[str, Any]) -> tuple[str, str]:
    return str(row["attack"]), str(row["setting"])


def recovery_rows(results: Sequence[Mapping[str, Any]], reference: Mapping[str, Mapping[str, float]],
                  eps: float = RECOVERY_EPS) -> tuple[list[dict], list[str]]:
    """CSV rows (``BASE_COLUMNS`` then the extra columns) and the distinct notes to print once.

    ``results``: dicts with attack, setting, target ("modified" / "control"), metrics (dict),
    seconds, optional reference ({"base", "modified"} on the attack's own evaluation data) and
    extra (dict of extra columns). ``reference``: the unattacked metrics of the run.
    """
    controls = {_key(r): r for r in results if r["target"] == "control"}
    rows, notes = [], []
    for result in results:
        ref = result.get("reference") or reference
        metrics = result["metrics"]
        row: dict[str, Any] = {"attack": result["attack"], "setting": result["setting"], "target": result["target"]}
        row.update({m: float(metrics.get(m, float("nan"))) for m in METRICS})
        row_notes = []
        control = controls.get(_key(result)) if result["target"] == "modified" else None
        for m in METRICS:
            base, modified = float(ref["base"][m]), float(ref["modified"][m])
            if result["target"] != "modified":
                row[f"recovery_{m}"] = row[f"recovery_vs_control_{m}"] = float("nan")
                continue
            row[f"recovery_{m}"] = recovery(row[m], modified, base, eps)
            if math.isfinite(base) and math.isfinite(modified) and abs(base - modified) < eps:
                row_notes.append(f"{m}: base and modified differ by less than {eps:g}, no recovery")
            if control is None:
                row[f"recovery_vs_control_{m}"] = float("nan")
                continue
            attacked_control = float(control["metrics"].get(m, float("nan")))
            row[f"recovery_vs_control_{m}"] = recovery(row[m], modified, attacked_control, eps)
            if math.isfinite(attacked_control) and abs(attacked_control - modified) < eps:
                row_notes.append(f"{m}: the attacked control equals the modified model, no recovery vs control")
        row["seconds"] = float(result.get("seconds", float("nan")))
        row["note"] = "; ".join(row_notes)
        row.update(result.get("extra") or {})
        rows.append(row)
        notes += [n for n in row_notes if n not in notes]
    return rows, notes


def columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """``BASE_COLUMNS`` then the union of every other column, sorted."""
    extra = sorted({k for row in rows for k in row} - set(BASE_COLUMNS))
    return [*BASE_COLUMNS, *extra]


def best_by_metric(rows: Sequence[Mapping[str, Any]], attack: str, fields: Sequence[str] = ()) -> dict[str, dict]:
    """Per metric, the modified row of ``attack`` with the highest finite recovery (None if none)."""
    out: dict[str, dict | None] = {}
    for m in METRICS:
        candidates = [r for r in rows if r["attack"] == attack and r["target"] == "modified"
                      and math.isfinite(float(r[f"recovery_{m}"]))]
        if not candidates:
            out[m] = None
            continue
        best = max(candidates, key=lambda r: float(r[f"recovery_{m}"]))
        out[m] = {"setting": best["setting"], "recovery": float(best[f"recovery_{m}"]),
                  "recovery_vs_control": float(best[f"recovery_vs_control_{m}"]),
                  **{f: best.get(f) for f in fields}}
    return out
