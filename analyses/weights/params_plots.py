"""PNG figures of the parameter-space diagnostics (titled, axes labelled, Agg backend, atomic saves)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from analyses.io import atomic_save_figure
from analyses.plotting import subplots

_COLORS = {"attn": "tab:blue", "mlp": "tab:orange", "embed": "tab:green"}


def _by_group(layer_rows: Sequence[dict[str, Any]], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """Per block group, (layers, values); embedding rows (layer -1, no block) stay off the per-layer lines."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for row in layer_rows:
        if int(row["layer"]) < 0:
            continue
        xs, ys = series.setdefault(str(row["group"]), ([], []))
        xs.append(int(row["layer"]))
        ys.append(float(row[key]))
    return series


def _line_panel(ax, layer_rows, key: str, ylabel: str, title: str) -> None:
    for group, (xs, ys) in sorted(_by_group(layer_rows, key).items()):
        ax.plot(xs, ys, marker="o", markersize=3, label=group.upper() if group == "mlp" else "Attention",
                color=_COLORS.get(group))
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()


def plot_param_stats(outdir: Path, rows: Sequence[dict[str, Any]], layer_rows: Sequence[dict[str, Any]],
                     label: str) -> list[Path]:
    """Layer locality, spectral norm, stable rank and dW-vs-W rank comparison plots."""
    outdir = Path(outdir)
    paths = []

    figure, ax = subplots(figsize=(7, 4), layout="constrained")
    _line_panel(ax, layer_rows, "dW_fro_layer_rel", "||dW||_F / ||W||_F", f"Layer locality of the update\n{label}")
    paths.append(atomic_save_figure(figure, outdir / "layer_locality.png"))

    figure, axes = subplots(1, 2, figsize=(12, 4), layout="constrained")
    _line_panel(axes[0], layer_rows, "max_dW_spectral_rel", "max sigma_1(dW) / max sigma_1(W)", "Relative spectral norm")
    _line_panel(axes[1], layer_rows, "max_dW_spectral", "max sigma_1(dW)", "Spectral norm of dW")
    figure.suptitle(f"Spectral norm per layer\n{label}")
    paths.append(atomic_save_figure(figure, outdir / "spectral_norm.png"))

    figure, ax = subplots(figsize=(7, 4), layout="constrained")
    _line_panel(ax, layer_rows, "mean_dW_stable_rank", "mean stable rank of dW", f"Stable rank of the update per layer\n{label}")
    paths.append(atomic_save_figure(figure, outdir / "stable_rank.png"))

    kinds = [("stable_rank", "stable rank")]
    if rows and "W_empirical_rank" in rows[0]:
        kinds.append(("empirical_rank", "99% empirical rank"))
    figure, axes = subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False, layout="constrained")
    for ax, (key, name) in zip(axes[0], kinds):
        for group in sorted({str(r["group"]) for r in rows}):
            sel = [r for r in rows if r["group"] == group]
            ax.scatter([float(r[f"W_{key}"]) for r in sel], [float(r[f"dW_{key}"]) for r in sel], s=12,
                       alpha=0.7, label=group, color=_COLORS.get(group))
        top = max([1.0] + [float(r[f"W_{key}"]) for r in rows] + [float(r[f"dW_{key}"]) for r in rows])
        ax.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1, label="dW = W")
        ax.set_xlabel(f"W {name}")
        ax.set_ylabel(f"dW {name}")
        ax.set_title(f"{name}: update vs base weight")
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle(f"Rank of dW against rank of W (one point per matrix)\n{label}")
    paths.append(atomic_save_figure(figure, outdir / "rank_comparison.png"))
    return paths


def plot_mlp_attn(outdir: Path, table: Sequence[dict[str, Any]], label: str) -> Path:
    """Per layer: relative change of MLP and attention, and MLP's share of the update energy."""
    layers = [int(r["layer"]) for r in table]
    figure, axes = subplots(1, 2, figsize=(12, 4), layout="constrained")
    width = 0.4
    x = np.arange(len(layers))
    axes[0].bar(x - width / 2, [r["attn_dW_fro_rel"] for r in table], width, label="Attention", color=_COLORS["attn"])
    axes[0].bar(x + width / 2, [r["mlp_dW_fro_rel"] for r in table], width, label="MLP", color=_COLORS["mlp"])
    axes[0].set_xticks(x, [str(l) for l in layers])
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("||dW||_F / ||W||_F")
    axes[0].set_title("Relative change by block part")
    axes[0].legend()
    axes[1].plot(layers, [r["mlp_energy_share"] for r in table], marker="o", color=_COLORS["mlp"])
    axes[1].axhline(0.5, color="grey", linestyle="--", linewidth=1)
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].set_xlabel("layer")
    axes[1].set_ylabel("MLP share of ||dW||_F^2")
    axes[1].set_title("MLP share of the update energy")
    figure.suptitle(f"MLP vs attention change per layer\n{label}")
    return atomic_save_figure(figure, Path(outdir) / "mlp_vs_attn.png")


def plot_null_space(outdir: Path, table: Sequence[dict[str, Any]], label: str) -> Path:
    """Top-10 energy share, 99% effective rank and subspace distance of the sampled matrices."""
    figure, axes = subplots(1, 3, figsize=(16, 4), layout="constrained")
    index = np.arange(len(table))
    colors = [_COLORS.get(str(r["group"]), "grey") for r in table]
    axes[0].bar(index, [r["top10_energy_share"] for r in table], color=colors)
    axes[0].set_ylim(0, 1.02)
    axes[0].set_xlabel("sampled changed matrix")
    axes[0].set_ylabel("share of ||dW||_F^2 in top-10 singular values")
    axes[0].set_title("Energy in the top 10 directions")
    axes[1].scatter([min(r["shape0"], r["shape1"]) for r in table], [r["dW_effective_rank_99"] for r in table],
                    c=colors, s=14)
    axes[1].set_xlabel("min(shape)")
    axes[1].set_ylabel("99% effective rank of dW")
    axes[1].set_title("Effective rank of the update")
    axes[2].scatter(index, [r["left_grassmann_distance"] for r in table], s=14, label="left (output) space")
    axes[2].scatter(index, [r["right_grassmann_distance"] for r in table], s=14, marker="x", label="right (input) space")
    k = table[0]["subspace_k"] if table else 0
    axes[2].set_xlabel("sampled changed matrix")
    axes[2].set_ylabel("Grassmann distance (rad)")
    axes[2].set_title(f"Top-k subspace shift, W_a vs W_b (k <= {k})")
    axes[2].legend()
    figure.suptitle(f"Null-space and subspace analysis (colour: blue attention, orange MLP, green embeddings)\n{label}")
    return atomic_save_figure(figure, Path(outdir) / "null_space_analysis.png")


def plot_mlp_nullspace(outdir: Path, table: Sequence[dict[str, Any]], label: str) -> Path:
    """Per MLP matrix: share of the update off W's column space and off its row space."""
    figure, axes = subplots(1, 2, figsize=(13, 4), layout="constrained")
    for ax, key, side in ((axes[0], "col_null_share", "column space (output side)"),
                          (axes[1], "row_null_share", "row space (input side)")):
        for role in sorted({str(r["role"]) for r in table}):
            sel = [r for r in table if r["role"] == role]
            ax.plot([int(r["layer"]) for r in sel], [float(r[key]) for r in sel], marker="o", markersize=3, label=role)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("layer")
        ax.set_ylabel("share of ||dW||_F^2 outside W's " + side.split(" (")[0])
        ax.set_title(f"Off-manifold share, {side}")
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle(f"MLP update vs the null space of W\n{label}")
    return atomic_save_figure(figure, Path(outdir) / "mlp_nullspace.png")
