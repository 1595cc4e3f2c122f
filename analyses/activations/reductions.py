"""Lazy, fused, blockwise reductions over cached activations (one read per chunk).

Every token-level diagnostic (norms, centroids, covariance, row-space energy, differences between
two models) is a function of a few per-layer sums over masked tokens. ``token_moments`` and
``difference_norms`` build those sums as dask graphs over the cache's chunks: one task per
(layer chunk, token chunk) computes everything from the chunk it reads, partial results merge in a
tree, and evaluating several reductions together in one ``dask.compute`` reads each chunk once.
Memory is bounded by the chunk size and a few d x d matrices per layer, never by the cache size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import dask
import dask.array as da
import numpy as np


@dataclass
class Moments:
    """Per-layer sums over the masked tokens of one array (layer axis first).

    ``m2`` is the centred sum of squares sum (x - mean)(x - mean)^T (Chan et al.'s pairwise
    update keeps it accurate when the mean is large); ``l1``/``l2`` sum the per-token norms.
    """

    n: float
    mean: np.ndarray  # (L, d) float64
    m2: np.ndarray | None  # (L, d, d) float64; None once compacted
    l1: np.ndarray  # (L,) float64
    l2: np.ndarray  # (L,) float64
    trace: np.ndarray | None = None  # (L,) trace of m2, kept by ``compact``
    spectra: np.ndarray | None = None  # (L, d) covariance eigenvalues, when computed in the graph

    @property
    def m2_trace(self) -> np.ndarray:
        """Per-layer trace of m2 (sum of squared deviations from the mean)."""
        return self.trace if self.m2 is None else np.einsum("lii->l", self.m2)

    def compact(self) -> "Moments":
        """The same sums without the d x d matrices (keeps counts, means, traces and norms)."""
        return Moments(self.n, self.mean, None, self.l1, self.l2, self.m2_trace, self.spectra)

    @property
    def covariance(self) -> np.ndarray:
        """Population covariance per layer (m2 / n)."""
        return self.m2 / max(self.n, 1.0)

    @property
    def second_moment(self) -> np.ndarray:
        """Uncentred sum of x x^T per layer (what a projection's energy share needs)."""
        return self.m2 + self.n * np.einsum("li,lj->lij", self.mean, self.mean)

    @property
    def mean_l1(self) -> np.ndarray:
        return self.l1 / max(self.n, 1.0)

    @property
    def mean_l2(self) -> np.ndarray:
        return self.l2 / max(self.n, 1.0)


def _masked(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    keep = np.asarray(mask) != 0
    x = np.asarray(x)
    if not keep.all():
        x = x[:, keep]
    return x.astype(np.float32, copy=False)


def _block_moments(x: np.ndarray, mask: np.ndarray) -> dict:
    """Sums of one (layer chunk, token chunk) block: count, mean, centred m2, norm sums."""
    x = _masked(x, mask)
    n_layers, n, d = x.shape
    if n == 0:
        zeros = np.zeros(n_layers)
        return {"n": 0.0, "mean": np.zeros((n_layers, d)), "m2": np.zeros((n_layers, d, d)),
                "l1": zeros, "l2": zeros.copy()}
    mean = x.sum(axis=1, dtype=np.float64) / n
    shift = mean.astype(np.float32)
    centred = x - shift[:, None, :]
    m2 = np.matmul(centred.transpose(0, 2, 1), centred).astype(np.float64)
    offset = mean - shift.astype(np.float64)  # correct for centring on the float32-rounded mean
    m2 -= n * np.einsum("li,lj->lij", offset, offset)
    l1, l2 = _norm_sums(x)
    return {"n": float(n), "mean": mean, "m2": m2, "l1": l1, "l2": l2}


def _token_sq_norms(x: np.ndarray) -> np.ndarray:
    """(layer, token) squared L2 norms: float32 within a token (d terms, ~1e-7 relative error),
    4-5x faster than a float64 einsum; sums over tokens are then taken in float64."""
    return np.einsum("ltd,ltd->lt", x, x)


def _norm_sums(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, float64 sums over tokens of each token's L1 and L2 norm."""
    l1 = np.abs(x).sum(axis=2).sum(axis=1, dtype=np.float64)
    l2 = np.sqrt(_token_sq_norms(x)).sum(axis=1, dtype=np.float64)
    return l1, l2


def _merge_moments(a: dict, b: dict) -> dict:
    """Chan et al.'s pairwise combination of two blocks' moments (same layers, disjoint tokens)."""
    n = a["n"] + b["n"]
    if a["n"] == 0:
        return b
    if b["n"] == 0:
        return a
    delta = b["mean"] - a["mean"]
    mean = a["mean"] + delta * (b["n"] / n)
    m2 = a["m2"] + b["m2"] + np.einsum("li,lj->lij", delta, delta) * (a["n"] * b["n"] / n)
    return {"n": n, "mean": mean, "m2": m2, "l1": a["l1"] + b["l1"], "l2": a["l2"] + b["l2"]}


def _block_difference_norms(xa: np.ndarray, xb: np.ndarray, mask: np.ndarray) -> dict:
    """Sums over a block's masked tokens of ||h_b - h_a||_1 and ||h_b - h_a||_2, per layer."""
    diff = _masked(xb, mask) - _masked(xa, mask)
    l1, l2 = _norm_sums(diff)
    return {"l1": l1, "l2": l2, "n": float(diff.shape[1])}


def _block_projected_energy(x: np.ndarray, mask: np.ndarray, bases: np.ndarray) -> dict:
    """Per layer of a block: sum over tokens of (x . b_j)^2 for every column b_j of that layer's
    ``bases`` (lc, d, K), and sum of ||x||^2. O(t d K): no d x d matrix is formed."""
    x = _masked(x, mask)
    projected = np.matmul(x, bases.astype(np.float32))  # (lc, t, K)
    return {"energy": np.einsum("ltk,ltk->lk", projected, projected, dtype=np.float64),
            "total": _token_sq_norms(x).sum(axis=1, dtype=np.float64), "n": float(x.shape[1])}


def _add_sums(a: dict, b: dict) -> dict:
    return {key: a[key] + b[key] for key in a}


def _stack_layer_chunks(parts: list[dict]) -> dict:
    """Join per-layer-chunk results along the layer axis."""
    out = {}
    for key in parts[0]:
        if key == "n" or parts[0][key] is None:
            out[key] = parts[0][key]
        else:
            out[key] = np.concatenate([p[key] for p in parts], axis=0)
    return out


def _as_moments(sums: dict) -> Moments:
    return Moments(**sums)


def _tree(items: list, combine) -> object:
    items = list(items)
    while len(items) > 1:
        items = [dask.delayed(combine)(items[i], items[i + 1]) if i + 1 < len(items) else items[i]
                 for i in range(0, len(items), 2)]
    return items[0]


def _prepare(x: da.Array, mask: da.Array) -> tuple[da.Array, da.Array]:
    if x.ndim != 3:
        raise ValueError("expected (layer, token, hidden)")
    if len(x.chunks[2]) != 1:
        x = x.rechunk({2: -1})
    mask = mask.rechunk((x.chunks[1],))
    return x, mask


def block_grid(x: da.Array) -> np.ndarray:
    """The array's blocks as delayed objects (same keys on every call, so reads are shared)."""
    return x.to_delayed(optimize_graph=False)


def token_moments(x: da.Array, mask: da.Array, finish: Callable[[dict], dict] | None = None):
    """Delayed ``Moments`` of a (layer, token, hidden) array over the tokens where ``mask`` != 0.

    ``finish`` maps each layer chunk's merged sums to what is kept of them (for example the
    covariance eigenvalues in place of the d x d ``m2``, see ``covariance.keep_spectra``): the
    d x d matrices then live only while their layer chunk is reduced, never all layers at once
    (4.4 GB per model and split for a 7B model in float64).
    """
    x, mask = _prepare(x, mask)
    blocks, mask_blocks = block_grid(x), block_grid(mask)
    per_layer_chunk = []
    for i in range(blocks.shape[0]):
        parts = [dask.delayed(_block_moments)(blocks[i, j, 0], mask_blocks[j])
                 for j in range(blocks.shape[1])]
        merged = _tree(parts, _merge_moments)
        per_layer_chunk.append(dask.delayed(finish)(merged) if finish is not None else merged)
    stacked = dask.delayed(_stack_layer_chunks)(per_layer_chunk)
    return dask.delayed(_as_moments)(stacked)


def difference_norms(xa: da.Array, xb: da.Array, mask: da.Array):
    """Delayed dict ``{"l1", "l2", "n"}``: per-layer sums of ||x_b - x_a|| over masked tokens."""
    xa, mask = _prepare(xa, mask)
    if xb.chunks != xa.chunks:
        xb = xb.rechunk(xa.chunks)
    blocks_a, blocks_b, mask_blocks = block_grid(xa), block_grid(xb), block_grid(mask)
    per_layer_chunk = []
    for i in range(blocks_a.shape[0]):
        parts = [dask.delayed(_block_difference_norms)(blocks_a[i, j, 0], blocks_b[i, j, 0],
                                                                 mask_blocks[j])
                 for j in range(blocks_a.shape[1])]
        per_layer_chunk.append(_tree(parts, _add_sums))
    return dask.delayed(_stack_layer_chunks)(per_layer_chunk)


def projected_energy(x: da.Array, mask: da.Array, bases: np.ndarray):
    """Delayed dict ``{"energy": (L, K), "total": (L,), "n"}`` over masked tokens.

    ``energy[l, j]`` = sum_t (x_t . bases[l, :, j])^2 and ``total[l]`` = sum_t ||x_t||^2, so the
    share of a subspace spanned by orthonormal columns J is energy[l, J].sum() / total[l]: the
    row-space projection without forming x x^T.
    """
    x, mask = _prepare(x, mask)
    blocks, mask_blocks = block_grid(x), block_grid(mask)
    per_layer_chunk, start = [], 0
    for i, size in enumerate(x.chunks[0]):
        chunk_bases = dask.delayed(np.ascontiguousarray(bases[start:start + size]))  # one graph key, shipped once
        start += size
        parts = [dask.delayed(_block_projected_energy)(blocks[i, j, 0], mask_blocks[j], chunk_bases)
                 for j in range(blocks.shape[1])]
        per_layer_chunk.append(_tree(parts, _add_sums))
    return dask.delayed(_stack_layer_chunks)(per_layer_chunk)
