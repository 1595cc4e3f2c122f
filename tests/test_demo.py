"""The README's main command, `unlearn-lens demo`, end to end on the real SmolLM2, and the planted-facts
testbed's known answers read from that one run.

The demo plants the testbed's facts into SmolLM2 (the step that makes its numbers findings) with its
real settings, unlearns entities A with rmu and ga, then runs every step; the diagnostics run with
fewer texts and steps than `bash scripts/run-demo` so that CI stays short. Every test here reads the
same run (a module fixture): one planted model serves them all.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from analyses.uncertainty import Estimate, metric_estimate

CHANCE = 0.25


@pytest.fixture(scope="module")
def demo(tmp_path_factory, smollm2_gguf):
    out = tmp_path_factory.mktemp("demo") / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "cli", "demo", "--outdir", str(out), "--max-samples", "30", "--max-length", "64",
         "--tuned-lens-steps", "1", "--tuned-lens-tokens", "32", "--lipschitz-samples", "2"],
        capture_output=True, text=True, env=env, timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def _json(path):
    return json.loads(path.read_text())


@pytest.mark.slow
def test_demo_runs_every_step_on_smollm2(demo):
    out, stdout = demo
    assert "Open the report" in stdout and "What unlearning did" in stdout
    html = (out / "report.html").read_text()
    assert "planted → rmu" in html and "planted → ga" in html
    # relearning and the attacks ran: no empty brittleness or recoverability section
    assert "No relearning results yet" not in html and "No attack results yet" not in html
    for name in ("rmu", "ga"):
        assert (out / name / "relearning" / "summary.json").is_file()
        assert (out / name / "attacks" / "attacks.csv").is_file()
    for name in ("rmu", "ga"):
        assert (out / "unlearning" / name / "model" / "config.json").is_file()
        rows = list(csv.DictReader((out / f"planted__to__{name}" / "param_stats" / "per_matrix.csv").open()))
        changed = {r["name"] for r in rows if float(r["dW_fro"]) > 0}
        if name == "rmu":  # the demo's RMU on the testbed: every linear map of blocks 0-3 moves, nothing else
            maps = [f"self_attn.{m}_proj" for m in "qkvo"] + [f"mlp.{m}_proj" for m in ("up", "gate", "down")]
            assert changed == {f"model.layers.{i}.{m}.weight" for i in range(4) for m in maps}
        else:
            assert len(changed) > 100
    records = [_json(p) for p in (out / ".pipeline").glob("*.json")]
    assert records and all(r["cpu_seconds"] >= 0 for r in records)


@pytest.mark.slow
def test_planting_plants_the_facts_and_keeps_the_language_model(demo):
    """The base answers A and B near chance; the planted model at least 0.8 on both, general NLL within 10%."""
    out, stdout = demo
    record = _json(out / "planting" / "plant.json")
    for metric in ("forget_facts_accuracy", "retain_facts_accuracy"):
        before, after = Estimate(**record["before"][metric]), Estimate(**record["after"][metric])
        assert before.n == after.n == 60
        assert before.contains(CHANCE), (metric, before)  # the base knows nothing of these people
        assert after.value >= 0.8, (metric, after)
    general = {when: record[when]["general_nll"]["value"] for when in ("before", "after")}
    assert general["after"] <= 1.1 * general["before"], general
    assert "smollm2 (before planting)" in stdout and "A: " in stdout


@pytest.mark.slow
def test_rmu_forgets_a_and_keeps_b(demo):
    """After RMU on A (the demo's settings): A's held-out accuracy within 0.15 of chance, B's still at least 0.7."""
    out, _ = demo
    after = _json(out / "unlearning" / "rmu" / "eval.json")["after"]
    forget = metric_estimate(after["per_item"]["cloze_accuracy"])
    retain = metric_estimate(after["per_item"]["retain_cloze_accuracy"])
    assert forget.n == retain.n == 60
    assert abs(forget.value - CHANCE) <= 0.15, forget
    assert retain.value >= 0.7, retain


@pytest.mark.slow
def test_gradient_ascent_removes_a_but_takes_b_with_it(demo):
    """ga on A is not selective on this testbed (README, "The planted-facts testbed": A and B share templates and
    values): it removes much of A (at least 0.2 of accuracy) and B falls with it (measured 0.63-0.73 at A 0.45-0.63)."""
    out, _ = demo
    result = _json(out / "unlearning" / "ga" / "eval.json")
    forget = {when: metric_estimate(result[when]["per_item"]["cloze_accuracy"]) for when in ("before", "after")}
    retain = metric_estimate(result["after"]["per_item"]["retain_cloze_accuracy"])
    assert forget["after"].value <= forget["before"].value - 0.2, forget
    assert retain.value < forget["before"].value, retain


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rmu", "ga"])
def test_relearning_on_a1_brings_back_a2_by_a_measured_fraction(demo, method):
    """relearn-heldout retrains on A1's texts and evaluates A2's questions; the recovery is measured with its
    interval over A2's 30 questions (Deeb & Roger report about 0.88; README states how ours compares)."""
    from analyses.report.testbed import heldout_estimates

    out, stdout = demo
    split = _json(out / method / "attacks" / "heldout_split.json")
    assert split["split"].startswith("entity") and len(split["eval_ids"]) == 30
    found = heldout_estimates(_json(out / method / "attacks" / "heldout_per_item.json"))
    recovery = found["recovery"]
    assert recovery.n == 30 and (recovery.low <= recovery.value <= recovery.high or recovery.note)
    assert f"Relearning {method} on A1, evaluated on A2" in stdout and recovery.text() in stdout


@pytest.mark.slow
def test_the_demo_report_shows_the_testbed_with_intervals_in_chromium(demo, tmp_path):
    """The demo's report, rendered by headless Chromium: the planted-facts table with its intervals."""
    import re
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs chromium (.ci/run); it is missing")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    out, _ = demo
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", (out / "report.html").as_uri()],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    section = dom[dom.index("Planted facts: what each model knows"):dom.index("Mechanistic signature")]
    cells = re.findall(r"\d\.\d\d \[\d\.\d\d, \d\.\d\d\], n = (\d+)", section)
    assert len(cells) >= 2 * 4 and set(cells) >= {"60", "30"}  # 4 models x (A, B) with n = 60; A2 with n = 30
    assert "smollm2 (before planting)" in section and "rmu (unlearned)" in section


def test_a_demo_model_unlearned_with_other_settings_is_redone_and_one_with_the_same_kept(tmp_path, monkeypatch):
    """The pipeline reruns a demo's unlearning step whose inputs changed (new demo settings); the folder is the
    demo's own, so the finished run made with the old settings is replaced, and one made with these is kept."""
    from unlearn_lens import demo as D
    from unlearn_lens.core import outputs
    from unlearn_lens.unlearning import trainer

    settings = D.demo_settings(tmp_path, "rmu", device="cpu")
    config = D.unlearn_config(settings, settings.models[0])
    calls = []
    monkeypatch.setattr(trainer, "run_unlearning", lambda cfg, progress: calls.append(cfg.overwrite) or tmp_path)
    folder = tmp_path / "unlearning" / "rmu"
    folder.mkdir(parents=True)
    outputs.mark_complete(folder, "x\n", outputs.RUN_MARKER)
    old = {**json.loads(json.dumps(config.to_dict(), default=str)), "steering_coeff": 300.0}
    (folder / "config.json").write_text(json.dumps({"config": old}))
    D.unlearn_step(config)
    assert calls == [True]  # other settings: redone
    (folder / "config.json").write_text(json.dumps({"config": json.loads(json.dumps(config.to_dict(), default=str))}))
    config.overwrite = False
    D.unlearn_step(config)
    assert calls == [True]  # the same settings: kept
