"""Covariance spectra (``activation_covariance/``): eigenvalues, effective rank, spectral entropy, Wasserstein shift.

Definitions (stated in every CSV's companion ``summary.json``):
- covariance: population covariance of the masked token states of one layer (m2 / n);
- spectral entropy H = -sum p_i log p_i (natural log) of p = eigenvalues / their sum;
- effective rank = exp(H) (Roy & Vetterli, 2007): d for a flat spectrum, 1 for a single direction;
- ``wasserstein``: ``scipy.stats.wasserstein_distance`` between the two raw eigenvalue sets;
  ``wasserstein_normalised``: the same on the normalised spectra p (scale-free);
- selectivity ratio = W(forget) / W(retain) per layer.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import wasserstein_distance

from analyses.activations.reductions import Moments

DEFINITIONS = {
    "covariance": "population covariance (m2 / n) of masked token states, per layer",
    "spectral_entropy": "H = -sum p log p (nats), p = eigenvalues / sum(eigenvalues)",
    "effective_rank": "exp(spectral_entropy) (Roy & Vetterli 2007)",
    "wasserstein": "scipy.stats.wasserstein_distance between the raw eigenvalue sets of base and modified",
    "wasserstein_normalised": "the same between the normalised spectra p",
    "selectivity_ratio": "wasserstein(forget) / wasserstein(retain)",
}


def eigenspectrum(covariance: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric covariance, descending, tiny negative round-off clipped to 0."""
    values = np.linalg.eigvalsh((covariance + covariance.T) / 2)[::-1]
    return np.clip(values, 0.0, None)


def spectral_entropy(eigenvalues: np.ndarray) -> float:
    """Shannon entropy (nats) of the normalised spectrum; 0 for an all-zero spectrum."""
    total = float(np.sum(eigenvalues))
    if total <= 0:
        return 0.0
    p = np.asarray(eigenvalues) / total
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def effective_rank(eigenvalues: np.ndarray) -> float:
    """exp(spectral entropy): the number of equally used directions that gives the same entropy."""
    if float(np.sum(eigenvalues)) <= 0:
        return 0.0
    return float(np.exp(spectral_entropy(eigenvalues)))


def _normalised(eigenvalues: np.ndarray) -> np.ndarray:
    total = float(np.sum(eigenvalues))
    return eigenvalues / total if total > 0 else eigenvalues


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator with 0/0 -> nan and x/0 -> inf (never an exception)."""
    if denominator == 0:
        return float("nan") if numerator == 0 else float("inf")
    return float(numerator / denominator)


def keep_spectra(sums: dict) -> dict:
    """A layer chunk's moment sums with its d x d ``m2`` replaced by covariance eigenvalues and trace.

    Used as ``token_moments(..., finish=keep_spectra)`` so that each layer's matrix is
    eigendecomposed and dropped inside the reduction graph.
    """
    m2 = sums["m2"]
    n = max(sums["n"], 1.0)
    spectra = np.stack([eigenspectrum(layer / n) for layer in m2])
    return {**sums, "m2": None, "trace": np.einsum("lii->l", m2), "spectra": spectra}


def layer_spectra(moments: Moments, map_layers=map) -> np.ndarray:
    """(layer, d) descending covariance eigenvalues of one model on one split."""
    if moments.spectra is not None:
        return moments.spectra
    covariances = moments.covariance
    return np.array(list(map_layers(lambda layer: eigenspectrum(covariances[layer]), range(covariances.shape[0]))))


def covariance_rows(split: str, spectra_a: np.ndarray, spectra_b: np.ndarray,
                    layers: Sequence[int] | None = None) -> list[dict]:
    """Per-layer metrics of one split from the two models' spectra (layer, d); ``layers``: the cached
    layers' numbers (default 0, 1, ...)."""
    layers = list(range(len(spectra_a))) if layers is None else list(layers)
    rows = []
    for layer, ea, eb in zip(layers, spectra_a, spectra_b):
        rows.append({
            "layer": int(layer), "split": split,
            "model_a_effective_rank": effective_rank(ea), "model_b_effective_rank": effective_rank(eb),
            "model_a_spectral_entropy": spectral_entropy(ea), "model_b_spectral_entropy": spectral_entropy(eb),
            "model_a_total_variance": float(ea.sum()), "model_b_total_variance": float(eb.sum()),
            "wasserstein": float(wasserstein_distance(ea, eb)),
            "wasserstein_normalised": float(wasserstein_distance(_normalised(ea), _normalised(eb))),
        })
    return rows


def selectivity_rows(forget_rows: list[dict], retain_rows: list[dict]) -> list[dict]:
    """Per layer: W(forget), W(retain) and their ratio, raw and normalised."""
    rows = []
    for f, r in zip(forget_rows, retain_rows):
        rows.append({
            "layer": f["layer"],
            "wasserstein_forget": f["wasserstein"], "wasserstein_retain": r["wasserstein"],
            "selectivity_ratio": ratio(f["wasserstein"], r["wasserstein"]),
            "wasserstein_normalised_forget": f["wasserstein_normalised"],
            "wasserstein_normalised_retain": r["wasserstein_normalised"],
            "selectivity_ratio_normalised": ratio(f["wasserstein_normalised"], r["wasserstein_normalised"]),
        })
    return rows
