"""`unlearn` / `unlearn-all` end to end: outputs, atomic layout, skipping, one-line errors."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import group
from conftest import write_unlearn_data
from unlearn_lens.testing import save_tiny_model

REPO = Path(__file__).resolve().parents[1]
FAST = ["--steps", "2", "--batch-size", "2", "--max-length", "16", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory):
    return str(save_tiny_model("gpt_neox", tmp_path_factory.mktemp("cli-neox")))


def invoke(*args):
    return CliRunner().invoke(group, list(args), catch_exceptions=True)


def test_unlearn_writes_model_config_log_eval(neox_dir, unlearn_data_dir, tmp_path):
    from unlearn_lens.loading import load_model

    out = tmp_path / "run"
    result = invoke("unlearn", "--model", neox_dir, "--data", str(unlearn_data_dir), "--outdir", str(out),
                    "--method", "npo", "--lr", "1e-3", *FAST)
    assert result.exit_code == 0, result.output
    assert (out / "COMPLETE").is_file() and not out.with_name("run.partial").exists()
    model, tokenizer = load_model(str(out / "model"))  # a normal HF directory, usable as --model-b
    assert model.config.model_type == "gpt_neox" and tokenizer is not None
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["method"] == "npo" and config["config"]["beta"] == 0.1
    assert config["data_manifest_hash"] == "test-data-hash" and config["seed"] == 0
    assert {"torch", "transformers", "accelerate"} <= set(config["versions"])
    assert "HF_TOKEN" not in (out / "config.json").read_text()
    with (out / "train_log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert {"loss", "forget_loss", "retain_loss", "lr", "grad_norm", "eval_forget_nll"} <= set(rows[0])
    assert float(rows[0]["lr"]) == pytest.approx(1e-3) and float(rows[1]["lr"]) == pytest.approx(5e-4)  # cosine
    evaluation = json.loads((out / "eval.json").read_text())
    for when in ("before", "after"):
        assert {"forget_nll", "retain_nll", "letter_accuracy", "cloze_accuracy"} <= set(evaluation[when])
        assert math.isfinite(evaluation[when]["forget_nll"])
    # the run ends by saying what it did, each metric with its paired change and interval
    from analyses.effects import change_lines

    said = change_lines(evaluation["before"], evaluation["after"])
    assert any(line.startswith("forget_nll: ") for line in said)
    assert all(f"  {line}" in result.output for line in said)
    # finished runs are not silently redone
    again = invoke("unlearn", "--model", neox_dir, "--data", str(unlearn_data_dir), "--outdir", str(out),
                   "--method", "npo", *FAST)
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_unlearn_all_skips_finished(neox_dir, unlearn_data_dir, tmp_path):
    args = ["unlearn-all", "--model", neox_dir, "--data", str(unlearn_data_dir), "--outdir", str(tmp_path),
            "--methods", "ga,simnpo", *FAST]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    assert all((tmp_path / m / "COMPLETE").is_file() for m in ("ga", "simnpo"))
    stamp = (tmp_path / "ga" / "COMPLETE").read_text()
    (tmp_path / "simnpo" / "COMPLETE").unlink()  # an unfinished run is redone
    second = invoke(*args)
    assert second.exit_code == 0, second.output
    assert "ga: already finished" in second.output and "simnpo: unlearned" in second.output
    assert (tmp_path / "ga" / "COMPLETE").read_text() == stamp


@pytest.mark.parametrize("extra,message", [
    (["--method", "bogus"], "unknown method 'bogus'"),
    (["--method", "wt_dist", "--lora"], "--lora cannot be used with wt_dist"),
    (["--method", "wt_dist_reg", "--lora"], "--lora cannot be used with wt_dist_reg"),
    (["--method", "rmu", "--layer-id", "7"], "--layer-id 7 is out of range"),
    (["--method", "ga", "--steps", "0"], "--steps must be at least 1"),
    (["--method", "cb", "--target-layers", "1,x"], "comma-separated integers"),
    (["--method", "ga", "--lora", "--lora-targets", "nonexistent_proj"], "match no module"),
    (["--method", "cb_lat", "--target-layers", "1,2", "--adversary-layers", "-1,1"],
     "must lie strictly before the first target layer 1"),
    (["--method", "lat", "--adversary-layers", "3"], "--adversary-layers 3 is out of range"),
    (["--method", "ga", "--forget-weight", "0.5"], "--forget-weight has no effect on ga"),
    (["--method", "cb", "--forget-weight", "2"], "--forget-weight has no effect on cb"),  # the cosine variant
])
def test_bad_input_one_line_error_before_training(neox_dir, unlearn_data_dir, tmp_path, extra, message):
    out = tmp_path / "bad"
    result = invoke("unlearn", "--model", neox_dir, "--data", str(unlearn_data_dir), "--outdir", str(out),
                    *FAST, *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.output and len(errors) == 1
    assert not out.exists() and not out.with_name("bad.partial").exists()


def test_empty_forget_set(neox_dir, tmp_path):
    data = write_unlearn_data(tmp_path / "data", forget=[""])
    result = invoke("unlearn", "--model", neox_dir, "--data", str(data), "--outdir", str(tmp_path / "o"),
                    "--method", "ga", *FAST)
    assert result.exit_code == 2 and "empty data set" in result.output and "Traceback" not in result.output


def test_unlearn_all_refuses_a_forget_weight_one_method_ignores(neox_dir, unlearn_data_dir, tmp_path):
    result = invoke("unlearn-all", "--model", neox_dir, "--data", str(unlearn_data_dir), "--outdir", str(tmp_path),
                    "--methods", "grad_diff,lat", "--forget-weight", "2", *FAST)
    assert result.exit_code == 2 and "--forget-weight has no effect on lat" in result.output
    assert not (tmp_path / "grad_diff").exists()


def test_unlearn_all_checks_every_method_first(neox_dir, unlearn_data_dir, tmp_path):
    result = invoke("unlearn-all", "--model", neox_dir, "--data", str(unlearn_data_dir), "--outdir", str(tmp_path),
                    "--methods", "ga,nope", *FAST)
    assert result.exit_code == 2 and "unknown method 'nope'" in result.output
    assert not (tmp_path / "ga").exists()


def test_help_lists_every_flag():
    result = invoke("unlearn", "--help")
    assert result.exit_code == 0
    for flag in ("--cb-variant", "--lat-norm", "--wt-reg-lambda", "--lora-targets", "--grad-accum-steps",
                 "--optimizer", "--eval-split", "--steering-coeff", "--update-roles", "--adversary",
                 "--adversary-layers", "--adversary-lr", "--lat-defender", "--lat-sft-coef"):
        assert flag in result.output


def _weights(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path / "model" / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ga", "cb"])
def test_two_processes_equal_one_process_with_double_batch(neox_dir, unlearn_data_dir, tmp_path, method):
    """DDP (gloo, 2 CPU processes, batch 2 each) == 1 process with batch 4: same weights.

    ``cb`` also checks the hidden-state path: full forwards under DDP, cut forwards on one process.
    """
    common = ["unlearn", "--model", neox_dir, "--data", str(unlearn_data_dir), "--method", method,
              "--optimizer", "sgd", "--lr", "0.05", "--steps", "3", "--max-length", "12", "--device", "cpu",
              "--no-progress", "--layer-id", "1", "--alpha", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cli = str(REPO / "cli.py")
    port = {"ga": "29531", "cb": "29532"}[method]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                    cli, *common, "--batch-size", "2", "--outdir", str(tmp_path / "two")],
                   check=True, env=env, capture_output=True, cwd=tmp_path)
    subprocess.run([sys.executable, cli, *common, "--batch-size", "4", "--outdir", str(tmp_path / "one")],
                   check=True, env=env, capture_output=True, cwd=tmp_path)
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert one.keys() == two.keys()
    difference = max(float(np.abs(one[k] - two[k]).max()) for k in one)
    from safetensors.numpy import load_file

    base = load_file(str(Path(neox_dir) / "model.safetensors"))
    moved = max(float(np.abs(one[k] - base[k]).max()) for k in one if k in base)
    assert difference < 1e-5 and moved > 1e-3  # the runs trained, and identically
    log_one = (tmp_path / "one" / "train_log.csv").read_text().splitlines()
    assert json.loads((tmp_path / "two" / "config.json").read_text())["resolved"]["world_size"] == 2
    assert len(log_one) == 4


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ga", "wt_dist_reg", "lat"])
def test_fsdp_two_cpu_processes_equal_one_process_with_double_batch(neox_dir, unlearn_data_dir, tmp_path, method):
    """FSDP (docs/accelerate/fsdp.yaml: FULL_SHARD, per-block wrapping, full state dict on save),
    2 CPU processes over gloo, batch 2 each == 1 process with batch 4: same weights.

    ``wt_dist_reg`` checks the distance summed over shards, ``lat`` the PGD adversary's gradient
    through the FSDP wrapper. accelerate only enables FSDP on GPUs, so tests/fsdp_cpu_launcher.py
    turns its CPU process group into FSDP (see its docstring).
    """
    common = ["unlearn", "--model", neox_dir, "--data", str(unlearn_data_dir), "--method", method,
              "--optimizer", "sgd", "--lr", "0.05", "--steps", "3", "--max-length", "12", "--device", "cpu",
              "--no-progress", "--layer-id", "1"]
    if method == "wt_dist_reg":
        common += ["--wt-reg-lambda", "50"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "UNLEARN_LENS_DEBUG": "1"}
    port = {"ga": "29541", "wt_dist_reg": "29542", "lat": "29543"}[method]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          port, str(REPO / "tests" / "fsdp_cpu_launcher.py"), *common, "--batch-size", "2",
                          "--outdir", str(tmp_path / "two")], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    subprocess.run([sys.executable, str(REPO / "cli.py"), *common, "--batch-size", "4", "--outdir",
                    str(tmp_path / "one")], check=True, env=env, capture_output=True, cwd=tmp_path)
    resolved = json.loads((tmp_path / "two" / "config.json").read_text())["resolved"]
    assert resolved["world_size"] == 2 and resolved["distributed_type"] == "FSDP"
    one, two_weights = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert one.keys() == two_weights.keys()
    from safetensors.numpy import load_file

    base = load_file(str(Path(neox_dir) / "model.safetensors"))
    difference = max(float(np.abs(one[k] - two_weights[k]).max()) for k in one)
    moved = max(float(np.abs(one[k] - base[k]).max()) for k in one if k in base)
    assert difference < 1e-5 and moved > 1e-3  # the runs trained, and identically


def test_wandb_without_key_is_refused(neox_dir, unlearn_data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    result = invoke("unlearn", "--model", neox_dir, "--data", str(unlearn_data_dir), "--outdir", str(tmp_path / "w"),
                    "--method", "ga", "--wandb", *FAST)
    assert result.exit_code == 2 and "WANDB_API_KEY" in result.output
