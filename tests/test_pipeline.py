"""End to end on tiny models: every output present with its columns, skip, --force and resume."""

from __future__ import annotations

import csv
import html.parser
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unlearn_lens.testing import save_tiny_study

COMPARISON_FILES = {
    "param_stats/per_matrix.csv": ["name", "layer", "group", "shape0", "shape1", "dW_fro", "W_fro", "dW_fro_rel",
                                   "dW_spectral", "W_spectral", "dW_spectral_rel", "dW_stable_rank", "W_stable_rank"],
    "param_stats/per_layer.csv": ["layer", "group", "dW_fro_layer", "W_fro_layer", "dW_fro_layer_rel",
                                  "max_dW_spectral", "max_W_spectral", "max_dW_spectral_rel", "mean_dW_stable_rank",
                                  "count_mats"],
    "activation_stats/activation_stats.csv": ["layer", "split", "model_a_norm_L1", "model_a_norm_L2",
                                              "model_b_norm_L1", "model_b_norm_L2", "mean_dh_L1", "mean_dh_L2"],
    "mlp_attn_analysis/mlp_attn_summary.csv": ["layer"],
    "null_space_analysis/null_space_results.csv": ["name", "top10_energy_share"],
    "mlp_nullspace/mlp_nullspace.csv": ["name", "col_null_share"],
    "activation_separation/separation_metrics.csv": ["layer", "model", "cosine_distance", "auc", "variance_ratio"],
    "activation_covariance/covariance_selectivity.csv": ["layer", "selectivity_ratio"],
    "row_space_projection/row_space_projection.csv": ["mlp_layer", "share_forget", "share_retain", "selectivity_ratio"],
    "lipschitzness/lipschitz_results.csv": ["model", "split", "eps", "lipschitz_logits_mean", "grad_norm_mean"],
}
MODEL_FILES = {
    "linear_probes/probe_results.csv": ["layer", "accuracy", "selectivity", "auc"],
    "wmdp_logit_lens/wmdp_lens_results.csv": ["layer", "scoring", "accuracy", "delta_from_final", "n_questions"],
    "wmdp_tuned_lens/wmdp_lens_results.csv": ["layer", "scoring", "accuracy", "delta_from_final", "n_questions"],
}
PLOT_FOLDERS = ["param_plots", "activation_plots", "activation_separation", "activation_covariance",
                "row_space_projection", "lipschitzness", "mlp_nullspace", "null_space_analysis", "mlp_attn_analysis"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny base model, a copy with a planted MLP edit, and a small demo data directory."""
    return save_tiny_study(tmp_path_factory.mktemp("study"))


def _pipeline_args(study, outdir: Path) -> list[str]:
    return ["pipeline", "--base", f"base={study['base']}", "--model", f"edited={study['edited']}",
            "--data", str(study["data"]), "--outdir", str(outdir), "--max-samples", "12", "--max-length", "32",
            "--batch-size", "4", "--lipschitz-samples", "4", "--tuned-lens-steps", "5"]


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=env,
                          timeout=900, **kwargs)


def _columns(path: Path) -> list[str]:
    with path.open() as handle:
        return next(csv.reader(handle))


class _Tables(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.images, self.text = 0, 0, []

    def handle_starttag(self, tag, attrs):
        self.tables += tag == "table"
        self.images += tag == "img" and dict(attrs).get("src", "").startswith("data:image/png;base64,")

    def handle_data(self, data):
        self.text.append(data)


@pytest.mark.slow
def test_pipeline_end_to_end_skip_force_and_resume(study):
    out = study["root"] / "outputs"
    first = _run(_pipeline_args(study, out))
    assert first.returncode == 0, first.stdout + first.stderr
    comparison = out / "base__to__edited"
    for relative, columns in COMPARISON_FILES.items():
        assert set(columns) <= set(_columns(comparison / relative)), relative
    for model in ("base", "edited"):
        for relative, columns in MODEL_FILES.items():
            assert set(columns) <= set(_columns(out / model / relative)), (model, relative)
    for folder in PLOT_FOLDERS:
        assert list((comparison / folder).glob("*.png")), folder
    assert (out / "caches" / "base.zarr").exists() and (out / "caches" / "edited.zarr").exists()
    # the planted edit is found where it was made
    rows = list(csv.DictReader((comparison / "param_stats" / "per_matrix.csv").open()))
    changed = {r["name"] for r in rows if float(r["dW_fro"]) > 0}
    assert changed == {"gpt_neox.layers.1.mlp.dense_h_to_4h.weight"}
    parser = _Tables()
    parser.feed((out / "report.html").read_text())
    text = " ".join(parser.text)
    assert parser.tables >= 1 and parser.images >= len(PLOT_FOLDERS)
    assert "Mechanistic signature" in text and "base → edited" in text

    second = _run(_pipeline_args(study, out))
    assert second.returncode == 0
    assert second.stdout.count("already done") == second.stdout.count("] ")  # every step skipped
    forced = _run(_pipeline_args(study, out) + ["--force", "--skip", "lipschitz,tuned-lens,analyze"])
    assert forced.returncode == 0 and "already done" not in forced.stdout


@pytest.mark.slow
def test_pipeline_killed_midway_resumes(study):
    out = study["root"] / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "cli", *_pipeline_args(study, out)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marker = out / ".pipeline" / "capture__base.json"
    deadline = time.time() + 600
    while not marker.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert marker.exists()
    resumed = _run(_pipeline_args(study, out))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "capture:base: already done" in resumed.stdout
    assert (out / "report.html").is_file()
    assert all(json.loads(p.read_text())["step"] for p in (out / ".pipeline").glob("*.json"))


def test_bad_pipeline_input_is_one_line(tmp_path):
    for args, message in ((["pipeline", "--model", "bad name=x", "--outdir", str(tmp_path)], "model name"),
                          (["pipeline", "--skip", "everything", "--outdir", str(tmp_path)], "--skip")):
        result = _run(args)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
