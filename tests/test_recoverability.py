"""The report's recoverability table from hand-written attacks.csv files, and the attack step of
`pipeline --attacks` and of the demo."""

from __future__ import annotations

import html
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from analyses.io import atomic_write_csv
from analyses.report import (NEEDS_THREE, ReportInputs, best_recovery, recoverability_correlations,
                             recoverability_table, render_report)
from unlearn_lens.core import outputs

COLUMNS = ["attack", "setting", "target", "letter_accuracy", "cloze_accuracy", "forget_nll", "retain_nll",
           "recovery_letter_accuracy", "recovery_cloze_accuracy", "recovery_forget_nll", "recovery_retain_nll",
           "seconds", "note"]


def _row(attack, setting, target, cloze, nll):
    return dict(zip(COLUMNS, [attack, setting, target, 0.3, 0.4, 3.0, 2.0, "nan", cloze, nll, 0.1, 1.0, ""]))


def _fake(root: Path, name: str, update: float, quant: tuple[float, float], relearn: float):
    """A comparison with a relative update norm of ``update`` and attacks with known recoveries."""
    folder = root / f"base__to__{name}" / "param_stats"
    folder.mkdir(parents=True)
    (folder / "per_matrix.csv").write_text(f"name,group,dW_fro,W_fro,dW_stable_rank\nw,mlp,{update},1.0,2\n")
    rows = [_row("quantize", "int8", "modified", quant[0] / 2, "nan"),
            _row("quantize", "int4", "modified", quant[0], quant[1]),
            _row("quantize", "int4", "control", 5.0, 5.0),  # control rows never count
            _row("relearn-unrelated", "n=10,steps=20,lr=1e-05", "modified", relearn, relearn / 2)]
    atomic_write_csv(root / name / "attacks" / "attacks.csv", rows, COLUMNS)
    for done in (folder, root / name / "attacks"):  # as the producers do, last
        outputs.mark_complete(done, "{}")


VALUES = {"a": (0.01, (0.9, 0.8), 0.1), "b": (0.02, (0.5, 0.7), 0.3), "c": (0.04, (0.6, 0.2), 0.2),
          "d": (0.08, (0.1, 0.1), 0.4)}


def test_recoverability_table_and_spearman(tmp_path):
    from scipy.stats import spearmanr

    for name, (update, quant, relearn) in VALUES.items():
        _fake(tmp_path, name, update, quant, relearn)
    inputs = ReportInputs(tmp_path, "base", list(VALUES))
    table, spearman, columns = recoverability_table(inputs)
    cells = {(r["attack"], r["metric"]): r for r in table}
    assert [key[0] for key in cells] == ["quantize"] * 4 + ["relearn-unrelated"] * 4  # 2 metrics x (base, control)
    # no headline.csv (a tree from before it): the maximum over settings, said to be one
    assert cells[("quantize", "recovery of cloze accuracy")]["a"] == "0.9 (int4; max over 2 settings, not held out)"
    assert cells[("quantize", "recovery of forget NLL")]["c"].startswith("0.2 (int4;")  # the NaN int8 row is skipped
    assert cells[("relearn-unrelated", "recovery of forget NLL")]["d"] == "0.2 (n=10,steps=20,lr=1e-05)"
    assert cells[("quantize", "recovery of cloze accuracy vs control")]["a"] == "— (no value)"  # no such column here
    assert columns == ["recovery", "update norm", "stable rank", "null-space share", "row-space selectivity",
                       "probe depth", "logit-lens depth", "tuned-lens depth"]
    by_target = {r["recovery"]: r for r in spearman}
    assert list(by_target) == ["quantize: cloze accuracy", "quantize: forget NLL",
                               "quantize: cloze accuracy vs control", "quantize: forget NLL vs control", "relearn-unrelated: cloze accuracy",
                               "relearn-unrelated: forget NLL", "relearn-unrelated: cloze accuracy vs control",
                               "relearn-unrelated: forget NLL vs control"]
    # ranks of the update (1, 2, 3, 4) vs int4 cloze recovery (4, 2, 3, 1): 1 - 6 * 18 / (4 * 15) = -0.8
    cell = by_target["quantize: cloze accuracy"]["update norm"]
    assert cell.startswith("ρ = -0.80 (p = ") and "exact" in cell and "Holm p = " in cell and "n = 4" in cell
    assert spearmanr([0.01, 0.02, 0.04, 0.08], [0.9, 0.5, 0.6, 0.1]).statistic == pytest.approx(-0.8)  # scipy agrees
    # vs relearning's cloze recovery (ranks 1, 3, 2, 4): 1 - 6 * 2 / 60 = 0.8
    assert by_target["relearn-unrelated: cloze accuracy"]["update norm"].startswith("ρ = 0.80 (p = ")
    assert by_target["quantize: forget NLL"]["null-space share"] == NEEDS_THREE  # no data for that signature
    # the family: only the update norm varies (stable rank is constant 2), 4 targets have values -> 4 tests
    family = recoverability_correlations(inputs)
    tested = [t for t in family.values() if math.isfinite(t.correlation.p)]
    assert len(tested) == 4 and all(t.holm_p >= t.correlation.p for t in tested)
    page = render_report(inputs)
    assert "Recoverability: what attacks bring back" in page and "0.9 (int4; max over 2 settings" in page
    assert "4 correlations tested here" in page
    assert page.index("Mechanistic signature") < page.index("Recoverability") < page.index("Brittleness")


def _headline(root: Path, name: str, cloze: tuple, nll: tuple = ("nan", "", "")):
    """``<name>/attacks/headline.csv`` as `attack` writes it: ablate's cloze and forget-NLL recovery vs the base."""
    from analyses.recovery import HEADLINE_COLUMNS, SELECTED_ON_HALF

    rows = []
    for metric, (value, low, high) in (("cloze_accuracy", cloze), ("forget_nll", nll)):
        rows.append({"attack": "ablate", "metric": metric, "against": "base", "setting": "layer=3,k=1,mode=single",
                     "selection": SELECTED_ON_HALF, "n_settings": 3, "recovery": value, "recovery_low": low,
                     "recovery_high": high, "n": 10, "max_recovery": 0.95, "max_setting": "layer=5,k=1,mode=single",
                     "note": "" if value != "nan" else "gap inside the evaluation noise (its 95% interval contains 0)"})
    atomic_write_csv(root / name / "attacks" / "headline.csv", rows, HEADLINE_COLUMNS)


def test_exact_spearman_p_of_three_identical_ranks_is_one_third_through_the_report(tmp_path):
    """n = 3, identical ranks: 2 of the 6 pairings are as extreme (two-sided), p = 1/3, where scipy's
    t approximation says 0; the cell says exact, and the held-out recovery carries its interval."""
    from scipy.stats import spearmanr

    for name, update, recovered in (("a", 0.01, 0.2), ("b", 0.02, 0.5), ("c", 0.04, 0.7)):
        _fake(tmp_path, name, update, (0.1, 0.1), 0.1)
        _headline(tmp_path, name, (recovered, recovered - 0.1, recovered + 0.1))
    inputs = ReportInputs(tmp_path, "base", ["a", "b", "c"])
    tested = recoverability_correlations(inputs)[("update norm", "ablate: cloze accuracy")]
    assert tested.correlation.rho == 1.0 and tested.correlation.method == "exact" and tested.correlation.n == 3
    assert tested.correlation.p == pytest.approx(1 / 3, abs=1e-12)
    assert spearmanr([1, 2, 3], [1, 2, 3]).pvalue == 0  # what the report said before
    table, spearman, _ = recoverability_table(inputs)
    cell = next(r for r in spearman if r["recovery"] == "ablate: cloze accuracy")["update norm"]
    assert cell.startswith("ρ = 1.00 (p = 0.33 exact") and "n = 3" in cell
    recovery = next(r for r in table if r["attack"] == "ablate" and r["metric"] == "recovery of cloze accuracy")
    assert recovery["b"] == "0.5 [0.4, 0.6], n = 10 (layer=3,k=1,mode=single; max of 3 settings 0.95)"
    nll = next(r for r in table if r["attack"] == "ablate" and r["metric"] == "recovery of forget NLL")
    assert nll["a"] == "— (inside the evaluation noise, n = 10)"  # the noise floor, stated


def test_best_recovery_skips_nan_and_control_rows():
    rows = [_row("quantize", "int8", "control", 0.9, 0.9), _row("quantize", "int8", "modified", "nan", "nan")]
    assert best_recovery(rows, "quantize", "cloze_accuracy") == (None, "")
    assert best_recovery(rows, "ablate", "cloze_accuracy") == (None, "")
    rows.append(_row("quantize", "int4", "modified", -0.2, 0.3))
    value, setting = best_recovery(rows, "quantize", "cloze_accuracy")
    assert math.isclose(value, -0.2) and setting == "int4"


def test_report_without_attacks_says_how_to_get_them(tmp_path):
    (tmp_path / "base__to__x").mkdir()
    page = render_report(ReportInputs(tmp_path, "base", ["x"]))
    assert "No attack results yet" in page and html.escape("--attacks") in page


# --- the pipeline step and the demo -----------------------------------------------------------------

def test_pipeline_plans_the_attack_step_only_with_attacks(tmp_path):
    from unlearn_lens.pipeline import ModelEntry, PipelineSettings, plan

    settings = PipelineSettings(outdir=tmp_path, base=ModelEntry("base", "/m/base"),
                                models=[ModelEntry("ga", "/m/ga", "v1"), ModelEntry("rmu", "/m/rmu")],
                                data=tmp_path / "data", max_samples=40)
    assert not [s for s in plan(settings) if s.id.startswith("attack")]
    settings.attacks = True
    settings.attack_options = {"relearn_steps": 5, "quant_settings": ("int8", "int4")}
    steps = {s.id: s for s in plan(settings) if s.id.startswith("attack")}
    assert set(steps) == {"attack:ga", "attack:rmu"}
    assert steps["attack:ga"].needs == ["capture:base", "capture:ga"]  # after the caches exist
    from unlearn_lens.pipeline import attack_settings

    attack = attack_settings(settings, settings.models[0])
    assert attack == steps["attack:ga"].settings
    assert attack.name == "ga" and attack.outdir == str(tmp_path)
    assert attack.cache_base == str(tmp_path / "caches" / "base.zarr")
    assert attack.cache_model == str(tmp_path / "caches" / "ga.zarr")
    assert attack.model_revision == "v1" and attack.max_samples == 40
    assert attack.options == {"relearn_steps": 5, "quant_settings": ("int8", "int4")}
    settings.skip = frozenset({"capture"})  # skipping captures does not drop the attack step
    assert {s.id for s in plan(settings) if s.id.startswith("attack")} == {"attack:ga", "attack:rmu"}


def test_demo_runs_relearning_and_attacks_with_short_settings(tmp_path):
    from unlearn_lens.demo import DEMO_ATTACK_OPTIONS, TESTBED_ATTACK_OPTIONS, demo_settings
    from unlearn_lens.pipeline import plan

    settings = demo_settings(tmp_path, "rmu,ga", max_samples=6, relearn=True, attacks=True)
    ids = [s.id for s in plan(settings)]
    assert {"relearn:rmu", "relearn:ga", "attack:rmu", "attack:ga"} <= set(ids)
    assert ids.index("capture:rmu") < ids.index("attack:rmu")
    assert settings.attack_max_samples == 6  # never more than --max-samples
    assert "steps" in settings.relearn_options and settings.relearn_options["max_samples"] == 6
    relearn = next(s for s in plan(settings) if s.id == "relearn:rmu").settings
    assert (relearn.steps, relearn.max_samples, relearn.batch_size) == (4, 6, 2)
    assert settings.attack_options == TESTBED_ATTACK_OPTIONS  # the default data source: the testbed
    wmdp = demo_settings(tmp_path, "rmu,ga", data_source="wmdp-demo", max_samples=6, relearn=True, attacks=True)
    assert wmdp.attack_options == DEMO_ATTACK_OPTIONS
    from unlearn_lens.attacks import ablation, quantization, relearning

    known = set(relearning.ATTACK_OPTIONS) | set(quantization.ATTACK_OPTIONS) | set(ablation.ATTACK_OPTIONS)
    assert set(DEMO_ATTACK_OPTIONS) | set(TESTBED_ATTACK_OPTIONS) <= known  # every demo option is an attack's


def test_demo_and_pipeline_flags():
    from cli import group

    demo = CliRunner().invoke(group, ["demo", "--help"])
    assert demo.exit_code == 0 and "--attacks / --no-attacks" in demo.output
    assert "[default: attacks]" in demo.output.replace("\n", " ") or "default: attacks" in demo.output
    pipeline = CliRunner().invoke(group, ["pipeline", "--help"])
    assert pipeline.exit_code == 0 and "--no-attacks" in pipeline.output


def test_attack_step_runs_once_and_resumes(tmp_path, monkeypatch):
    """The step runs `attack` with its settings, writes its marker, and a second run skips it (force redoes it)."""
    import unlearn_lens.pipeline as P

    calls = []
    monkeypatch.setattr(P, "attack_step", lambda settings: calls.append(settings))
    skip = frozenset({"datasets", "capture", "params", "analyze", "lipschitz", "tuned-lens", "report"})
    settings = P.PipelineSettings(outdir=tmp_path, base=P.ModelEntry("base", "/m/base"),
                                  models=[P.ModelEntry("ga", "/m/ga")], data=tmp_path, attacks=True, skip=skip)
    assert P.run_pipeline(settings, echo=lambda message: None) == {"attack:ga": "done"}
    assert [c.name for c in calls] == ["ga"] and (tmp_path / ".pipeline" / "attack__ga.json").is_file()
    assert P.run_pipeline(settings, echo=lambda message: None) == {"attack:ga": "skipped (done)"}
    settings.force = True
    assert P.run_pipeline(settings, echo=lambda message: None) == {"attack:ga": "done"}
    assert len(calls) == 2 and calls[-1].force and not calls[0].force
