"""The mechanistic signature as one tidy table of numbers, read from the diagnostics' own CSVs.

Each row of ``SIGNATURE`` reads one diagnostic's outputs into named numbers (``read(inputs, name)``
-> ``{column: value or None}``, the columns declared in ``columns``) and says how the report shows
them (``show(values)`` -> "x", "a / b" or "base → x"; a dash where the diagnostic did not run).
``signature_frame`` is the tidy table (one row per comparison, one numeric column per signature
metric): the report's signature table is its text, and ``unlearn-lens study``'s ``signatures.csv``
is the frame itself, so correlations and predictions are computed from numbers, never parsed back
from formatted cells. ``RECOVERY_PREDICTORS`` names the columns set beside measured recovery.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from analyses.report.inputs import ReportInputs, read_json, read_rows
from analyses.report.stats import floats, fmt, fmt_pair, mean, median
from unlearn_lens.core import outputs

Values = dict[str, "float | None"]
Reader = Callable[[ReportInputs, str], Values]


@dataclass(frozen=True)
class SignatureRow:
    """One row of the signature table: its question and label, the tidy columns it reads, its cell text."""

    question: str
    label: str
    columns: tuple[str, ...]
    read: Reader
    show: Callable[[Values], str]


def one(column: str) -> Callable[[Values], str]:
    """A cell showing one number."""
    return lambda values: fmt(values.get(column))


def pair(first: str, second: str, separator: str, need_both: bool = False) -> Callable[[Values], str]:
    """A cell ``first separator second``."""
    return lambda values: fmt_pair(values.get(first), values.get(second), separator, need_both)


def _matrix_rows(inputs: ReportInputs, name: str) -> list[dict]:
    return read_rows(inputs.comparison_dir(name) / outputs.PARAM_STATS / outputs.PER_MATRIX_CSV)


def relative_update(inputs: ReportInputs, name: str) -> Values:
    rows = _matrix_rows(inputs, name)
    dw, w = floats(rows, "dW_fro"), floats(rows, "W_fro")
    value = math.sqrt(sum(x * x for x in dw)) / math.sqrt(sum(x * x for x in w)) if dw and w and any(w) else None
    return {"update_norm_rel": value}


def max_spectral_rel(inputs: ReportInputs, name: str) -> Values:
    values = floats(_matrix_rows(inputs, name), "dW_spectral_rel")
    return {"max_spectral_rel": max(values) if values else None}


def mlp_energy_share(inputs: ReportInputs, name: str) -> Values:
    """MLP share of the block matrices' update energy (embedding rows, group ``embed``, left out)."""
    rows = _matrix_rows(inputs, name)
    mlp = sum(x * x for x in floats(rows, "dW_fro", lambda r: r.get("group") == "mlp"))
    total = sum(x * x for x in floats(rows, "dW_fro", lambda r: r.get("group") in ("mlp", "attn")))
    return {"mlp_energy_share": mlp / total if total > 0 else None}


TOP_LAYERS = ("top_layer_1", "top_layer_2", "top_layer_3")


def top_layers(inputs: ReportInputs, name: str) -> Values:
    """The three blocks with the largest update energy, largest first."""
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
    return {column: (float(ranked[i]) if i < len(ranked) else None) for i, column in enumerate(TOP_LAYERS)}


def show_layers(values: Values) -> str:
    layers = [str(int(values[c])) for c in TOP_LAYERS if values.get(c) is not None]
    return ", ".join(layers) if layers else fmt(None)


def _changed(row: dict) -> bool:
    """Rows of matrices the intervention touched: geometry of an unchanged matrix is not defined."""
    try:
        return float(row.get("dW_fro", "nan")) > 0
    except ValueError:
        return False


def _column_stat(key: str, folder: str, filename: str, column: str, stat=median, where=_changed) -> Reader:
    def read(inputs: ReportInputs, name: str) -> Values:
        return {key: stat(floats(read_rows(inputs.comparison_dir(name) / folder / filename), column, where))}
    return read


def grassmann(inputs: ReportInputs, name: str) -> Values:
    rows = read_rows(inputs.comparison_dir(name) / outputs.NULL_SPACE / outputs.NULL_SPACE_CSV)
    distances = floats(rows, "left_grassmann_distance", _changed) + floats(rows, "right_grassmann_distance", _changed)
    return {"grassmann_distance": mean(distances)}


def activation_change(inputs: ReportInputs, name: str) -> Values:
    """Mean ‖Δh‖2 over layers on forget and on retain text, and their ratio."""
    rows = read_rows(inputs.comparison_dir(name) / outputs.ACTIVATION_STATS / outputs.ACTIVATION_STATS_CSV)
    forget = mean(floats(rows, "mean_dh_L2", lambda r: r.get("split") == "forget"))
    retain = mean(floats(rows, "mean_dh_L2", lambda r: r.get("split") == "retain"))
    ratio = forget / retain if forget is not None and retain else None
    return {"dh_forget": forget, "dh_retain": retain, "dh_forget_over_retain": ratio}


def row_space_selectivity(inputs: ReportInputs, name: str) -> Values:
    """Mean forget/retain energy ratio over every row of ``row_space_projection.csv`` with a finite one:
    the row space of the matrices that read the stream (MLP inputs) and the column space of those
    that write into it (residual after the block), so an update of down-projections only gets a value."""
    summary = read_json(inputs.comparison_dir(name) / outputs.ROW_SPACE / outputs.SUMMARY_JSON)
    value = (summary.get("mean_selectivity_ratio") or {}).get(inputs.base)
    return {"row_space_selectivity": float(value) if isinstance(value, (int, float)) else None}


def separation_auc_change(inputs: ReportInputs, name: str) -> Values:
    rows = read_rows(inputs.comparison_dir(name) / outputs.SEPARATION / outputs.SEPARATION_CSV)
    base = mean(floats(rows, "auc", lambda r: r.get("model") == inputs.base))
    modified = mean(floats(rows, "auc", lambda r: r.get("model") == name))
    return {"separation_auc_change": modified - base if base is not None and modified is not None else None}


def lipschitz_ratio(split: str) -> Reader:
    def read(inputs: ReportInputs, name: str) -> Values:
        rows = read_rows(inputs.comparison_dir(name) / outputs.LIPSCHITZ / outputs.LIPSCHITZ_CSV)
        eps = floats(rows, "eps")
        if not eps:
            return {f"lipschitz_ratio_{split}": None}
        smallest = min(eps)

        def pick(model):
            return mean(floats(rows, "lipschitz_logits_mean", lambda r: r.get("model") == model and
                               r.get("split") == split and float(r.get("eps", "nan")) == smallest))
        base, modified = pick(inputs.base), pick(name)
        return {f"lipschitz_ratio_{split}": modified / base if base and modified is not None else None}
    return read


def _before_after(key: str, value: Callable[[Path], "float | None"]) -> Reader:
    """``{key_base: the base's value, key: the modified model's}`` of one per-model value read from ``<model>/``."""
    return lambda inputs, name: {f"{key}_base": value(inputs.model_dir(inputs.base)),
                                 key: value(inputs.model_dir(name))}


def _best_selectivity(model_dir: Path) -> float | None:
    value = read_json(model_dir / outputs.PROBES / outputs.SUMMARY_JSON).get("best_selectivity")
    return float(value) if isinstance(value, (int, float)) else None


def _lens_rows(model_dir: Path, folder: str, scoring: str) -> list[dict]:
    """A lens's rows of one scoring (``letter`` or ``cloze``)."""
    return [r for r in read_rows(model_dir / folder / outputs.LENS_CSV) if r.get("scoring") == scoring]


def lens_best(folder: str, scoring: str = "cloze") -> Callable[[Path], "float | None"]:
    def best(model_dir: Path) -> float | None:
        values = floats(_lens_rows(model_dir, folder, scoring), "accuracy")
        return max(values) if values else None
    return best


def lens_final(folder: str, scoring: str = "cloze") -> Callable[[Path], "float | None"]:
    def final(model_dir: Path) -> float | None:
        rows = sorted(_lens_rows(model_dir, folder, scoring), key=lambda r: int(r.get("layer", -1)))
        values = floats(rows[-1:], "accuracy")
        return values[0] if values else None
    return final


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




def behaviour(metric: str) -> Reader:
    """``metric`` before and after unlearning and its change (after - before)."""
    def read(inputs: ReportInputs, name: str) -> Values:
        data = evaluation_for(inputs, name)
        before, after = ((data.get(k) or {}).get(metric) for k in ("before", "after"))
        before, after = (float(v) if isinstance(v, (int, float)) else None for v in (before, after))
        change = after - before if before is not None and after is not None else None
        return {f"{metric}_before": before, f"{metric}_after": after, f"{metric}_change": change}
    return read


def _behaviour_row(metric: str, label: str) -> SignatureRow:
    return SignatureRow("Behaviour", label, (f"{metric}_before", f"{metric}_after", f"{metric}_change"),
                        behaviour(metric), pair(f"{metric}_before", f"{metric}_after", "→"))


def _before_after_row(question: str, label: str, key: str, value: Callable[[Path], "float | None"]) -> SignatureRow:
    return SignatureRow(question, label, (f"{key}_base", key), _before_after(key, value),
                        pair(f"{key}_base", key, "→"))


def _one_row(question: str, label: str, key: str, read: Reader) -> SignatureRow:
    return SignatureRow(question, label, (key,), read, one(key))


SIGNATURE: list[SignatureRow] = [
    _one_row("Magnitude", "relative update ‖ΔW‖F / ‖W‖F, all matrices", "update_norm_rel", relative_update),
    _one_row("Magnitude", "largest relative spectral norm σ1(ΔW)/σ1(W)", "max_spectral_rel", max_spectral_rel),
    _one_row("Location", "MLP share of update energy (rest: attention)", "mlp_energy_share", mlp_energy_share),
    SignatureRow("Location", "layers with the largest change", TOP_LAYERS, top_layers, show_layers),
    _one_row("Geometry", "median stable rank of ΔW (changed matrices)", "dW_stable_rank",
             _column_stat("dW_stable_rank", outputs.PARAM_STATS, outputs.PER_MATRIX_CSV, "dW_stable_rank")),
    _one_row("Geometry", "median empirical rank of ΔW (99% energy, changed matrices)", "dW_empirical_rank",
             _column_stat("dW_empirical_rank", outputs.PARAM_STATS, outputs.PER_MATRIX_CSV, "dW_empirical_rank")),
    _one_row("Geometry", "top-10 singular values' share of ΔW energy (sampled, changed)", "top10_energy_share",
             _column_stat("top10_energy_share", outputs.NULL_SPACE, outputs.NULL_SPACE_CSV, "top10_energy_share",
                          mean)),
    _one_row("Geometry", "null-space share of MLP updates (output side, changed)", "mlp_null_share",
             _column_stat("mlp_null_share", outputs.MLP_NULLSPACE, outputs.MLP_NULLSPACE_CSV, "col_null_share", mean)),
    _one_row("Geometry", "Grassmann distance of top-k singular subspaces (mean, changed)", "grassmann_distance",
             grassmann),
    SignatureRow("Activation change", "mean ‖Δh‖2 forget / retain",
                 ("dh_forget", "dh_retain", "dh_forget_over_retain"), activation_change,
                 pair("dh_forget", "dh_retain", "/", need_both=True)),
    _one_row("Selectivity", "covariance Wasserstein selectivity W(forget)/W(retain)", "covariance_selectivity",
             _column_stat("covariance_selectivity", outputs.COVARIANCE, outputs.COVARIANCE_CSV, "selectivity_ratio",
                          median, lambda r: True)),
    _one_row("Selectivity", "row/column-space selectivity (forget/retain energy where ΔW reads or writes)",
             "row_space_selectivity", row_space_selectivity),
    _one_row("Selectivity", "forget/retain separation AUC, modified − base", "separation_auc_change",
             separation_auc_change),
    _one_row("Stability", "local Lipschitz (logits) modified/base, forget", "lipschitz_ratio_forget",
             lipschitz_ratio("forget")),
    _one_row("Stability", "local Lipschitz (logits) modified/base, retain", "lipschitz_ratio_retain",
             lipschitz_ratio("retain")),
    _before_after_row("Knowledge depth", "best probe selectivity, base → modified", "probe_selectivity",
                      _best_selectivity),
    _before_after_row("Knowledge depth", "logit lens cloze accuracy, best layer", "logit_lens_best",
                      lens_best(outputs.LOGIT_LENS)),
    _before_after_row("Knowledge depth", "logit lens cloze accuracy, final layer", "logit_lens_final",
                      lens_final(outputs.LOGIT_LENS)),
    _before_after_row("Knowledge depth", "tuned lens cloze accuracy, best layer", "tuned_lens_best",
                      lens_best(outputs.TUNED_LENS)),
    _behaviour_row("forget_nll", "forget NLL before → after unlearning"),
    _behaviour_row("forget_value_nll", "forget NLL of the planted values alone (testbed) before → after"),
    _behaviour_row("retain_nll", "retain NLL before → after unlearning"),
    _behaviour_row("cloze_accuracy", "WMDP cloze accuracy before → after"),
]
#: every column of the tidy table, in the table's order
SIGNATURE_COLUMNS: tuple[str, ...] = tuple(column for row in SIGNATURE for column in row.columns)
#: the behavioural effect of unlearning (what a signature must beat to be worth reading)
BEHAVIOUR_COLUMNS = ("forget_nll_change", "retain_nll_change", "cloze_accuracy_change")


def signature_values(inputs: ReportInputs, name: str) -> Values:
    """Every column of the tidy table for the comparison ``base -> name`` (None: not measured)."""
    values: Values = {}
    for row in SIGNATURE:
        read = row.read(inputs, name)
        values.update({column: _number(read.get(column)) for column in row.columns})
    return values


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def signature_frame(inputs: ReportInputs) -> list[dict]:
    """The tidy table: one row per comparison (``model``, then every ``SIGNATURE_COLUMNS`` value, NaN where
    the diagnostic did not run)."""
    return [{"model": name, **{c: (v if v is not None else float("nan"))
                               for c, v in signature_values(inputs, name).items()}}
            for name in inputs.comparisons]


def signature_table(inputs: ReportInputs) -> list[dict[str, str]]:
    """Rows of the report's signature table: question, metric, then one cell per comparison (from the frame)."""
    values = {name: signature_values(inputs, name) for name in inputs.comparisons}
    return [{"question": row.question, "metric": row.label, **{name: row.show(values[name]) for name in values}}
            for row in SIGNATURE]


# --- the columns set beside measured recovery (relearning, attacks) ------------------------------

#: (short name, tidy column) of the signature metrics set beside the measured recovery.
RECOVERY_PREDICTORS: list[tuple[str, str]] = [
    ("update norm", "update_norm_rel"),
    ("stable rank", "dW_stable_rank"),
    ("null-space share", "mlp_null_share"),
    ("row-space selectivity", "row_space_selectivity"),
    ("probe depth", "probe_selectivity"),
    ("logit-lens depth", "logit_lens_best"),
    ("tuned-lens depth", "tuned_lens_best"),
]


def predictor_columns(inputs: ReportInputs) -> dict[str, list[float | None]]:
    """Each ``RECOVERY_PREDICTORS`` column across the comparisons, by short name (None: not measured)."""
    values = [signature_values(inputs, name) for name in inputs.comparisons]
    return {short: [v.get(column) for v in values] for short, column in RECOVERY_PREDICTORS}
