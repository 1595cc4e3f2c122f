"""Spectral quantities of one weight matrix without a full SVD where none is needed.

A 7B model has hundreds of 4096 x 11008 matrices, and a full SVD of each takes tens of seconds on
a laptop. The spectral norm comes from ARPACK's Lanczos (``scipy.sparse.linalg.eigsh``) on the
implicit operator ``x -> A^T A x`` (a few dozen matrix-vector products when sigma_1 stands out,
as in most updates); when that needs more products than it is worth, Lanczos runs on the Gram
matrix of the smaller side instead (``A^T A`` or ``A A^T``, one BLAS ``syrk``). The 99 % empirical
rank grows ``k`` (top-k eigenvalues of the Gram matrix) until they hold 99 % of the (known)
squared Frobenius norm (Lanczos on the implicit operator first, the Gram matrix only when that
needs too many products), and takes every eigenvalue only once the rank is provably above
``LANCZOS_MAX_SHARE`` of the smaller side (near-full-rank matrices). Matrices whose smaller side is at most
``DENSE_MAX`` use an exact dense SVD in float64 instead (cheap there, and ARPACK needs
``k < n``).

Conventions: a zero matrix has spectral norm 0, stable rank 0 and empirical rank 0; ratios are
0 for 0/0 (identical models give zeros, never NaN).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigsh

#: Matrices whose smaller side is at most this use a dense float64 SVD.
DENSE_MAX = 384
#: Share of the squared Frobenius norm the empirical rank must hold.
RANK_ENERGY = 0.99
#: Grow the Lanczos top-k up to this share of the small side, then take every eigenvalue.
LANCZOS_MAX_SHARE = 0.1
#: Matrix-vector products tried before building the Gram matrix for the spectral norm.
OPERATOR_BUDGET = 40
#: Further products allowed per requested eigenvalue before the top-k falls back to the Gram matrix.
MATVECS_PER_VALUE = 8
_ROW_CHUNK = 1024


class _BudgetExceeded(Exception):
    """Lanczos on the implicit Gram operator needs more products than the Gram matrix costs."""


def safe_ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator`` with 0/0 = 0 and x/0 = inf (for x > 0)."""
    if denominator == 0:
        return 0.0 if numerator == 0 else math.inf
    return float(numerator) / float(denominator)


def frobenius_sq(a: np.ndarray) -> float:
    """Squared Frobenius norm, accumulated in float64 over row chunks (no full float64 copy)."""
    flat = a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(1, -1)
    total = 0.0
    for start in range(0, flat.shape[0], _ROW_CHUNK):
        block = flat[start : start + _ROW_CHUNK].astype(np.float64)
        total += float(np.einsum("ij,ij->", block, block))
    return total


def stable_rank(fro_sq: float, spectral: float) -> float:
    """``||A||_F^2 / ||A||_2^2``; 0 for a zero matrix."""
    return safe_ratio(fro_sq, spectral * spectral)


def _start_vector(n: int) -> np.ndarray:
    """A fixed ARPACK start vector: same matrix, same answer, whichever worker computes it."""
    return np.random.default_rng(12345).standard_normal(n)


def small_side_gram(a: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Gram matrix of the smaller side: ``A^T A`` if A is tall, else ``A A^T`` (min(m,n) square)."""
    a = np.asarray(a, dtype=dtype)
    return a.T @ a if a.shape[0] >= a.shape[1] else a @ a.T


class Spectrum:
    """Singular-value energies (sigma_i^2) of one matrix, computed lazily and as little as needed."""

    def __init__(self, a: np.ndarray, fro_sq: float | None = None, dense_max: int | None = None):
        self.shape = tuple(int(n) for n in a.shape)
        self.small = min(self.shape)
        self.fro_sq = frobenius_sq(a) if fro_sq is None else float(fro_sq)
        dense_max = DENSE_MAX if dense_max is None else dense_max
        self._all: np.ndarray | None = None
        self._gram_cache: np.ndarray | None = None
        self._matrix: np.ndarray | None = None
        self._top: np.ndarray = np.zeros(0)
        if self.fro_sq == 0.0 or self.small == 0:
            self._all = np.zeros(self.small)
        elif self.small <= dense_max or self.small < 3:
            sigma = np.linalg.svd(np.asarray(a, dtype=np.float64), compute_uv=False)
            self._all = sigma * sigma
        else:
            self._matrix = np.asarray(a, dtype=np.float32)

    @property
    def _gram(self) -> np.ndarray:
        if self._gram_cache is None:
            assert self._matrix is not None
            self._gram_cache = small_side_gram(self._matrix)
        return self._gram_cache

    def _top_by_matvec(self, budget: int = OPERATOR_BUDGET) -> float | None:
        """sigma_1^2 by Lanczos on x -> A^T (A x) without forming the Gram matrix.

        Much cheaper than the Gram matrix when sigma_1 stands out (typical of updates); gives up
        after ``budget`` products (flat spectrum) and returns None.
        """
        values = self._top_k_by_matvec(1, budget)
        return None if values is None else float(values[0])

    def _top_k_by_matvec(self, k: int, budget: int) -> np.ndarray | None:
        """The k largest sigma_i^2 (descending) by Lanczos on the implicit Gram operator, or None.

        None when ARPACK needs more than ``budget`` products (a flat top spectrum): the caller
        then builds the Gram matrix, one ``syrk`` costing as much as min(m, n) products.
        """
        a = self._matrix
        assert a is not None
        tall = a.shape[0] >= a.shape[1]
        count = [0]

        def product(x: np.ndarray) -> np.ndarray:
            count[0] += 1
            if count[0] > budget:
                raise _BudgetExceeded
            x = np.asarray(x, dtype=np.float32).ravel()
            return a.T @ (a @ x) if tall else a @ (a.T @ x)

        operator = LinearOperator((self.small, self.small), matvec=product, dtype=np.float32)
        try:
            values = eigsh(operator, k=k, which="LA", return_eigenvectors=False, v0=_start_vector(self.small), tol=0)
        except (_BudgetExceeded, ArpackNoConvergence, ArpackError):
            return None
        return np.clip(np.sort(values.astype(np.float64))[::-1], 0.0, None)

    def all_energies(self) -> np.ndarray:
        """Every sigma_i^2, descending (dense eigenvalues of the Gram matrix, in float64)."""
        if self._all is None:
            assert self._gram is not None
            values = np.linalg.eigvalsh(self._gram.astype(np.float64))[::-1]
            self._all = np.clip(values, 0.0, None)
        return self._all

    def top_energies(self, k: int) -> np.ndarray:
        """The k largest sigma_i^2, descending (Lanczos when k is small against the matrix)."""
        k = min(int(k), self.small)
        if self._all is not None:
            return self._all[:k]
        if len(self._top) >= k:
            return self._top[:k]
        if k >= self.small - 1 or k > LANCZOS_MAX_SHARE * self.small:
            return self.all_energies()[:k]
        if self._gram_cache is None:  # a low-rank update converges in a few products: no Gram matrix
            values = self._top_k_by_matvec(k, OPERATOR_BUDGET + MATVECS_PER_VALUE * k)
            if values is not None:
                self._top = values
                return self._top
        try:
            values = eigsh(self._gram, k=k, which="LA", return_eigenvectors=False,
                           v0=_start_vector(self.small), tol=0)
        except (ArpackNoConvergence, ArpackError):
            return self.all_energies()[:k]
        self._top = np.clip(np.sort(values.astype(np.float64))[::-1], 0.0, None)
        return self._top

    def spectral_norm(self) -> float:
        """Largest singular value."""
        if self.small == 0:
            return 0.0
        if self._all is None and not len(self._top) and self._gram_cache is None:
            top = self._top_by_matvec()
            if top is not None:
                return float(math.sqrt(top))
        return float(math.sqrt(self.top_energies(1)[0]))

    def empirical_rank(self, energy: float = RANK_ENERGY) -> int:
        """Fewest singular values holding ``energy`` of the squared Frobenius norm (0 for zero)."""
        if self.fro_sq == 0.0:
            return 0
        if self._all is not None:
            return _rank_from_energies(self._all, energy * float(self._all.sum()))
        k = 8
        while k <= LANCZOS_MAX_SHARE * self.small and k < self.small - 1:
            top = self.top_energies(k)
            if self._all is not None:
                break
            cumulative = np.cumsum(top)
            target = energy * self.fro_sq
            if cumulative[-1] >= target:
                return int(np.searchsorted(cumulative, target) + 1)
            # each further sigma^2 is at most the k-th: a lower bound on the rank still to find
            at_least = k + (target - cumulative[-1]) / max(top[-1], 1e-300)
            if at_least > LANCZOS_MAX_SHARE * self.small:
                break
            k = max(2 * k, int(math.ceil(at_least)))
        values = self.all_energies()
        return _rank_from_energies(values, energy * float(values.sum()))


def _rank_from_energies(energies: np.ndarray, target: float) -> int:
    if target <= 0:
        return 0
    cumulative = np.cumsum(energies)
    return int(min(np.searchsorted(cumulative, target * (1 - 1e-12)) + 1, len(energies)))


def top_singular_subspaces(a: np.ndarray, k: int, dense_max: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(U_k, s_k, V_k)``: orthonormal bases (m x k, n x k) of the top-k left/right singular spaces.

    Dense SVD for small matrices; otherwise Lanczos on the small-side Gram matrix, the other side
    recovered as ``A V / s`` and re-orthonormalised.
    """
    a = np.asarray(a)
    m, n = a.shape
    small = min(m, n)
    k = max(1, min(int(k), small))
    dense_max = DENSE_MAX if dense_max is None else dense_max
    if small <= dense_max or k >= small - 1:
        u, s, vt = np.linalg.svd(a.astype(np.float64), full_matrices=False)
        return u[:, :k], s[:k], vt[:k].T
    gram = small_side_gram(a)
    try:
        values, vectors = eigsh(gram, k=k, which="LA", v0=_start_vector(small), tol=0)
    except (ArpackNoConvergence, ArpackError):
        values, vectors = np.linalg.eigh(gram.astype(np.float64))
        values, vectors = values[-k:], vectors[:, -k:]
    order = np.argsort(values)[::-1]
    values = np.clip(values[order].astype(np.float64), 0.0, None)
    small_basis = vectors[:, order].astype(np.float64)
    sigma = np.sqrt(values)
    other = (a.T if m < n else a).astype(np.float32) @ small_basis.astype(np.float32)
    other = np.linalg.qr(other.astype(np.float64))[0]  # orthonormal even where sigma ~ 0
    if m >= n:
        return other, sigma, small_basis
    return small_basis, sigma, other


def principal_angles(basis_a: np.ndarray, basis_b: np.ndarray) -> np.ndarray:
    """Principal angles (radians, ascending) between the spans of two orthonormal bases."""
    cross = basis_a.T @ basis_b
    cosines = np.clip(np.linalg.svd(cross, compute_uv=False), 0.0, 1.0)  # descending
    # arccos loses small angles (cos ~ 1); take those from the sines (Knyazev & Argentati 2002)
    sines = np.clip(np.linalg.svd(basis_b - basis_a @ cross, compute_uv=False)[::-1], 0.0, 1.0)
    k = min(len(cosines), len(sines))
    angles = np.arccos(cosines[:k])
    small = cosines[:k] ** 2 > 0.5
    angles[small] = np.arcsin(sines[:k][small])
    return np.sort(angles)


def grassmann_distance(angles: np.ndarray) -> float:
    """Geodesic distance on the Grassmannian: sqrt(sum theta_i^2)."""
    return float(np.sqrt(np.sum(np.square(angles))))


def default_rank_rtol(shape: tuple[int, int]) -> float:
    """numpy's ``matrix_rank`` rule for float32 weights: max(m, n) * eps(float32), relative to sigma_1."""
    return float(max(shape) * np.finfo(np.float32).eps)


def space_shares(w: np.ndarray, dw: np.ndarray, rtol: float | None = None,
                 dense_max: int | None = None) -> dict[str, float]:
    """Split ``||dW||_F^2`` between W's column space (output side) / row space (input side) and complements.

    The rank of W counts singular values above ``rtol * sigma_1(W)`` (default
    ``default_rank_rtol``). Column space: ``||U_r^T dW||^2``; row space: ``||dW V_r||^2``; each
    as a share of ``||dW||_F^2`` (0 for dW = 0), the complement share being the rest.
    """
    w = np.asarray(w)
    dw = np.asarray(dw)
    m, n = w.shape
    rtol = default_rank_rtol((m, n)) if rtol is None else float(rtol)
    dense_max = DENSE_MAX if dense_max is None else dense_max
    total = frobenius_sq(dw)
    if min(m, n) <= dense_max:
        u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
        rank = int(np.sum(s > rtol * s[0])) if s.size and s[0] > 0 else 0
        d64 = dw.astype(np.float64)
        col = float(np.sum(np.square(u[:, :rank].T @ d64)))
        row = float(np.sum(np.square(d64 @ vt[:rank].T)))
    else:
        tall = m >= n
        wt, dt = (w, dw) if tall else (w.T, dw.T)  # small side = columns of wt
        w64 = wt.astype(np.float64)
        values, vectors = np.linalg.eigh(w64.T @ w64)
        order = np.argsort(values)[::-1]
        sigma = np.sqrt(np.clip(values[order], 0.0, None))
        vectors = vectors[:, order]
        rank = int(np.sum(sigma > rtol * sigma[0])) if sigma[0] > 0 else 0
        basis_small = vectors[:, :rank]  # span of W's rows (tall) / columns (wide), small side
        d64 = dt.astype(np.float64)
        small_side = float(np.sum(np.square(d64 @ basis_small)))
        basis_large = (w64 @ basis_small) / sigma[:rank]  # orthonormal, large side
        large_side = float(np.sum(np.square(basis_large.T @ d64)))
        row, col = (small_side, large_side) if tall else (large_side, small_side)
    col_share, row_share = safe_ratio(min(col, total), total), safe_ratio(min(row, total), total)
    return {
        "W_rank": rank,
        "rank_rtol": rtol,
        "col_space_share": col_share,
        "col_null_share": max(0.0, 1.0 - col_share) if total > 0 else 0.0,
        "row_space_share": row_share,
        "row_null_share": max(0.0, 1.0 - row_share) if total > 0 else 0.0,
    }
