"""Recoverability: what the attacks bring back (``unlearn-lens attack``), beside the signature.

Reads ``<model>/attacks/headline.csv``: per attack and metric, the recovery of the setting chosen on
half of the evaluation items and scored on the other half (one setting: every item), with its 95 %
interval and n, NaN where the gap is inside the evaluation noise. A tree from before headline.csv
existed falls back to ``attacks.csv``'s maximum over settings, labelled as one. Spearman ρ of each
``RECOVERY_PREDICTORS`` column with each recovery, computed from numbers, with the number of
correlations tested and Holm-adjusted p beside each raw p.
"""

from __future__ import annotations

import html
from typing import Sequence

from analyses.recovery import AGAINST, MAX_OVER_SETTINGS, interval_columns, recovery_column
from analyses.report.html import muted, section, table
from analyses.report.inputs import ReportInputs, read_rows
from analyses.report.signatures import RECOVERY_PREDICTORS, predictor_columns
from analyses.report.stats import family_note, floats, fmt, spearman_cell, spearman_family
from analyses.uncertainty import CONFIDENCE
from unlearn_lens.core import outputs

#: Attacks in the order the table shows them (others found in attacks.csv follow, sorted).
ATTACK_ORDER = ("ablate", "quantize", "relearn-unrelated", "relearn-heldout")
#: (attacks.csv metric, label) of the recoverability table.
RECOVERABILITY_METRICS = (("cloze_accuracy", "cloze accuracy"), ("forget_nll", "forget NLL"),
                          ("forget_value_nll", "forget NLL, values only"))
INTRO = ("Recovery per attack on the modified model, (attacked − modified) / (base − modified) on the same "
         "evaluation data: 0 = nothing recovered, 1 = back to the base model (`unlearn-lens attack`: direction "
         f"ablation, int8/int4 quantization, relearning on unrelated text and on held-out facts). Each cell: the "
         f"recovery with its {CONFIDENCE:.0%} interval (percentile bootstrap over the evaluation questions or texts, "
         "paired across the models) and n; where an attack has several settings, the setting (in brackets) was "
         "chosen on one half of the items and the recovery is scored on the other half, with the maximum over "
         "settings beside it. \"vs control\": (attacked − modified) / (attacked base − modified), the base under "
         "the same attack as the target. — where the gap is inside the evaluation noise (its interval contains "
         "0): no recovery is defined there. Below: Spearman ρ of each signature metric with each recovery across "
         "comparisons.")
EMPTY = ("No attack results yet: run `unlearn-lens attack` per model (--outdir OUT --name NAME), or the pipeline "
         "with --attacks.")


def attack_rows(inputs: ReportInputs, name: str) -> list[dict[str, str]]:
    return read_rows(inputs.model_dir(name) / outputs.ATTACKS / outputs.ATTACKS_CSV)


def best_recovery(rows: Sequence[dict], attack: str, metric: str, column: str | None = None
                  ) -> tuple[float | None, str]:
    """(largest finite ``column`` (default ``recovery_<metric>``) of ``attack``'s rows on the modified model,
    its setting): a maximum over settings, what trees without ``headline.csv`` fall back to."""
    best, setting = None, ""
    for row in rows:
        if row.get("attack") == attack and row.get("target") == "modified":
            values = floats([row], column or f"recovery_{metric}")
            if values and (best is None or values[0] > best):
                best, setting = values[0], row.get("setting", "")
    return best, setting


def headline_rows(inputs: ReportInputs, name: str) -> list[dict]:
    """``headline.csv`` of ``name``'s attacks; from ``attacks.csv`` (the maximum over settings) when absent."""
    folder = inputs.model_dir(name) / outputs.ATTACKS
    rows = read_rows(folder / outputs.HEADLINE_CSV)
    if rows:
        return rows
    out = []
    attack_csv = attack_rows(inputs, name)
    for attack in dict.fromkeys(r.get("attack", "") for r in attack_csv if r.get("target") == "modified"):
        settings = {r.get("setting") for r in attack_csv if r.get("attack") == attack}
        for metric, _ in RECOVERABILITY_METRICS:
            for against in AGAINST:
                column = recovery_column(metric, against)
                best, setting = best_recovery(attack_csv, attack, metric, column)
                row = next((r for r in attack_csv if r.get("attack") == attack and r.get("setting") == setting
                            and r.get("target") == "modified"), {})
                low, high = (row.get(c, "") for c in interval_columns(column))
                out.append({"attack": attack, "metric": metric, "against": against, "setting": setting,
                            "selection": MAX_OVER_SETTINGS, "n_settings": len(settings),
                            "recovery": best if best is not None else "nan", "recovery_low": low,
                            "recovery_high": high, "n": row.get(f"n_{metric}", ""),
                            "max_recovery": best if best is not None else "nan", "max_setting": setting, "note": ""})
    return out


def _number(row: dict, column: str) -> float | None:
    values = floats([row], column)
    return values[0] if values else None


def recovery_cell(row: dict | None) -> str:
    """``0.62 [0.31, 0.90], n = 10 (int4; max of 2 settings 0.75)``; a dash with the reason where undefined."""
    if not row:
        return fmt(None)
    value, n = _number(row, "recovery"), str(row.get("n") or "")
    count = f"n = {n}" if n not in ("", "0") else ""
    low, high = (_number(row, c) for c in interval_columns("recovery"))
    several = int(float(row.get("n_settings") or 1)) > 1
    if value is None:
        note = row.get("note") or ""
        reason = "inside the evaluation noise" if "noise" in note else (note or "no value")
        return f"{fmt(None)} ({', '.join(filter(None, (reason, count)))})"
    text = fmt(value) + (f" [{fmt(low)}, {fmt(high)}]" if low is not None and high is not None else "")
    text += f", {count}" if count else ""
    detail = [row.get("setting", "")] if row.get("setting") else []
    if row.get("selection") == MAX_OVER_SETTINGS and several:
        detail.append(f"max over {int(float(row['n_settings']))} settings, not held out")
    elif several:
        detail.append(f"max of {int(float(row['n_settings']))} settings {fmt(_number(row, 'max_recovery'))}")
    return text + (f" ({'; '.join(detail)})" if detail else "")


def _attacks_present(per_model: Sequence[Sequence[dict]]) -> list[str]:
    found = {row.get("attack", "") for rows in per_model for row in rows if row.get("attack")}
    return [a for a in ATTACK_ORDER if a in found] + sorted(found - set(ATTACK_ORDER))


def target_label(attack: str, metric: str, against: str) -> str:
    """``quantize: cloze accuracy`` (against the base) or ``quantize: cloze accuracy vs control``."""
    return f"{attack}: {dict(RECOVERABILITY_METRICS)[metric]}" + (" vs control" if against == "control" else "")


def _measured(row: dict | None) -> bool:
    """Whether a headline row's metric was measured at all (a finite recovery, or items it was read on):
    not so for ``forget_value_nll`` outside a planted-facts testbed."""
    return row is not None and (_number(row, "recovery") is not None or (_number(row, "n") or 0) > 0)


def recoveries(inputs: ReportInputs) -> dict[tuple[str, str, str], list[dict | None]]:
    """``{(attack, metric, against): [headline row, per comparison]}`` for the table's metrics and targets
    (a metric that no attack of any comparison measured is left out)."""
    per_model = [headline_rows(inputs, n) for n in inputs.comparisons]
    out = {}
    for attack in _attacks_present(per_model):
        for against in AGAINST:
            for metric, _ in RECOVERABILITY_METRICS:
                out[(attack, metric, against)] = [
                    next((r for r in rows if r.get("attack") == attack and r.get("metric") == metric
                          and r.get("against", "base") == against), None) for rows in per_model]
    measured = {key[1] for key, rows in out.items() if any(_measured(row) for row in rows)}
    return {key: rows for key, rows in out.items() if key[1] in measured}


def recoverability_correlations(inputs: ReportInputs) -> dict:
    """The family of Spearman tests: ``{(signature short name, target label): Tested}``."""
    predictors = predictor_columns(inputs)
    targets = {target_label(*key): [_number(r, "recovery") if r else None for r in rows]
               for key, rows in recoveries(inputs).items()}
    return spearman_family({(short, label): (xs, ys) for label, ys in targets.items()
                            for short, xs in predictors.items()})


def recoverability_table(inputs: ReportInputs) -> tuple[list[dict[str, str]], list[dict[str, str]], list[str]]:
    """(rows attack x metric x target with one recovery cell per comparison, Spearman rows (one per recovery
    target), the Spearman table's columns: "recovery", then one per signature metric)."""
    names = inputs.comparisons
    rows, labels = [], []
    for (attack, metric, against), per_model in recoveries(inputs).items():
        labels.append(target_label(attack, metric, against))
        rows.append({"attack": attack, "metric": f"recovery of {dict(RECOVERABILITY_METRICS)[metric]}"
                     + (" vs control" if against == "control" else ""),
                     **{n: recovery_cell(row) for n, row in zip(names, per_model)}})
    family = recoverability_correlations(inputs)
    shorts = [short for short, _ in RECOVERY_PREDICTORS]
    spearman = [{"recovery": label, **{short: spearman_cell(family.get((short, label))) for short in shorts}}
                for label in labels]
    return rows, spearman, ["recovery", *shorts]


def recoverability_section(inputs: ReportInputs) -> str:
    """The recoverability table (attack x model) and the Spearman ρ of each signature with each recovery."""
    body = None
    if any(headline_rows(inputs, n) for n in inputs.comparisons):
        rows, spearman, columns = recoverability_table(inputs)
        body = (table(rows, ["attack", "metric", *inputs.comparisons], group_column="attack") + table(spearman, columns)
                + muted(html.escape(family_note(recoverability_correlations(inputs)))))
    return section("recoverability", "Recoverability: what attacks bring back", INTRO, body, EMPTY)

