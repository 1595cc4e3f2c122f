"""`unlearn-lens relearn`: relearning undoes gradient ascent, step 0 is the model's own evaluation,
runs reproduce for a seed, bad input is one line with exit status 2, the pipeline step and the
report's recovery table."""

from __future__ import annotations

import csv
import html
import json

import pytest
from click.testing import CliRunner

from cli import group
from conftest import UNLEARN_MCQ, write_unlearn_data
from unlearn_lens import relearn as R
from unlearn_lens.core import outputs
from unlearn_lens.testing import save_tiny_model

#: Relearning flags of the tiny runs: a few steps at a high LR, short texts.
FAST = ["--steps", "8", "--eval-every", "4", "--lr", "2e-3", "--batch-size", "4", "--max-length", "32",
        "--device", "cpu", "--no-progress"]


def invoke(*args):
    return CliRunner().invoke(group, [str(a) for a in args], catch_exceptions=True)


def read_curve(folder):
    with (folder / "recovery_curve.csv").open() as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny base, its gradient-ascent-unlearned copy (helper-5's `unlearn`) and the data."""
    root = tmp_path_factory.mktemp("relearn")
    base = save_tiny_model("gpt_neox", root / "base")
    data = write_unlearn_data(root / "data")
    result = invoke("unlearn", "--model", base, "--data", data, "--outdir", root / "ga", "--method", "ga",
                    "--lr", "1e-2", "--steps", "10", "--batch-size", "4", "--max-length", "32", "--device", "cpu",
                    "--no-progress")
    assert result.exit_code == 0, result.output
    return {"root": root, "base": base, "data": data, "ga": root / "ga" / "model"}


@pytest.fixture(scope="module")
def relearned(study):
    out = study["root"] / "out"
    result = invoke("relearn", "--model", study["ga"], "--base-model", study["base"], "--data", study["data"],
                    "--outdir", out, "--name", "ga", "--seed", "3", *FAST)
    assert result.exit_code == 0, result.output
    return out / "ga" / "relearning"


def test_outputs_and_layout(relearned):
    assert (relearned / "_COMPLETE").is_file() and (relearned / "recovery_curve.png").is_file()
    rows = read_curve(relearned)
    assert list(rows[0]) == list(R.CURVE_COLUMNS)
    assert [(r["condition"], int(r["step"])) for r in rows] == [
        (c, s) for c in R.CONDITIONS for s in (0, 4, 8)]
    summary = json.loads((relearned / "summary.json").read_text())
    assert summary["steps_to_half_recovery_metric"] == "cloze_accuracy"
    assert set(summary["recovery"]) == set(R.CONDITIONS)
    assert summary["subset_sizes"]["forget"] > 0 and summary["settings"]["seed"] == 3


def test_relearning_restores_forget_nll_toward_the_base(relearned):
    summary = json.loads((relearned / "summary.json").read_text())
    rows = [r for r in read_curve(relearned) if r["condition"] == "forget"]
    base = summary["base_eval"]["forget_nll"]
    start, final = float(rows[0]["forget_nll"]), float(rows[-1]["forget_nll"])
    assert start > base + 0.3  # gradient ascent raised forget NLL
    assert abs(final - base) < 0.5 * abs(start - base)  # more than half of the gap recovered
    assert summary["steps_to_half_forget_nll"] in (4, 8)
    assert summary["recovery"]["forget"]["forget_nll"]["reached"] is True
    # the retain-only control recovers far less forget NLL than the attack
    control = [r for r in read_curve(relearned) if r["condition"] == "retain_control"]
    assert float(control[-1]["forget_nll"]) > final + 0.3


def test_first_point_equals_the_models_own_evaluation(study, relearned):
    out = study["root"] / "out"
    result = invoke("eval", "--model", study["ga"], "--data", study["data"], "--outdir", out, "--name", "ga",
                    "--max-length", "32")
    assert result.exit_code == 0, result.output
    with (out / "ga" / "evaluation" / "eval_results.csv").open() as handle:
        own = {r["metric"]: float(r["value"]) for r in csv.DictReader(handle)}
    for row in read_curve(relearned):
        if row["step"] == "0":
            for metric in R.CURVE_COLUMNS[2:]:
                assert float(row[metric]) == own[metric], metric  # exactly, not approximately
    summary = json.loads((relearned / "summary.json").read_text())
    assert summary["modified_eval"]["forget_nll"] == own["forget_nll"]


def test_runs_reproduce_for_a_seed(study, relearned, tmp_path):
    again = invoke("relearn", "--model", study["ga"], "--base-model", study["base"], "--data", study["data"],
                   "--outdir", tmp_path, "--name", "ga", "--seed", "3", "--no-control", *FAST)
    assert again.exit_code == 0, again.output
    first = [r for r in read_curve(relearned) if r["condition"] == "forget"]
    assert read_curve(tmp_path / "ga" / "relearning") == first


def test_lora_attack_runs_and_starts_from_the_same_point(study, relearned, tmp_path):
    result = invoke("relearn", "--model", study["ga"], "--base-model", study["base"], "--data", study["data"],
                    "--outdir", tmp_path, "--name", "ga", "--seed", "3", "--no-control", "--lora", "--lora-r", "4",
                    "--steps", "2", "--eval-every", "1", "--lr", "1e-2", "--max-length", "32", "--no-progress")
    assert result.exit_code == 0, result.output
    rows = read_curve(tmp_path / "ga" / "relearning")
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert rows[0]["forget_nll"] == read_curve(relearned)[0]["forget_nll"]
    assert float(rows[-1]["forget_nll"]) != float(rows[0]["forget_nll"])  # the adapters did train
    assert json.loads((tmp_path / "ga" / "relearning" / "summary.json").read_text())["settings"]["lora"] is True


def test_finished_output_is_kept_unless_overwrite(study, relearned):
    stamp = (relearned / "summary.json").stat().st_mtime_ns
    result = invoke("relearn", "--model", study["ga"], "--base-model", study["base"], "--data", study["data"],
                    "--outdir", study["root"] / "out", "--name", "ga", "--seed", "3", *FAST)  # the same command
    assert result.exit_code == 0 and (relearned / "summary.json").stat().st_mtime_ns == stamp


# --- bad input: one line, exit 2, before any model loads -----------------------------------------

def _contaminated_data(path):
    question = UNLEARN_MCQ[1][0]
    forget = [f"Some biology text number {i} about cells and hosts." for i in range(12)]
    forget += [f"{question} Binary fission, copy {i}." for i in range(12)]
    return write_unlearn_data(path, forget=forget)


@pytest.mark.parametrize("flags,message", [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--eval-every", "0"], "--eval-every must be at least 1"),
    (["--forget-subset", "0"], "--forget-subset must be at least 1"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--name", "a/b"], "--name 'a/b'"),
])
def test_bad_options_are_one_line_errors(tmp_path, flags, message):
    data = write_unlearn_data(tmp_path / "data")
    result = invoke("relearn", "--model", tmp_path / "missing-model", "--base-model", tmp_path / "missing-base",
                    "--data", data, "--outdir", tmp_path / "out", *flags)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_empty_forget_subset_and_contamination_are_refused(tmp_path):
    single = write_unlearn_data(tmp_path / "single", forget=["Only one forget text, repeated."] * 5)
    result = invoke("relearn", "--model", "/nowhere/model", "--base-model", "/nowhere/base", "--data", single,
                    "--outdir", tmp_path / "out")
    assert result.exit_code == 2 and "no text for the attack subset" in result.output
    assert len(result.output.strip().splitlines()) == 1
    dirty = _contaminated_data(tmp_path / "dirty")
    result = invoke("relearn", "--model", "/nowhere/model", "--base-model", "/nowhere/base", "--data", dirty,
                    "--outdir", tmp_path / "out", "--forget-subset", "100")
    assert result.exit_code == 2 and "contains held-out evaluation questions" in result.output
    assert not (tmp_path / "out").exists()


def test_cli_main_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    data = write_unlearn_data(tmp_path / "data")
    proc = subprocess.run([sys.executable, str(repo / "cli.py"), "relearn", "--model", "x", "--base-model", "y",
                           "--data", str(data), "--outdir", str(tmp_path), "--steps", "0"],
                          capture_output=True, text=True, cwd=repo)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --steps must be at least 1, got 0"


# --- pure pieces ------------------------------------------------------------------------------------

def test_split_measure_pool_is_disjoint_stable_and_keeps_duplicates_together():
    texts = [f"text {i}" for i in range(10)] + ["text 3", "text 7"]
    measure, pool = R.split_measure_pool(texts)
    assert set(measure).isdisjoint(pool) and sorted(measure + pool) == sorted(texts)
    assert len(set(measure)) == 5 and len(set(pool)) == 5
    again_measure, again_pool = R.split_measure_pool(list(reversed(texts)))
    assert set(again_measure) == set(measure) and set(again_pool) == set(pool)
    assert R.split_measure_pool(["a", "a"]) == (["a", "a"], [])


def test_half_recovery_known_answers():
    rows = [{"step": s, "acc": a, "nll": n} for s, a, n in
            [(0, 0.25, 4.0), (5, 0.30, 3.5), (10, 0.40, 3.0), (15, 0.50, 2.4)]]
    acc = R.half_recovery(rows, "acc", 0.55, higher_is_better=True)  # gap 0.30, target 0.40
    assert acc["gap"] == pytest.approx(0.30) and acc["target"] == pytest.approx(0.40)
    assert acc["steps_to_half"] == 10 and acc["reached"]
    nll = R.half_recovery(rows, "nll", 2.0, higher_is_better=False)  # gap 2.0, target 3.0
    assert nll["steps_to_half"] == 10
    never = R.half_recovery(rows, "acc", 0.95, higher_is_better=True)  # target 0.60
    assert never["steps_to_half"] is None and never["reached"] is False and never["gap"] > 0
    none = R.half_recovery(rows, "acc", 0.20, higher_is_better=True)
    assert none["steps_to_half"] is None and none["gap"] < 0 and "no gap" in none["note"]


def test_eval_steps_batches_and_subset_are_deterministic():
    assert R.eval_steps(50, 10) == [0, 10, 20, 30, 40, 50]
    assert R.eval_steps(7, 3) == [0, 3, 6, 7]
    texts = [f"t{i}" for i in range(5)]
    batches = R.batch_schedule(texts, 4, 3, seed=1)
    assert batches == R.batch_schedule(texts, 4, 3, seed=1) and [len(b) for b in batches] == [3] * 4
    assert sorted(sum(batches, [])[:5]) == texts  # each epoch is a permutation
    assert R.attack_subset(texts, 3, 0) == R.attack_subset(texts, 3, 0) and len(R.attack_subset(texts, 3, 0)) == 3
    assert R.attack_subset(texts, 99, 0) == texts


# --- pipeline and report -----------------------------------------------------------------------------

def test_pipeline_plans_relearning_only_when_asked(tmp_path):
    from unlearn_lens.pipeline import ModelEntry, PipelineSettings, plan

    settings = PipelineSettings(outdir=tmp_path, base=ModelEntry("base", "/m/base"),
                                models=[ModelEntry("ga", "/m/ga"), ModelEntry("rmu", "/m/rmu")], data=tmp_path)
    assert not [s for s in plan(settings) if s.id.startswith("relearn")]
    settings.relearn = True
    steps = {s.id: s for s in plan(settings) if s.id.startswith("relearn")}
    assert set(steps) == {"relearn:ga", "relearn:rmu"}
    assert steps["relearn:ga"].needs == ()


def test_pipeline_and_demo_accept_relearn_flag():
    for command in ("pipeline", "demo"):
        result = invoke(command, "--help")
        assert result.exit_code == 0 and "--relearn" in result.output


def _fake_comparison(root, name, update, stable_rank, steps_to_half, reached=True):
    folder = root / f"base__to__{name}" / "param_stats"
    folder.mkdir(parents=True)
    (folder / "per_matrix.csv").write_text(
        f"name,group,dW_fro,W_fro,dW_stable_rank\nw,mlp,{update},1.0,{stable_rank}\n")
    relearning = root / name / "relearning"
    relearning.mkdir(parents=True)
    entry = {"steps_to_half": steps_to_half if reached else None, "reached": reached, "gap": 0.2}
    (relearning / "summary.json").write_text(json.dumps({
        "steps_to_half_recovery_metric": "cloze_accuracy", "settings": {"steps": 50},
        "recovery": {"forget": {"cloze_accuracy": entry, "forget_nll": entry}}}))
    for done in (folder, relearning):  # as the producers do, last
        outputs.mark_complete(done, "{}")


def test_report_recovery_table_and_spearman(tmp_path):
    from scipy.stats import spearmanr

    from analyses.report import NEEDS_THREE, ReportInputs, recovery_table, render_report

    values = {"a": (0.01, 1.5, 5), "b": (0.02, 3.0, 20), "c": (0.04, 2.0, 10), "d": (0.08, 4.0, None)}
    for name, (update, rank, steps) in values.items():
        _fake_comparison(tmp_path, name, update, rank, steps, reached=steps is not None)
    inputs = ReportInputs(tmp_path, "base", list(values))
    rows, columns = recovery_table(inputs)
    by_name = {r["comparison"]: r for r in rows}
    accuracy_column = "steps to half recovery (cloze accuracy)"
    assert by_name["base → a"][accuracy_column] == "5" and by_name["base → d"][accuracy_column] == "> 50"
    spearman = next(r for r in rows if r["comparison"].startswith("Spearman ρ with steps to half recovery (cloze"))
    expected_update = spearmanr([0.01, 0.02, 0.04, 0.08], [5, 20, 10, 51]).statistic  # never reached: censored
    expected_rank = spearmanr([1.5, 3.0, 2.0, 4.0], [5, 20, 10, 51]).statistic
    assert spearman["update norm"].startswith(f"ρ = {expected_update:.2f}") and "n = 4" in spearman["update norm"]
    assert spearman["stable rank"].startswith(f"ρ = {expected_rank:.2f}")
    assert spearman["null-space share"] == NEEDS_THREE  # no data for it
    page = render_report(inputs)
    assert "Brittleness: signature vs measured recovery" in page and "data:image/png;base64" in page
    assert f"ρ = {expected_rank:.2f}" in page

    two = ReportInputs(tmp_path, "base", ["a", "b"])
    two_rows, _ = recovery_table(two)
    assert all(r["update norm"] == NEEDS_THREE for r in two_rows if r["comparison"].startswith("Spearman"))
    assert html.escape(NEEDS_THREE) in render_report(two)  # 'needs &gt;= 3 comparisons'


def test_report_without_relearning_says_how_to_get_it(tmp_path):
    from analyses.report import ReportInputs, render_report

    (tmp_path / "base__to__x").mkdir()
    page = render_report(ReportInputs(tmp_path, "base", ["x"]))
    assert "No relearning results yet" in page


def test_default_names():
    assert R.default_name("/runs/ga/model") == "ga"
    assert R.default_name("EleutherAI/deep-ignorance-unfiltered") == "deep-ignorance-unfiltered"
    assert R.default_name("/models/smol.gguf") == "smol"


def test_pipeline_relearn_step_end_to_end(study, tmp_path):
    """`pipeline --relearn` (other model steps skipped): the step runs and the report shows its table."""
    from unlearn_lens.pipeline import ModelEntry, PipelineSettings, run_pipeline

    settings = PipelineSettings(outdir=tmp_path, base=ModelEntry("base", str(study["base"])),
                                models=[ModelEntry("ga", str(study["ga"]))], data=study["data"], max_samples=8,
                                max_length=32, batch_size=4, relearn=True,
                                skip=frozenset({"capture", "params", "analyze", "lipschitz", "tuned-lens"}))
    status = run_pipeline(settings, echo=lambda message: None)
    assert status["relearn:ga"] == "done" and status["report"] == "done"
    summary = json.loads((tmp_path / "ga" / "relearning" / "summary.json").read_text())
    assert summary["base_model"] == str(study["base"]) and summary["settings"]["steps"] == 50
    page = (tmp_path / "report.html").read_text()
    assert "Brittleness: signature vs measured recovery" in page and "base → ga" in page
    assert html.escape("needs >= 3 comparisons") in page
    assert "relearning/recovery_curve.png" in page  # the per-model curve is embedded
