"""Recovery intervals, the noise floor and the held-out headline of the attacks' outputs
(analyses/recovery.py), against known answers; torch-free."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analyses import recovery as R
from analyses.uncertainty import PER_ITEM, recovery_estimate

N = 20


def _accuracy(correct) -> dict:
    correct = [int(c) for c in correct]
    return {"correct": correct}


def _evaluation(correct, nll_sums=None) -> dict:
    """An evaluation record of the four metrics: cloze from ``correct``, the rest fixed (letter = cloze)."""
    sums = list(nll_sums if nll_sums is not None else [2.0] * N)
    items = {"letter_accuracy": _accuracy(correct), "cloze_accuracy": _accuracy(correct),
             "forget_nll": {"sum": sums, "count": [1] * len(sums)}, "retain_nll": {"sum": [3.0] * N, "count": [1] * N}}
    values = {"letter_accuracy": float(np.mean(correct)), "cloze_accuracy": float(np.mean(correct)),
              "forget_nll": float(np.mean(sums)), "retain_nll": 3.0}
    return {**values, PER_ITEM: items}


def _result(setting, target, evaluation, attack="x") -> dict:
    return {"attack": attack, "setting": setting, "target": target, "seconds": 1.0, "extra": {},
            "metrics": {m: evaluation.get(m, math.nan) for m in R.METRICS}, PER_ITEM: evaluation[PER_ITEM]}


def test_interval_columns_are_named_in_one_place():
    assert R.interval_columns("recovery_cloze_accuracy") == ("recovery_cloze_accuracy_low",
                                                             "recovery_cloze_accuracy_high")
    for column in R.RECOVERY_COLUMNS:
        assert set(R.interval_columns(column)) <= set(R.BASE_COLUMNS)
    assert R.recovery_column("forget_nll", "control") == "recovery_vs_control_forget_nll"


def test_rows_carry_the_paired_bootstrap_interval_and_n():
    reference = {"base": _evaluation([1] * N, [2.0] * N), "modified": _evaluation([0] * N, [4.0] * N)}
    attacked = _evaluation([1] * 12 + [0] * 8, [3.0] * N)
    control = _evaluation([1] * 16 + [0] * 4, [2.5] * N)
    rows, notes = R.recovery_rows([_result("s", "modified", attacked), _result("s", "control", control)], reference)
    row = rows[0]
    assert row["recovery_cloze_accuracy"] == pytest.approx(0.6)  # 12 of 20 questions back, base answers all
    assert row["recovery_forget_nll"] == pytest.approx(0.5)
    assert row["recovery_vs_control_forget_nll"] == pytest.approx(2 / 3)
    expected = recovery_estimate(*(e[PER_ITEM]["cloze_accuracy"] for e in
                                   (attacked, reference["modified"], reference["base"])))
    low, high = R.interval_columns("recovery_cloze_accuracy")
    assert (row[low], row[high]) == (expected.low, expected.high) and expected.low < 0.6 < expected.high
    assert row["n_cloze_accuracy"] == N
    assert notes and all(n.startswith("retain_nll") for n in notes)  # retain NLL did not move: no recovery
    # constant per-text NLLs: every resample gives the same recovery, the interval is a point
    assert (row["recovery_forget_nll_low"], row["recovery_forget_nll_high"]) == (pytest.approx(0.5), pytest.approx(0.5))
    assert all(math.isnan(rows[1][c]) for c in R.RECOVERY_COLUMNS + R.INTERVAL_COLUMNS)  # the control row


def test_a_gap_inside_the_noise_is_nan_with_a_note_not_a_ratio():
    """Base and modified differ on one question of 20: the gap's interval contains 0, so no recovery
    (the eps rule alone would have printed 2.0 for an attack that fixed two questions)."""
    base = [1] + [0] * 10 + [1] * 9
    modified = [0] * 11 + [1] * 9
    reference = {"base": _evaluation(base), "modified": _evaluation(modified)}
    attacked = _evaluation([1, 1] + [0] * 9 + [1] * 9)
    assert R.recovery(np.mean(attacked[PER_ITEM]["cloze_accuracy"]["correct"]), np.mean(modified), np.mean(base)) \
        == pytest.approx(2.0)
    rows, notes = R.recovery_rows([_result("s", "modified", attacked)], reference)
    assert math.isnan(rows[0]["recovery_cloze_accuracy"])
    assert "cloze_accuracy: base and modified: gap inside the evaluation noise" in rows[0]["note"]
    assert any("noise" in n for n in notes)


def test_without_per_item_data_the_eps_rule_applies_and_the_interval_is_blank():
    reference = {"base": {"letter_accuracy": 0.75, "cloze_accuracy": 0.5, "forget_nll": 2.0, "retain_nll": 3.0},
                 "modified": {"letter_accuracy": 0.25, "cloze_accuracy": 0.5, "forget_nll": 4.0, "retain_nll": 3.5}}
    result = {"attack": "x", "setting": "s", "target": "modified", "seconds": 1.0,
              "metrics": {"letter_accuracy": 0.5, "cloze_accuracy": 0.75, "forget_nll": 3.0, "retain_nll": 3.5}}
    row = R.recovery_rows([result], reference)[0][0]
    assert row["recovery_letter_accuracy"] == 0.5 and math.isnan(row["recovery_letter_accuracy_low"])
    assert row["n_letter_accuracy"] == "" and "less than 1e-06" in row["note"]


def test_headline_chooses_the_setting_on_half_a_and_scores_it_on_half_b():
    """``lucky`` recovers exactly the questions of half A, ``steady`` 60 % of each half: half A picks
    ``lucky``, which recovers nothing on half B; the maximum over settings (``steady``, 0.6) is shown
    beside it, never as the headline."""
    half_a, half_b = R.split_halves(N)
    assert sorted([*half_a, *half_b]) == list(range(N)) and len(half_a) == N // 2
    lucky = np.zeros(N, int)
    lucky[half_a] = 1
    steady = np.zeros(N, int)
    steady[half_a[:6]] = 1
    steady[half_b[:6]] = 1
    reference = {"base": _evaluation([1] * N), "modified": _evaluation([0] * N)}
    results = [_result("lucky", "modified", _evaluation(lucky)), _result("steady", "modified", _evaluation(steady))]
    row = R.headline(results, reference, "x", "cloze_accuracy")
    assert (row["setting"], row["selection"], row["n_settings"]) == ("lucky", R.SELECTED_ON_HALF, 2)
    assert row["recovery"] == 0.0 and row["n"] == len(half_b)
    assert (row["max_recovery"], row["max_setting"]) == (pytest.approx(0.6), "steady")
    assert set(row) == set(R.HEADLINE_COLUMNS)


def test_headline_of_one_setting_uses_every_item_and_without_items_is_a_labelled_maximum():
    reference = {"base": _evaluation([1] * N), "modified": _evaluation([0] * N)}
    one = [_result("only", "modified", _evaluation([1] * 15 + [0] * 5))]
    row = R.headline(one, reference, "x", "cloze_accuracy")
    assert (row["selection"], row["recovery"], row["n"]) == (R.SINGLE_SETTING, 0.75, N)
    assert row["recovery_low"] < 0.75 < row["recovery_high"]
    bare = [{k: v for k, v in r.items() if k != PER_ITEM} for r in
            (_result("a", "modified", _evaluation([1] * 5 + [0] * 15)),
             _result("b", "modified", _evaluation([1] * 9 + [0] * 11)))]
    row = R.headline(bare, reference, "x", "cloze_accuracy")
    assert (row["setting"], row["selection"], row["recovery"]) == ("b", R.MAX_OVER_SETTINGS, 0.45)
    assert math.isnan(row["recovery_low"])


def test_headline_rows_cover_every_attack_metric_and_target():
    reference = {"base": _evaluation([1] * N), "modified": _evaluation([0] * N)}
    results = [_result("s", "modified", _evaluation([1] * 10 + [0] * 10), attack=attack) for attack in ("p", "q")]
    results.append(_result("s", "control", _evaluation([1] * N), attack="p"))
    rows = R.headline_rows(results, reference)
    assert len(rows) == 2 * len(R.METRICS) * 2
    vs_control = {(r["attack"], r["metric"]): r for r in rows if r["against"] == "control"}
    assert vs_control[("p", "cloze_accuracy")]["recovery"] == 0.5  # the attacked base answers all 20
    assert vs_control[("q", "cloze_accuracy")]["note"] == "no modified row"  # q has no control row


def test_a_forget_metric_moved_the_wrong_way_is_nan_with_a_note_not_a_ratio():
    """Unlearning that lowered forget NLL (2.0 -> 1.0) and raised the accuracy (10 -> 20 of 20) has
    nothing to recover: both gaps are far outside the noise, yet the plain ratio would read 3.0 and -1.0.
    retain NLL has no forget direction, so its gap of either sign stays a recovery."""
    reference = {"base": _evaluation([1] * 10 + [0] * 10, [2.0] * N),
                 "modified": _evaluation([1] * N, [1.0] * N)}
    reference["modified"]["retain_nll"] = 2.0
    reference["modified"][PER_ITEM]["retain_nll"] = {"sum": [2.0] * N, "count": [1] * N}
    attacked = _evaluation([1] * N, [4.0] * N)
    attacked["retain_nll"] = 2.5
    attacked[PER_ITEM]["retain_nll"] = {"sum": [2.5] * N, "count": [1] * N}
    assert R.recovery(4.0, 1.0, 2.0) == 3.0 and R.recovery(0.0, 1.0, 0.5) == 2.0
    rows, notes = R.recovery_rows([_result("s", "modified", attacked)], reference)
    row = rows[0]
    for metric in ("forget_nll", "cloze_accuracy", "letter_accuracy"):
        assert math.isnan(row[f"recovery_{metric}"]) and math.isnan(row[f"recovery_{metric}_low"])
        assert f"{metric}: base and modified: {R.WRONG_WAY_NOTE}" in row["note"]
    assert row["recovery_retain_nll"] == pytest.approx(0.5)  # 2.0 -> 2.5 of the way back to 3.0
    heads = {(r["metric"], r["against"]): r for r in R.headline_rows([_result("s", "modified", attacked)], reference)}
    assert math.isnan(heads[("forget_nll", "base")]["recovery"])
    assert heads[("forget_nll", "base")]["note"] == R.WRONG_WAY_NOTE
    assert heads[("retain_nll", "base")]["recovery"] == pytest.approx(0.5)


def test_headline_leaves_out_a_setting_whose_attacked_control_is_past_the_modified_model():
    """Against the control each setting has its own target: a setting whose attacked base has a higher
    forget NLL than the modified model (the attack broke the base more) is no candidate; the other is."""
    reference = {"base": _evaluation([1] * N, [2.0] * N), "modified": _evaluation([0] * N, [4.0] * N)}
    results = [_result("broken", "modified", _evaluation([0] * N, [5.0] * N)),
               _result("broken", "control", _evaluation([1] * N, [6.0] * N)),
               _result("mild", "modified", _evaluation([0] * N, [3.0] * N)),
               _result("mild", "control", _evaluation([1] * N, [2.0] * N))]
    row = R.headline(results, reference, "x", "forget_nll", "control")
    assert (row["setting"], row["n_settings"], row["selection"]) == ("mild", 2, R.SINGLE_SETTING)
    assert row["recovery"] == pytest.approx(0.5) and row["max_setting"] == "mild"
    only_broken = R.headline(results[:2], reference, "x", "forget_nll", "control")
    assert math.isnan(only_broken["recovery"]) and only_broken["note"] == R.WRONG_WAY_NOTE


def test_the_testbed_a1_to_a2_recovery_follows_the_same_rule():
    """relearn-heldout's A2 recovery (the report's ``heldout_estimates``): a modified model that answers
    more of A2 than the base has nothing to recover there; one that answers less is a ratio as before."""
    from analyses.report.testbed import heldout_estimates

    def record(base_before, modified_before):
        return {which: {"before": {"correct": before}, "after": {"correct": [1] * N}}
                for which, before in (("base", base_before), ("modified", modified_before))}

    unlearned = heldout_estimates(record([1] * N, [0] * N))
    assert unlearned["recovery"].value == 1.0 and unlearned["recovery_vs_control"].value == 1.0
    raised = heldout_estimates(record([1] * 5 + [0] * 15, [1] * 15 + [0] * 5))
    assert math.isnan(raised["recovery"].value) and raised["recovery"].note == R.WRONG_WAY_NOTE
    assert raised["recovery"].n == N


def _with_values(evaluation: dict, value_sums) -> dict:
    """``evaluation`` with a testbed's ``forget_value_nll`` (one value token per text)."""
    sums = list(value_sums)
    return {**evaluation, "forget_value_nll": float(np.mean(sums)),
            PER_ITEM: {**evaluation[PER_ITEM], "forget_value_nll": {"sum": sums, "count": [1] * len(sums)}}}


def test_the_values_forget_nll_recovers_like_forget_nll_and_says_where_it_was_not_measured():
    """On a testbed, ``forget_value_nll`` is a forget metric (unlearning raises it: 0.1 -> 2.1, an attack
    back to 1.1 recovers half); where the data is no testbed it was not measured, and its headline rows say
    so instead of reading as a recovery inside the noise."""
    assert R.FORGET_DIRECTION["forget_value_nll"] == R.FORGET_DIRECTION["forget_nll"] == 1.0
    reference = {"base": _with_values(_evaluation([1] * N), [0.1] * N),
                 "modified": _with_values(_evaluation([0] * N), [2.1] * N)}
    attacked = _with_values(_evaluation([1] * 10 + [0] * 10), [1.1] * N)
    rows, _ = R.recovery_rows([_result("s", "modified", attacked)], reference)
    assert rows[0]["recovery_forget_value_nll"] == pytest.approx(0.5) and rows[0]["n_forget_value_nll"] == N
    lowered = _with_values(_evaluation([0] * N), [0.05] * N)  # unlearning that made the values likelier
    rows, _ = R.recovery_rows([_result("s", "modified", attacked)], {**reference, "modified": lowered})
    assert math.isnan(rows[0]["recovery_forget_value_nll"])
    assert f"forget_value_nll: base and modified: {R.WRONG_WAY_NOTE}" in rows[0]["note"]

    plain = {"base": _evaluation([1] * N), "modified": _evaluation([0] * N)}  # no testbed: no values
    heads = {(r["metric"], r["against"]): r
             for r in R.headline_rows([_result("s", "modified", _evaluation([1] * 10 + [0] * 10))], plain)}
    row = heads[("forget_value_nll", "base")]
    assert math.isnan(row["recovery"]) and (row["selection"], row["n"], row["note"]) == ("", 0, R.NOT_MEASURED_NOTE)
    assert heads[("cloze_accuracy", "base")]["recovery"] == pytest.approx(0.5)
