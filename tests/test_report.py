"""The HTML report: signature values from known outputs, parsed as HTML, and rendered by Chromium."""

from __future__ import annotations

import html.parser
import os
import shutil
import subprocess

import pytest

from analyses.io import atomic_write_csv, atomic_write_json, clear_complete, mark_complete
from analyses.report import ReportInputs, discover, signature_table, write_report

PER_MATRIX = ["name", "layer", "group", "shape0", "shape1", "dW_fro", "W_fro", "dW_fro_rel", "dW_spectral",
              "W_spectral", "dW_spectral_rel", "dW_stable_rank", "W_stable_rank"]


def _study(root):
    """Outputs of a made-up study with round numbers, as the steps would write them."""
    comparison = root / "base__to__edit"
    rows = [dict(zip(PER_MATRIX, ["a", 0, "mlp", 4, 4, 3.0, 10.0, 0.3, 2.0, 5.0, 0.4, 2.0, 4.0])),
            dict(zip(PER_MATRIX, ["b", 1, "attn", 4, 4, 4.0, 10.0, 0.4, 1.0, 5.0, 0.2, 4.0, 4.0])),
            dict(zip(PER_MATRIX, ["e", -1, "embed", 8, 4, 5.0, 10.0, 0.5, 1.0, 5.0, 0.2, 3.0, 4.0]))]
    atomic_write_csv(comparison / "param_stats" / "per_matrix.csv", rows, PER_MATRIX)
    atomic_write_csv(comparison / "activation_stats" / "activation_stats.csv", [
        {"layer": 0, "split": "forget", "mean_dh_L2": 2.0}, {"layer": 0, "split": "retain", "mean_dh_L2": 0.5}])
    atomic_write_json(root / "unlearning" / "edit" / "eval.json",
                      {"before": {"forget_nll": 3.5, "retain_nll": 3.0, "cloze_accuracy": 0.5},
                       "after": {"forget_nll": 4.5, "retain_nll": 3.1, "cloze_accuracy": 0.25}})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots()
    axis.plot([0, 1], [0, 1])
    (comparison / "param_plots").mkdir(parents=True)
    figure.savefig(comparison / "param_plots" / "layer_locality.png")
    plt.close(figure)
    for folder in ("param_stats", "activation_stats", "param_plots"):  # each producer marks its folder last
        mark_complete(comparison / folder, {"step": "test"})
    return ReportInputs(root, "base", ["edit"])


def test_signature_values_are_computed_from_the_outputs(tmp_path):
    rows = {row["metric"]: row["edit"] for row in signature_table(_study(tmp_path))}
    assert rows["relative update ‖ΔW‖F / ‖W‖F, all matrices"] == "0.408"  # sqrt(9+16+25)/sqrt(300), embeddings in
    assert rows["MLP share of update energy (rest: attention)"] == "0.36"  # 9 / 25: the embedding row is left out
    assert rows["median stable rank of ΔW (changed matrices)"] == "3"  # of 2, 4 and the embedding's 3
    assert rows["mean ‖Δh‖2 forget / retain"] == "2 / 0.5"
    assert rows["forget NLL before → after unlearning"] == "3.5 → 4.5"
    assert rows["local Lipschitz (logits) modified/base, forget"] == "—"  # not run: a dash, not an error


def test_the_tidy_signature_table_holds_the_numbers_the_cells_show(tmp_path):
    """One table feeds the report's cells and the study's signatures.csv: numbers, NaN where not measured."""
    import math

    from analyses.report import SIGNATURE_COLUMNS, signature_frame

    (row,) = signature_frame(_study(tmp_path))
    assert list(row) == ["model", *SIGNATURE_COLUMNS] and row["model"] == "edit"
    assert row["update_norm_rel"] == pytest.approx(math.sqrt(50 / 300))
    assert row["mlp_energy_share"] == pytest.approx(0.36)
    assert (row["dh_forget"], row["dh_retain"], row["dh_forget_over_retain"]) == (2.0, 0.5, 4.0)
    assert (row["forget_nll_before"], row["forget_nll_after"], row["forget_nll_change"]) == (3.5, 4.5, 1.0)
    assert row["cloze_accuracy_change"] == -0.25 and math.isnan(row["top_layer_1"])  # no per_layer.csv here
    assert math.isnan(row["lipschitz_ratio_forget"]) and math.isnan(row["probe_selectivity"])


def test_report_reads_only_folders_marked_complete_and_names_the_rest(tmp_path):
    """A folder without its marker (a step killed half way, or rewriting it from other inputs) is not
    read: its cells are a dash, its plots are left out, and the report and `report` name it."""
    from click.testing import CliRunner

    from cli import group

    inputs = _study(tmp_path)
    clear_complete(tmp_path / "base__to__edit" / "activation_stats")
    clear_complete(tmp_path / "base__to__edit" / "param_plots")
    rows = {row["metric"]: row["edit"] for row in signature_table(inputs)}
    assert rows["mean ‖Δh‖2 forget / retain"] == "—"
    assert rows["relative update ‖ΔW‖F / ‖W‖F, all matrices"] == "0.408"  # param_stats is still complete
    result = CliRunner().invoke(group, ["report", "--outdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert ("skipped 2 folder(s) not marked complete: base__to__edit/param_plots, base__to__edit/activation_stats"
            in result.output)
    page = (tmp_path / "report.html").read_text()
    assert "Left out" in page and "base__to__edit/activation_stats" in page
    assert "data:image/png;base64," not in page  # the only plot was in the unfinished folder


class _Parser(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_report_is_one_self_contained_page(tmp_path):
    _study(tmp_path)
    path = write_report(discover(tmp_path))
    parser = _Parser()
    parser.feed(path.read_text())
    images = [attrs for tag, attrs in parser.tags if tag == "img"]
    assert images and all(a["src"].startswith("data:image/png;base64,") for a in images)
    assert not [a for tag, a in parser.tags if tag in ("script", "link")]  # nothing fetched
    assert "Mechanistic signature" in "".join(parser.text)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_headless_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs chromium (.ci/run); it is missing")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    path = write_report(_study(tmp_path))
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600",
                    f"--screenshot={shot}", path.as_uri()], check=True, capture_output=True, timeout=120)
    from PIL import Image

    image = Image.open(shot).convert("L")
    assert image.size == (1200, 1600)
    assert len(set(image.getdata())) > 20  # text, table borders and the plot, not a blank page


# --- behaviour rows: what `unlearn-lens eval` writes --------------------------------------------

BEHAVIOUR = {"forget_nll": "forget NLL before → after unlearning",
             "retain_nll": "retain NLL before → after unlearning",
             "cloze_accuracy": "WMDP cloze accuracy before → after"}


def _eval_folder(root, model, metrics, complete=True):
    """``<model>/evaluation/`` as `eval` writes it: eval_results.csv, summary.json, the marker last."""
    from unlearn_lens.core import outputs

    folder = root / model / "evaluation"
    atomic_write_csv(folder / "eval_results.csv", [{"metric": m, "value": v} for m, v in metrics.items()],
                     ["metric", "value"])
    atomic_write_json(folder / "summary.json", {"name": model, "metrics": metrics})
    if complete:
        outputs.mark_complete(folder, "{}")


def _behaviour(root, name="edit"):
    rows = {row["metric"]: row[name] for row in signature_table(discover(root))}
    return {metric: rows[label] for metric, label in BEHAVIOUR.items()}


def test_behaviour_rows_read_what_eval_writes(tmp_path):
    (tmp_path / "base__to__edit").mkdir()
    (tmp_path / "base__to__other").mkdir()
    _eval_folder(tmp_path, "base", {"forget_nll": 3.5, "retain_nll": 3.0, "cloze_accuracy": 0.5, "n_questions": 4})
    _eval_folder(tmp_path, "edit", {"forget_nll": 4.25, "retain_nll": 3.125, "cloze_accuracy": 0.25})
    _eval_folder(tmp_path, "other", {"forget_nll": 9.0, "retain_nll": 9.0, "cloze_accuracy": 1.0}, complete=False)
    assert _behaviour(tmp_path) == {"forget_nll": "3.5 → 4.25", "retain_nll": "3 → 3.12",
                                    "cloze_accuracy": "0.5 → 0.25"}
    # an unfinished eval folder (no marker yet) is not read: the base alone is shown
    assert _behaviour(tmp_path, "other") == {"forget_nll": "3.5 → —", "retain_nll": "3 → —",
                                             "cloze_accuracy": "0.5 → —"}
    # an unlearning run made by this tool keeps its own before/after record
    atomic_write_json(tmp_path / "unlearning" / "edit" / "eval.json",
                      {"before": {"forget_nll": 1.0, "retain_nll": 2.0, "cloze_accuracy": 0.75},
                       "after": {"forget_nll": 1.5, "retain_nll": 2.5, "cloze_accuracy": 0.5}})
    assert _behaviour(tmp_path)["forget_nll"] == "1 → 1.5"


def test_report_of_a_tree_where_eval_ran_shows_its_values(tmp_path):
    """`unlearn-lens eval` on a base and a modified tiny model, then `unlearn-lens report`: the page
    shows eval_results.csv's values in the behaviour rows."""
    import csv

    from click.testing import CliRunner

    from cli import group
    from conftest import write_unlearn_data
    from unlearn_lens.testing import save_tiny_model

    data = write_unlearn_data(tmp_path / "data")
    out = tmp_path / "out"
    for name, seed in (("base", 0), ("edit", 1)):
        model = save_tiny_model("llama", tmp_path / name, seed=seed)
        result = CliRunner().invoke(group, ["eval", "--model", str(model), "--name", name, "--data", str(data),
                                            "--outdir", str(out), "--max-length", "32", "--batch-size", "4"])
        assert result.exit_code == 0, result.output
    (out / "base__to__edit").mkdir()
    result = CliRunner().invoke(group, ["report", "--outdir", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()

    def written(model):
        with (out / model / "evaluation" / "eval_results.csv").open() as handle:
            return {row["metric"]: float(row["value"]) for row in csv.DictReader(handle)}

    before, after = written("base"), written("edit")
    for metric, cell in _behaviour(out).items():
        assert html.escape(cell) in page
        shown = [float(part) for part in cell.split("→")]
        assert shown == pytest.approx([before[metric], after[metric]], rel=5e-3, abs=1e-9), metric
    assert before["forget_nll"] != after["forget_nll"]  # two different models, so the row says something
