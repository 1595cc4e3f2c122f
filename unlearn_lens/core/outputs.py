"""The output tree (``OUTPUTS.md``): folder names, the comparison name, the model-name rule, markers.

Every producer (``params``, ``analyze``, ``lipschitz``, ``tuned-lens``, ``eval``, ``relearn``,
``attack``, ``unlearn``, the pipeline) builds its paths here and ``analyses/report/`` reads them
back from here, so a folder name is written once. Layout under ``OUT/``::

    <base>__to__<name>/<comparison folder>/   what changed from the base to one modified model
    <model>/<model folder>/                   diagnostics of one model alone
    caches/<model>.zarr                       activation caches (cache_store/SCHEMA.md)
    data/                                     forget / retain / WMDP texts (``datasets create``)
    unlearning/<method>/                      models unlearned by the demo (``unlearn-all``)
    planting/                                 the demo's planted-facts model (``plant``: model/, plant.json)
    .pipeline/<step>.json                     the pipeline's record of each finished step
    .evaluations/<key>.json                   the evaluation memo (``unlearn_lens/eval_memo.py``)
    study/                                    `unlearn-lens study`'s tables (``analyses/study/``)
    report.html                               the report (``analyses/report/``)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from unlearn_lens.core.atomic import atomic_write_text
from unlearn_lens.core.identity import plain
from unlearn_lens.core.errors import UserError

# --- folders of a comparison OUT/<base>__to__<name>/ ------------------------------------------
PARAM_STATS = "param_stats"
PARAM_PLOTS = "param_plots"
MLP_ATTN = "mlp_attn_analysis"
NULL_SPACE = "null_space_analysis"
MLP_NULLSPACE = "mlp_nullspace"
ACTIVATION_STATS = "activation_stats"
ACTIVATION_PLOTS = "activation_plots"
SEPARATION = "activation_separation"
COVARIANCE = "activation_covariance"
ROW_SPACE = "row_space_projection"
LIPSCHITZ = "lipschitzness"
COMPARISON_FOLDERS = (PARAM_STATS, PARAM_PLOTS, MLP_ATTN, NULL_SPACE, MLP_NULLSPACE, ACTIVATION_STATS,
                      ACTIVATION_PLOTS, SEPARATION, COVARIANCE, ROW_SPACE, LIPSCHITZ)

# --- folders of one model OUT/<model>/ ----------------------------------------------------------
PROBES = "linear_probes"
LOGIT_LENS = "wmdp_logit_lens"
TUNED_LENS = "wmdp_tuned_lens"
EVALUATION = "evaluation"
RELEARNING = "relearning"
ATTACKS = "attacks"
MODEL_FOLDERS = (PROBES, LOGIT_LENS, TUNED_LENS, EVALUATION, RELEARNING, ATTACKS)

# --- files in those folders that the report reads (OUTPUTS.md lists their columns) --------------
PER_MATRIX_CSV = "per_matrix.csv"  # param_stats/ (params)
PER_LAYER_CSV = "per_layer.csv"  # param_stats/ (params)
NULL_SPACE_CSV = "null_space_results.csv"  # null_space_analysis/ (params)
MLP_NULLSPACE_CSV = "mlp_nullspace.csv"  # mlp_nullspace/ (params)
ACTIVATION_STATS_CSV = "activation_stats.csv"  # activation_stats/ (analyze)
COVARIANCE_CSV = "covariance_selectivity.csv"  # activation_covariance/ (analyze)
SEPARATION_CSV = "separation_metrics.csv"  # activation_separation/ (analyze)
LIPSCHITZ_CSV = "lipschitz_results.csv"  # lipschitzness/ (lipschitz)
LENS_CSV = "wmdp_lens_results.csv"  # wmdp_logit_lens/ (analyze), wmdp_tuned_lens/ (tuned-lens)
EVAL_CSV = "eval_results.csv"  # evaluation/ (eval): columns metric, value
ATTACKS_CSV = "attacks.csv"  # attacks/ (attack)
HEADLINE_CSV = "headline.csv"  # attacks/ (attack): each attack's held-out headline recovery
SUMMARY_JSON = "summary.json"  # most folders' summary
UNLEARN_EVAL_JSON = "eval.json"  # unlearning/<method>/ (unlearn): before / after unlearning
PLANT_JSON = "plant.json"  # planting/ (plant): facts accuracy and general NLL before / after planting
HELDOUT_PER_ITEM_JSON = "heldout_per_item.json"  # attacks/ (attack relearn-heldout): each question's correctness

# --- the top level of OUT/ ----------------------------------------------------------------------
CACHES = "caches"
DATA = "data"
UNLEARNING = "unlearning"
PLANTING = "planting"
PIPELINE_RECORDS = ".pipeline"
EVALUATIONS = ".evaluations"
REPORT = "report.html"
STUDY = "study"  # `unlearn-lens study`'s tables (analyses/study/)

# --- files of OUT/study/ (OUTPUTS.md lists their columns) ---------------------------------------
STUDY_MODELS_CSV = "models.csv"  # the study's design: each unlearned model's method, strength, training
STUDY_SIGNATURES_CSV = "signatures.csv"  # one row per model: the tidy signature table
STUDY_RECOVERY_CSV = "recovery.csv"  # one row per model, attack, metric and target of the recovery
STUDY_PREDICTION_CSV = "prediction.csv"  # one row per recovery target and predictor
STUDY_PREDICTIONS_CSV = "predictions.csv"  # one row per target and model: held-out predictions
STUDY_PLOT = "prediction.png"  # predicted vs measured recovery, coloured by method

# --- names ---------------------------------------------------------------------------------------
#: what joins the base and the modified model in a comparison folder's name
COMPARISON_SEPARATOR = "__to__"
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_model_name(name: str | None, what: str = "--name", hint: str = "") -> str:
    """The one model-name rule: a plain folder name that can never read as a comparison.

    Letters, digits, '.', '-' and '_', starting with a letter or digit, never ``__to__``
    (``tuned-lens --name a__to__b`` would otherwise write a folder the report takes for a
    comparison). ``what`` names the flag in the error; ``hint`` is appended to it.
    """
    if not name or not _MODEL_NAME.match(name) or COMPARISON_SEPARATOR in name:
        raise UserError(f"{what} {name!r}: use letters, digits, '.', '-' or '_' "
                        f"(never {COMPARISON_SEPARATOR!r}){hint}")
    return name


def default_name(spec: str) -> str:
    """The default model name of a spec: its last path component (the parent's, for ``.../model``).

    Characters outside the model-name rule become '-' (``check_model_name`` still refuses ``__to__``).
    """
    parts = [p for p in str(spec).replace("\\", "/").rstrip("/").split("/") if p]
    name = parts[-1] if parts else "model"
    if name == "model" and len(parts) > 1:
        name = parts[-2]
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", name.removesuffix(".gguf")).lstrip("-_.") or "model"
    return name


def comparison_name(base: str, name: str) -> str:
    """``<base>__to__<name>``: the folder of what changed from ``base`` to ``name``."""
    return f"{base}{COMPARISON_SEPARATOR}{name}"


def parse_comparison_name(folder: str) -> tuple[str, str] | None:
    """``(base, name)`` of a comparison folder's name, or None for any other folder."""
    base, sep, name = folder.partition(COMPARISON_SEPARATOR)
    return (base, name) if sep and base and name else None


def comparison_dir(outdir: str | Path, base: str, name: str) -> Path:
    """``OUT/<base>__to__<name>``."""
    return Path(outdir) / comparison_name(base, name)


def model_dir(outdir: str | Path, name: str) -> Path:
    """``OUT/<model>``: the diagnostics of one model alone."""
    return Path(outdir) / name


def cache_path(outdir: str | Path, name: str) -> Path:
    """``OUT/caches/<model>.zarr``."""
    return Path(outdir) / CACHES / f"{name}.zarr"


def pipeline_record(outdir: str | Path, step_id: str) -> Path:
    """``OUT/.pipeline/<step>.json`` (``capture:base`` -> ``capture__base.json``)."""
    return Path(outdir) / PIPELINE_RECORDS / (step_id.replace(":", "__") + ".json")


def evaluations_dir(outdir: str | Path) -> Path:
    """``OUT/.evaluations``: the evaluation memo (one ``<key>.json`` per stored evaluation)."""
    return Path(outdir) / EVALUATIONS


# --- the completion marker -------------------------------------------------------------------
#: written last into a finished output folder; the folder counts as finished only once it exists
COMPLETE_MARKER = "_COMPLETE"
#: the marker name of an unlearned-model folder (``unlearn``: OUT/model/ beside config.json):
#: the same scheme, kept under its first name so existing runs and their readers still agree
RUN_MARKER = "COMPLETE"
MARKERS = (COMPLETE_MARKER, RUN_MARKER)


def marker_record(folder: str | Path) -> dict | None:
    """What a folder's marker says (a JSON object; {} for a plain-text marker), None when there is none."""
    for marker in MARKERS:
        path = Path(folder) / marker
        if path.is_file():
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return {}
            return record if isinstance(record, dict) else {}
    return None


def is_complete(folder: str | Path, inputs: dict | None = None) -> bool:
    """True once a folder's marker (either name) has been written, and, when ``inputs`` are given
    (``core.identity.inputs_record``), it records those inputs: a folder made from other data, other
    weights or other settings is not finished for this run. A marker written before markers
    recorded inputs (no ``inputs`` key) counts as finished, as it did then."""
    record = marker_record(folder)
    if record is None:
        return False
    return inputs is None or "inputs" not in record or record["inputs"] == plain(inputs)


def clear_complete(folder: str | Path) -> None:
    """Remove the marker before rewriting a folder, so a crash mid-way leaves it unfinished."""
    for marker in MARKERS:
        (Path(folder) / marker).unlink(missing_ok=True)


def mark_complete(folder: str | Path, text: str, marker: str = COMPLETE_MARKER) -> Path:
    """Write ``folder``'s marker (call it after every other file is written)."""
    if marker not in MARKERS:
        raise ValueError(f"unknown marker {marker!r}")
    return atomic_write_text(Path(folder) / marker, text)
