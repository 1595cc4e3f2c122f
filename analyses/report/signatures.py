"""The mechanistic signature: one extractor per row, each reading one diagnostic's outputs.

An extractor takes ``(inputs, name)`` and returns the cell's text for the comparison
``base -> name`` ("x", "a / b" or "base → x"; a dash when the diagnostic did not run).
``RECOVERY_PREDICTORS`` names the rows the recovery and recoverability sections correlate.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from analyses.report.inputs import ReportInputs, read_json, read_rows
from analyses.report.stats import floats, fmt, fmt_pair, mean, median
from unlearn_lens.core import outputs

Extractor = Callable[[ReportInputs, str], str]


def _matrix_rows(inputs: ReportInputs, name: str) -> list[dict]:
    return read_rows(inputs.comparison_dir(name) / outputs.PARAM_STATS / outputs.PER_MATRIX_CSV)


def relative_update(inputs: ReportInputs, name: str) -> str:
    rows = _matrix_rows(inputs, name)
    dw, w = floats(rows, "dW_fro"), floats(rows, "W_fro")
    return fmt(math.sqrt(sum(x * x for x in dw)) / math.sqrt(sum(x * x for x in w))) if dw and w else fmt(None)


def max_spectral_rel(inputs: ReportInputs, name: str) -> str:
    values = floats(_matrix_rows(inputs, name), "dW_spectral_rel")
    return fmt(max(values) if values else None)


def mlp_energy_share(inputs: ReportInputs, name: str) -> str:
    """MLP share of the block matrices' update energy (embedding rows, group ``embed``, left out)."""
    rows = _matrix_rows(inputs, name)
    mlp = sum(x * x for x in floats(rows, "dW_fro", lambda r: r.get("group") == "mlp"))
    total = sum(x * x for x in floats(rows, "dW_fro", lambda r: r.get("group") in ("mlp", "attn")))
    return fmt(mlp / total) if total > 0 else fmt(None)


def top_layers(inputs: ReportInputs, name: str) -> str:
    rows = read_rows(inputs.comparison_dir(name) / outputs.PARAM_STATS / outputs.PER_LAYER_CSV)
    energy: dict[int, float] = {}
    for row in rows:
        try:
            layer, value = int(row["layer"]), float(row["dW_fro_layer"])
        except (KeyError, ValueError):
            continue
        if layer >= 0:
            energy[layer] = energy.get(layer, 0.0) + value * value
    ranked = [layer for layer, value in sorted(energy.items(), key=lambda kv: -kv[1]) if value > 0][:3]
    return ", ".join(str(layer) for layer in ranked) if ranked else fmt(None)


def _changed(row: dict) -> bool:
    """Rows of matrices the intervention touched: geometry of an unchanged matrix is not defined."""
    try:
        return float(row.get("dW_fro", "nan")) > 0
    except ValueError:
        return False


def _column_stat(folder: str, filename: str, column: str, stat=median, where=_changed) -> Extractor:
    def extract(inputs: ReportInputs, name: str) -> str:
        return fmt(stat(floats(read_rows(inputs.comparison_dir(name) / folder / filename), column, where)))
    return extract


def grassmann(inputs: ReportInputs, name: str) -> str:
    rows = read_rows(inputs.comparison_dir(name) / outputs.NULL_SPACE / outputs.NULL_SPACE_CSV)
    distances = floats(rows, "left_grassmann_distance", _changed) + floats(rows, "right_grassmann_distance", _changed)
    return fmt(mean(distances))


def dh_forget_over_retain(inputs: ReportInputs, name: str) -> str:
    rows = read_rows(inputs.comparison_dir(name) / outputs.ACTIVATION_STATS / outputs.ACTIVATION_STATS_CSV)
    forget = mean(floats(rows, "mean_dh_L2", lambda r: r.get("split") == "forget"))
    retain = mean(floats(rows, "mean_dh_L2", lambda r: r.get("split") == "retain"))
    return fmt_pair(forget, retain, "/", need_both=True)


def row_space_selectivity(inputs: ReportInputs, name: str) -> str:
    """Mean forget/retain energy ratio over every row of ``row_space_projection.csv`` with a finite one:
    the row space of the matrices that read the stream (MLP inputs) and the column space of those
    that write into it (residual after the block), so an update of down-projections only gets a value."""
    summary = read_json(inputs.comparison_dir(name) / outputs.ROW_SPACE / outputs.SUMMARY_JSON)
    return fmt((summary.get("mean_selectivity_ratio") or {}).get(inputs.base))


def separation_auc_change(inputs: ReportInputs, name: str) -> str:
    rows = read_rows(inputs.comparison_dir(name) / outputs.SEPARATION / outputs.SEPARATION_CSV)
    base = mean(floats(rows, "auc", lambda r: r.get("model") == inputs.base))
    modified = mean(floats(rows, "auc", lambda r: r.get("model") == name))
    return fmt(modified - base) if base is not None and modified is not None else fmt(None)


def lipschitz_ratio(split: str) -> Extractor:
    def extract(inputs: ReportInputs, name: str) -> str:
        rows = read_rows(inputs.comparison_dir(name) / outputs.LIPSCHITZ / outputs.LIPSCHITZ_CSV)
        eps = floats(rows, "eps")
        if not eps:
            return fmt(None)
        smallest = min(eps)

        def pick(model):
            return mean(floats(rows, "lipschitz_logits_mean", lambda r: r.get("model") == model and
                               r.get("split") == split and float(r.get("eps", "nan")) == smallest))
        base, modified = pick(inputs.base), pick(name)
        return fmt(modified / base) if base and modified is not None else fmt(None)
    return extract


def _before_after(inputs: ReportInputs, name: str, value: Callable[[Path], float | None]) -> str:
    """"base → modified" of one per-model value read from ``<model>/``."""
    return fmt_pair(value(inputs.model_dir(inputs.base)), value(inputs.model_dir(name)), "→")


def probe_selectivity(inputs: ReportInputs, name: str) -> str:
    return _before_after(inputs, name, lambda model_dir: read_json(
        model_dir / outputs.PROBES / outputs.SUMMARY_JSON).get("best_selectivity"))


def _lens_rows(model_dir: Path, folder: str, scoring: str) -> list[dict]:
    """A lens's rows of one scoring (``letter`` or ``cloze``)."""
    return [r for r in read_rows(model_dir / folder / outputs.LENS_CSV) if r.get("scoring") == scoring]


def lens_best(folder: str, scoring: str = "cloze") -> Extractor:
    def best(model_dir: Path) -> float | None:
        values = floats(_lens_rows(model_dir, folder, scoring), "accuracy")
        return max(values) if values else None
    return lambda inputs, name: _before_after(inputs, name, best)


def lens_final(folder: str, scoring: str = "cloze") -> Extractor:
    def final(model_dir: Path) -> float | None:
        rows = sorted(_lens_rows(model_dir, folder, scoring), key=lambda r: int(r.get("layer", -1)))
        values = floats(rows[-1:], "accuracy")
        return values[0] if values else None
    return lambda inputs, name: _before_after(inputs, name, final)


def eval_metrics(model_dir: Path) -> dict[str, float]:
    """``metric -> value`` of a finished ``unlearn-lens eval`` (``<model>/evaluation/eval_results.csv``)."""
    folder = model_dir / outputs.EVALUATION
    if not outputs.is_complete(folder):
        return {}
    return {row["metric"]: value for row in read_rows(folder / outputs.EVAL_CSV)
            for value in floats([row], "value")}


def evaluation_for(inputs: ReportInputs, name: str) -> dict:
    """``{"before": metrics, "after": metrics}`` of the behaviour rows, or {} when nothing measured it.

    The unlearning run's own record (``unlearning/<name>/eval.json``, written by ``unlearn``) when
    this tool made the model; otherwise what ``eval`` wrote for the base (before) and for ``name``
    (after).
    """
    data = read_json(inputs.root / outputs.UNLEARNING / name / outputs.UNLEARN_EVAL_JSON)
    if data:
        return data
    before, after = eval_metrics(inputs.model_dir(inputs.base)), eval_metrics(inputs.model_dir(name))
    return {"before": before, "after": after} if before or after else {}


def behaviour(metric: str) -> Extractor:
    def extract(inputs: ReportInputs, name: str) -> str:
        data = evaluation_for(inputs, name)
        before, after = (data.get("before") or {}).get(metric), (data.get("after") or {}).get(metric)
        return fmt_pair(before, after, "→") if data else fmt(None)
    return extract


SIGNATURE: list[tuple[str, str, Extractor]] = [
    ("Magnitude", "relative update ‖ΔW‖F / ‖W‖F, all matrices", relative_update),
    ("Magnitude", "largest relative spectral norm σ1(ΔW)/σ1(W)", max_spectral_rel),
    ("Location", "MLP share of update energy (rest: attention)", mlp_energy_share),
    ("Location", "layers with the largest change", top_layers),
    ("Geometry", "median stable rank of ΔW (changed matrices)",
     _column_stat(outputs.PARAM_STATS, outputs.PER_MATRIX_CSV, "dW_stable_rank")),
    ("Geometry", "median empirical rank of ΔW (99% energy, changed matrices)",
     _column_stat(outputs.PARAM_STATS, outputs.PER_MATRIX_CSV, "dW_empirical_rank")),
    ("Geometry", "top-10 singular values' share of ΔW energy (sampled, changed)",
     _column_stat(outputs.NULL_SPACE, outputs.NULL_SPACE_CSV, "top10_energy_share", mean)),
    ("Geometry", "null-space share of MLP updates (output side, changed)",
     _column_stat(outputs.MLP_NULLSPACE, outputs.MLP_NULLSPACE_CSV, "col_null_share", mean)),
    ("Geometry", "Grassmann distance of top-k singular subspaces (mean, changed)", grassmann),
    ("Activation change", "mean ‖Δh‖2 forget / retain", dh_forget_over_retain),
    ("Selectivity", "covariance Wasserstein selectivity W(forget)/W(retain)",
     _column_stat(outputs.COVARIANCE, outputs.COVARIANCE_CSV, "selectivity_ratio", median, lambda r: True)),
    ("Selectivity", "row/column-space selectivity (forget/retain energy where ΔW reads or writes)",
     row_space_selectivity),
    ("Selectivity", "forget/retain separation AUC, modified − base", separation_auc_change),
    ("Stability", "local Lipschitz (logits) modified/base, forget", lipschitz_ratio("forget")),
    ("Stability", "local Lipschitz (logits) modified/base, retain", lipschitz_ratio("retain")),
    ("Knowledge depth", "best probe selectivity, base → modified", probe_selectivity),
    ("Knowledge depth", "logit lens cloze accuracy, best layer", lens_best(outputs.LOGIT_LENS)),
    ("Knowledge depth", "logit lens cloze accuracy, final layer", lens_final(outputs.LOGIT_LENS)),
    ("Knowledge depth", "tuned lens cloze accuracy, best layer", lens_best(outputs.TUNED_LENS)),
    ("Behaviour", "forget NLL before → after unlearning", behaviour("forget_nll")),
    ("Behaviour", "retain NLL before → after unlearning", behaviour("retain_nll")),
    ("Behaviour", "WMDP cloze accuracy before → after", behaviour("cloze_accuracy")),
]
EXTRACTORS: dict[str, Extractor] = {label: extract for _, label, extract in SIGNATURE}


def signature_table(inputs: ReportInputs) -> list[dict[str, str]]:
    """Rows of the signature table: question, metric, then one value per comparison."""
    return [{"question": question, "metric": label, **{name: extract(inputs, name) for name in inputs.comparisons}}
            for question, label, extract in SIGNATURE]


# --- the rows set beside measured recovery (relearning, attacks) ---------------------------------

#: (short column name, SIGNATURE label) of the signature metrics set beside the measured recovery.
RECOVERY_PREDICTORS: list[tuple[str, str]] = [
    ("update norm", "relative update ‖ΔW‖F / ‖W‖F, all matrices"),
    ("stable rank", "median stable rank of ΔW (changed matrices)"),
    ("null-space share", "null-space share of MLP updates (output side, changed)"),
    ("row-space selectivity", "row/column-space selectivity (forget/retain energy where ΔW reads or writes)"),
    ("probe depth", "best probe selectivity, base → modified"),
    ("logit-lens depth", "logit lens cloze accuracy, best layer"),
    ("tuned-lens depth", "tuned lens cloze accuracy, best layer"),
]


def signature_number(text: str) -> float | None:
    """The modified model's value in an extractor's text ("x" or "base → x"); None for a dash."""
    try:
        value = float(text.split("→")[-1].strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def signature_texts(inputs: ReportInputs, label: str) -> list[str]:
    """The cells of one signature row, one per comparison."""
    return [EXTRACTORS[label](inputs, name) for name in inputs.comparisons]


def signature_values(inputs: ReportInputs, label: str) -> list[float | None]:
    """The modified models' values of one signature row, one per comparison (None: not measured)."""
    return [signature_number(text) for text in signature_texts(inputs, label)]
