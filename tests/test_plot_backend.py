"""Plotting never goes through pyplot: importing and drawing leave a notebook's backend alone."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
import matplotlib
matplotlib.use("svg")  # stands for a notebook's inline backend
import analyses.plotting, analyses.attack_plots, analyses.weights.params_plots, analyses.report
import unlearn_lens.lipschitz, unlearn_lens.relearn, unlearn_lens.tuned_lens
from analyses.plotting import panel_plot
panel_plot(sys.argv[1], "t", "layer", [("y", {"a": ([0, 1], [1.0, 2.0])}, None)])
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
assert "matplotlib.pyplot" not in sys.modules
print("ok")
"""


def test_plots_leave_the_backend_and_pyplot_alone(tmp_path):
    out = tmp_path / "panel.png"
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
