"""Recoverability: what the attacks bring back (``unlearn-lens attack``), beside the signature.

Reads ``<model>/attacks/attacks.csv``: the best recovery fraction of each attack on the modified
model, per comparison, and Spearman ρ of each row of ``RECOVERY_PREDICTORS`` with each.
"""

from __future__ import annotations

from typing import Sequence

from analyses.report.html import section, table
from analyses.report.inputs import ReportInputs, read_rows
from analyses.report.signatures import RECOVERY_PREDICTORS, signature_values
from analyses.report.stats import floats, fmt, spearman_text
from unlearn_lens.core import outputs

#: Attacks in the order the table shows them (others found in attacks.csv follow, sorted).
ATTACK_ORDER = ("ablate", "quantize", "relearn-unrelated", "relearn-heldout")
#: (attacks.csv metric, label) of the recoverability table.
RECOVERABILITY_METRICS = (("cloze_accuracy", "cloze accuracy"), ("forget_nll", "forget NLL"))
INTRO = ("Best recovery fraction per attack on the modified model, (attacked − modified) / (base − modified) on "
         "the same evaluation data: 0 = nothing recovered, 1 = back to the base model (`unlearn-lens attack`: "
         "direction ablation, int8/int4 quantization, relearning on unrelated text and on held-out facts; the "
         "setting that recovered most in brackets; — where base and modified do not differ). Below: Spearman ρ "
         "of each signature metric with each best recovery across comparisons.")
EMPTY = ("No attack results yet: run `unlearn-lens attack` per model (--outdir OUT --name NAME), or the pipeline "
         "with --attacks.")


def attack_rows(inputs: ReportInputs, name: str) -> list[dict[str, str]]:
    return read_rows(inputs.model_dir(name) / outputs.ATTACKS / outputs.ATTACKS_CSV)


def best_recovery(rows: Sequence[dict], attack: str, metric: str) -> tuple[float | None, str]:
    """(largest finite ``recovery_<metric>`` of ``attack``'s rows on the modified model, its setting)."""
    best, setting = None, ""
    for row in rows:
        if row.get("attack") == attack and row.get("target") == "modified":
            values = floats([row], f"recovery_{metric}")
            if values and (best is None or values[0] > best):
                best, setting = values[0], row.get("setting", "")
    return best, setting


def _attacks_present(per_model: Sequence[Sequence[dict]]) -> list[str]:
    found = {row.get("attack", "") for rows in per_model for row in rows if row.get("attack")}
    return [a for a in ATTACK_ORDER if a in found] + sorted(found - set(ATTACK_ORDER))


def recoverability_table(inputs: ReportInputs) -> tuple[list[dict[str, str]], list[dict[str, str]], list[str]]:
    """(rows attack x metric with one best-recovery cell per comparison, Spearman rows, Spearman columns).

    A cell reads "best (setting)"; the Spearman rows correlate each signature metric of
    ``RECOVERY_PREDICTORS`` with each best recovery across comparisons.
    """
    names = inputs.comparisons
    per_model = [attack_rows(inputs, n) for n in names]
    rows, recoveries = [], {}
    for attack in _attacks_present(per_model):
        for metric, label in RECOVERABILITY_METRICS:
            best = [best_recovery(model_rows, attack, metric) for model_rows in per_model]
            recoveries[f"{attack}: {label}"] = [value for value, _ in best]
            rows.append({"attack": attack, "metric": f"best recovery of {label}",
                         **{n: fmt(value) + (f" ({setting})" if value is not None and setting else "")
                            for n, (value, setting) in zip(names, best)}})
    columns = ["signature metric", *recoveries]
    spearman = []
    for short, label in RECOVERY_PREDICTORS:
        xs = signature_values(inputs, label)
        spearman.append({"signature metric": short,
                         **{column: spearman_text(xs, ys) for column, ys in recoveries.items()}})
    return rows, spearman, columns


def recoverability_section(inputs: ReportInputs) -> str:
    """The recoverability table (attack x model) and the Spearman ρ of each signature with each recovery."""
    body = None
    if any(attack_rows(inputs, n) for n in inputs.comparisons):
        rows, spearman, columns = recoverability_table(inputs)
        body = table(rows, ["attack", "metric", *inputs.comparisons], group_column="attack") + table(spearman, columns)
    return section("recoverability", "Recoverability: what attacks bring back", INTRO, body, EMPTY)
