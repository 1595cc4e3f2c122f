"""The Lanczos / Gram code path of the parameter diagnostics against numpy's full SVD.

Real models take this path (smaller side above ``DENSE_MAX``); here it is forced on moderate
matrices with ``dense_max=0`` so that it runs in milliseconds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.linalg import subspace_angles

from analyses.weights.params_linalg import (
    Spectrum,
    frobenius_sq,
    grassmann_distance,
    principal_angles,
    safe_ratio,
    space_shares,
    stable_rank,
    top_singular_subspaces,
)


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """The CPU is shared: multi-threaded LAPACK on busy cores is slow and no more exact."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


def _matrices():
    rng = np.random.default_rng(0)
    m, n = 520, 410
    low = (np.linalg.qr(rng.standard_normal((m, 6)))[0] * np.array([5, 4, 3, 2, 1, 0.5])) @ np.linalg.qr(rng.standard_normal((n, 6)))[0].T
    return {
        "random": (0.02 * rng.standard_normal((m, n))).astype(np.float32),
        "random_wide": (0.02 * rng.standard_normal((n, m))).astype(np.float32),
        "low_rank_plus_noise": (low + 1e-4 * rng.standard_normal((m, n))).astype(np.float32),
        "exact_rank_3": (rng.standard_normal((m, 3)) @ rng.standard_normal((3, n))).astype(np.float32),
        "rank_1_wide": np.outer(rng.standard_normal(n), rng.standard_normal(m)).astype(np.float32),
        "decaying": ((rng.standard_normal((m, n)) * np.geomspace(1, 1e-3, n)) @ np.linalg.qr(rng.standard_normal((n, n)))[0]).astype(np.float32),
    }


@pytest.mark.parametrize("kind", list(_matrices()))
@pytest.mark.parametrize("dense_max", [0, 10_000])
def test_spectrum_matches_full_svd(kind, dense_max):
    a = _matrices()[kind]
    s = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    energy = np.cumsum(s**2)
    spectrum = Spectrum(a, dense_max=dense_max)
    # F64 direct sums: 1e-10
    assert spectrum.fro_sq == pytest.approx(energy[-1], rel=1e-10)
    # Lanczos to its convergence tolerance vs a full SVD: 1e-4
    assert spectrum.spectral_norm() == pytest.approx(s[0], rel=1e-4)
    assert stable_rank(spectrum.fro_sq, spectrum.spectral_norm()) == pytest.approx(energy[-1] / s[0] ** 2, rel=1e-4)
    assert spectrum.empirical_rank() == int(np.searchsorted(energy, 0.99 * energy[-1]) + 1)
    np.testing.assert_allclose(spectrum.top_energies(10), s[:10] ** 2, rtol=1e-4, atol=1e-6 * s[0] ** 2)


def test_zero_matrix_and_ratios():
    spectrum = Spectrum(np.zeros((500, 400), np.float32), dense_max=0)
    assert spectrum.spectral_norm() == 0.0 and spectrum.empirical_rank() == 0
    assert stable_rank(0.0, 0.0) == 0.0
    assert safe_ratio(0.0, 0.0) == 0.0 and math.isinf(safe_ratio(1.0, 0.0)) and safe_ratio(1.0, 4.0) == 0.25
    assert frobenius_sq(np.full((3000, 7), 2.0, np.float32)) == 4.0 * 3000 * 7


@pytest.mark.parametrize("shape", [(520, 410), (410, 520)])
def test_top_subspaces_match_svd(shape):
    rng = np.random.default_rng(1)
    a = (rng.standard_normal(shape) * np.geomspace(1, 0.01, shape[1])).astype(np.float32)
    u, s, vt = np.linalg.svd(a.astype(np.float64), full_matrices=False)
    for dense_max in (0, 10_000):
        u_k, s_k, v_k = top_singular_subspaces(a, 8, dense_max=dense_max)
        assert u_k.shape == (shape[0], 8) and v_k.shape == (shape[1], 8)
        np.testing.assert_allclose(s_k, s[:8], rtol=1e-4)
        np.testing.assert_allclose(u_k.T @ u_k, np.eye(8), atol=1e-6)
        assert grassmann_distance(principal_angles(u_k, u[:, :8])) < 1e-3
        assert grassmann_distance(principal_angles(v_k, vt[:8].T)) < 1e-3


def test_principal_angles_match_scipy():
    rng = np.random.default_rng(2)
    a = np.linalg.qr(rng.standard_normal((60, 5)))[0]
    b = np.linalg.qr(rng.standard_normal((60, 5)))[0]
    near = np.linalg.qr(a + 1e-9 * rng.standard_normal((60, 5)))[0]
    for x, y in ((a, b), (a, near)):
        np.testing.assert_allclose(principal_angles(x, y), np.sort(subspace_angles(x, y)), rtol=1e-6, atol=1e-15)
    assert grassmann_distance(principal_angles(a, a)) < 1e-14


@pytest.mark.parametrize("tall", [True, False])
def test_space_shares_gram_path_matches_dense(tall):
    """Rank-deficient W (rank 40): planted in-span, left-null and right-null updates, both code paths."""
    rng = np.random.default_rng(3)
    m, n, r = (500, 420, 40) if tall else (420, 500, 40)
    u = np.linalg.qr(rng.standard_normal((m, r)))[0]
    v = np.linalg.qr(rng.standard_normal((n, r)))[0]
    w = (u * np.linspace(2, 1, r)) @ v.T
    x = rng.standard_normal((m, n))
    updates = {
        "in_span": u @ rng.standard_normal((r, r)) @ v.T,
        "left_null": x - u @ (u.T @ x),
        "right_null": x - (x @ v) @ v.T,
        "generic": x,
    }
    for kind, dw in updates.items():
        dense = space_shares(w, dw, dense_max=10_000)
        gram = space_shares(w, dw, dense_max=0)
        assert dense["W_rank"] == gram["W_rank"] == r
        for key in ("col_space_share", "row_space_share", "col_null_share", "row_null_share"):
            assert gram[key] == pytest.approx(dense[key], abs=1e-8), (kind, key)
        exact_col = np.sum((u.T @ dw) ** 2) / np.sum(dw**2)
        exact_row = np.sum((dw @ v) ** 2) / np.sum(dw**2)
        assert dense["col_space_share"] == pytest.approx(exact_col, abs=1e-10)
        assert dense["row_space_share"] == pytest.approx(exact_row, abs=1e-10)
    assert space_shares(w, updates["in_span"])["col_null_share"] == pytest.approx(0.0, abs=1e-10)
    assert space_shares(w, updates["left_null"])["col_null_share"] == pytest.approx(1.0, abs=1e-10)
    assert space_shares(w, updates["right_null"])["row_null_share"] == pytest.approx(1.0, abs=1e-10)
    zero = space_shares(w, np.zeros_like(w), dense_max=0)
    assert zero["col_space_share"] == zero["col_null_share"] == zero["row_null_share"] == 0.0
