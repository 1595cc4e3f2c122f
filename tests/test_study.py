"""`unlearn-lens study` end to end on a tiny model (2 methods x 2 strengths), its design, its command and resume."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from unlearn_lens.study import STRENGTH_KNOBS, StudySettings
from analyses.recovery import METRICS

#: Tiny sizes for every unlearning run: a few steps at a learning rate that moves a tiny model.
TINY_UNLEARN = {"steps": 3, "batch_size": 2, "max_length": 32, "max_samples": 8, "eval_batch_size": 8, "lr": 3e-2,
                "layer_id": 1}
#: Cheap attacks only: torchao int8 / int4 (groups of 32) and one relearning step on two unrelated texts.
TINY_ATTACKS = {"quant_settings": ("int8", "int4-g32"), "quant_bitsandbytes": False, "relearn_steps": 1,
                "relearn_batch_size": 2, "relearn_examples": 2, "relearn_lr": 1e-2}


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _settings(root: Path, base: Path, data: Path) -> StudySettings:
    return StudySettings(model=str(base), data=data, outdir=root / "out", methods=("ga", "rmu"), strengths=(1.0, 3.0),
                         unlearn_options=dict(TINY_UNLEARN), max_samples=8, max_length=32, batch_size=4,
                         lipschitz_samples=2, tuned_lens_steps=2, tuned_lens_tokens=32,
                         attacks=("quantize", "relearn-unrelated"), attack_max_samples=8,
                         attack_options=dict(TINY_ATTACKS))


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """A tiny base trained briefly on the demo data (so unlearning has something to undo), and the data."""
    from unlearn_lens.data import create_datasets
    from unlearn_lens.testing import save_tiny_trained_model

    root = tmp_path_factory.mktemp("tiny_study")
    create_datasets(root / "data", source="demo")
    return root, save_tiny_trained_model(root / "base", root / "data"), root / "data"


def test_tiny_study_end_to_end_and_resume(tiny_study, monkeypatch):
    from analyses.report.signatures import SIGNATURE_COLUMNS
    from analyses.study.tables import DESIGN_COLUMNS
    from unlearn_lens.study import run_study

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root, base, data = tiny_study
    settings = _settings(root, base, data)
    lines: list[str] = []
    status = run_study(settings, echo=lines.append)
    assert all(state.startswith(("done", "skipped")) for state in status.values()), status
    models = ["ga-x1", "ga-x3", "rmu-x1", "rmu-x3"]
    assert [k for k in status if k.startswith("attack:")] == [f"attack:{m}" for m in models]
    study = settings.outdir / "study"
    for name in ("models.csv", "signatures.csv", "recovery.csv", "prediction.csv", "predictions.csv",
                 "prediction.png", "summary.json", "_COMPLETE"):
        assert (study / name).is_file(), name

    design = {row["model"]: row for row in _rows(study / "models.csv")}
    assert list(design) == models and list(design["ga-x1"]) == list(DESIGN_COLUMNS)
    assert (design["ga-x3"]["knob"], float(design["ga-x3"]["value"])) == ("lr", pytest.approx(3 * 3e-2))
    assert (design["rmu-x1"]["knob"], float(design["rmu-x1"]["value"])) == ("steering_coeff", 20.0)  # the demo's
    assert {row["training"] for row in design.values()} == {"full"}  # neither reference trains LoRA

    signatures = {row["model"]: row for row in _rows(study / "signatures.csv")}
    assert list(signatures) == models and list(signatures["ga-x1"]) == [*DESIGN_COLUMNS, *SIGNATURE_COLUMNS]
    updates = {m: float(signatures[m]["update_norm_rel"]) for m in models}
    assert all(u > 0 for u in updates.values())
    assert updates["ga-x3"] > updates["ga-x1"]  # three times the learning rate moves the weights further
    assert all(math.isfinite(float(signatures[m]["dh_forget"])) for m in models)

    recovery = _rows(study / "recovery.csv")
    assert len(recovery) == 4 * 2 * len(METRICS) * 2  # models x attacks x metrics x (vs base, vs control)
    # the demo data is no testbed: the values' forget NLL is measured nowhere
    assert all(r["recovery"] in ("", "nan") for r in recovery if r["metric"] == "forget_value_nll")
    quantize = [r for r in recovery if r["attack"] == "quantize"]
    # int8 and int4: chosen on half A, scored on half B, except where the tiny model's unlearning moved the
    # metric the wrong way, which has nothing to recover (no setting chosen, no value)
    from analyses.recovery import NOT_MEASURED_NOTE, SELECTED_ON_HALF, WRONG_WAY_NOTE

    wrong_way = [r for r in quantize if r["note"] == WRONG_WAY_NOTE]
    unmeasured = [r for r in quantize if r["note"] == NOT_MEASURED_NOTE]
    assert {r["metric"] for r in unmeasured} == {"forget_value_nll"}
    assert all(r["selection"] == "" and r["recovery"] in ("", "nan") for r in wrong_way + unmeasured)
    assert {r["selection"] for r in quantize if r not in wrong_way + unmeasured} == {SELECTED_ON_HALF}
    assert len(wrong_way) < len(quantize)
    defined = [r for r in recovery if r["recovery"] not in ("", "nan")]
    assert defined and all(float(r["recovery_low"]) <= float(r["recovery"]) <= float(r["recovery_high"])
                           for r in defined if r["recovery_low"] not in ("", "nan"))
    prediction = _rows(study / "prediction.csv")
    assert len(prediction) == 8 * 3  # (2 attacks x 2 metrics x 2 targets) x 3 predictor sets
    assert {r["predictors"] for r in prediction} == {"signatures", "behaviour", "mean"}
    page = (settings.outdir / "report.html").read_text()
    assert "Does a signature predict recovery? (study)" in page and "ga-x3" in page

    lines.clear()
    again = run_study(settings, echo=lines.append)  # resumes: nothing is trained or measured again
    assert all(again[k] == "skipped (done)" for k in again if k not in ("study", "report")), again
    assert again["study"] == "done" and (study / "_COMPLETE").is_file()


def test_study_command_builds_the_settings(tmp_path, monkeypatch):
    import unlearn_lens.study as S
    from cli import group

    captured = []
    monkeypatch.setattr(S, "run_study", lambda settings, echo=None: captured.append(settings) or {"study": "done"})
    data = tmp_path / "data"
    result = CliRunner().invoke(group, ["study", "--model", "m", "--data", str(data), "--outdir", str(tmp_path),
                                        "--methods", "ga,npo", "--strengths", "0.5,1,2", "--lora",
                                        "--attacks", "quantize", "--skip", "tuned-lens"])
    assert result.exit_code == 0, result.output
    assert captured == [StudySettings(model="m", data=data, outdir=tmp_path, methods=("ga", "npo"),
                                      strengths=(0.5, 1.0, 2.0), training="lora", attacks=("quantize",),
                                      skip=frozenset({"tuned-lens"}))]


@pytest.mark.parametrize("args, message", [(["--methods", "ga"], "at least two"),
                                           (["--methods", "ga,bogus"], "unknown bogus"),
                                           (["--strengths", "1,x"], "--strengths"),
                                           (["--strengths", "1,-1"], "positive"),
                                           (["--skip", "unlearn"], "--skip")])
def test_study_command_refuses_bad_input_in_one_line(tmp_path, args, message):
    from cli import group

    out = tmp_path / "out"
    result = CliRunner().invoke(group, ["study", "--model", "m", "--data", str(tmp_path), "--outdir", str(out), *args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not out.exists()  # refused before anything is written


def test_validation_is_one_line_per_cause(tmp_path):
    from unlearn_lens.core.errors import UserError
    from unlearn_lens.study import validate

    for kwargs, message in (({"methods": ("ga",)}, "at least two"), ({"methods": ("ga", "bogus")}, "unknown bogus"),
                            ({"strengths": (1.0, -1.0)}, "positive"), ({"strengths": (1.0, 1.0)}, "distinct")):
        with pytest.raises(UserError, match=message):
            validate(StudySettings(model="m", data=tmp_path, outdir=tmp_path, **kwargs))


def test_each_method_names_its_strength_knob_and_the_config_equals_unlearn(tmp_path, monkeypatch):
    """Every method has a knob that is a field of UnlearnConfig; a study model's config is `unlearn` with the
    demo's flags and the knob scaled (rmu at strength 2: steering coefficient 40)."""
    from dataclasses import fields

    from cli import group
    from unlearn_lens.study import unlearn_config
    from unlearn_lens.unlearning.config import UnlearnConfig
    from unlearn_lens.unlearning.method_names import METHODS

    assert set(STRENGTH_KNOBS) == set(METHODS)
    assert set(STRENGTH_KNOBS.values()) <= {f.name for f in fields(UnlearnConfig)}
    settings = StudySettings(model="/m/base", data=tmp_path / "data", outdir=tmp_path, methods=("rmu", "ga"))
    built = unlearn_config(settings, "rmu", 2.0)
    import unlearn_lens.unlearning.trainer as T

    calls = []
    monkeypatch.setattr(T, "run_unlearning", lambda config, progress=True: calls.append(config) or Path("x"))
    result = CliRunner().invoke(group, ["unlearn", "--model", "/m/base", "--data", str(tmp_path / "data"), "--device",
                                        "cpu", "--batch-size", "4", "--max-length", "128", "--seed", "0", "--method",
                                        "rmu", "--outdir", str(tmp_path / "unlearning" / "rmu-x2"), "--layer-id", "7",
                                        "--steering-coeff", "40", "--alpha", "100", "--lr", "1e-3", "--steps", "20"])
    assert result.exit_code == 0, result.output
    assert calls == [built]


def test_on_a_testbed_the_study_starts_from_the_testbed_demo_settings(tmp_path):
    """On planted facts a study's rmu is the demo's testbed rmu (layer 3, c = 100, 120 steps) scaled; methods
    the testbed has no settings for keep the WMDP-style demo's."""
    from unlearn_lens.demo import DEMO_METHOD_SETTINGS, TESTBED_METHOD_SETTINGS
    from unlearn_lens.study import unlearn_config
    from unlearn_lens.testbed import create_testbed

    data = tmp_path / "testbed"
    create_testbed(data, facts=8, seed=0)
    settings = StudySettings(model="/m/base", data=data, outdir=tmp_path, methods=("rmu", "npo"))
    rmu = unlearn_config(settings, "rmu", 2.0)
    expected = TESTBED_METHOD_SETTINGS["rmu"]
    assert (rmu.layer_id, rmu.steps, rmu.alpha, rmu.update_layers) == \
        (expected["layer_id"], expected["steps"], expected["alpha"], expected["update_layers"])
    assert rmu.steering_coeff == 2 * expected["steering_coeff"]
    assert unlearn_config(settings, "ga", 1.0).lr == TESTBED_METHOD_SETTINGS["ga"]["lr"]
    assert unlearn_config(settings, "npo", 1.0).lr == DEMO_METHOD_SETTINGS["npo"]["lr"]
