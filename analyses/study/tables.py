"""The study's tables from an output tree: its design, the signatures and the recoveries, as numbers.

- ``models.csv`` (written by ``unlearn-lens study`` before anything runs): each unlearned model's
  method, the strength knob and its multiplier and value, and the training mode;
- ``signatures.csv``: the design columns, then the report's tidy signature table
  (``analyses.report.signatures.signature_frame``: every diagnostic read from its own CSVs);
- ``recovery.csv``: the design columns, then each model's ``attacks/headline.csv`` (per attack,
  metric and target of the recovery, the setting chosen on half the items and scored on the
  other half, with its interval and n).

``targets`` turns recovery.csv into the prediction's targets, ``predictor_matrix`` signatures.csv
into its predictor matrices (``SIGNATURE_PREDICTORS``, ``BEHAVIOUR_PREDICTORS``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from analyses.recovery import FORGET_DIRECTION as UNLEARNED_SIGN
from analyses.recovery import HEADLINE_COLUMNS, NOT_MEASURED_NOTE
from analyses.report.inputs import ReportInputs, read_rows
from analyses.report.signatures import BEHAVIOUR_COLUMNS, SIGNATURE_COLUMNS, TOP_LAYERS, signature_frame
from unlearn_lens.core import outputs

#: Columns of models.csv: the study's design, one row per unlearned model.
DESIGN_COLUMNS = ("model", "method", "knob", "strength", "value", "training")
#: Signature columns the prediction reads: every tidy column but the behaviour rows, the base's own
#: values (the same for every model) and the indices of the most-changed layers (labels, not amounts).
SIGNATURE_PREDICTORS = tuple(c for c in SIGNATURE_COLUMNS if not c.endswith(("_before", "_after", "_change", "_base"))
                             and c not in TOP_LAYERS)
#: The behavioural effect of unlearning: forget / retain NLL and WMDP cloze accuracy, after - before.
BEHAVIOUR_PREDICTORS = BEHAVIOUR_COLUMNS
#: Metrics whose recovery is predicted (each attack, against the base and against the control).
TARGET_METRICS = ("cloze_accuracy", "forget_nll", "forget_value_nll")
RECOVERY_COLUMNS = (*DESIGN_COLUMNS, *[c for c in HEADLINE_COLUMNS])
#: Per target metric, the behaviour column saying what unlearning did to it and the sign of that change
#: when it unlearned: forget NLL up, cloze accuracy down. A model whose unlearning moved the metric the
#: other way has nothing of it to recover: its recovery divides by a gap of the wrong sign (on SmolLM2,
#: cb's forget NLL fell by 0.007 nats and relearning "recovered" -2100 of it), so it is no target. The
#: attacks' headline already reads NaN where their own evaluation data shows the wrong sign
#: (``analyses.recovery.wrong_way``); this rule reads the unlearning run's evaluation as well.
FORGET_DIRECTION = {m: (f"{m}_change", UNLEARNED_SIGN[m]) for m in TARGET_METRICS}


def study_dir(root: str | Path) -> Path:
    """``OUT/study``."""
    return Path(root) / outputs.STUDY


def read_design(root: str | Path) -> list[dict[str, str]]:
    """The rows of ``OUT/study/models.csv`` (none when the study has not been set up)."""
    return read_rows(study_dir(root) / outputs.STUDY_MODELS_CSV)


def signature_rows(inputs: ReportInputs, design: Sequence[dict]) -> list[dict]:
    """``signatures.csv``: per model of the design that is a comparison, its design then its signature."""
    frame = {row["model"]: row for row in signature_frame(inputs)}
    return [{**{c: d.get(c, "") for c in DESIGN_COLUMNS}, **frame[d["model"]]} for d in design if d["model"] in frame]


def recovery_rows(inputs: ReportInputs, design: Sequence[dict]) -> list[dict]:
    """``recovery.csv``: per model of the design, its design then each row of its ``attacks/headline.csv``."""
    rows = []
    for d in design:
        for headline in read_rows(inputs.model_dir(d["model"]) / outputs.ATTACKS / outputs.HEADLINE_CSV):
            rows.append({**{c: d.get(c, "") for c in DESIGN_COLUMNS}, **headline})
    return rows


def _float(value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return number if math.isfinite(number) else float("nan")


def target_name(attack: str, metric: str, against: str) -> str:
    """``relearn-heldout: cloze_accuracy vs base``."""
    return f"{attack}: {metric} vs {against}"


def not_unlearned(signatures: Sequence[dict], metric: str) -> set[str]:
    """Models whose measured behavioural change of ``metric`` is not in the forget direction
    (``FORGET_DIRECTION``; an unchanged metric included); a model without the measurement is kept."""
    column, sign = FORGET_DIRECTION[metric]
    return {row["model"] for row in signatures if sign * _float(row.get(column)) <= 0}


def targets(recovery: Sequence[dict], models: Sequence[str],
            signatures: Sequence[dict] = ()) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """``({target name: recovery per model (NaN where missing)}, {target name: models left out})`` for each
    attack x TARGET_METRICS x target. With ``signatures``, a model that did not unlearn the target's
    metric (``not_unlearned``) is NaN there, and named among the left out when its recovery was finite. A
    metric the attack did not measure (``forget_value_nll`` off a testbed) makes no target."""
    index = {m: i for i, m in enumerate(models)}
    wrong_way = {metric: not_unlearned(signatures, metric) for metric in TARGET_METRICS}
    out: dict[str, np.ndarray] = {}
    left_out: dict[str, list[str]] = {}
    for row in recovery:
        if row.get("metric") not in TARGET_METRICS or row.get("model") not in index \
                or row.get("note") == NOT_MEASURED_NOTE:
            continue
        name = target_name(row["attack"], row["metric"], row.get("against", "base"))
        value = _float(row.get("recovery"))
        dropped = left_out.setdefault(name, [])
        if row["model"] in wrong_way[row["metric"]]:
            if math.isfinite(value):
                dropped.append(row["model"])
            value = float("nan")
        out.setdefault(name, np.full(len(models), np.nan))[index[row["model"]]] = value
    return out, left_out


def predictor_matrix(signatures: Sequence[dict], columns: Sequence[str]) -> np.ndarray:
    """``(models, columns)`` floats of signatures.csv rows (NaN where not measured)."""
    return np.array([[_float(row.get(c)) for c in columns] for row in signatures], dtype=float).reshape(
        len(signatures), len(columns))
