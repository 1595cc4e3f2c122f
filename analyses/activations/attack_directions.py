"""Torch-free directions for the ablation attack, from the two activation caches (no forward pass).

Per residual layer l (0 = embedding output, l = output of block l), over the forget tokens of the
base and modified caches (the same tokens in the same order, checked by ``open_caches``):

- ``mean_diff[l]``: the mean over tokens of ``resid_modified - resid_base`` (difference in means,
  the direction refusal-direction work removes);
- ``pcs[l]``: the top-``kmax`` principal directions of the per-token difference ``d_t``, i.e. the
  eigenvectors of the *uncentred* second moment ``E[d d^T]`` (uncentred, so that a constant shift,
  which has no variance, is still the first direction); unit rows, sign chosen so that each has a
  non-negative dot product with ``mean_diff`` (reproducible);
- ``pc_variance[l]``: their eigenvalues (mean squared projection of ``d_t``).

Each direction's ``write_space_share`` is ``|P u|^2`` for the orthogonal projector P onto the span
of what block l's writing parameters changed: the columns of dW (out, in) of the attention output
and MLP down projections, and their bias changes (the embeddings for l = 0); 0 when nothing
changed, NaN when no checkpoints are given. Checkpoints are read tensor by tensor
(``analyses.weights.checkpoints``).

Output: ``directions.npz`` (``layers``, ``mean_diff`` (layers, hidden) float32, ``pcs`` (layers,
kmax, hidden) float32, ``pc_variance`` (layers, kmax), ``n_tokens``) and ``directions.csv``
(layer, direction, norm, variance_share, write_space_share).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from analyses.io import atomic_write_csv
from unlearn_lens.core.atomic import atomic_path
from unlearn_lens.core.errors import UserError

DIRECTIONS_FILE = "directions.npz"
DIRECTIONS_CSV = "directions.csv"
CSV_COLUMNS = ("layer", "direction", "norm", "variance_share", "write_space_share")
#: Eigenvalues of the write-space Gram matrix below this fraction of the largest are dropped
#: (singular values below 1e-5 of the largest: float32 rounding of an unchanged weight is 0 exactly).
WRITE_SPACE_RTOL = 1e-10
WRITING_ROLES = frozenset({"out", "down"})
EMBEDDING_ROLES = frozenset({"embed", "pos_embed"})


def difference_moments(cache_base: str, cache_model: str, split: str = "forget") -> dict[str, Any]:
    """Per layer, the token sum and uncentred second moment sum of ``resid_modified - resid_base``.

    Lazy: one layer's residuals are read at a time. Refuses (one line) caches whose token ids or
    sample lengths differ.
    """
    import dask

    from cache_store import open_caches

    ds = open_caches({"base": str(cache_base), "modified": str(cache_model)}, split)
    resid = ds["resid"]
    n_layers, n_tokens, hidden = resid.sizes["layer"], resid.sizes["token"], resid.sizes["hidden"]
    if n_tokens == 0:
        raise UserError(f"{cache_model}: the {split} split holds no tokens")
    sums = np.zeros((n_layers, hidden))
    second = np.zeros((n_layers, hidden, hidden))
    for layer in range(n_layers):
        at = resid.isel(layer=layer)
        d = at.sel(model="modified").data.astype(np.float64) - at.sel(model="base").data.astype(np.float64)
        sums[layer], second[layer] = dask.compute(d.sum(axis=0), d.T @ d)
    return {"layers": np.arange(n_layers), "sum": sums, "second": second, "n_tokens": n_tokens,
            "family": ds.attrs.get("family"), "num_layers": ds.attrs.get("num_layers")}


def directions_from_moments(moments: Mapping[str, Any], kmax: int = 4) -> dict[str, np.ndarray]:
    """Mean difference, top-``kmax`` principal directions and their eigenvalues per layer."""
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
    return {"layers": np.asarray(moments["layers"], dtype=np.int64), "mean_diff": mean.astype(np.float32),
            "pcs": pcs.astype(np.float32), "pc_variance": variance, "trace": trace,
            "n_tokens": np.int64(moments["n_tokens"])}


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
        projector = projectors[layer] if projectors is not None else None
        mean = directions["mean_diff"][layer].astype(np.float64)
        rows.append({"layer": layer, "direction": "mean_diff", "norm": float(np.linalg.norm(mean)),
                     "variance_share": float(mean @ mean) / trace if trace > 0 else float("nan"),
                     "write_space_share": share_in(projector, mean)})
        for i, value in enumerate(directions["pc_variance"][layer].tolist()):
            rows.append({"layer": layer, "direction": f"pc{i + 1}", "norm": float(np.sqrt(value)),
                         "variance_share": value / trace if trace > 0 else float("nan"),
                         "write_space_share": share_in(projector, directions["pcs"][layer, i])})
    return rows


def save_directions(folder: str | Path, directions: Mapping[str, np.ndarray],
                    projectors: list[np.ndarray] | None = None) -> Path:
    """Write ``directions.npz`` (atomically) and ``directions.csv`` into ``folder``; returns the npz path."""
    folder = Path(folder)
    path = folder / DIRECTIONS_FILE
    with atomic_path(path, suffix=".npz") as tmp:  # np.savez appends .npz to any other name
        np.savez(tmp, layers=directions["layers"], mean_diff=directions["mean_diff"], pcs=directions["pcs"],
                 pc_variance=directions["pc_variance"], n_tokens=directions["n_tokens"])
    atomic_write_csv(folder / DIRECTIONS_CSV, directions_table(directions, projectors), CSV_COLUMNS)
    return path


def load_directions(path: str | Path) -> dict[str, np.ndarray]:
    """Read ``directions.npz`` (no pickles)."""
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def compute_and_save(cache_base: str, cache_model: str, folder: str | Path, *, kmax: int = 4,
                     base_spec: str | None = None, model_spec: str | None = None,
                     base_revision: str | None = None, model_revision: str | None = None,
                     split: str = "forget") -> Path:
    """Directions from the caches plus (with both checkpoints) their write-space shares; returns the npz."""
    moments = difference_moments(cache_base, cache_model, split)
    directions = directions_from_moments(moments, kmax)
    projectors = None
    if base_spec and model_spec:
        n_layers, hidden = directions["mean_diff"].shape
        projectors = write_space_projectors(base_spec, model_spec, n_layers - 1, hidden,
                                            base_revision, model_revision)
    return save_directions(folder, directions, projectors)
