"""The study section: does a signature predict recovery? (``unlearn-lens study``, OUT/study/).

Shown once OUT/study/ is complete: the prediction table (per recovery target, the held-out
predictions from the signatures, from the behavioural effect alone and from the training mean,
each scored by Spearman ρ and R² with intervals; whether the signatures beat each), the scatter of
predicted vs measured recovery coloured by method, and one sentence per target naming the
signatures that carry the prediction. Reads prediction.csv by the column names OUTPUTS.md lists.
"""

from __future__ import annotations

import html

from analyses.report.html import muted, png_figure, section, table
from analyses.report.inputs import ReportInputs, read_rows
from analyses.report.stats import fmt
from unlearn_lens.core import outputs

INTRO = ("Each unlearning method at several strengths; each method held out in turn, a model fitted on the other "
         "methods' models predicts its recovery (ridge on the standardised signature metrics, the penalty chosen "
         "inside the training methods; the same on the behavioural effect of unlearning alone; the training mean). "
         "Scores are of the pooled held-out predictions: Spearman ρ (exact p below 10 models; Holm p over every row "
         "of the table) and R² = 1 − SSE/SST, with 95% intervals that resample whole methods. \"beats\" is yes only "
         "where the interval of the R² difference lies above 0.")
EMPTY = "No study yet: run `unlearn-lens study --model M --data DIR --outdir OUT`."
COLUMNS = ("target", "predictors", "n", "Spearman ρ", "R²", "beats behaviour", "beats mean")


def _number(row: dict, column: str) -> float | None:
    try:
        value = float(row.get(column, ""))
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None


def _with_interval(row: dict, column: str) -> str:
    value, low, high = (_number(row, c) for c in (column, f"{column}_low", f"{column}_high"))
    if value is None:
        return fmt(None)
    return fmt(value, 2) + (f" [{fmt(low, 2)}, {fmt(high, 2)}]" if low is not None and high is not None else "")


def prediction_rows(rows: list[dict]) -> list[dict[str, str]]:
    """The table's rows: one per predicted target and predictor set."""
    out = []
    for row in rows:
        p = f"p = {fmt(_number(row, 'spearman_p'), 2)} {row.get('spearman_p_method', '')}, " \
            f"Holm p = {fmt(_number(row, 'spearman_p_holm'), 2)}"
        cells = {"Spearman ρ": f"{_with_interval(row, 'spearman')} ({p})", "R²": _with_interval(row, "r2")}
        out.append({"target": row["target"], "predictors": row["predictors"],
                    "n": f"{row.get('n_models', '')} models, {row.get('n_methods', '')} methods", **cells,
                    "beats behaviour": row.get("beats_behaviour", ""), "beats mean": row.get("beats_mean", "")})
    return out


def _anti_ordered(signatures: dict, mean: dict) -> str:
    """A warning where the signatures' held-out ρ is below 0 and so is the training mean's: leaving a
    method out anti-orders a prediction that knows nothing of it (the held-out method's own values pull
    the others' mean the other way), so a negative ρ, however small its p, is no signal."""
    rho, rho_mean = _number(signatures, "spearman"), _number(mean, "spearman")
    if rho is None or rho_mean is None or not (rho < 0 and rho_mean < 0):
        return ""
    return (f" A ρ below 0 is no signal: the training mean, blind to the held-out method, gets ρ = "
            f"{fmt(rho_mean, 2)} (leaving a method out anti-orders any uninformed prediction).")


def sentences(rows: list[dict]) -> list[str]:
    """One sentence per predicted target: which signatures carry the prediction, and whether it beats
    behaviour alone; one more naming the targets with too few models."""
    by_target: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_target.setdefault(row["target"], {})[row["predictors"]] = row
    out, unpredicted = [], []
    for target, sets in by_target.items():
        signatures, behaviour = sets.get("signatures", {}), sets.get("behaviour", {})
        if signatures.get("note") or not signatures:
            unpredicted.append(target)
            continue
        carried = signatures.get("carried_by") or "no signature (every coefficient 0: the prediction is the mean)"
        out.append(f"{target}: the signatures' prediction rests most on {carried}; held-out R² "
                   f"{_with_interval(signatures, 'r2')} against {_with_interval(behaviour, 'r2')} from behaviour "
                   f"alone; beats behaviour: {signatures.get('beats_behaviour', '?')}, beats the mean: "
                   f"{signatures.get('beats_mean', '?')}"
                   + (f" ({signatures['interval_note']})." if signatures.get("interval_note") else ".")
                   + _anti_ordered(signatures, sets.get("mean", {}))
                   + (f" Left out, their unlearning did not move the metric the forget way: {signatures['left_out']}."
                      if signatures.get("left_out") else ""))
    if unpredicted:
        out.append(f"Not predicted (too few models with a recovery outside the evaluation noise): "
                   f"{', '.join(unpredicted)}.")
    return out


def study_section(inputs: ReportInputs) -> str:
    """The study's section, or nothing (no heading) when OUT/study/ is not complete."""
    folder = inputs.root / outputs.STUDY
    if not outputs.is_complete(folder):
        return ""
    rows = read_rows(folder / outputs.STUDY_PREDICTION_CSV)
    predicted = [row for row in rows if not row.get("note")]  # the others are named in the last sentence
    body = table(prediction_rows(predicted), list(COLUMNS), group_column="target") if predicted else muted(
        "No recovery target had enough models with a recovery outside the evaluation noise.")
    body += "".join(f"<p>{html.escape(sentence)}</p>" for sentence in sentences(rows))
    plot = folder / outputs.STUDY_PLOT
    if plot.is_file():
        body += "<div class='figs'>" + png_figure(plot.read_bytes(), "held-out predicted vs measured recovery, "
                                                  "coloured by method (diagonal: perfect)", style="max-width:100%") \
                + "</div>"
    return section("study", "Does a signature predict recovery? (study)", INTRO, body, EMPTY)
