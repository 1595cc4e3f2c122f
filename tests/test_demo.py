"""The README's main command, `unlearn-lens demo`, end to end on the real SmolLM2 (small settings).

The full-size demo is what `bash scripts/run-demo` runs; here every step runs for real on SmolLM2
with fewer texts and steps so that CI stays short.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_every_step_on_smollm2(tmp_path, smollm2_gguf):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "cli", "demo", "--outdir", str(out), "--unlearn-steps", "2", "--max-samples", "6",
         "--max-length", "48", "--tuned-lens-steps", "1", "--tuned-lens-tokens", "32", "--lipschitz-samples", "2"],
        capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Open the report" in result.stdout and "What unlearning did" in result.stdout
    html = (out / "report.html").read_text()
    assert "smollm2 → rmu" in html and "smollm2 → ga" in html
    # relearning and the attacks ran: no empty brittleness or recoverability section
    assert "No relearning results yet" not in html and "No attack results yet" not in html
    for name in ("rmu", "ga"):
        assert (out / name / "relearning" / "summary.json").is_file()
        assert (out / name / "attacks" / "attacks.csv").is_file()
    for name in ("rmu", "ga"):
        assert (out / "unlearning" / name / "model" / "config.json").is_file()
        rows = list(csv.DictReader((out / f"smollm2__to__{name}" / "param_stats" / "per_matrix.csv").open()))
        changed = {r["name"] for r in rows if float(r["dW_fro"]) > 0}
        if name == "rmu":  # WMDP's RMU: only the MLP down-projections of layers 5..7 move
            assert changed == {f"model.layers.{i}.mlp.down_proj.weight" for i in (5, 6, 7)}
        else:
            assert len(changed) > 100
    assert not [p for p in (out / ".pipeline").glob("*.json")] == []
