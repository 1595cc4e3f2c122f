"""Per-matrix and per-layer statistics of the update dW = W_b - W_a: the rows of ``param_stats/``,
``mlp_attn_analysis/``, ``null_space_analysis/`` and ``mlp_nullspace/``.

``analyse_matrix`` is the one per-matrix job: it reads W_a and W_b once and computes every
quantity asked of that matrix (norms and ranks, and where requested the subspace and
null-space measures), so each tensor is read a single time. The aggregations below turn its
rows into the per-layer tables.
"""

from __future__ import annotations

import math
from collections import defaultdict
from statistics import median
from typing import Any, Iterable, Sequence

import numpy as np

from analyses.weights.checkpoints import Checkpoint
from analyses.weights.params_linalg import (
    RANK_ENERGY,
    Spectrum,
    frobenius_sq,
    grassmann_distance,
    principal_angles,
    safe_ratio,
    space_shares,
    stable_rank,
    top_singular_subspaces,
)
from analyses.weights.params_pairs import MatrixPair
from analyses.weights.quantization import flip_rows

PER_MATRIX_COLUMNS = [
    "name", "layer", "group", "shape0", "shape1", "dW_fro", "W_fro", "dW_fro_rel", "dW_spectral",
    "W_spectral", "dW_spectral_rel", "dW_stable_rank", "W_stable_rank",
]
#: The update's 99 % empirical rank: always computed (0 for an unchanged matrix, without work).
DW_RANK_COLUMN = "dW_empirical_rank"
#: The base weight's empirical rank: only with ``--empirical-rank`` (near-full rank: every eigenvalue).
EMPIRICAL_COLUMNS = ["W_empirical_rank"]
PER_LAYER_COLUMNS = [
    "layer", "group", "dW_fro_layer", "W_fro_layer", "dW_fro_layer_rel", "max_dW_spectral",
    "max_W_spectral", "max_dW_spectral_rel", "mean_dW_stable_rank", "mean_dW_empirical_rank", "count_mats",
]
NULL_SPACE_COLUMNS = [
    "name", "layer", "group", "shape0", "shape1", "dW_fro", "top10_energy_share", "dW_effective_rank_99",
    "subspace_k", "left_grassmann_distance", "left_max_angle_deg", "left_mean_cos2",
    "right_grassmann_distance", "right_max_angle_deg", "right_mean_cos2",
]
MLP_NULLSPACE_COLUMNS = [
    "name", "layer", "role", "shape0", "shape1", "dW_fro", "W_rank", "rank_rtol", "col_space_share",
    "col_null_share", "row_space_share", "row_null_share",
]
MLP_ATTN_COLUMNS = [
    "layer", "mlp_dW_fro", "attn_dW_fro", "mlp_dW_fro_rel", "attn_dW_fro_rel", "mlp_attn_ratio",
    "mlp_attn_ratio_abs", "mlp_energy_share",
]
GROUPS = ("attn", "mlp", "embed")
#: Groups of the block matrices: the MLP / attention shares are shares of their energy only.
BLOCK_GROUPS = ("attn", "mlp")
TOP_K_ENERGY = 10


def read_pair(ckpt_a: Checkpoint, ckpt_b: Checkpoint, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(W_a, dW)`` as float32 (out, in); W_b's buffer is reused for dW."""
    w = ckpt_a.read_matrix(name)
    dw = ckpt_b.read_matrix(name)
    np.subtract(dw, w, out=dw)
    return w, dw


def matrix_stats(pair: MatrixPair, w: np.ndarray, dw: np.ndarray, empirical_rank: bool) -> dict[str, Any]:
    """One row of ``per_matrix.csv``.

    dW's empirical rank is always computed: cheap for the low-rank updates unlearning makes
    (top-k Lanczos against the known ||dW||_F^2) and free for an unchanged matrix (0). W's
    empirical rank, which needs every eigenvalue of a near-full-rank Gram matrix, only with
    ``empirical_rank``.
    """
    w_fro2, dw_fro2 = frobenius_sq(w), frobenius_sq(dw)
    spec_w, spec_dw = Spectrum(w, w_fro2), Spectrum(dw, dw_fro2)
    w_sigma, dw_sigma = spec_w.spectral_norm(), spec_dw.spectral_norm()
    row: dict[str, Any] = {
        "name": pair.name, "layer": pair.layer, "group": pair.group,
        "shape0": pair.shape[0], "shape1": pair.shape[1],
        "dW_fro": math.sqrt(dw_fro2), "W_fro": math.sqrt(w_fro2),
        "dW_fro_rel": safe_ratio(math.sqrt(dw_fro2), math.sqrt(w_fro2)),
        "dW_spectral": dw_sigma, "W_spectral": w_sigma,
        "dW_spectral_rel": safe_ratio(dw_sigma, w_sigma),
        "dW_stable_rank": stable_rank(dw_fro2, dw_sigma), "W_stable_rank": stable_rank(w_fro2, w_sigma),
    }
    row[DW_RANK_COLUMN] = spec_dw.empirical_rank(RANK_ENERGY)
    if empirical_rank:
        row["W_empirical_rank"] = spec_w.empirical_rank(RANK_ENERGY)
    row["_spectrum_dw"] = spec_dw  # reused by the null-space step; dropped before writing
    return row


def _angles_summary(prefix: str, angles: np.ndarray) -> dict[str, float]:
    cos2 = np.cos(angles) ** 2
    return {
        f"{prefix}_grassmann_distance": grassmann_distance(angles),
        f"{prefix}_max_angle_deg": float(np.degrees(angles.max())) if angles.size else 0.0,
        f"{prefix}_mean_cos2": float(cos2.mean()) if cos2.size else 1.0,
    }


def null_space_row(pair: MatrixPair, w: np.ndarray, dw: np.ndarray, spec_dw: Spectrum, subspace_k: int) -> dict[str, Any]:
    """A row of ``null_space_results.csv``: low-rankness of dW and alignment of W_a's and W_b's top-k
    singular subspaces."""
    top = spec_dw.top_energies(TOP_K_ENERGY)
    k = max(1, min(subspace_k, min(pair.shape)))
    if spec_dw.fro_sq == 0.0:  # identical matrices: identical subspaces, angles exactly 0
        left = right = np.zeros(k)
    else:
        u_a, _, v_a = top_singular_subspaces(w, k)
        u_b, _, v_b = top_singular_subspaces(w + dw, k)
        left, right = principal_angles(u_a, u_b), principal_angles(v_a, v_b)
    return {
        "name": pair.name, "layer": pair.layer, "group": pair.group,
        "shape0": pair.shape[0], "shape1": pair.shape[1], "dW_fro": math.sqrt(spec_dw.fro_sq),
        "top10_energy_share": min(1.0, safe_ratio(float(np.sum(top)), spec_dw.fro_sq)),
        "dW_effective_rank_99": spec_dw.empirical_rank(RANK_ENERGY),
        "subspace_k": k,
        **_angles_summary("left", left),
        **_angles_summary("right", right),
    }


def mlp_nullspace_row(pair: MatrixPair, w: np.ndarray, dw: np.ndarray, rank_rtol: float | None) -> dict[str, Any]:
    """A row of ``mlp_nullspace.csv``: share of ||dW||_F^2 in W's column/row space versus their complements."""
    shares = space_shares(w, dw, rank_rtol)
    return {"name": pair.name, "layer": pair.layer, "role": pair.role, "shape0": pair.shape[0],
            "shape1": pair.shape[1], "dW_fro": math.sqrt(frobenius_sq(dw)), **shares}


def analyse_matrix(
    ckpt_a: Checkpoint,
    ckpt_b: Checkpoint,
    pair: MatrixPair,
    *,
    stats: bool = True,
    empirical_rank: bool = False,
    null_space: bool = False,
    subspace_k: int = 10,
    mlp_nullspace: bool = False,
    rank_rtol: float | None = None,
) -> dict[str, dict[str, Any] | None]:
    """Everything asked of one matrix, from a single read of W_a and W_b.

    With ``stats``, also the quantization-flip rows (``out["quantization"]``), computed from the
    stored values of W_a and W_b before dW is formed (W_a + dW need not round back to W_b).
    """
    out: dict[str, Any] = {"stats": None, "null_space": None, "mlp_nullspace": None, "quantization": None}
    if stats:
        w, dw = ckpt_a.read_matrix(pair.name), ckpt_b.read_matrix(pair.name)
        out["quantization"] = flip_rows(pair.name, pair.layer, pair.group, pair.role, w, dw)
        np.subtract(dw, w, out=dw)
    else:
        w, dw = read_pair(ckpt_a, ckpt_b, pair.name)
    spec_dw = None
    if stats:
        row = matrix_stats(pair, w, dw, empirical_rank)
        spec_dw = row.pop("_spectrum_dw")
        out["stats"] = row
    if null_space:
        spec_dw = spec_dw or Spectrum(dw)
        out["null_space"] = null_space_row(pair, w, dw, spec_dw, subspace_k)
    if mlp_nullspace and pair.group == "mlp":
        out["mlp_nullspace"] = mlp_nullspace_row(pair, w, dw, rank_rtol)
    return out


# --- aggregation -------------------------------------------------------------------------------


def per_layer(rows: Iterable[dict[str, Any]], empirical_rank: bool) -> list[dict[str, Any]]:
    """Rows of ``per_layer.csv``: one per (layer, group), norms combined as root-sum-square."""
    buckets: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        buckets[(int(row["layer"]), str(row["group"]))].append(row)
    table = []
    for (layer, group), items in sorted(buckets.items()):
        dw = math.sqrt(sum(float(r["dW_fro"]) ** 2 for r in items))
        w = math.sqrt(sum(float(r["W_fro"]) ** 2 for r in items))
        max_dw = max(float(r["dW_spectral"]) for r in items)
        max_w = max(float(r["W_spectral"]) for r in items)
        entry = {
            "layer": layer, "group": group, "dW_fro_layer": dw, "W_fro_layer": w,
            "dW_fro_layer_rel": safe_ratio(dw, w), "max_dW_spectral": max_dw, "max_W_spectral": max_w,
            "max_dW_spectral_rel": safe_ratio(max_dw, max_w),
            "mean_dW_stable_rank": float(np.mean([float(r["dW_stable_rank"]) for r in items])),
            "count_mats": len(items),
        }
        entry["mean_dW_empirical_rank"] = float(np.mean([float(r[DW_RANK_COLUMN]) for r in items]))
        table.append(entry)
    return table


def per_layer_columns(empirical_rank: bool) -> list[str]:
    """Columns of ``per_layer.csv`` (the same with or without ``--empirical-rank``)."""
    return list(PER_LAYER_COLUMNS)


def per_matrix_columns(empirical_rank: bool) -> list[str]:
    """Columns of ``per_matrix.csv``: W's empirical rank only with ``--empirical-rank``."""
    return PER_MATRIX_COLUMNS + [DW_RANK_COLUMN] + (EMPIRICAL_COLUMNS if empirical_rank else [])


def mlp_attn_table(layer_rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``mlp_attn_summary.csv``: per layer, MLP change against attention change (relative and absolute)."""
    by_layer: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    for row in layer_rows:
        if str(row["group"]) in BLOCK_GROUPS and int(row["layer"]) >= 0:  # embeddings sit in no block
            by_layer[int(row["layer"])][str(row["group"])] = row
    table = []
    for layer, groups in sorted(by_layer.items()):
        mlp, attn = groups.get("mlp", {}), groups.get("attn", {})
        mlp_dw, attn_dw = float(mlp.get("dW_fro_layer", 0.0)), float(attn.get("dW_fro_layer", 0.0))
        mlp_rel, attn_rel = float(mlp.get("dW_fro_layer_rel", 0.0)), float(attn.get("dW_fro_layer_rel", 0.0))
        table.append({
            "layer": layer, "mlp_dW_fro": mlp_dw, "attn_dW_fro": attn_dw,
            "mlp_dW_fro_rel": mlp_rel, "attn_dW_fro_rel": attn_rel,
            "mlp_attn_ratio": safe_ratio(mlp_rel, attn_rel),
            "mlp_attn_ratio_abs": safe_ratio(mlp_dw, attn_dw),
            "mlp_energy_share": safe_ratio(mlp_dw**2, mlp_dw**2 + attn_dw**2),
        })
    return table


def group_energy(rows: Iterable[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Per group: (sum ||dW||_F^2, sum ||W||_F^2)."""
    totals: dict[str, list[float]] = {g: [0.0, 0.0] for g in GROUPS}
    for row in rows:
        bucket = totals.setdefault(str(row["group"]), [0.0, 0.0])
        bucket[0] += float(row["dW_fro"]) ** 2
        bucket[1] += float(row["W_fro"]) ** 2
    return {g: (v[0], v[1]) for g, v in totals.items()}


def headline_summary(rows: Sequence[dict[str, Any]], layer_rows: Sequence[dict[str, Any]], top: int = 3) -> dict[str, Any]:
    """Numbers a report quotes: overall relative update, MLP/attention shares, ranks, top layers.

    Totals, ranks and ``embed_energy_share`` cover every matrix (embeddings included); the MLP and
    attention shares are shares of the block matrices' energy (they sum to 1 when blocks changed),
    and the layer figures count blocks only.
    """
    energy = group_energy(rows)
    dw_total = sum(v[0] for v in energy.values())
    w_total = sum(v[1] for v in energy.values())
    block_total = sum(energy[g][0] for g in BLOCK_GROUPS)
    per_layer_total: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for row in rows:
        if int(row["layer"]) < 0:
            continue
        per_layer_total[int(row["layer"])][0] += float(row["dW_fro"]) ** 2
        per_layer_total[int(row["layer"])][1] += float(row["W_fro"]) ** 2
    layer_change = sorted(
        ({"layer": layer, "dW_fro_layer_rel": safe_ratio(math.sqrt(d), math.sqrt(w))}
         for layer, (d, w) in per_layer_total.items()),
        key=lambda item: (-item["dW_fro_layer_rel"], item["layer"]),
    )
    stable = [float(r["dW_stable_rank"]) for r in rows]
    summary: dict[str, Any] = {
        "num_matrices": len(rows),
        "num_layers": len(per_layer_total),
        "total_dW_fro_rel": safe_ratio(math.sqrt(dw_total), math.sqrt(w_total)),
        "total_dW_fro": math.sqrt(dw_total),
        "mlp_energy_share": safe_ratio(energy["mlp"][0], block_total),
        "attn_energy_share": safe_ratio(energy["attn"][0], block_total),
        "embed_energy_share": safe_ratio(energy["embed"][0], dw_total),
        "embed_dW_fro_rel": safe_ratio(math.sqrt(energy["embed"][0]), math.sqrt(energy["embed"][1])),
        "mlp_dW_fro_rel": safe_ratio(math.sqrt(energy["mlp"][0]), math.sqrt(energy["mlp"][1])),
        "attn_dW_fro_rel": safe_ratio(math.sqrt(energy["attn"][0]), math.sqrt(energy["attn"][1])),
        "median_dW_stable_rank": float(median(stable)) if stable else 0.0,
        "median_W_stable_rank": float(median(float(r["W_stable_rank"]) for r in rows)) if rows else 0.0,
        "max_dW_spectral_rel": max((float(r["dW_spectral_rel"]) for r in rows), default=0.0),
        "top_changed_layers": [item for item in layer_change[:top] if item["dW_fro_layer_rel"] > 0],
        "identical": dw_total == 0.0,
    }
    if rows and "dW_empirical_rank" in rows[0]:
        summary["median_dW_empirical_rank"] = float(median(float(r["dW_empirical_rank"]) for r in rows))
    return summary
