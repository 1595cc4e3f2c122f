"""``run_params``: compare two checkpoints in parameter space and write every output folder.

    OUT/param_stats/          per_matrix.csv, per_layer.csv, quantization_flips.csv, summary.json
    OUT/param_plots/          layer_locality, spectral_norm, stable_rank, rank_comparison PNGs
    OUT/mlp_attn_analysis/    mlp_attn_summary.csv, summary.json, mlp_vs_attn.png
    OUT/null_space_analysis/  null_space_results.csv, summary.json, null_space_analysis.png
    OUT/mlp_nullspace/        mlp_nullspace.csv, summary.json, mlp_nullspace.png

Each folder's completion marker is written last; a folder whose marker records the same options
is skipped on a rerun unless ``force``. Both checkpoints are read one matrix at a time.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from statistics import median
from typing import Any, Sequence

import numpy as np

from analyses.io import COMPLETE_MARKER, atomic_write_csv, atomic_write_json, clear_complete, mark_complete
from analyses.weights.checkpoints import Checkpoint, open_checkpoint
from analyses.weights.params_pairs import MatrixPair, map_pairs, pair_linear_weights
from analyses.weights.params_stats import (
    MLP_ATTN_COLUMNS,
    MLP_NULLSPACE_COLUMNS,
    NULL_SPACE_COLUMNS,
    analyse_matrix,
    headline_summary,
    mlp_attn_table,
    per_layer,
    per_layer_columns,
    per_matrix_columns,
)
from analyses.weights.quantization import FLIP_COLUMNS, flip_summary
from unlearn_lens.core import outputs
from unlearn_lens.core.errors import UserError
from unlearn_lens.core.identity import inputs_record
from unlearn_lens.core.limits import at_least_message

#: Bumped when an output's contents change meaning, so that older complete folders are recomputed
#: (2: embedding rows, dW's empirical rank by default, null-space sample among changed matrices,
#: quantization_flips.csv; 3: int4 at group 128 and 32, predicted in bfloat16, attack_quantizes).
OUTPUTS_VERSION = 3
STEPS = ("stats", "mlp_attn", "null_space", "mlp_nullspace")
FOLDERS = {
    "stats": (outputs.PARAM_STATS, outputs.PARAM_PLOTS),
    "mlp_attn": (outputs.MLP_ATTN,),
    "null_space": (outputs.NULL_SPACE,),
    "mlp_nullspace": (outputs.MLP_NULLSPACE,),
}


def matrix_changed(ckpt_a: Checkpoint, ckpt_b: Checkpoint, pair: MatrixPair) -> bool:
    """Whether the two checkpoints' values of one matrix differ (read as stored, compared exactly)."""
    return not np.array_equal(ckpt_a.read(pair.name, None), ckpt_b.read(pair.name, None))


def sample_pairs(pairs: Sequence[MatrixPair], num: int, seed: int) -> list[MatrixPair]:
    """``num`` matrices drawn without replacement with a fixed seed, kept in model order."""
    if num <= 0:
        return []
    if num >= len(pairs):
        return list(pairs)
    chosen = np.random.default_rng(seed).choice(len(pairs), size=num, replace=False)
    return [pairs[i] for i in sorted(int(i) for i in chosen)]


def _finished(folder: Path, options: dict, inputs: dict) -> bool:
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("options") == options and outputs.is_complete(folder, inputs)
    except ValueError:
        return False


def run_params(
    model_a: str,
    model_b: str,
    outdir: str | Path,
    *,
    empirical_rank: bool = False,
    num_matrices: int = 50,
    workers: int = 1,
    seed: int = 0,
    revision_a: str | None = None,
    revision_b: str | None = None,
    steps: Sequence[str] = STEPS,
    subspace_k: int = 10,
    rank_rtol: float | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Compute the parameter-space diagnostics of ``model_b`` against ``model_a``; returns the headline summary."""
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        raise UserError(f"unknown step {unknown[0]!r}; choose from {', '.join(STEPS)}")
    if subspace_k < 1:
        raise UserError(at_least_message("--subspace-k", 1, subspace_k))
    if rank_rtol is not None and not (0 < rank_rtol < 1):
        raise UserError(f"--rank-rtol must be in (0, 1), got {rank_rtol}")
    outdir = Path(outdir)
    options = {"model_a": model_a, "model_b": model_b, "revision_a": revision_a, "revision_b": revision_b,
               "empirical_rank": empirical_rank, "num_matrices": num_matrices, "seed": seed,
               "subspace_k": subspace_k, "rank_rtol": rank_rtol, "outputs_version": OUTPUTS_VERSION}
    # a model rewritten in place (its files' sizes and times) is another input: its folders are recomputed
    inputs = inputs_record(models=[("model_a", model_a, revision_a), ("model_b", model_b, revision_b)])
    todo = [s for s in STEPS
            if s in steps and (force or not all(_finished(outdir / f, options, inputs) for f in FOLDERS[s]))]
    if not todo:
        return {"skipped": True, "outdir": str(outdir)}

    started = time.time()
    ckpt_a = open_checkpoint(model_a, revision_a)
    ckpt_b = open_checkpoint(model_b, revision_b)
    pairs = pair_linear_weights(ckpt_a, ckpt_b)
    need_stats = "stats" in todo or "mlp_attn" in todo
    for step in todo:
        for folder in FOLDERS[step]:
            clear_complete(outdir / folder)

    jobs = [p for p in pairs if need_stats or ("mlp_nullspace" in todo and p.group == "mlp")]
    results = _run_jobs(jobs, ckpt_a, ckpt_b, workers, need_stats, empirical_rank, set(), subspace_k,
                        "mlp_nullspace" in todo, rank_rtol)
    label = f"A = {model_a}  vs  B = {model_b}"
    rows = [r["stats"] for r in results if r["stats"] is not None]
    sampling: dict[str, Any] = {}
    if "null_space" in todo:
        # sample among the matrices the intervention changed: an unchanged one has no update geometry
        if need_stats:
            changed_names = {r["name"] for r in rows if float(r["dW_fro"]) > 0}
            changed = [p for p in pairs if p.name in changed_names]
        else:
            flags = map_pairs(matrix_changed, pairs, ckpt_a, ckpt_b, workers, desc="changed matrices")
            changed = [p for p, flag in zip(pairs, flags) if flag]
        chosen = sample_pairs(changed, num_matrices, seed)
        sampling = {"num_changed": len(changed), "num_total": len(pairs), "sampled_from": "changed matrices",
                    "sampled": [p.name for p in chosen]}
        part = _run_jobs(chosen, ckpt_a, ckpt_b, workers, False, False, {p.name for p in chosen}, subspace_k,
                         False, rank_rtol)
        results = results + part
    layer_rows = per_layer(rows, empirical_rank) if need_stats else []
    summary = headline_summary(rows, layer_rows) if need_stats else {}
    meta = {"inputs": inputs, "options": options, "family": ckpt_a.family}

    if "stats" in todo:
        flips = [row for r in results if r.get("quantization") for row in r["quantization"]]
        _write_stats(outdir, rows, layer_rows, summary, empirical_rank, label, meta, started, flips)
    if "mlp_attn" in todo:
        _write_mlp_attn(outdir / outputs.MLP_ATTN, layer_rows, summary, label, meta)
    if "null_space" in todo:
        table = [r["null_space"] for r in results if r["null_space"] is not None]
        _write_null_space(outdir / outputs.NULL_SPACE, table, subspace_k, seed, label, meta, sampling)
    if "mlp_nullspace" in todo:
        table = [r["mlp_nullspace"] for r in results if r["mlp_nullspace"] is not None]
        _write_mlp_nullspace(outdir / outputs.MLP_NULLSPACE, table, rank_rtol, label, meta)
    return {**summary, "outdir": str(outdir), "steps": todo, "seconds": time.time() - started}


def _run_jobs(jobs, ckpt_a, ckpt_b, workers, need_stats, empirical_rank, sampled, subspace_k, mlp_nullspace,
              rank_rtol) -> list[dict[str, Any]]:
    # Group jobs by the options they need so that each worker call is a plain function + kwargs.
    base = {"stats": need_stats, "empirical_rank": empirical_rank, "subspace_k": subspace_k,
            "mlp_nullspace": mlp_nullspace, "rank_rtol": rank_rtol}
    flagged = [(p, p.name in sampled) for p in jobs]
    out: list[dict[str, Any] | None] = [None] * len(jobs)
    for flag in (False, True):
        index = [i for i, (_, f) in enumerate(flagged) if f == flag]
        if not index:
            continue
        part = map_pairs(analyse_matrix, [jobs[i] for i in index], ckpt_a, ckpt_b, workers,
                         {**base, "null_space": flag}, desc="null-space matrices" if flag else "matrices")
        for i, result in zip(index, part):
            out[i] = result
    return [r for r in out if r is not None]


def _write_stats(outdir, rows, layer_rows, summary, empirical_rank, label, meta, started, flips) -> None:
    from analyses.weights.params_plots import plot_param_stats

    stats_dir, plots_dir = outdir / outputs.PARAM_STATS, outdir / outputs.PARAM_PLOTS
    atomic_write_csv(stats_dir / outputs.PER_MATRIX_CSV, rows, per_matrix_columns(empirical_rank))
    atomic_write_csv(stats_dir / outputs.PER_LAYER_CSV, layer_rows, per_layer_columns(empirical_rank))
    atomic_write_csv(stats_dir / "quantization_flips.csv", flips, FLIP_COLUMNS)
    atomic_write_json(stats_dir / "summary.json", {**summary, "family": meta["family"], **meta["options"],
                                                    "quantization_flips": flip_summary(flips),
                                                    "seconds": time.time() - started})
    mark_complete(stats_dir, meta)
    plot_param_stats(plots_dir, rows, layer_rows, label)
    mark_complete(plots_dir, meta)


def _write_mlp_attn(folder, layer_rows, summary, label, meta) -> None:
    from analyses.weights.params_plots import plot_mlp_attn

    table = mlp_attn_table(layer_rows)
    atomic_write_csv(folder / "mlp_attn_summary.csv", table, MLP_ATTN_COLUMNS)
    finite = [r["mlp_attn_ratio"] for r in table if math.isfinite(r["mlp_attn_ratio"])]
    atomic_write_json(folder / "summary.json", {
        "mlp_energy_share": summary.get("mlp_energy_share", 0.0),
        "attn_energy_share": summary.get("attn_energy_share", 0.0),
        "mlp_dW_fro_rel": summary.get("mlp_dW_fro_rel", 0.0),
        "attn_dW_fro_rel": summary.get("attn_dW_fro_rel", 0.0),
        "median_mlp_attn_ratio": float(median(finite)) if finite else 0.0,
        "layers_mlp_dominant": [r["layer"] for r in table if r["mlp_energy_share"] > 0.5],
        "layers_attn_dominant": [r["layer"] for r in table if 0 < r["mlp_attn_ratio"] < 1 or
                                 (r["attn_dW_fro"] > 0 and r["mlp_dW_fro"] == 0)],
        "ratio_definition": "mlp_attn_ratio = mlp_dW_fro_rel / attn_dW_fro_rel (0/0 = 0, x/0 = inf)",
    })
    plot_mlp_attn(folder, table, label)
    mark_complete(folder, meta)


def _write_null_space(folder, table, subspace_k, seed, label, meta, sampling) -> None:
    from analyses.weights.params_plots import plot_null_space

    atomic_write_csv(folder / outputs.NULL_SPACE_CSV, table, NULL_SPACE_COLUMNS)
    def med(key: str) -> float:
        return float(median(float(r[key]) for r in table)) if table else 0.0
    atomic_write_json(folder / "summary.json", {
        "num_matrices": len(table), "seed": seed, "subspace_k": subspace_k, **sampling,
        "median_top10_energy_share": med("top10_energy_share"),
        "median_dW_effective_rank_99": med("dW_effective_rank_99"),
        "median_left_grassmann_distance": med("left_grassmann_distance"),
        "median_right_grassmann_distance": med("right_grassmann_distance"),
        "definitions": {
            "top10_energy_share": "sum of the 10 largest sigma_i(dW)^2 / ||dW||_F^2",
            "dW_effective_rank_99": "fewest singular values of dW holding 99% of ||dW||_F^2",
            "grassmann_distance": "sqrt(sum theta_i^2) over the principal angles between the top-k "
                                  "left (resp. right) singular subspaces of W_a and W_b, k = subspace_k",
            "mean_cos2": "mean cos^2 of those principal angles (1 = same subspace)",
        },
    })
    plot_null_space(folder, table, label)
    mark_complete(folder, meta)


def _write_mlp_nullspace(folder, table, rank_rtol, label, meta) -> None:
    from analyses.weights.params_plots import plot_mlp_nullspace

    atomic_write_csv(folder / outputs.MLP_NULLSPACE_CSV, table, MLP_NULLSPACE_COLUMNS)
    energy = sum(float(r["dW_fro"]) ** 2 for r in table)
    def weighted(key: str) -> float:
        return sum(float(r[key]) * float(r["dW_fro"]) ** 2 for r in table) / energy if energy > 0 else 0.0
    atomic_write_json(folder / "summary.json", {
        "num_matrices": len(table),
        "rank_rtol": rank_rtol if rank_rtol is not None else "max(shape) * eps(float32) per matrix (see rank_rtol column)",
        "rank_rule": "rank(W) = number of singular values > rank_rtol * sigma_1(W)",
        "col_null_share_weighted": weighted("col_null_share"),
        "row_null_share_weighted": weighted("row_null_share"),
        "definitions": {
            "col_space_share": "||U_r^T dW||_F^2 / ||dW||_F^2, U_r = W's column-space basis (output side)",
            "row_space_share": "||dW V_r||_F^2 / ||dW||_F^2, V_r = W's row-space basis (input side)",
            "*_null_share": "1 - the space share: the update's energy off W's span (0 when dW = 0)",
            "weighted": "averaged over matrices with weights ||dW||_F^2",
        },
    })
    plot_mlp_nullspace(folder, table, label)
    mark_complete(folder, meta)
