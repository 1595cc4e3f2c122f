"""Brittleness: the signature beside the recovery measured by relearning (``unlearn-lens relearn``).

Reads ``<model>/relearning/summary.json``; the table and the figure set each row of
``RECOVERY_PREDICTORS`` beside the steps to half recovery, with Spearman ρ across comparisons
(computed from the tidy signature numbers; exact p below 10 comparisons; Holm over the table).
"""

from __future__ import annotations

import html
import math

from analyses.report.html import muted, png_figure, section, table
from analyses.report.inputs import ReportInputs, read_json
from analyses.report.signatures import RECOVERY_PREDICTORS, SIGNATURE, predictor_columns, signature_table
from analyses.report.stats import family_note, fmt, spearman_cell, spearman_family
from unlearn_lens.core import outputs

INTRO = ("A fine-tuning attack (plain NLL descent on a few forget texts, `unlearn-lens relearn`) measures how "
         "many steps recover half of the gap to the base model. Fewer steps = more brittle. Spearman ρ across "
         "comparisons asks whether each signature metric predicts it (never reached: ranked above every "
         "reached value; no gap: left out).")
EMPTY = "No relearning results yet: run `unlearn-lens relearn` per model, or the pipeline with --relearn."


def relearning_summary(inputs: ReportInputs, name: str) -> dict:
    return read_json(inputs.model_dir(name) / outputs.RELEARNING / outputs.SUMMARY_JSON)


def recovery_steps(summary: dict, metric: str | None = None) -> tuple[float | None, str]:
    """(value used for ranking, text shown) of the forget attack's steps to half recovery.

    Never reached within the run ranks above every reached value (censored at steps + 1); no gap
    to recover gives None (left out of the correlation).
    """
    metric = metric or summary.get("steps_to_half_recovery_metric") or "cloze_accuracy"
    entry = ((summary.get("recovery") or {}).get("forget") or {}).get(metric)
    if not entry:
        return None, fmt(None)
    if entry.get("reached") and entry.get("steps_to_half") is not None:
        return float(entry["steps_to_half"]), str(entry["steps_to_half"])
    gap = entry.get("gap")
    if gap is not None and gap > 0:
        steps = int((summary.get("settings") or {}).get("steps") or 0)
        return float(steps + 1), f"> {steps}"
    return None, "no gap"


def _targets(inputs: ReportInputs) -> tuple[str, dict[str, list[tuple[float | None, str]]]]:
    """(the accuracy metric's name, {column: [(ranked value, text) per comparison]}) of both recovery measures."""
    summaries = [relearning_summary(inputs, n) for n in inputs.comparisons]
    metric = next((s.get("steps_to_half_recovery_metric") for s in summaries if s), "cloze_accuracy")
    return metric, {f"steps to half recovery ({metric.replace('_', ' ')})": [recovery_steps(s) for s in summaries],
                    "steps to half recovery (forget NLL)": [recovery_steps(s, "forget_nll") for s in summaries]}


def recovery_correlations(inputs: ReportInputs) -> dict:
    """The table's family of Spearman tests: ``{(signature short name, recovery column): Tested}``."""
    predictors = predictor_columns(inputs)
    _, targets = _targets(inputs)
    return spearman_family({(short, column): (xs, [t[0] for t in target])
                            for column, target in targets.items() for short, xs in predictors.items()})


def recovery_table(inputs: ReportInputs) -> tuple[list[dict[str, str]], list[str]]:
    """Rows (one per comparison, then one Spearman row per recovery measure) and the columns."""
    names = inputs.comparisons
    cells = {row["metric"]: row for row in signature_table(inputs)}
    labels = dict(_predictor_labels())
    _, targets = _targets(inputs)
    family = recovery_correlations(inputs)
    columns = ["comparison", *[short for short, _ in RECOVERY_PREDICTORS], *targets]
    rows = []
    for index, name in enumerate(names):
        row = {"comparison": f"{inputs.base} → {name}", **{c: target[index][1] for c, target in targets.items()}}
        row.update({short: cells[labels[short]][name] for short, _ in RECOVERY_PREDICTORS})
        rows.append(row)
    for column in targets:
        row = {"comparison": f"Spearman ρ with {column}", **{c: "" for c in targets}}
        row.update({short: spearman_cell(family.get((short, column))) for short, _ in RECOVERY_PREDICTORS})
        rows.append(row)
    return rows, columns


def _predictor_labels() -> list[tuple[str, str]]:
    """(short name, signature-table label) of each predictor: the row whose cell shows it."""
    by_column = {column: row.label for row in SIGNATURE for column in row.columns}
    return [(short, by_column[column]) for short, column in RECOVERY_PREDICTORS]


def recovery_plot(inputs: ReportInputs) -> bytes:
    """PNG: a scatter of each signature metric against steps to half recovery, one panel each."""
    import io

    from analyses.plotting import subplots

    names = inputs.comparisons
    steps = [recovery_steps(relearning_summary(inputs, n))[0] for n in names]
    predictors = predictor_columns(inputs)
    family = recovery_correlations(inputs)
    accuracy_column = next(iter(_targets(inputs)[1]))
    columns = 4
    panel_rows = math.ceil(len(RECOVERY_PREDICTORS) / columns)
    figure, axes = subplots(panel_rows, columns, figsize=(4 * columns, 3.4 * panel_rows), squeeze=False)
    for axis, (short, _) in zip(axes.flat, RECOVERY_PREDICTORS):
        xs = predictors[short]
        points = [(x, y, n) for x, y, n in zip(xs, steps, names) if x is not None and y is not None]
        for x, y, n in points:
            axis.scatter(x, y, color="tab:red")
            axis.annotate(n, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
        if not points:
            axis.text(0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes, color="grey")
        axis.set(xlabel=short, ylabel="steps to half recovery",
                 title=f"{short}: {spearman_cell(family.get((short, accuracy_column)))}")
        axis.title.set_fontsize(8)
    for axis in list(axes.flat)[len(RECOVERY_PREDICTORS):]:
        axis.set_visible(False)
    figure.suptitle("Mechanistic signature vs measured recovery under relearning")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def recovery_figure(inputs: ReportInputs) -> str:
    """The scatter of ``recovery_plot`` as an embedded figure."""
    return png_figure(recovery_plot(inputs), "signature vs steps to half recovery (never reached: ranked above "
                      "every reached value)", alt="signature vs recovery", style="max-width:100%")


def recovery_section(inputs: ReportInputs) -> str:
    """The brittleness section: signature beside measured recovery, with Spearman correlations."""
    body = None
    if any(relearning_summary(inputs, n) for n in inputs.comparisons):
        rows, columns = recovery_table(inputs)
        body = (table(rows, columns) + muted(html.escape(family_note(recovery_correlations(inputs))))
                + f"<div class='figs'>{recovery_figure(inputs)}</div>")
    return section("recovery", "Brittleness: signature vs measured recovery", INTRO, body, EMPTY)
