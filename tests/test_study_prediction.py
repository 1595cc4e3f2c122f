"""The study's prediction against known answers (torch-free): a planted signature is found and beats
the baselines, an unrelated recovery does not, and the held-out method never reaches the fit."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from analyses.io import atomic_write_csv, mark_complete
from analyses.study import prediction as P

METHODS = np.repeat([f"m{i}" for i in range(8)], 3)  # 8 methods x 3 strengths = 24 models


def _data(y, rng, n_signatures=7) -> P.TargetData:
    signatures = rng.normal(size=(len(y), n_signatures))
    return P.TargetData("t", y, METHODS, signatures, [f"s{i}" for i in range(n_signatures)],
                        rng.normal(size=(len(y), 3)), ["b0", "b1", "b2"], [f"model{i}" for i in range(len(y))])


def test_a_planted_signature_is_the_predictor_and_beats_both_baselines():
    rng = np.random.default_rng(0)
    data = _data(np.zeros(24), rng)
    data.y = 2.0 * data.signatures[:, 3] + 0.3 * rng.normal(size=24)  # recovery = 2 * s3 + noise
    rows, per_model = P.predict_target(data)
    by = {row["predictors"]: row for row in rows}
    signatures = by["signatures"]
    assert signatures["carried_by"].startswith("s3 (+")  # the largest standardised coefficient
    assert signatures["r2"] > 0.8 and signatures["r2_low"] > 0.5 and signatures["spearman_low"] > 0.5
    assert signatures["beats_behaviour"] == "yes" and signatures["beats_mean"] == "yes"
    assert signatures["r2_minus_behaviour_low"] > 0 and signatures["r2_minus_mean_low"] > 0
    assert by["mean"]["r2"] < 0.05 and by["behaviour"]["r2"] < 0.3
    assert signatures["spearman_p_method"] == "asymptotic" and signatures["n_models"] == 24
    assert len(per_model) == 24 and {r["method"] for r in per_model} == set(METHODS)


@pytest.mark.parametrize("seed", range(4))
def test_a_recovery_unrelated_to_every_signature_does_not_beat_the_mean(seed):
    rng = np.random.default_rng(100 + seed)
    data = _data(rng.normal(size=24), rng)  # drawn independently of every column
    by = {row["predictors"]: row for row in P.predict_target(data)[0]}
    assert by["signatures"]["beats_mean"] != "yes" and by["signatures"]["beats_behaviour"] != "yes"
    assert by["signatures"]["r2_minus_mean_low"] <= 0  # not better beyond its interval


def test_leave_one_method_out_never_fits_on_the_held_out_method(monkeypatch):
    """Every fit (and every inner split choosing the penalty) sees only the training methods' rows; and a
    constant planted in the held-out method's recovery leaves its predictions exactly unchanged."""
    rng = np.random.default_rng(1)
    constants = {m: rng.normal() for m in dict.fromkeys(METHODS.tolist())}
    y = np.array([constants[m] for m in METHODS]) + 0.01 * rng.normal(size=24)
    data = _data(y, rng)
    seen = []
    real_split = P.inner_splits

    def spy_split(groups):
        seen.append(("inner", set(groups.tolist())))
        return real_split(groups)

    def spy_fit(X, y_train, groups, names):
        seen.append(("fit", set(groups.tolist())))
        return P.fit_ridge(X, y_train, groups, names)

    monkeypatch.setattr(P, "inner_splits", spy_split)
    predicted = P.leave_one_method_out(data.signatures, y, METHODS, spy_fit, data.signature_names)
    fits = [groups for kind, groups in seen if kind == "fit"]
    assert len(fits) == 8 and all(len(groups) == 7 for groups in fits)
    held_out = [set(constants) - groups for groups in fits]
    assert [h.pop() for h in held_out] == list(constants)  # each fit lacks exactly the method it predicts
    inner = [groups for kind, groups in seen if kind == "inner"]
    assert len(inner) == 8 and inner == fits  # the penalty is chosen on the same training methods only
    for method in constants:  # plant a method-specific constant in the held-out method's recovery
        planted = y.copy()
        planted[METHODS == method] += 1000.0
        again = P.leave_one_method_out(data.signatures, planted, METHODS, P.fit_ridge, data.signature_names)
        assert np.array_equal(again[METHODS == method], predicted[METHODS == method])


def test_verdicts_and_too_few_models():
    assert P.verdict(0.1, 0.5) == "yes" and P.verdict(-0.5, -0.1) == "no (worse)"
    assert P.verdict(-0.1, 0.2) == "no (interval contains 0)"
    data = _data(np.array([0.1, 0.2, 0.3] + [np.nan] * 21), np.random.default_rng(2))
    rows, per_model = P.predict_target(data)
    assert per_model == [] and all("too few models" in row["note"] for row in rows)


# --- through the output tree: write_study ----------------------------------------------------------

def _tree(root, recovery_of, raised=()):
    """A study's output tree as its steps write it: models.csv, per-matrix updates, activation changes,
    the unlearning runs' eval.json and each model's attacks/headline.csv (recovery_of(update, rng)); the
    models named in ``raised`` came out with a higher cloze accuracy than they went in (nothing unlearned)."""
    from analyses.recovery import HEADLINE_COLUMNS, SINGLE_SETTING
    from analyses.study.tables import DESIGN_COLUMNS

    rng = np.random.default_rng(3)
    design = []
    for i, method in enumerate(METHODS):
        name = f"{method}-x{i % 3}"
        design.append({"model": name, "method": method, "knob": "lr", "strength": [0.5, 1, 2][i % 3],
                       "value": 1e-5, "training": "full"})
        update = float(rng.uniform(0.01, 0.1))
        comparison = root / f"base__to__{name}"
        atomic_write_csv(comparison / "param_stats" / "per_matrix.csv",
                         [{"name": "w", "layer": 0, "group": "mlp", "dW_fro": update, "W_fro": 1.0,
                           "dW_stable_rank": rng.uniform(1, 5)}])
        atomic_write_csv(comparison / "activation_stats" / "activation_stats.csv",
                         [{"layer": 0, "split": s, "mean_dh_L2": rng.uniform(0.1, 1)} for s in ("forget", "retain")])
        for folder in ("param_stats", "activation_stats"):  # the report reads only finished folders
            mark_complete(comparison / folder, {"step": "test"})
        (root / "unlearning" / name).mkdir(parents=True)
        (root / "unlearning" / name / "eval.json").write_text(json.dumps({
            "before": {"forget_nll": 3.0, "retain_nll": 3.0, "cloze_accuracy": 0.5},
            "after": {"forget_nll": 3 + rng.uniform(0, 1), "retain_nll": 3 + rng.uniform(0, .1),
                      "cloze_accuracy": 0.5 - rng.uniform(0, .2) * (-1 if name in raised else 1)}}))
        rows = [{"attack": "quantize", "metric": metric, "against": "base", "setting": "int4",
                 "selection": SINGLE_SETTING, "n_settings": 1, "recovery": recovery_of(update, rng),
                 "recovery_low": "", "recovery_high": "", "n": 40, "max_recovery": "", "max_setting": "", "note": ""}
                for metric in ("cloze_accuracy", "letter_accuracy")]
        atomic_write_csv(root / name / "attacks" / "headline.csv", rows, HEADLINE_COLUMNS)
        mark_complete(root / name / "attacks", {"step": "test"})
    atomic_write_csv(root / "study" / "models.csv", design, DESIGN_COLUMNS)
    return design


def _csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_write_study_finds_a_planted_update_norm_through_the_tree(tmp_path):
    from analyses.study.write import write_study

    _tree(tmp_path, lambda update, rng: 10 * update + 0.02 * rng.normal())
    folder = write_study(tmp_path, "base")
    for name in ("signatures.csv", "recovery.csv", "prediction.csv", "predictions.csv", "prediction.png",
                 "summary.json", "_COMPLETE"):
        assert (folder / name).is_file(), name
    signatures = _csv(folder / "signatures.csv")
    assert len(signatures) == 24 and signatures[0]["method"] == "m0"
    assert float(signatures[0]["dh_forget_over_retain"]) == pytest.approx(
        float(signatures[0]["dh_forget"]) / float(signatures[0]["dh_retain"]))
    assert len(_csv(folder / "recovery.csv")) == 48
    rows = {(r["target"], r["predictors"]): r for r in _csv(folder / "prediction.csv")}
    assert {t for t, _ in rows} == {"quantize: cloze_accuracy vs base"}  # letter accuracy is not a target
    planted = rows[("quantize: cloze_accuracy vs base", "signatures")]
    assert planted["carried_by"].startswith("update_norm_rel (+")
    assert planted["beats_behaviour"] == "yes" and planted["beats_mean"] == "yes"
    assert float(planted["spearman_p_holm"]) >= float(planted["spearman_p"])
    assert math.isfinite(float(planted["r2_low"]))


def test_ridge_path_equals_sklearn_ridge_and_bootstrap_scores_equal_their_definitions():
    from scipy.stats import spearmanr
    from sklearn.linear_model import Ridge

    from analyses.uncertainty import cluster_resample_indices

    rng = np.random.default_rng(4)
    X, y = rng.normal(size=(15, 5)), rng.normal(size=15)
    intercepts, coefficients = P.ridge_path(X, y, P.ALPHAS)
    for alpha, intercept, coefficient in zip(P.ALPHAS, intercepts, coefficients):
        reference = Ridge(alpha=alpha).fit(X, y)
        assert np.allclose(coefficient, reference.coef_, atol=1e-10)
        assert intercept == pytest.approx(reference.intercept_)
    predicted = y + rng.normal(size=15)
    resamples = cluster_resample_indices(METHODS[:15], n_resamples=50)
    scores = P.bootstrap_scores(y, predicted, resamples)
    for index, (r2, rho) in zip(resamples, scores):
        assert r2 == pytest.approx(P.r_squared(y[index], predicted[index]))
        assert rho == pytest.approx(spearmanr(y[index], predicted[index]).statistic)


def test_a_model_that_did_not_unlearn_the_metric_is_no_target(tmp_path):
    """A model whose unlearning raised the accuracy divides its recovery by a gap of the wrong sign (a
    wild value): it is left out of the target and named, and the planted finding still stands."""
    from analyses.study.write import write_study

    raised = {"m0-x0", "m3-x0"}
    _tree(tmp_path, lambda update, rng: 10 * update + 0.02 * rng.normal(), raised)
    recovery_path = tmp_path / "m0-x0" / "attacks" / "headline.csv"
    rows = _csv(recovery_path)
    for row in rows:
        row["recovery"] = -2100.0
    from analyses.recovery import HEADLINE_COLUMNS
    atomic_write_csv(recovery_path, rows, HEADLINE_COLUMNS)
    folder = write_study(tmp_path, "base")
    signatures = {r["model"]: float(r["cloze_accuracy_change"]) for r in _csv(folder / "signatures.csv")}
    assert {m for m, change in signatures.items() if change > 0} == raised
    rows = {r["predictors"]: r for r in _csv(folder / "prediction.csv")}
    assert all(r["left_out"] == "m0-x0 m3-x0" and r["n_models"] == "22" for r in rows.values())
    predictions = _csv(folder / "predictions.csv")
    assert not {r["model"] for r in predictions} & raised and len(predictions) == 22
    assert rows["signatures"]["beats_mean"] == "yes" and rows["signatures"]["carried_by"].startswith("update_norm_rel")
    summary = json.loads((folder / "summary.json").read_text())
    assert "forget way" in summary["definitions"]["targets"]


def test_targets_keep_models_that_unlearned_and_those_not_measured():
    from analyses.study.tables import not_unlearned, targets

    signatures = [{"model": "up", "forget_nll_change": "0.5", "cloze_accuracy_change": "-0.2"},
                  {"model": "down", "forget_nll_change": "-0.007", "cloze_accuracy_change": "0.0"},
                  {"model": "unmeasured", "forget_nll_change": "", "cloze_accuracy_change": "nan"}]
    assert not_unlearned(signatures, "forget_nll") == {"down"}
    assert not_unlearned(signatures, "cloze_accuracy") == {"down"}  # unchanged is not unlearned
    recovery = [{"model": m, "attack": "a", "metric": metric, "against": "base", "recovery": value}
                for m, value in (("up", "0.4"), ("down", "-2100"), ("unmeasured", "0.2"))
                for metric in ("forget_nll", "cloze_accuracy")]
    values, left_out = targets(recovery, ["up", "down", "unmeasured"], signatures)
    np.testing.assert_array_equal(values["a: forget_nll vs base"], [0.4, np.nan, 0.2])
    assert left_out == {"a: forget_nll vs base": ["down"], "a: cloze_accuracy vs base": ["down"]}
    values, left_out = targets(recovery, ["up", "down", "unmeasured"])  # no signatures: nothing is left out
    np.testing.assert_array_equal(values["a: forget_nll vs base"], [0.4, -2100, 0.2])
    assert left_out["a: forget_nll vs base"] == []


def test_the_report_says_a_negative_rho_shared_by_the_mean_is_no_signal():
    from analyses.report.study import sentences

    def rows(rho_mean):
        common = {"target": "t", "n_models": "20", "n_methods": "7", "r2": "-0.5", "note": "", "left_out": "cb-x1"}
        return [{**common, "predictors": "signatures", "spearman": "-0.87", "carried_by": "s (+1.00)"},
                {**common, "predictors": "behaviour", "spearman": "0.1"},
                {**common, "predictors": "mean", "spearman": rho_mean}]
    said = sentences(rows("-0.92"))[0]
    assert "no signal" in said and "ρ = -0.92" in said and "forget way: cb-x1." in said
    assert "no signal" not in sentences(rows("0.30"))[0]


def test_the_plot_legend_names_every_method_even_those_absent_from_the_first_panel(tmp_path, monkeypatch):
    from analyses.study import plots

    saved = {}
    monkeypatch.setattr(plots, "atomic_save_figure", lambda figure, path: saved.setdefault("figure", figure))
    per_model = [{"target": "t1", "model": "a1", "method": "a", "measured": 0.1, "predicted_signatures": 0.2},
                 {"target": "t2", "model": "b1", "method": "b", "measured": 0.3, "predicted_signatures": 0.1}]
    plots.prediction_plot(tmp_path / "p.png", per_model, [])
    legends = saved["figure"].legends
    assert len(legends) == 1 and [t.get_text() for t in legends[0].get_texts()] == ["a", "b"]
