"""The output folders of analyze: each diagnostic's CSVs, plots and summary.json.

Every folder is cleared of its completion marker first, its files are written atomically and the
marker is written last (``analyses.io``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from analyses.activations import covariance, logit_lens, norms, probes, row_space, separation
from analyses.activations.caches import SPLITS
from analyses.io import atomic_write_csv, atomic_write_json, clear_complete, mark_complete
from analyses.plotting import by, panel_plot, spectra_plot
from unlearn_lens.core import outputs


def _begin(directory: Path) -> Path:
    """Create the folder and drop its completion marker before anything in it is rewritten."""
    directory.mkdir(parents=True, exist_ok=True)
    clear_complete(directory)
    return directory


def _finish(directory: Path, info: Mapping[str, Any], inputs: Mapping[str, Any] | None) -> None:
    """Mark the folder complete, last, with the inputs it was made from."""
    mark_complete(directory, info, inputs)


def write_norms(directory: Path, plots: Path, rows: list[dict], a: str, b: str, *,
                inputs: Mapping[str, Any] | None = None) -> None:
    """``activation_stats/`` (norms of a, b and their difference per layer and split) and its plots folder."""
    atomic_write_csv(_begin(directory) / outputs.ACTIVATION_STATS_CSV, rows, norms.COLUMNS)
    _begin(plots)
    panels = []
    for column, label in (("L1", "mean L1 norm"), ("L2", "mean L2 norm")):
        series = {}
        for split in SPLITS:
            series[f"{a} {split}"] = by(rows, "layer", f"model_a_norm_{column}", split=split)
            series[f"{b} {split}"] = by(rows, "layer", f"model_b_norm_{column}", split=split)
        panels.append((label, series, None))
    panel_plot(plots / "activation_norms.png", f"Activation norms per layer: {a} vs {b}", "layer", panels)
    panels = [(f"mean ||dh||_{p[-1]}", {split: by(rows, "layer", f"mean_dh_{p}", split=split) for split in SPLITS},
               None) for p in ("L1", "L2")]
    panel_plot(plots / "activation_diffs.png", f"Activation difference dh = h({b}) - h({a})", "layer", panels)
    _finish(plots, {"files": ["activation_norms.png", "activation_diffs.png"]}, inputs)
    _finish(directory, {"rows": len(rows),
                        "definition": "per-token means over real tokens, every layer before the final norm"}, inputs)


def write_separation(directory: Path, rows: list[dict], a: str, b: str, *,
                     inputs: Mapping[str, Any] | None = None) -> None:
    """``activation_separation/``: forget/retain separation of both models per layer."""
    atomic_write_csv(_begin(directory) / outputs.SEPARATION_CSV, rows, separation.COLUMNS)
    panels = [(metric, {m: by(rows, "layer", metric, model=m) for m in (a, b)}, 0.5 if metric == "auc" else None)
              for metric in ("cosine_distance", "auc", "variance_ratio")]
    panel_plot(directory / "separation.png", f"Forget/retain separation: {a} vs {b}", "layer", panels)
    atomic_write_json(directory / "summary.json", {"definitions": separation.DEFINITIONS, "models": [a, b]})
    _finish(directory, {"rows": len(rows)}, inputs)


def write_covariance(directory: Path, rows: list[dict], selectivity: list[dict], spectra: dict, a: str,
                     b: str, layers: list[int] | None = None, *, inputs: Mapping[str, Any] | None = None) -> None:
    """``activation_covariance/``: spectrum metrics, forget/retain selectivity and every eigenvalue
    (``layers``: the cached layers' numbers, default 0, 1, ...)."""
    _begin(directory)
    columns = list(rows[0].keys())
    atomic_write_csv(directory / "covariance_metrics.csv", rows, columns)
    atomic_write_csv(directory / outputs.COVARIANCE_CSV, selectivity, list(selectivity[0].keys()))
    layers = list(range(len(spectra[("forget", a)]))) if layers is None else [int(v) for v in layers]
    spectra_rows = [{"layer": layer, "split": split, "model": model, "index": i, "eigenvalue": float(value)}
                    for (split, model), values in spectra.items()
                    for layer, layer_values in zip(layers, values) for i, value in enumerate(layer_values)]
    atomic_write_csv(directory / "eigenvalues.csv", spectra_rows, ["layer", "split", "model", "index", "eigenvalue"])
    panels = [("effective rank", {f"{m} {s}": by(rows, "layer", f"model_{r}_effective_rank", split=s)
                                  for r, m in (("a", a), ("b", b)) for s in SPLITS}, None),
              ("Wasserstein distance of spectra", {s: by(rows, "layer", "wasserstein", split=s) for s in SPLITS}, None),
              ("selectivity W(forget)/W(retain)", {"raw": by(selectivity, "layer", "selectivity_ratio"),
                                                   "normalised": by(selectivity, "layer",
                                                                    "selectivity_ratio_normalised")}, 1.0)]
    panel_plot(directory / "covariance.png", f"Activation covariance: {a} vs {b}", "layer", panels)
    shown = sorted({layers[0], layers[len(layers) // 2], layers[-1]})
    spectra_plot(directory / "spectra_forget.png", f"Covariance spectra on forget text: {a} vs {b}",
                 {m: dict(zip(layers, spectra[("forget", m)])) for m in (a, b)}, shown)
    atomic_write_json(directory / "summary.json", {"definitions": covariance.DEFINITIONS})
    _finish(directory, {"rows": len(rows)}, inputs)


def _space_panels(rows: list[dict], models: tuple[str, str], space: str, what: str) -> list:
    """One panel per model: forget / retain / random / chance energy shares of one projection space."""
    panels = []
    for model in models:
        chosen = [r for r in rows if r["activations"] == model and r["space"] == space]
        panels.append((f"energy share ({model} {what})", {
            "forget": by(chosen, "mlp_layer", "share_forget"), "retain": by(chosen, "mlp_layer", "share_retain"),
            "random forget": by(chosen, "mlp_layer", "random_share_forget"),
            "random retain": by(chosen, "mlp_layer", "random_share_retain"),
            "chance k/d": by(chosen, "mlp_layer", "chance_share")}, None))
    return panels


def write_row_space(directory: Path, rows: list[dict], a: str, b: str, top_k: int, seed: int,
                    not_captured: str = "", *, inputs: Mapping[str, Any] | None = None) -> None:
    """``row_space_projection/``: energy shares in dW's row (and column) spaces, both models' activations;
    ``not_captured`` (in ``summary.json``) names the blocks whose activations the caches do not hold."""
    atomic_write_csv(_begin(directory) / "row_space_projection.csv", rows, row_space.COLUMNS)
    panel_plot(directory / "row_space_projection.png",
               f"MLP input energy in dW's top-{top_k} row space: {a} -> {b}", "MLP layer",
               _space_panels(rows, (a, b), "row", "MLP inputs"))
    if any(r["space"] == "column" for r in rows):
        panel_plot(directory / "column_space_projection.png",
                   f"Residual energy in the top-{top_k} directions dW writes (attention out, MLP down): {a} -> {b}",
                   "block", _space_panels(rows, (a, b), "column", "residual after the block"))
    atomic_write_json(directory / "summary.json", {
        "definition": row_space.__doc__.strip(), "top_k": top_k, "seed": seed,
        "mean_selectivity_ratio": {m: _nanmean([r["selectivity_ratio"] for r in rows if r["activations"] == m])
                                   for m in (a, b)},
        "mean_selectivity_ratio_by_space": {
            m: {space: _nanmean([r["selectivity_ratio"] for r in rows if r["activations"] == m and r["space"] == space])
                for space in row_space.SPACES} for m in (a, b)},
        **({"not_captured": not_captured} if not_captured else {})})
    _finish(directory, {"rows": len(rows)}, inputs)


def _nanmean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def write_probes(directory: Path, rows: list[dict], model: str, C: float, max_iter: int, seed: int, *,
                 inputs: Mapping[str, Any] | None = None) -> None:
    """``linear_probes/`` of one model, with the probe's settings in ``summary.json``."""
    atomic_write_csv(_begin(directory) / "probe_results.csv", rows, probes.COLUMNS)
    atomic_write_json(directory / "summary.json", {**probes.summarise(rows), "model": model, "C": C,
                                                   "max_iter": max_iter, "seed": seed})
    panels = [(metric, {model: by(rows, "layer", metric)}, 0.5 if metric == "auc" else None)
              for metric in ("accuracy", "selectivity", "auc")]
    panel_plot(directory / "linear_probes.png", f"Linear probes forget vs retain: {model}", "layer", panels)
    _finish(directory, {"rows": len(rows)}, inputs)


def write_lens(directory: Path, rows: list[dict], summary: dict, model: str, *,
               inputs: Mapping[str, Any] | None = None) -> None:
    """``wmdp_logit_lens/`` of one model: accuracy per layer for both scorings."""
    atomic_write_csv(_begin(directory) / outputs.LENS_CSV, rows, logit_lens.COLUMNS)
    atomic_write_json(directory / "summary.json", {"model": model, **summary})
    series = {scoring: by(rows, "layer", "accuracy", scoring=scoring) for scoring in ("letter", "cloze")}
    panel_plot(directory / "wmdp_logit_lens.png", f"WMDP accuracy by layer (logit lens): {model}", "layer",
               [("accuracy", series, 0.25)])
    _finish(directory, {"rows": len(rows)}, inputs)
