"""The planted-facts testbed: what each model knows of the facts A (forgotten) and B (kept), with intervals.

Reads what `plant` (``planting/plant.json``), `unlearn` (``unlearning/<name>/eval.json``) and
`attack` (``<name>/attacks/heldout_per_item.json``, relearn-heldout: retrained on A1, evaluated
on A2) wrote. Every accuracy and recovery carries its 95% percentile-bootstrap interval over
questions and its n (``analyses.uncertainty``, seeded); the recovery on A2 is paired over the same
questions and undefined where unlearning's gap is inside the noise. The section, and the demo's
printout (``testbed_lines``), appear only where those outputs exist.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from analyses.recovery import count_column, forget_recovery, interval_columns, recovery_column
from analyses.report.html import muted, section, table
from analyses.report.inputs import ReportInputs, read_json, read_rows
from analyses.uncertainty import PER_ITEM, Estimate, metric_estimate, nan_estimate
from unlearn_lens.core import outputs
from unlearn_lens.core.outputs import default_name

#: (evaluate()'s metric, label) of the knowledge columns.
FACT_METRICS = (("cloze_accuracy", "forget facts A"), ("retain_cloze_accuracy", "retain facts B"))
#: plant.json's names of the same metrics.
PLANT_METRICS = {"cloze_accuracy": "forget_facts_accuracy", "retain_cloze_accuracy": "retain_facts_accuracy"}
#: Deeb & Roger 2024's recovery of held-out facts after retraining on the others (most methods).
DEEB_ROGER_RECOVERY = 0.88
INTRO = ("Entities A were unlearned, entities B kept (`unlearn-lens datasets create --facts N`, `unlearn-lens plant`). "
         "Cloze accuracy on held-out questions (a template no training text contains; chance 0.25), with its 95% "
         "bootstrap interval over questions and n. Retraining on A1's texts and evaluating on A2's questions asks "
         "whether unlearning removed the knowledge or hid it (Deeb & Roger 2024, who find about "
         f"{DEEB_ROGER_RECOVERY:.2f} of it comes back for most methods).")


def _estimate(record: dict | None) -> Estimate:
    """An Estimate from its stored record (plant.json); a dash without one."""
    try:
        return Estimate(**record)
    except TypeError:
        return nan_estimate()


def evaluation_estimates(result: dict) -> dict[str, Estimate]:
    """Forget- and retain-facts accuracy of an ``evaluate`` result, from its per-item record."""
    per_item = (result or {}).get(PER_ITEM) or {}
    return {metric: metric_estimate(per_item.get(metric)) for metric, _ in FACT_METRICS}


def plant_record(inputs: ReportInputs) -> dict:
    return read_json(inputs.root / outputs.PLANTING / outputs.PLANT_JSON)


def unlearn_record(inputs: ReportInputs, name: str) -> dict:
    return read_json(inputs.root / outputs.UNLEARNING / name / outputs.UNLEARN_EVAL_JSON)


def heldout_record(inputs: ReportInputs, name: str) -> dict:
    return read_json(inputs.model_dir(name) / outputs.ATTACKS / outputs.HELDOUT_PER_ITEM_JSON)


def heldout_estimates(record: dict) -> dict[str, Estimate]:
    """A2 accuracy of the base and the modified model before / after retraining on A1, and the recoveries
    ``(modified after - modified before) / (base before - modified before)`` (against the unattacked base)
    and against the control (the base retrained the same way), paired over A2's questions; NaN where the
    modified model answers more of A2 than its target (``analyses.recovery.forget_recovery``)."""
    try:
        parts = {f"{which}_{when}": {"correct": list(record[which][when]["correct"])}
                 for which in ("base", "modified") for when in ("before", "after")}
    except (KeyError, TypeError):
        return {}
    out = {key: metric_estimate(value) for key, value in parts.items()}
    out["recovery"] = forget_recovery("cloze_accuracy", parts["modified_after"], parts["modified_before"],
                                      parts["base_before"])
    out["recovery_vs_control"] = forget_recovery("cloze_accuracy", parts["modified_after"], parts["modified_before"],
                                                 parts["base_after"])
    return out


def _has_retain_facts(result: dict) -> bool:
    return bool(((result or {}).get(PER_ITEM) or {}).get("retain_cloze_accuracy", {}).get("correct"))


def present(inputs: ReportInputs) -> bool:
    """Whether the output tree holds testbed results (a planting, retain-facts accuracy, A1 -> A2 relearning)."""
    return bool(plant_record(inputs)) or any(
        _has_retain_facts((unlearn_record(inputs, n) or {}).get("after")) or heldout_record(inputs, n)
        for n in inputs.comparisons)


def knowledge_rows(inputs: ReportInputs) -> list[dict[str, str]]:
    """One row per model: before planting, planted (the base), each unlearned model."""
    rows = []
    planted = plant_record(inputs)
    before_name = default_name(str(planted.get("model", ""))) if planted.get("model") else "base"
    for when, label in (("before", f"{before_name} (before planting)"), ("after", inputs.base)):
        if planted.get(when):
            rows.append({"model": label, **{column: _estimate(planted[when].get(PLANT_METRICS[metric])).text()
                                            for metric, column in FACT_METRICS}})
    for name in inputs.comparisons:
        record = unlearn_record(inputs, name)
        if record.get("after"):
            after = evaluation_estimates(record["after"])
            rows.append({"model": f"{name} (unlearned)",
                         **{column: after[metric].text() for metric, column in FACT_METRICS}})
    return rows


VALUE_NLL_INTRO = "NLL of A's values alone (nats per value token), before -> after unlearning:"


def value_nll_lines(inputs: ReportInputs) -> list[str]:
    """Per unlearned model, what unlearning did to the NLL of A's values alone (``forget_value_nll``, paired
    over the held-out forget texts): the testbed's forget NLL of the facts, not of their templates."""
    from analyses.effects import change_lines

    lines = []
    for name in inputs.comparisons:
        record = unlearn_record(inputs, name)
        found = change_lines(record.get("before") or {}, record.get("after") or {}, ("forget_value_nll",))
        lines += [f"{name}: {line}" for line in found]
    return [VALUE_NLL_INTRO, *lines] if lines else []


def heldout_rows(inputs: ReportInputs) -> list[dict[str, str]]:
    """One row per comparison with A1 -> A2 relearning results."""
    rows = []
    for name in inputs.comparisons:
        found = heldout_estimates(heldout_record(inputs, name))
        if found:
            rows.append({"comparison": f"{inputs.base} → {name}",
                         "base on A2": found["base_before"].text(), "unlearned on A2": found["modified_before"].text(),
                         "unlearned, retrained on A1": found["modified_after"].text(),
                         "base, retrained on A1 (control)": found["base_after"].text(),
                         "recovery": found["recovery"].text(), "recovery vs control": found["recovery_vs_control"].text()})
    return rows


HELDOUT_COLUMNS = ["comparison", "base on A2", "unlearned on A2", "unlearned, retrained on A1",
                   "base, retrained on A1 (control)", "recovery", "recovery vs control"]


def testbed_section(inputs: ReportInputs) -> str:
    """The planted-facts section; empty where the tree holds no testbed results."""
    if not present(inputs):
        return ""
    planted = plant_record(inputs)
    parts = [table(knowledge_rows(inputs), ["model", *[column for _, column in FACT_METRICS]])]
    if planted:
        general = [_estimate(planted.get(when, {}).get("general_nll")).text() for when in ("before", "after")]
        parts.append(muted(html.escape(f"General NLL (general passages never trained on) before → after planting: "
                                       f"{general[0]} → {general[1]}; planted in {planted.get('steps')} steps "
                                       f"({planted.get('stopped')}).")))
    parts += [muted(html.escape(line)) for line in value_nll_lines(inputs)]
    heldout = heldout_rows(inputs)
    if heldout:
        parts.append("<h3>Relearning on A1, evaluated on A2</h3>" + table(heldout, HELDOUT_COLUMNS))
    return section("testbed", "Planted facts: what each model knows", INTRO, "".join(parts))


# --- the demo's printout -------------------------------------------------------------------------

def attack_recovery(row: dict, metric: str = "cloze_accuracy") -> str:
    """An attacks.csv row's recovery of ``metric`` as text, with its interval and n where attacks.csv has them."""
    column = recovery_column(metric)
    try:
        value = float(row.get(column, "nan"))
    except ValueError:
        value = float("nan")
    try:
        low, high = (float(row[name]) for name in interval_columns(column))
        n = int(float(row[count_column(metric)]))
    except (KeyError, TypeError, ValueError):
        return "—" if not math.isfinite(value) else f"{value:.2f} (no interval in attacks.csv)"
    return Estimate(value, low, high, n).text()


def best_attack_rows(path: Path, metric: str = "cloze_accuracy") -> dict[str, dict]:
    """Per attack, its modified row with the largest finite recovery of ``metric`` (attacks.csv)."""
    best: dict[str, dict] = {}
    for row in read_rows(path):
        if row.get("target") != "modified":
            continue
        try:
            value = float(row.get(f"recovery_{metric}", "nan"))
        except ValueError:
            continue
        current = best.get(row.get("attack", ""))
        if math.isfinite(value) and (current is None or value > float(current[f"recovery_{metric}"])):
            best[row["attack"]] = row
    return best


def testbed_lines(root: str | Path, base: str, names: list[str]) -> list[str]:
    """The demo's printout of the testbed results (every accuracy and recovery with interval and n)."""
    inputs = ReportInputs(Path(root), base, list(names))
    lines = []
    rows = knowledge_rows(inputs)
    if rows:
        lines.append("Held-out questions, cloze accuracy (chance 0.25) [95% bootstrap interval], n questions:")
        lines += [f"  {row['model']:<22} A: {row['forget facts A']:<26} B: {row['retain facts B']}" for row in rows]
    planted = plant_record(inputs)
    if planted:
        general = [_estimate(planted.get(when, {}).get("general_nll")).text() for when in ("before", "after")]
        lines.append(f"  general NLL before -> after planting: {general[0]} -> {general[1]}")
    lines += [f"  {line}" for line in value_nll_lines(inputs)]
    for name in names:
        found = heldout_estimates(heldout_record(inputs, name))
        if found:
            lines.append(f"Relearning {name} on A1, evaluated on A2: accuracy {found['modified_before'].text()} -> "
                         f"{found['modified_after'].text()} (base {found['base_before'].text()}); recovery "
                         f"{found['recovery'].text()} (Deeb & Roger: about {DEEB_ROGER_RECOVERY:.2f})")
        best = best_attack_rows(inputs.model_dir(name) / outputs.ATTACKS / outputs.ATTACKS_CSV)
        if best:
            lines.append(f"Best recovery of A's accuracy per attack on {name}: " + "; ".join(
                f"{attack} {attack_recovery(row)}" for attack, row in best.items()))
    return lines
