"""The refactor of issue #17 changes no result: a tiny pipeline run writes the CSVs main wrote before it.

``tests/data/pipeline_before_issue17/`` holds every CSV of this exact run made with main's code
before the refactor (same tiny models, same data, same flags). On the machine that made them the
files are byte-identical; elsewhere floats may differ in the last bits (another BLAS), so cells
are compared as text, numbers to 1e-6 relative.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unlearn_lens.testing import save_tiny_study

BEFORE = Path(__file__).parent / "data" / "pipeline_before_issue17"
ROOT = Path(__file__).resolve().parents[1]


def _same_cell(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)


@pytest.mark.slow
def test_tiny_pipeline_writes_the_csvs_it_wrote_before_the_refactor(tmp_path):
    study = save_tiny_study(tmp_path)
    base, edited = study["base"], study["edited"]
    out = tmp_path / "out"
    args = ["pipeline", "--base", f"base={base}", "--model", f"edited={edited}", "--data", str(tmp_path / "data"),
            "--outdir", str(out), "--max-samples", "12", "--max-length", "32", "--batch-size", "4",
            "--lipschitz-samples", "4", "--tuned-lens-steps", "5"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=env, timeout=900,
                         cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]

    before = sorted(p.relative_to(BEFORE) for p in BEFORE.rglob("*.csv"))
    now = sorted(p.relative_to(out) for p in out.rglob("*.csv") if "caches" not in p.parts)
    assert now == before and len(before) == 23
    for relative in before:
        rows_before = list(csv.reader((BEFORE / relative).open(newline="")))
        rows_now = list(csv.reader((out / relative).open(newline="")))
        assert rows_now[0] == rows_before[0], relative  # the same columns in the same order
        assert len(rows_now) == len(rows_before), relative
        for row_now, row_before in zip(rows_now, rows_before):
            assert len(row_now) == len(row_before) and all(map(_same_cell, row_now, row_before)), (relative, row_now)
