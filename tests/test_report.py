"""The HTML report: signature values from known outputs, parsed as HTML, and rendered by Chromium."""

from __future__ import annotations

import html.parser
import os
import shutil
import subprocess

import pytest

from analyses.io import atomic_write_csv, atomic_write_json
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
    return ReportInputs(root, "base", ["edit"])


def test_signature_values_are_computed_from_the_outputs(tmp_path):
    rows = {row["metric"]: row["edit"] for row in signature_table(_study(tmp_path))}
    assert rows["relative update ‖ΔW‖F / ‖W‖F, all matrices"] == "0.408"  # sqrt(9+16+25)/sqrt(300), embeddings in
    assert rows["MLP share of update energy (rest: attention)"] == "0.36"  # 9 / 25: the embedding row is left out
    assert rows["median stable rank of ΔW (changed matrices)"] == "3"  # of 2, 4 and the embedding's 3
    assert rows["mean ‖Δh‖2 forget / retain"] == "2 / 0.5"
    assert rows["forget NLL before → after unlearning"] == "3.5 → 4.5"
    assert rows["local Lipschitz (logits) modified/base, forget"] == "—"  # not run: a dash, not an error


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
