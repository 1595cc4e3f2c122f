"""End to end: capture tiny models with ``unlearn_lens.capture``, then ``unlearn-lens analyze`` in a
subprocess where torch, transformers and nnsight cannot be imported (so no model can run)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_analyze_runner import blocked_env

FORGET = ["Viruses replicate inside host cells using the host's machinery.", "Bacteria divide by binary fission.",
          "The cell membrane controls what enters and leaves the cell.", "Plasmids carry genes between bacteria.",
          "Proteins fold into shapes that determine their function.", "Pathogens evolve quickly under pressure."]
RETAIN = ["The river flows through the valley toward the sea.", "Paris is the capital of France.",
          "The orchestra played a symphony by Beethoven.", "Rain fell all afternoon.",
          "In 1905 Einstein published papers on relativity.", "Mountains form where plates collide."]
MCQ = [("Which organelle produces most of the cell's energy?", ["Nucleus", "Mitochondrion", "Ribosome", "Golgi"], 1),
       ("What do viruses need to replicate?", ["A host cell", "Sunlight", "Oxygen only", "Nothing"], 0),
       ("How do bacteria divide?", ["Meiosis", "Budding", "Binary fission", "Spores"], 2)]
CHANGED_BLOCK = 1


def write_data(path: Path, forget=FORGET, tag="analyze-e2e") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "forget.txt").write_text("\n".join(forget) + "\n")
    (path / "retain.txt").write_text("\n".join(RETAIN) + "\n")
    records = [{"id": f"q{i}", "question": q, "choices": c, "answer": a} for i, (q, c, a) in enumerate(MCQ)]
    (path / "wmdp_mcq.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (path / "manifest.json").write_text(json.dumps({"hash": tag}))
    return path


def plant_mlp_change(source: Path, target: Path, family: str, block: int) -> Path:
    """Copy a model directory, adding a change to block ``block``'s MLP input matrices whose row
    space (input side) is the same 2-D subspace for every matrix: the stacked update has rank 2."""
    from safetensors.numpy import load_file, save_file

    from unlearn_lens.core.naming import MLP_INPUT_ROLES, classify

    shutil.copytree(source, target)
    tensors = load_file(str(target / "model.safetensors"))
    rng = np.random.default_rng(7)
    changed, rows_in = [], None
    for name, value in sorted(tensors.items()):
        info = classify(name, family)
        if info.layer == block and info.role in MLP_INPUT_ROLES and value.ndim == 2:
            oriented = value.T if family == "gpt2" else value  # GPT-2's Conv1D stores (in, out)
            rows_in = rng.normal(size=(2, oriented.shape[1])) if rows_in is None else rows_in
            update = rng.normal(size=(oriented.shape[0], 2)) @ rows_in
            update = update.T if family == "gpt2" else update
            tensors[name] = (value + 0.05 * update).astype(value.dtype)
            changed.append(name)
    assert changed
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def captured(tmp_path_factory, tiny_model_dir, family):
    from unlearn_lens.capture import CaptureSettings, capture

    root = tmp_path_factory.mktemp(f"analyze-e2e-{family}")
    data = write_data(root / "data")
    modified = plant_mlp_change(Path(tiny_model_dir), root / "modified", family, CHANGED_BLOCK)
    settings = CaptureSettings(batch_size=4, block_samples=4, dtype="float32", progress=False, token_chunk=16)
    caches = {}
    for name, model in (("base", tiny_model_dir), ("unl", modified)):
        caches[name] = root / f"{name}.zarr"
        assert set(capture(str(model), data, str(caches[name]), settings).values()) == {"complete"}
    return root, caches, settings


def analyze(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "import cli; cli.main()", "analyze", "--no-progress", *args]
    return subprocess.run(command, env=blocked_env(tmp_path), capture_output=True, text=True, timeout=600,
                          cwd=str(Path(__file__).resolve().parents[1]))


def rows(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_capture_then_analyze_without_torch(captured, tmp_path, family):
    root, caches, _ = captured
    out = tmp_path / "out"
    result = analyze(["--base", str(caches["base"]), "--compare", f"unl={caches['unl']}", "--outdir", str(out),
                      "--top-k", "4"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for folder in ("base__to__unl/activation_stats", "base__to__unl/activation_separation",
                   "base__to__unl/activation_covariance", "base__to__unl/row_space_projection",
                   "base/linear_probes", "unl/linear_probes", "base/wmdp_logit_lens", "unl/wmdp_logit_lens"):
        assert (out / folder / "_COMPLETE").is_file(), folder
    took = [line for line in result.stdout.splitlines() if line.startswith("took ")]
    assert len(took) == 1 and all(stage in took[0] for stage in
                                  ("forget split", "retain split", "linear probes", "logit lens")), result.stdout

    # the lens at the last layer reproduces the model's own answers (final norm applied once)
    for model in ("base", "unl"):
        summary = json.loads((out / model / "wmdp_logit_lens/summary.json").read_text())
        assert summary["letter"]["final_layer_agreement_with_model"] == 1.0
        assert summary["cloze"]["final_layer_agreement_with_model"] == 1.0
        assert summary["cloze"]["final_layer_max_abs_logprob_difference"] < 1e-4
        assert summary["n_questions"] == len(MCQ)

    # blocks before the changed one see identical inputs: dh is exactly zero there, not after
    stats = rows(out / "base__to__unl/activation_stats/activation_stats.csv")
    for row in stats:
        layer, dh = int(row["layer"]), float(row["mean_dh_L2"])
        if layer <= CHANGED_BLOCK:
            assert dh == 0.0, row
        else:
            assert dh > 0.0, row

    # only the changed block has a non-zero update; its row space has rank 2
    projection = rows(out / "base__to__unl/row_space_projection/row_space_projection.csv")
    for row in projection:
        expected_rank = 2 if int(row["mlp_layer"]) == CHANGED_BLOCK else 0
        assert int(row["dW_rank"]) == expected_rank, row
    changed = [r for r in projection if int(r["mlp_layer"]) == CHANGED_BLOCK]
    assert all(0.0 < float(r["share_forget"]) < 1.0 for r in changed)


@pytest.mark.slow
def test_refusals_from_the_cli(captured, tmp_path, family):
    if family != "llama":
        pytest.skip("one family is enough for the refusal messages")
    root, caches, settings = captured
    from unlearn_lens.capture import capture
    from unlearn_lens.testing import save_tiny_model

    other_data = write_data(tmp_path / "other", forget=FORGET[::-1], tag="other-data")
    other = tmp_path / "other.zarr"
    capture(str(root / "modified"), other_data, str(other), settings)
    result = analyze(["--base", str(caches["base"]), "--compare", f"x={other}", "--outdir", str(tmp_path / "o")],
                     tmp_path)
    assert result.returncode == 2
    assert "different data or tokenisation" in result.stderr and "Traceback" not in result.stderr

    other_arch = save_tiny_model("gpt2", tmp_path / "gpt2")  # same hidden size and depth, other tensors
    other_cache = tmp_path / "gpt2.zarr"
    capture(str(other_arch), root / "data", str(other_cache), settings)
    result = analyze(["--base", str(caches["base"]), "--compare", f"g={other_cache}", "--outdir",
                      str(tmp_path / "o")], tmp_path)
    assert result.returncode == 2 and "hold different tensors" in result.stderr, result.stderr

    result = analyze(["--base", str(tmp_path / "missing.zarr"), "--compare", f"u={caches['unl']}", "--outdir",
                      str(tmp_path / "o")], tmp_path)
    assert result.returncode == 2 and "no activation cache" in result.stderr
    result = analyze(["--base", str(caches["base"]), "--compare", "nonsense", "--outdir", str(tmp_path / "o")],
                     tmp_path)
    assert result.returncode == 2 and "NAME=CACHE" in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_threads_processes_and_scheduler_agree(captured, tmp_path, family):
    if family != "llama":
        pytest.skip("one family is enough for the scheduler comparison")
    root, caches, _ = captured
    common = ["--base", str(caches["base"]), "--compare", f"unl={caches['unl']}", "--top-k", "4"]
    # --checkpoint naming the same weights explicitly changes nothing
    threads = analyze([*common, "--outdir", str(tmp_path / "threads"), "--workers", "2",
                       "--checkpoint", f"unl={root / 'modified'}"], tmp_path)
    assert threads.returncode == 0, threads.stderr[-3000:]
    processes = analyze([*common, "--outdir", str(tmp_path / "procs"), "--workers", "2", "--processes"], tmp_path)
    assert processes.returncode == 0, processes.stderr[-3000:]
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster:
        remote = analyze([*common, "--outdir", str(tmp_path / "remote"), "--scheduler", cluster.scheduler_address],
                         tmp_path)
    assert remote.returncode == 0, remote.stderr[-3000:]
    files = sorted((tmp_path / "threads").rglob("*.csv"))
    assert len(files) >= 7
    for path in files:
        relative = path.relative_to(tmp_path / "threads")
        assert path.read_text() == (tmp_path / "procs" / relative).read_text(), path
        assert path.read_text() == (tmp_path / "remote" / relative).read_text(), path


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_lens_reproduces_model(smollm2_dir, tmp_path):
    """On the real SmolLM2 (float32 cache), the last-layer lens equals the model's own answers."""
    from analyses.activations.caches import open_model_caches
    from analyses.activations.runner import AnalyzeOptions, run_analysis
    from unlearn_lens.capture import CaptureSettings, capture

    data = write_data(tmp_path / "data", tag="smollm2-lens")
    settings = CaptureSettings(batch_size=4, block_samples=4, dtype="float32", progress=False, max_length=64)
    modified = plant_mlp_change(Path(smollm2_dir), tmp_path / "modified", "llama", CHANGED_BLOCK)
    caches = {}
    for name, model in (("base", smollm2_dir), ("unl", modified)):
        capture(str(model), data, str(tmp_path / f"{name}.zarr"), settings)
        caches[name] = open_model_caches(str(tmp_path / f"{name}.zarr"))
    run_analysis(caches, "base", tmp_path / "out", AnalyzeOptions(progress=False, top_k=4))
    for model in ("base", "unl"):
        summary = json.loads((tmp_path / "out" / model / "wmdp_logit_lens/summary.json").read_text())
        assert summary["letter"]["final_layer_agreement_with_model"] == 1.0
        assert summary["cloze"]["final_layer_agreement_with_model"] == 1.0
        assert summary["cloze"]["final_layer_max_abs_logprob_difference"] < 1e-4
    stats = rows(tmp_path / "out/base__to__unl/activation_stats/activation_stats.csv")
    assert all(float(r["mean_dh_L2"]) == 0.0 for r in stats if int(r["layer"]) <= CHANGED_BLOCK)
    projection = rows(tmp_path / "out/base__to__unl/row_space_projection/row_space_projection.csv")
    assert {int(r["mlp_layer"]) for r in projection if int(r["dW_rank"]) > 0} == {CHANGED_BLOCK}
