"""Torch-free directions for the ablation attack, from the two activation caches (no forward pass).

Per residual layer l (0 = embedding output, l = output of block l), over the *fitted* forget
tokens of the base and modified caches (the same tokens in the same order, checked by
``open_caches``):

- ``mean_diff[l]``: the mean over tokens of ``resid_modified - resid_base`` (difference in means,
  the direction refusal-direction work removes);
- ``pcs[l]``: the top-``kmax`` principal directions of the per-token difference ``d_t``, i.e. the
  eigenvectors of the *uncentred* second moment ``E[d d^T]`` (uncentred, so that a constant shift,
  which has no variance, is still the first direction); unit rows, sign chosen so that each has a
  non-negative dot product with ``mean_diff`` (reproducible);
- ``pc_variance[l]``: their eigenvalues (mean squared projection of ``d_t``);
- ``base_rms[l]``: the base residual's root-mean-square norm ``sqrt(E ||h_base||^2)`` over the
  same tokens, and ``relative_norm[l] = ||mean_diff[l]|| / base_rms[l]``: residual norms grow with
  depth, so the raw norm favours the last layers; the ablation attack ranks layers by this ratio.

Which tokens are fitted (Lucki et al. 2024, ethz-spylab/unlearning-vs-safety
``src/orthogonalization/orthogonalization.py``): only the samples given (the attack passes the
forget texts its NLL does not measure), no position below ``skip`` (position 0 is the attention
sink, whose huge, model-specific states would dominate a mean; the reference skips 40 positions
of its fixed question template), and no *outlier token*: as in the reference, per block output
the mean L1 distance of each of the first ``OUTLIER_TOKENS`` fitted base states to the others is
z-scored (sample standard deviation), ids with z > ``OUTLIER_Z`` at any layer are outliers, and
every occurrence of an outlier id is left out (the reference compares decoded strings; ids here).

Each direction's ``write_space_share`` is ``|P u|^2`` for the orthogonal projector P onto the span
of what block l's writing parameters changed: the columns of dW (out, in) of the attention output
and MLP down projections, and their bias changes (the embeddings for l = 0); 0 when nothing
changed, NaN when no checkpoints are given. Checkpoints are read tensor by tensor
(``analyses.weights.checkpoints``).

Output: ``directions.npz`` (``layers``, ``mean_diff`` (layers, hidden) float32, ``pcs`` (layers,
kmax, hidden) float32, ``pc_variance`` (layers, kmax), ``base_rms``, ``relative_norm``,
``n_tokens`` (fitted), ``n_tokens_total``, ``skip_positions``, ``outlier_ids``, ``fit_samples``)
and ``directions.csv`` (layer, direction, norm, relative_norm, variance_share, write_space_share).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from analyses.io import atomic_write_csv
from unlearn_lens.core.atomic import atomic_path
from unlearn_lens.core.errors import UserError

DIRECTIONS_FILE = "directions.npz"
DIRECTIONS_CSV = "directions.csv"
CSV_COLUMNS = ("layer", "direction", "norm", "relative_norm", "variance_share", "write_space_share")
#: Eigenvalues of the write-space Gram matrix below this fraction of the largest are dropped
#: (singular values below 1e-5 of the largest: float32 rounding of an unchanged weight is 0 exactly).
WRITE_SPACE_RTOL = 1e-10
WRITING_ROLES = frozenset({"out", "down"})
EMBEDDING_ROLES = frozenset({"embed", "pos_embed"})
#: Leading positions of every text left out of the fit: position 0 is the attention sink.
SKIP_POSITIONS = 1
#: Outlier tokens (Lucki et al.'s rule): a z-score above this ...
OUTLIER_Z = 3.0
#: ... of the mean L1 distance among the first this many fitted tokens.
OUTLIER_TOKENS = 1000


def outlier_ids(states: Sequence[np.ndarray], ids: np.ndarray, z: float = OUTLIER_Z) -> np.ndarray:
    """Token ids whose state is an outlier at any layer (Lucki et al.'s ``get_zscore`` rule).

    ``states``: per layer, (tokens, hidden) states of the same tokens, whose ids are ``ids``. A
    token is an outlier at a layer when the z-score (sample standard deviation, as ``torch.std``)
    of its mean L1 distance to all the tokens is above ``z``.
    """
    from scipy.spatial.distance import cdist

    found: set[int] = set()
    for x in states:
        if len(x) < 3:
            continue
        x = np.asarray(x, dtype=np.float32)
        mean_distance = cdist(x, x, metric="cityblock").mean(axis=0)
        spread = mean_distance.std(ddof=1)
        if spread > 0:
            found |= {int(i) for i in ids[(mean_distance - mean_distance.mean()) / spread > z]}
    return np.array(sorted(found), dtype=np.int64)


def fit_mask(ds, samples: Sequence[int] | None = None, skip: int = SKIP_POSITIONS) -> np.ndarray:
    """Bool over the token axis: tokens of ``samples`` (all when None) at positions ``>= skip``."""
    position = np.asarray(ds["token_position"].values)
    keep = position >= skip
    if samples is not None:
        keep &= np.isin(np.asarray(ds["token_sample"].values), np.asarray(list(samples), dtype=np.int64))
    return keep


def moments_of(ds, samples: Sequence[int] | None = None, skip: int = SKIP_POSITIONS,
               drop_outliers: bool = True) -> dict[str, Any]:
    """Per layer, sums over the fitted tokens of ``d = resid_modified - resid_base``, of ``d d^T``
    and of ``||resid_base||^2``, for ``ds`` stacked by ``open_caches`` (models "base", "modified").

    Lazy: one layer's residuals are read at a time.
    """
    import dask
    import dask.array as da

    resid = ds["resid"]
    n_layers, n_tokens, hidden = resid.sizes["layer"], resid.sizes["token"], resid.sizes["hidden"]
    keep = fit_mask(ds, samples, skip)
    ids = np.asarray(ds["input_ids"].values, dtype=np.int64)
    outliers = np.zeros(0, dtype=np.int64)
    if drop_outliers and keep.any():
        first = np.flatnonzero(keep)[:OUTLIER_TOKENS]
        base = resid.sel(model="base").isel(token=first)
        # the block outputs, as the reference hooks them (not the embedding output)
        states = [base.isel(layer=layer).values for layer in range(1, n_layers)]
        outliers = outlier_ids(states, ids[first])
        keep &= ~np.isin(ids, outliers)
    n_fit = int(keep.sum())
    if n_fit == 0:
        raise UserError(f"no forget token is left to fit the ablation directions on ({n_tokens} cached, "
                        f"positions below {skip} and outlier tokens left out): capture more forget texts")
    chunks = resid.sel(model="base").isel(layer=0).data.chunks[0]
    weight = da.from_array(keep.astype(np.float64), chunks=(chunks,))
    sums = np.zeros((n_layers, hidden))
    second = np.zeros((n_layers, hidden, hidden))
    base_sq = np.zeros(n_layers)
    for layer in range(n_layers):
        at = resid.isel(layer=layer)
        b = at.sel(model="base").data.astype(np.float64)
        d = at.sel(model="modified").data.astype(np.float64) - b
        weighted = d * weight[:, None]
        sums[layer], second[layer], base_sq[layer] = dask.compute(
            weighted.sum(axis=0), weighted.T @ d, ((b * b).sum(axis=1) * weight).sum())
    fitted = np.unique(np.asarray(ds["token_sample"].values)[keep]).astype(np.int64)
    return {"layers": np.arange(n_layers), "sum": sums, "second": second, "base_sq": base_sq, "n_tokens": n_fit,
            "n_tokens_total": n_tokens, "skip_positions": int(skip), "outlier_ids": outliers, "fit_samples": fitted,
            "family": ds.attrs.get("family"), "num_layers": ds.attrs.get("num_layers")}


def difference_moments(cache_base: str, cache_model: str, split: str = "forget", *,
                       samples: Sequence[int] | None = None, skip: int = SKIP_POSITIONS,
                       drop_outliers: bool = True) -> dict[str, Any]:
    """``moments_of`` the two caches' ``split``. Refuses (one line) caches whose token ids or
    sample lengths differ, and an empty split."""
    from cache_store import open_caches

    ds = open_caches({"base": str(cache_base), "modified": str(cache_model)}, split)
    if "resid" not in ds.variables:
        raise UserError(f"{cache_model}: the caches record no residual stream (captured with --variables mlp_in); "
                        "the ablation attack's directions need it")
    kept = [int(v) for v in ds["layer"].values]
    if kept != list(range(int(ds.attrs.get("num_layers", len(kept) - 1)) + 1)):
        raise UserError(f"{cache_model}: the caches keep residual layers {','.join(map(str, kept))} only (captured "
                        "with --layers); the ablation attack needs every layer: capture without --layers")
    if ds["resid"].sizes["token"] == 0:
        raise UserError(f"{cache_model}: the {split} split holds no tokens")
    return moments_of(ds, samples, skip, drop_outliers)


def directions_from_moments(moments: Mapping[str, Any], kmax: int = 4) -> dict[str, np.ndarray]:
    """Mean difference, top-``kmax`` principal directions, their eigenvalues and the base RMS per layer."""
    n = float(moments["n_tokens"])
    mean = moments["sum"] / n
    n_layers, hidden = mean.shape
    kmax = max(1, min(int(kmax), hidden))
    pcs = np.zeros((n_layers, kmax, hidden))
    variance = np.zeros((n_layers, kmax))
    trace = np.zeros(n_layers)
    for layer in range(n_layers):
        m2 = moments["second"][layer] / n
        m2 = (m2 + m2.T) / 2
        values, vectors = np.linalg.eigh(m2)
        order = np.argsort(values)[::-1][:kmax]
        for i, j in enumerate(order):
            v = vectors[:, j]
            reference = mean[layer] @ v
            if abs(reference) <= 1e-12 * (np.linalg.norm(mean[layer]) + 1e-300):
                reference = v[np.argmax(np.abs(v))]
            pcs[layer, i] = v if reference >= 0 else -v
            variance[layer, i] = max(values[j], 0.0)
        trace[layer] = max(np.trace(m2), 0.0)
    base_rms = np.sqrt(np.maximum(np.asarray(moments["base_sq"], dtype=np.float64), 0.0) / n)
    norms = np.linalg.norm(mean, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(base_rms > 0, norms / np.where(base_rms > 0, base_rms, 1.0), np.nan)
    return {"layers": np.asarray(moments["layers"], dtype=np.int64), "mean_diff": mean.astype(np.float32),
            "pcs": pcs.astype(np.float32), "pc_variance": variance, "trace": trace, "base_rms": base_rms,
            "relative_norm": relative, "n_tokens": np.int64(moments["n_tokens"]),
            "n_tokens_total": np.int64(moments.get("n_tokens_total", moments["n_tokens"])),
            "skip_positions": np.int64(moments.get("skip_positions", 0)),
            "outlier_ids": np.asarray(moments.get("outlier_ids", []), dtype=np.int64),
            "fit_samples": np.asarray(moments.get("fit_samples", []), dtype=np.int64)}


def _gram(delta: np.ndarray, role: str) -> np.ndarray:
    """``M M^T`` for the written-space columns M of one changed tensor (float64, hidden x hidden)."""
    delta = delta.astype(np.float64)
    if delta.ndim == 1:  # a bias: one column
        return np.outer(delta, delta)
    if role in EMBEDDING_ROLES:  # stored (vocab, hidden): the rows are what is written
        return delta.T @ delta
    return delta @ delta.T  # (out = hidden, in)


def write_space_projectors(base_spec: str, model_spec: str, num_layers: int, hidden: int,
                           base_revision: str | None = None,
                           model_revision: str | None = None) -> list[np.ndarray]:
    """Per residual layer 0..num_layers, the projector onto the span of the changed writing parameters."""
    from analyses.weights.checkpoints import open_checkpoint
    from unlearn_lens.core.naming import classify

    base = open_checkpoint(base_spec, base_revision)
    model = open_checkpoint(model_spec, model_revision)
    grams = [np.zeros((hidden, hidden)) for _ in range(num_layers + 1)]
    for name in model.names():
        info = classify(name, model.family)
        if info.layer >= 0 and info.role in WRITING_ROLES:
            layer = info.layer + 1
        elif info.layer < 0 and info.role in EMBEDDING_ROLES and name.endswith(".weight"):
            layer = 0
        else:
            continue
        if name not in base or base.shape(name) != model.shape(name):
            raise UserError(f"{base_spec} and {model_spec} differ in tensor {name!r}: not the same architecture")
        is_matrix = len(model.shape(name)) == 2
        read = (lambda c: c.read_matrix(name)) if is_matrix and info.role in WRITING_ROLES else (lambda c: c.read(name))
        delta = read(model) - read(base)
        if delta.ndim == 1 and delta.shape[0] != hidden or delta.ndim == 2 and hidden not in delta.shape:
            continue
        if np.any(delta):
            grams[layer] += _gram(delta, info.role)
    projectors = []
    for gram in grams:
        values, vectors = np.linalg.eigh(gram)
        keep = values > max(values.max(initial=0.0), 0.0) * WRITE_SPACE_RTOL if values.max(initial=0.0) > 0 \
            else np.zeros_like(values, dtype=bool)
        basis = vectors[:, keep]
        projectors.append(basis @ basis.T)
    return projectors


def share_in(projector: np.ndarray | None, direction: np.ndarray) -> float:
    """``|P u|^2 / |u|^2``; NaN without a projector or for a zero direction."""
    norm = float(np.linalg.norm(direction))
    if projector is None or norm == 0.0:
        return float("nan")
    u = np.asarray(direction, dtype=np.float64) / norm
    return float(u @ projector @ u)


def directions_table(directions: Mapping[str, np.ndarray],
                     projectors: list[np.ndarray] | None = None) -> list[dict]:
    """Rows of ``directions.csv``: the mean difference and each principal direction per layer."""
    rows = []
    for layer in directions["layers"].tolist():
        trace = float(directions["trace"][layer])
        rms = float(directions["base_rms"][layer])
        projector = projectors[layer] if projectors is not None else None
        mean = directions["mean_diff"][layer].astype(np.float64)

        def row(direction: str, norm: float, variance: float, vector: np.ndarray) -> dict:
            return {"layer": layer, "direction": direction, "norm": norm,
                    "relative_norm": norm / rms if rms > 0 else float("nan"),
                    "variance_share": variance / trace if trace > 0 else float("nan"),
                    "write_space_share": share_in(projector, vector)}

        rows.append(row("mean_diff", float(np.linalg.norm(mean)), float(mean @ mean), mean))
        for i, value in enumerate(directions["pc_variance"][layer].tolist()):
            rows.append(row(f"pc{i + 1}", float(np.sqrt(value)), value, directions["pcs"][layer, i]))
    return rows


#: What ``directions.npz`` holds (``trace`` is only needed for the CSV).
SAVED_KEYS = ("layers", "mean_diff", "pcs", "pc_variance", "base_rms", "relative_norm", "n_tokens",
              "n_tokens_total", "skip_positions", "outlier_ids", "fit_samples")


def save_directions(folder: str | Path, directions: Mapping[str, np.ndarray],
                    projectors: list[np.ndarray] | None = None) -> Path:
    """Write ``directions.npz`` (atomically) and ``directions.csv`` into ``folder``; returns the npz path."""
    folder = Path(folder)
    path = folder / DIRECTIONS_FILE
    with atomic_path(path, suffix=".npz") as tmp:  # np.savez appends .npz to any other name
        np.savez(tmp, **{key: directions[key] for key in SAVED_KEYS})
    atomic_write_csv(folder / DIRECTIONS_CSV, directions_table(directions, projectors), CSV_COLUMNS)
    return path


def load_directions(path: str | Path) -> dict[str, np.ndarray]:
    """Read ``directions.npz`` (no pickles)."""
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def compute_and_save(cache_base: str, cache_model: str, folder: str | Path, *, kmax: int = 4,
                     base_spec: str | None = None, model_spec: str | None = None,
                     base_revision: str | None = None, model_revision: str | None = None,
                     split: str = "forget", samples: Sequence[int] | None = None,
                     skip: int = SKIP_POSITIONS, drop_outliers: bool = True) -> Path:
    """Directions from the caches' fitted tokens (see ``moments_of``) plus (with both checkpoints)
    their write-space shares; returns the npz."""
    moments = difference_moments(cache_base, cache_model, split, samples=samples, skip=skip,
                                 drop_outliers=drop_outliers)
    directions = directions_from_moments(moments, kmax)
    projectors = None
    if base_spec and model_spec:
        n_layers, hidden = directions["mean_diff"].shape
        projectors = write_space_projectors(base_spec, model_spec, n_layers - 1, hidden,
                                            base_revision, model_revision)
    return save_directions(folder, directions, projectors)
