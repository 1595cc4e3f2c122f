"""benchmarks/gpu_check.sh in its CPU smoke mode (GPU_CHECK_CONFIG=tiny), so the GPU check cannot rot
before a GPU is at hand: every step runs and the summary table says so."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("write checkpoints", "capture vs bare forward", "capture at --layers every:4 --token-sample 64",
         "params (2 checkpoints)", "unlearn rmu (3 steps)", "unlearn cb_lat --lora (3 steps)")


def run_check(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "GPU_CHECK_CONFIG": "tiny", "OMP_NUM_THREADS": "1",
                                            "GPU_CHECK_DIR": str(tmp_path / "work"), **env})


def test_tiny_gpu_check_runs_every_step(tmp_path):
    result = run_check(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = result.stdout[result.stdout.index("\nstep "):].strip().splitlines()[1:-1]
    rows = dict(re.split(r"\s{2,}", line.strip())[:2] for line in table)
    assert rows == {**{step: "ok" for step in STEPS}, "FSDP rmu, 2 processes": "skipped"}, table
    assert "planted change found" in result.stdout
    assert result.stdout.count("GB/s with") == 2  # the writer's ingestion, full and at the recommended setting
    assert "needs 2 GPUs, 0 present" in result.stdout
    assert result.stdout.rstrip().endswith("gpu_check: all steps ok")
    # the large outputs are deleted as the check goes
    assert not (tmp_path / "work" / "model_b").exists() and not (tmp_path / "work" / "unlearn-rmu" / "model").exists()


def test_the_full_config_without_a_gpu_is_one_line(tmp_path):
    result = run_check(tmp_path, GPU_CHECK_CONFIG="deep-ignorance", CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: no CUDA device; run GPU_CHECK_CONFIG=tiny for the CPU smoke run"
    assert not (tmp_path / "work").exists()
