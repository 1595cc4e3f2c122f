"""``write_study``: OUT/study/ from a finished output tree (torch-free; the last step of `unlearn-lens study`).

Reads the design (``models.csv``), each model's signature (the report's tidy table) and headline
recoveries, predicts every recovery target leave-one-method-out (``prediction``), and writes
``signatures.csv``, ``recovery.csv``, ``prediction.csv`` (with the Holm-adjusted Spearman p over
every row of the table), ``predictions.csv``, ``prediction.png`` and ``summary.json``; the
completion marker goes last.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from analyses.io import atomic_write_csv, atomic_write_json, clear_complete, mark_complete
from analyses.recovery import HEADLINE_COLUMNS
from analyses.report.inputs import ReportInputs
from analyses.report.signatures import SIGNATURE_COLUMNS
from analyses.study.plots import prediction_plot
from analyses.study.prediction import ALPHAS, MIN_METHODS, MIN_MODELS, PREDICTORS, TargetData, predict_target
from analyses.study.tables import (BEHAVIOUR_PREDICTORS, DESIGN_COLUMNS, SIGNATURE_PREDICTORS, predictor_matrix,
                                   read_design, recovery_rows, signature_rows, study_dir, targets)
from analyses.uncertainty import CONFIDENCE, N_RESAMPLES, SEED, holm
from unlearn_lens.core import outputs
from unlearn_lens.core.errors import UserError

#: Columns of prediction.csv (one row per recovery target and predictor).
PREDICTION_COLUMNS = ("target", "predictors", "n_models", "n_methods", "spearman", "spearman_low", "spearman_high",
                      "spearman_p", "spearman_p_method", "spearman_p_holm", "r2", "r2_low", "r2_high",
                      "r2_minus_behaviour", "r2_minus_behaviour_low", "r2_minus_behaviour_high", "beats_behaviour",
                      "r2_minus_mean", "r2_minus_mean_low", "r2_minus_mean_high", "beats_mean", "alpha",
                      "carried_by", "interval_note", "left_out", "note")
PREDICTIONS_COLUMNS = ("target", "model", "method", "measured", *(f"predicted_{p}" for p in PREDICTORS))


def predict_all(signatures: list[dict], recovery: list[dict]) -> tuple[list[dict], list[dict]]:
    """(prediction.csv rows, predictions.csv rows) of every target in ``recovery``."""
    models = [row["model"] for row in signatures]
    methods = np.array([row["method"] for row in signatures], dtype=object)
    sig, beh = predictor_matrix(signatures, SIGNATURE_PREDICTORS), predictor_matrix(signatures, BEHAVIOUR_PREDICTORS)
    scores, per_model = [], []
    values, left_out = targets(recovery, models, signatures)
    for name, y in values.items():
        rows, points = predict_target(TargetData(name, y, methods, sig, list(SIGNATURE_PREDICTORS), beh,
                                                 list(BEHAVIOUR_PREDICTORS), models))
        scores += [{**row, "left_out": " ".join(left_out.get(name, []))} for row in rows]
        per_model += points
    adjusted = holm([row.get("spearman_p", float("nan")) for row in scores])
    for row, p in zip(scores, adjusted):
        row["spearman_p_holm"] = p
    return scores, per_model


def write_study(root: str | Path, base: str, echo: Callable[[str], None] = lambda message: None) -> Path:
    """Write OUT/study/ from the tree under ``root`` (base model ``base``); returns the folder."""
    folder = study_dir(root)
    design = read_design(root)
    if not design:
        raise UserError(f"{folder / outputs.STUDY_MODELS_CSV}: no study design (run `unlearn-lens study`)")
    clear_complete(folder)
    inputs = ReportInputs(Path(root), base, [d["model"] for d in design
                                             if outputs.comparison_dir(root, base, d["model"]).is_dir()])
    signatures = signature_rows(inputs, design)
    recovery = recovery_rows(inputs, design)
    atomic_write_csv(folder / outputs.STUDY_SIGNATURES_CSV, signatures, [*DESIGN_COLUMNS, *SIGNATURE_COLUMNS])
    atomic_write_csv(folder / outputs.STUDY_RECOVERY_CSV, recovery, [*DESIGN_COLUMNS, *HEADLINE_COLUMNS])
    echo(f"study: predicting {len({(r['attack'], r['metric'], r['against']) for r in recovery})} recovery targets "
         f"of {len(signatures)} models, leave one method out")
    scores, per_model = predict_all(signatures, recovery)
    atomic_write_csv(folder / outputs.STUDY_PREDICTION_CSV, scores, PREDICTION_COLUMNS)
    atomic_write_csv(folder / outputs.STUDY_PREDICTIONS_CSV, per_model, PREDICTIONS_COLUMNS)
    prediction_plot(folder / outputs.STUDY_PLOT, per_model, scores)
    atomic_write_json(folder / outputs.SUMMARY_JSON, {
        "base": base, "models": [d["model"] for d in design], "compared": inputs.comparisons,
        "signature_predictors": list(SIGNATURE_PREDICTORS), "behaviour_predictors": list(BEHAVIOUR_PREDICTORS),
        "alphas": list(ALPHAS), "min_models": MIN_MODELS, "min_methods": MIN_METHODS,
        "intervals": {"confidence": CONFIDENCE, "resamples": N_RESAMPLES, "seed": SEED, "resampled": "methods"},
        "definitions": {
            "prediction": "each method held out in turn; ridge on standardised columns (training medians for missing "
                          "values), penalty chosen by leave-one-method-out among the training methods; behaviour: the "
                          "same on the behavioural effect; mean: the training methods' mean",
            "targets": "a model's recovery of a metric is a target only where its unlearning moved that metric the "
                       "forget way (forget NLL up, cloze accuracy down: the sign of the behaviour columns); the "
                       "others, where their recovery was finite, are named in left_out",
            "r2": "1 - SSE/SST of the pooled held-out predictions", "spearman_p_holm": "Holm over every row's p",
            "beats": "yes only where the interval of the R² difference lies above 0"}})
    mark_complete(folder, {"step": "study", "models": len(design), "compared": len(inputs.comparisons)})
    return folder
