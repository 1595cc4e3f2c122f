"""Parameter-space diagnostics: planted known answers, numpy full-SVD references, errors, CLI."""

from __future__ import annotations

import csv
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from analyses.weights.params import run_params, sample_pairs
from analyses.weights.params_stats import (
    MLP_ATTN_COLUMNS,
    MLP_NULLSPACE_COLUMNS,
    NULL_SPACE_COLUMNS,
    per_layer_columns,
    per_matrix_columns,
)
from unlearn_lens.core.errors import UserError

FAST = dict(steps=("stats",), num_matrices=0)


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """The CPU is shared: multi-threaded LAPACK on busy cores is slow and no more exact."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def header(path: Path) -> list[str]:
    with open(path, newline="") as handle:
        return next(csv.reader(handle))


def clone_with(src: Path, dst: Path, edit) -> Path:
    """Copy a saved model directory and apply ``edit(tensors)`` to its safetensors weights."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def orthonormal(rng, n: int, r: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((n, r)))[0]


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory) -> Path:
    from unlearn_lens.testing import save_tiny_model

    return save_tiny_model("gpt_neox", tmp_path_factory.mktemp("neox") / "base")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    from unlearn_lens.testing import save_tiny_model

    return save_tiny_model("llama", tmp_path_factory.mktemp("llama") / "base")


PLANTS = {  # name -> rank of the planted update
    "gpt_neox.layers.1.mlp.dense_h_to_4h.weight": 2,
    "gpt_neox.layers.2.attention.dense.weight": 3,
}


@pytest.fixture(scope="module")
def planted_dir(neox_dir, tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)

    def edit(tensors):
        for name, rank in PLANTS.items():
            m, n = tensors[name].shape
            # equal singular values: each direction holds 1/r of the energy, so the 99% rank is r
            tensors[name] = (tensors[name] + 0.05 * orthonormal(rng, m, rank) @ orthonormal(rng, n, rank).T).astype(np.float32)

    return clone_with(neox_dir, tmp_path_factory.mktemp("planted") / "model", edit)


@pytest.fixture(scope="module")
def planted_out(neox_dir, planted_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("planted_out")
    run_params(str(neox_dir), str(planted_dir), out, empirical_rank=True, num_matrices=6, seed=0)
    return out


def test_planted_low_rank_update(planted_out):
    rows = read_csv(planted_out / "param_stats" / "per_matrix.csv")
    assert len(rows) == 3 * 4 + 2  # blocks, then the input embedding and the untied unembedding
    embed = {r["name"]: r for r in rows if r["group"] == "embed"}
    assert set(embed) == {"gpt_neox.embed_in.weight", "embed_out.weight"}
    assert all(int(r["layer"]) == -1 and float(r["W_fro"]) > 0 for r in embed.values())
    for row in rows:
        if row["name"] in PLANTS:
            rank = PLANTS[row["name"]]
            assert int(row["dW_empirical_rank"]) == rank
            assert 1 - 1e-6 <= float(row["dW_stable_rank"]) <= rank + 1e-6
            # F64: equal planted singular values give a stable rank of exactly k (float64 SVD: 1e-6)
            assert float(row["dW_stable_rank"]) == pytest.approx(rank, rel=1e-6)  # equal singular values
            # F32 weights: the planted spectral norm 0.05 read back from float32 checkpoints (1e-4)
            assert float(row["dW_spectral"]) == pytest.approx(0.05, rel=1e-4)
        else:
            assert float(row["dW_fro"]) == 0.0 and float(row["dW_spectral"]) == 0.0
            assert int(row["dW_empirical_rank"]) == 0 and float(row["dW_stable_rank"]) == 0.0
    layers = read_csv(planted_out / "param_stats" / "per_layer.csv")
    changed = {(int(r["layer"]), r["group"]) for r in layers if float(r["dW_fro_layer"]) > 0}
    assert changed == {(1, "mlp"), (2, "attn")}
    assert all(int(r["count_mats"]) == 2 for r in layers)
    assert {(int(r["layer"]), r["group"]) for r in layers if int(r["layer"]) < 0} == {(-1, "embed")}
    import json

    summary = json.loads((planted_out / "param_stats" / "summary.json").read_text())
    assert {entry["layer"] for entry in summary["top_changed_layers"][:2]} == {1, 2}
    assert summary["mlp_energy_share"] + summary["attn_energy_share"] == pytest.approx(1.0)
    assert summary["mlp_energy_share"] == pytest.approx(2 / 5, rel=1e-3)  # energies 2 * 0.05^2 vs 3 * 0.05^2
    assert summary["embed_energy_share"] == 0.0 and summary["num_layers"] == 3
    ratio = read_csv(planted_out / "mlp_attn_analysis" / "mlp_attn_summary.csv")
    by_layer = {int(r["layer"]): r for r in ratio}
    assert float(by_layer[1]["mlp_energy_share"]) == 1.0 and math.isinf(float(by_layer[1]["mlp_attn_ratio"]))
    assert float(by_layer[2]["mlp_energy_share"]) == 0.0 and float(by_layer[2]["mlp_attn_ratio"]) == 0.0
    assert float(by_layer[0]["mlp_attn_ratio"]) == 0.0  # 0/0 -> 0


def test_metrics_match_numpy_full_svd(neox_dir, planted_dir, planted_out):
    base = load_file(str(neox_dir / "model.safetensors"))
    new = load_file(str(planted_dir / "model.safetensors"))
    for row in read_csv(planted_out / "param_stats" / "per_matrix.csv"):
        w = base[row["name"]].astype(np.float64)
        dw = new[row["name"]].astype(np.float64) - w
        s_w, s_dw = np.linalg.svd(w, compute_uv=False), np.linalg.svd(dw, compute_uv=False)
        expected = {
            "dW_fro": np.sqrt(np.sum(s_dw**2)), "W_fro": np.sqrt(np.sum(s_w**2)),
            "dW_spectral": s_dw[0], "W_spectral": s_w[0],
            "W_stable_rank": np.sum(s_w**2) / s_w[0] ** 2,
        }
        expected["dW_fro_rel"] = expected["dW_fro"] / expected["W_fro"]
        expected["dW_spectral_rel"] = expected["dW_spectral"] / expected["W_spectral"]
        for key, value in expected.items():
            # tolerance: Lanczos (eigsh) against numpy's full SVD: the solver converges to rtol ~1e-6;
            # 1e-4 leaves room for float32 weights
            assert float(row[key]) == pytest.approx(value, rel=1e-4, abs=1e-9), (row["name"], key)
        energy = np.cumsum(s_w**2)
        assert int(row["W_empirical_rank"]) == int(np.searchsorted(energy, 0.99 * energy[-1]) + 1)


def test_null_space_step(planted_out, neox_dir, planted_dir):
    table = read_csv(planted_out / "null_space_analysis" / "null_space_results.csv")
    assert header(planted_out / "null_space_analysis" / "null_space_results.csv") == NULL_SPACE_COLUMNS
    assert {r["name"] for r in table} == set(PLANTS)  # only the 2 changed matrices, though 6 were asked for
    import json

    summary = json.loads((planted_out / "null_space_analysis" / "summary.json").read_text())
    assert summary["num_changed"] == 2 and summary["sampled_from"] == "changed matrices"
    assert sorted(summary["sampled"]) == sorted(PLANTS)
    base = load_file(str(neox_dir / "model.safetensors"))
    new = load_file(str(planted_dir / "model.safetensors"))
    from scipy.linalg import subspace_angles

    for row in table:
        w_a = base[row["name"]].astype(np.float64)
        w_b = new[row["name"]].astype(np.float64)
        k = int(row["subspace_k"])
        assert k == 10
        u_a, _, vt_a = np.linalg.svd(w_a)
        u_b, _, vt_b = np.linalg.svd(w_b)
        left = np.sqrt(np.sum(subspace_angles(u_a[:, :k], u_b[:, :k]) ** 2))
        right = np.sqrt(np.sum(subspace_angles(vt_a[:k].T, vt_b[:k].T) ** 2))
        assert float(row["left_grassmann_distance"]) == pytest.approx(left, rel=1e-4, abs=1e-9)
        assert float(row["right_grassmann_distance"]) == pytest.approx(right, rel=1e-4, abs=1e-9)
        if row["name"] in PLANTS:
            assert float(row["top10_energy_share"]) == pytest.approx(1.0, abs=1e-6)
            assert int(row["dW_effective_rank_99"]) == PLANTS[row["name"]]
        else:
            assert float(row["top10_energy_share"]) == 0.0 and int(row["dW_effective_rank_99"]) == 0
            assert float(row["left_grassmann_distance"]) == 0.0 and float(row["right_grassmann_distance"]) == 0.0


def test_null_space_alone_samples_changed_and_dw_rank_by_default(neox_dir, planted_dir, tmp_path):
    """Without the stats step the changed matrices are found by comparing the stored tensors; dW's
    empirical rank is in per_matrix.csv without --empirical-rank, W's is not."""
    run_params(str(neox_dir), str(planted_dir), tmp_path / "ns", steps=("null_space",), num_matrices=50, seed=3)
    table = read_csv(tmp_path / "ns" / "null_space_analysis" / "null_space_results.csv")
    assert sorted(r["name"] for r in table) == sorted(PLANTS) and not (tmp_path / "ns" / "param_stats").exists()
    run_params(str(neox_dir), str(planted_dir), tmp_path / "st", **FAST)
    path = tmp_path / "st" / "param_stats" / "per_matrix.csv"
    assert "dW_empirical_rank" in header(path) and "W_empirical_rank" not in header(path)
    for row in read_csv(path):
        assert int(row["dW_empirical_rank"]) == PLANTS.get(row["name"], 0)


def test_sample_is_seeded(planted_out):
    from analyses.weights.params_pairs import MatrixPair

    pairs = [MatrixPair(f"m{i}", i, "mlp", "up", (2, 2)) for i in range(20)]
    assert sample_pairs(pairs, 5, 0) == sample_pairs(pairs, 5, 0)
    assert sample_pairs(pairs, 5, 0) != sample_pairs(pairs, 5, 1)
    assert sample_pairs(pairs, 50, 0) == pairs and sample_pairs(pairs, 0, 0) == []


def test_mlp_nullspace_planted(llama_dir, tmp_path):
    """Updates planted in W's left / right complement are ~100% off-space; W-shaped ones 100% in."""
    rng = np.random.default_rng(5)
    up, down, gate = ("model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight",
                      "model.layers.2.mlp.gate_proj.weight")

    def edit(t):
        w = t[up].astype(np.float64)  # 96 x 32: column space is 32-dim in R^96
        u = np.linalg.svd(w, full_matrices=False)[0]
        x = rng.standard_normal(w.shape)
        t[up] = (w + 0.01 * (x - u @ (u.T @ x))).astype(np.float32)
        w = t[down].astype(np.float64)  # 32 x 96: row space is 32-dim in R^96
        vt = np.linalg.svd(w, full_matrices=False)[2]
        x = rng.standard_normal(w.shape)
        t[down] = (w + 0.01 * (x - (x @ vt.T) @ vt)).astype(np.float32)
        t[gate] = (t[gate] * 1.01).astype(np.float32)  # dW = 0.01 W: inside both spaces

    modified = clone_with(llama_dir, tmp_path / "m", edit)
    out = tmp_path / "out"
    run_params(str(llama_dir), str(modified), out, steps=("mlp_nullspace",))
    assert header(out / "mlp_nullspace" / "mlp_nullspace.csv") == MLP_NULLSPACE_COLUMNS
    rows = {r["name"]: r for r in read_csv(out / "mlp_nullspace" / "mlp_nullspace.csv")}
    assert len(rows) == 3 * 3 and not (out / "param_stats").exists()
    # float32 storage leaves ~1e-7 of the energy in the span
    assert float(rows[up]["col_null_share"]) > 0.999 and int(rows[up]["W_rank"]) == 32
    assert float(rows[down]["row_null_share"]) > 0.999
    assert float(rows[gate]["col_space_share"]) == pytest.approx(1.0, abs=1e-6)
    assert float(rows[gate]["row_space_share"]) == pytest.approx(1.0, abs=1e-6)
    untouched = rows["model.layers.0.mlp.down_proj.weight"]
    assert float(untouched["dW_fro"]) == 0.0 and float(untouched["col_null_share"]) == 0.0
    assert float(untouched["rank_rtol"]) == pytest.approx(96 * np.finfo(np.float32).eps)
    assert (out / "mlp_nullspace" / "_COMPLETE").is_file()


def test_identical_models_give_zeros(llama_dir, tmp_path):
    run_params(str(llama_dir), str(llama_dir), tmp_path, empirical_rank=True, num_matrices=4)
    for folder, name in [("param_stats", "per_matrix.csv"), ("param_stats", "per_layer.csv"),
                         ("mlp_attn_analysis", "mlp_attn_summary.csv"),
                         ("null_space_analysis", "null_space_results.csv"), ("mlp_nullspace", "mlp_nullspace.csv")]:
        for row in read_csv(tmp_path / folder / name):
            for key, value in row.items():
                if key.startswith(("dW", "mlp_", "attn_", "mean_dW", "max_dW", "top10", "left_g", "right_g",
                                   "col_", "row_")):
                    assert float(value) == 0.0, (name, key, value)
                if key not in ("name", "group", "role"):
                    assert math.isfinite(float(value)), (name, key)
    import json

    summary = json.loads((tmp_path / "param_stats" / "summary.json").read_text())
    assert summary["identical"] and summary["total_dW_fro_rel"] == 0.0 and summary["top_changed_layers"] == []


def test_mismatches_are_one_line_errors(neox_dir, llama_dir, tmp_path):
    from unlearn_lens.testing import save_tiny_model

    wider = save_tiny_model("gpt_neox", tmp_path / "wider", hidden=48)
    with pytest.raises(UserError, match=r"shapes differ: tensor gpt_neox\.embed_in\.weight"):  # model order
        run_params(str(neox_dir), str(wider), tmp_path / "o1", **FAST)
    deeper = save_tiny_model("gpt_neox", tmp_path / "deeper", layers=4)
    with pytest.raises(UserError, match=r"tensor gpt_neox\.layers\.3\.attention\.dense\.weight is in model B"):
        run_params(str(neox_dir), str(deeper), tmp_path / "o2", **FAST)
    with pytest.raises(UserError, match="architectures differ: model A is gpt_neox, model B is llama"):
        run_params(str(neox_dir), str(llama_dir), tmp_path / "o3", **FAST)
    with pytest.raises(UserError, match="unknown step"):
        run_params(str(neox_dir), str(neox_dir), tmp_path / "o4", steps=("bogus",))


def test_gpt2_orientation(tmp_path):
    from unlearn_lens.testing import save_tiny_model

    base = save_tiny_model("gpt2", tmp_path / "base")
    rng = np.random.default_rng(2)
    name = "transformer.h.1.mlp.c_fc.weight"  # stored (in=32, out=128)
    u, v = rng.standard_normal(128), rng.standard_normal(32)

    def edit(t):
        t[name] = (t[name] + np.outer(v, u) * 1e-2).astype(np.float32)  # rank 1 in the stored layout

    modified = clone_with(base, tmp_path / "mod", edit)
    run_params(str(base), str(modified), tmp_path / "out", **FAST)
    rows = {r["name"]: r for r in read_csv(tmp_path / "out" / "param_stats" / "per_matrix.csv")}
    assert (int(rows[name]["shape0"]), int(rows[name]["shape1"])) == (128, 32)  # (out, in)
    assert {n for n, r in rows.items() if r["group"] == "embed"} == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert (int(rows["transformer.h.0.attn.c_attn.weight"]["shape0"]), int(rows["transformer.h.0.attn.c_attn.weight"]["shape1"])) == (96, 32)
    assert float(rows[name]["dW_stable_rank"]) == pytest.approx(1.0, rel=1e-5)
    assert float(rows[name]["dW_spectral"]) == pytest.approx(1e-2 * np.linalg.norm(u) * np.linalg.norm(v), rel=1e-4)


def test_two_workers_same_csv(neox_dir, planted_dir, planted_out, tmp_path):
    run_params(str(neox_dir), str(planted_dir), tmp_path, empirical_rank=True, num_matrices=6, seed=0, workers=2)
    for folder, name in [("param_stats", "per_matrix.csv"), ("param_stats", "per_layer.csv"),
                         ("null_space_analysis", "null_space_results.csv"), ("mlp_nullspace", "mlp_nullspace.csv"),
                         ("mlp_attn_analysis", "mlp_attn_summary.csv")]:
        assert (tmp_path / folder / name).read_bytes() == (planted_out / folder / name).read_bytes(), name


def test_cli_end_to_end(neox_dir, planted_dir, tmp_path):
    from cli import main

    out = tmp_path / "out"
    args = ["params", "--model-a", str(neox_dir), "--model-b", str(planted_dir), "--outdir", str(out),
            "--empirical-rank", "--num-matrices", "1", "--seed", "1", "--workers", "1"]
    main(args)
    expected = {
        "param_stats": ["per_matrix.csv", "per_layer.csv", "quantization_flips.csv", "summary.json"],
        "param_plots": ["layer_locality.png", "spectral_norm.png", "stable_rank.png", "rank_comparison.png"],
        "mlp_attn_analysis": ["mlp_attn_summary.csv", "summary.json", "mlp_vs_attn.png"],
        "null_space_analysis": ["null_space_results.csv", "summary.json", "null_space_analysis.png"],
        "mlp_nullspace": ["mlp_nullspace.csv", "summary.json", "mlp_nullspace.png"],
    }
    for folder, files in expected.items():
        for file in files + ["_COMPLETE"]:
            assert (out / folder / file).is_file(), (folder, file)
        for png in (f for f in files if f.endswith(".png")):
            assert (out / folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert header(out / "param_stats" / "per_matrix.csv") == per_matrix_columns(True)
    assert header(out / "param_stats" / "per_layer.csv") == per_layer_columns(True)
    assert header(out / "mlp_attn_analysis" / "mlp_attn_summary.csv") == MLP_ATTN_COLUMNS
    assert len(read_csv(out / "null_space_analysis" / "null_space_results.csv")) == 1  # 1 of the 2 changed
    # a rerun with the same options is skipped; without --empirical-rank the columns are the base set
    stamp = (out / "param_stats" / "per_matrix.csv").stat().st_mtime_ns
    main(args)
    assert (out / "param_stats" / "per_matrix.csv").stat().st_mtime_ns == stamp
    main(args[:7] + ["--steps", "stats"])
    assert header(out / "param_stats" / "per_matrix.csv") == per_matrix_columns(False)
    assert header(out / "param_stats" / "per_layer.csv") == per_layer_columns(False)


def test_cli_user_error_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "cli.py", "params", "--model-a", str(tmp_path / "nope"), "--model-b", str(tmp_path / "nope"),
         "--outdir", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no such model" in result.stderr
    assert "Traceback" not in result.stderr


def test_params_modules_are_torch_free():
    code = ("import sys, analyses.weights.params, analyses.weights.params_plots, analyses.commands.params, "
            "analyses.weights.quantization; "
            "bad=[m for m in sys.modules if m.split('.')[0] in ('torch','transformers','nnsight')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.slow
@pytest.mark.smollm2
def test_gguf_against_its_dequantized_dir(smollm2_gguf, smollm2_dir, tmp_path):
    """The GGUF reader and transformers' dequantization agree: dW is exactly zero on every matrix."""
    summary = run_params(str(smollm2_gguf), str(smollm2_dir), tmp_path, steps=("stats",), num_matrices=0)
    assert summary["num_matrices"] == 30 * 7 + 1 and summary["identical"]  # 7 per block + the tied embedding
    rows = read_csv(tmp_path / "param_stats" / "per_matrix.csv")
    assert all(float(r["W_spectral"]) > 0 and float(r["W_stable_rank"]) >= 1 for r in rows)


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_rmu_like_update_fills_every_cell(smollm2_dir, tmp_path):
    """RMU-like: rank-4 updates of 3 of SmolLM2's 211 matrices (down-projections 5..7). The null-space
    step samples exactly those, dW's rank is found by default and the flips are predicted."""
    rng = np.random.default_rng(0)
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in (5, 6, 7)]

    def edit(t):
        for name in names:
            m, n = t[name].shape
            t[name] = (t[name] + 0.01 * orthonormal(rng, m, 4) @ orthonormal(rng, n, 4).T).astype(t[name].dtype)

    modified = clone_with(smollm2_dir, tmp_path / "rmu", edit)
    summary = run_params(str(smollm2_dir), str(modified), tmp_path / "out")
    assert summary["num_matrices"] == 30 * 7 + 1  # blocks and the (tied) embedding
    import json

    null_space = json.loads((tmp_path / "out" / "null_space_analysis" / "summary.json").read_text())
    assert null_space["num_changed"] == 3 and sorted(null_space["sampled"]) == sorted(names)
    assert null_space["median_top10_energy_share"] == pytest.approx(1.0, abs=1e-5)
    rows = {r["name"]: r for r in read_csv(tmp_path / "out" / "param_stats" / "per_matrix.csv")}
    assert all(int(rows[n]["dW_empirical_rank"]) == 4 for n in names)
    flips = json.loads((tmp_path / "out" / "param_stats" / "summary.json").read_text())["quantization_flips"]
    assert flips["int8"]["matrices_changed"] == 3 and flips["int8"]["n_flipped"] > 0
