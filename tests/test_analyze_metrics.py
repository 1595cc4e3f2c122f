"""Each activation metric against a direct numpy / scipy / sklearn computation, and known answers."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
from scipy.stats import wasserstein_distance
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from analyses.activations import covariance, logit_lens, norms, probes, row_space, separation
from analyses.activations.reductions import difference_norms, token_moments
from analyses.testing import final_norm, llama_tensors, make_wmdp_pair, write_checkpoint
from analyses.weights.checkpoints import open_checkpoint


def _lazy(x, token_chunk=7, layer_chunk=2):
    return da.from_array(x, chunks=(layer_chunk, token_chunk, -1))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_token_moments_equal_numpy(dtype):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(5, 53, 6)) * 3 + 40).astype(dtype)  # large mean: the centred update matters
    mask = (rng.random(53) > 0.2).astype(np.int8)
    moments = dask.compute(token_moments(_lazy(x), da.from_array(mask, chunks=11)))[0]
    kept = x[:, mask == 1].astype(np.float64)
    assert moments.n == mask.sum()
    # tolerances: F64 for the float64 accumulators (mean 1e-10); covariance of float16/float32
    # inputs with mean 40: the centred update loses ~log2(40) bits of a float32 product, F32-ORDER 1e-4
    np.testing.assert_allclose(moments.mean, kept.mean(axis=1), rtol=1e-10)
    for layer in range(5):
        np.testing.assert_allclose(moments.covariance[layer], np.cov(kept[layer].T, bias=True), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(moments.second_moment[layer], kept[layer].T @ kept[layer], rtol=1e-6)
    np.testing.assert_allclose(moments.mean_l1, np.abs(kept).sum(-1).mean(-1), rtol=1e-6)
    np.testing.assert_allclose(moments.mean_l2, np.linalg.norm(kept, axis=-1).mean(-1), rtol=1e-6)
    compact = moments.compact()
    np.testing.assert_allclose(compact.m2_trace, np.einsum("lii->l", moments.m2))


def test_difference_norms_and_norm_rows_equal_numpy():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4, 40, 5)).astype(np.float32)
    b = a + rng.normal(size=a.shape).astype(np.float32) * 0.3
    mask = np.ones(40, np.int8)
    mask[[3, 17]] = 0
    lazy_mask = da.from_array(mask, chunks=9)
    ma, mb, dh = dask.compute(token_moments(_lazy(a), lazy_mask), token_moments(_lazy(b, 13, 3), lazy_mask),
                              difference_norms(_lazy(a), _lazy(b, 13, 3), lazy_mask))
    rows = norms.norm_rows("forget", ma, mb, dh)
    keep = mask == 1
    diff = (b - a)[:, keep].astype(np.float64)
    assert [r["layer"] for r in rows] == [0, 1, 2, 3]
    for layer, row in enumerate(rows):
        assert row["split"] == "forget"
        assert row["model_a_norm_L2"] == pytest.approx(np.linalg.norm(a[layer, keep], axis=-1).mean(), rel=1e-6)
        assert row["model_b_norm_L1"] == pytest.approx(np.abs(b[layer, keep]).sum(-1).mean(), rel=1e-6)
        assert row["mean_dh_L1"] == pytest.approx(np.abs(diff[layer]).sum(-1).mean(), rel=1e-5)
        assert row["mean_dh_L2"] == pytest.approx(np.linalg.norm(diff[layer], axis=-1).mean(), rel=1e-5)
    assert list(rows[0]) == norms.COLUMNS


def _with_covariance(eigenvalues, n, rng):
    """Samples whose population covariance is exactly Q diag(eigenvalues) Q^T."""
    d = len(eigenvalues)
    z = rng.normal(size=(n, d))
    z -= z.mean(axis=0)
    q_z, _ = np.linalg.qr(z)
    whitened = q_z * np.sqrt(n)  # columns orthonormal * sqrt(n): covariance = identity, mean 0
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return whitened * np.sqrt(eigenvalues) @ q.T + 5.0


def test_planted_spectrum_effective_rank():
    rng = np.random.default_rng(2)
    n = 400
    flat3 = np.array([2.0, 2.0, 2.0, 0, 0, 0, 0, 0])
    decaying = np.array([4.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05, 0.05])
    x = np.stack([_with_covariance(flat3, n, rng), _with_covariance(decaying, n, rng)]).astype(np.float32)
    moments = dask.compute(token_moments(da.from_array(x, chunks=(1, 64, -1)), da.ones(n, chunks=64)))[0]
    spectra = covariance.layer_spectra(moments)
    # STAT + F32-ORDER: the sample covariance of float32 data drawn with this spectrum (exactly
    # whitened by _with_covariance, so only float32 rounding remains: 1e-4 of eigenvalues of order 1)
    np.testing.assert_allclose(spectra[0], flat3, atol=1e-4)
    np.testing.assert_allclose(spectra[1], decaying, rtol=1e-3, atol=1e-5)
    assert covariance.effective_rank(spectra[0]) == pytest.approx(3.0, rel=1e-4)
    p = decaying / decaying.sum()
    assert covariance.spectral_entropy(spectra[1]) == pytest.approx(-(p * np.log(p)).sum(), rel=1e-4)
    assert covariance.effective_rank(np.ones(8)) == pytest.approx(8.0)
    assert covariance.effective_rank(np.zeros(8)) == 0.0
    rows = covariance.covariance_rows("forget", spectra, spectra[::-1])
    assert rows[0]["wasserstein"] == pytest.approx(wasserstein_distance(spectra[0], spectra[1]))
    assert rows[0]["wasserstein_normalised"] == pytest.approx(
        wasserstein_distance(spectra[0] / spectra[0].sum(), spectra[1] / spectra[1].sum()))
    same = covariance.covariance_rows("retain", spectra, spectra)
    assert same[0]["wasserstein"] == 0.0
    selectivity = covariance.selectivity_rows(rows, rows)
    assert selectivity[0]["selectivity_ratio"] == pytest.approx(1.0)
    assert np.isinf(covariance.selectivity_rows(rows, same)[0]["selectivity_ratio"])


def test_spectra_in_the_graph_equal_full_matrices_and_drop_them():
    """``finish=keep_spectra`` eigendecomposes each layer chunk inside the graph: same spectra,
    traces, means and norms as the full-matrix path, and no d x d matrix in the result."""
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(5, 61, 9)) * rng.uniform(0.1, 3, size=9) + 2).astype(np.float32)
    mask = (rng.random(61) > 0.1).astype(np.int8)
    lazy_mask = da.from_array(mask, chunks=10)
    full, kept = dask.compute(token_moments(_lazy(x, 10, 2), lazy_mask),
                              token_moments(_lazy(x, 10, 2), lazy_mask, finish=covariance.keep_spectra))
    assert kept.m2 is None and kept.spectra.shape == (5, 9)
    reference = np.stack([np.linalg.eigvalsh(np.cov(x[layer, mask == 1].T.astype(np.float64), bias=True))[::-1]
                          for layer in range(5)])
    # F64 reference vs float64 accumulators of float32 data: 1e-5 (F32-ORDER on the inputs' squares)
    np.testing.assert_allclose(kept.spectra, reference, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(covariance.layer_spectra(kept), covariance.layer_spectra(full), rtol=1e-12)
    compact = full.compact()
    for name in ("mean", "l1", "l2", "trace"):
        np.testing.assert_allclose(getattr(kept, name), getattr(compact, name), rtol=1e-12)
    assert kept.compact().spectra is kept.spectra


def test_planted_separation():
    rng = np.random.default_rng(3)
    d, n = 6, 60
    direction = np.zeros(d)
    direction[2] = 1.0
    retain = rng.normal(size=(2, n, d))
    forget = rng.normal(size=(2, n, d)) + 8.0 * direction * np.array([0.0, 1.0])[:, None, None]  # layer 1 only
    ones = da.ones(n, chunks=16)
    mf, mr = dask.compute(token_moments(da.from_array(forget.astype(np.float32), chunks=(1, 16, -1)), ones),
                          token_moments(da.from_array(retain.astype(np.float32), chunks=(1, 16, -1)), ones))
    aucs = separation.layer_aucs(forget, retain, seed=0)
    rows = separation.separation_rows("base", "a", mf, mr, aucs)
    assert rows[1]["auc"] > 0.99
    assert 0.2 < rows[0]["auc"] < 0.85
    for layer in (0, 1):
        cf, cr = forget[layer].mean(0), retain[layer].mean(0)
        expected = 1 - cf @ cr / (np.linalg.norm(cf) * np.linalg.norm(cr))
        assert rows[layer]["cosine_distance"] == pytest.approx(expected, rel=1e-5)
        both = np.concatenate([forget[layer], retain[layer]])
        between = n * (((cf - both.mean(0)) ** 2).sum() + ((cr - both.mean(0)) ** 2).sum()) / (2 * n)
        within = (((forget[layer] - cf) ** 2).sum() + ((retain[layer] - cr) ** 2).sum()) / (2 * n)
        assert rows[layer]["variance_ratio"] == pytest.approx(between / within, rel=1e-4)
    assert rows[1]["variance_ratio"] > 5 * rows[0]["variance_ratio"]


def test_heldout_auc_equals_sklearn():
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(4)
    f, r = rng.normal(size=(20, 4)) + 0.5, rng.normal(size=(20, 4))
    X = np.concatenate([f, r])
    y = np.r_[np.ones(20), np.zeros(20)]
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=12, stratify=y, random_state=7)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=200, random_state=7)).fit(Xtr, ytr)
    assert separation.heldout_auc(f, r, C=0.5, max_iter=200, seed=7) == pytest.approx(
        roc_auc_score(yte, clf.decision_function(Xte)))


def test_probe_equals_sklearn_cross_validation():
    rng = np.random.default_rng(5)
    f, r = rng.normal(size=(14, 5)) + 0.4, rng.normal(size=(9, 5))
    got = probes.probe_layer(f, r, C=2.0, max_iter=300, seed=3)
    X = np.concatenate([f, r])
    y = np.r_[np.ones(14), np.zeros(9)]
    folds = StratifiedKFold(5, shuffle=True, random_state=3)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=2.0, max_iter=300, random_state=3))
    accuracy = cross_val_score(clf, X, y, cv=folds).mean()
    auc = roc_auc_score(y, cross_val_predict(clf, X, y, cv=folds, method="decision_function"))
    assert got["accuracy"] == pytest.approx(accuracy)
    assert got["auc"] == pytest.approx(auc)
    assert got["majority_baseline"] == pytest.approx(14 / 23)
    assert got["selectivity"] == pytest.approx(accuracy - 14 / 23)
    few = probes.probe_layer(f[:3], r[:2])
    assert few["n_folds"] == 2


def test_probe_refuses_too_few_samples():
    from unlearn_lens.core.errors import UserError

    with pytest.raises(UserError, match="at least 2"):
        probes.probe_layer(np.zeros((1, 3)), np.zeros((5, 3)))


def test_planted_row_space_alignment(tmp_path):
    rng = np.random.default_rng(6)
    layers, d, ff, k = 2, 12, 24, 3
    tensors = llama_tensors(layers, d, ff, 30, seed=0)
    rows_basis, _ = np.linalg.qr(rng.normal(size=(d, k)))
    modified = {name: value.copy() for name, value in tensors.items()}
    for name in ("model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.gate_proj.weight"):
        modified[name] += (rng.normal(size=(ff, k)) @ rows_basis.T).astype(np.float32)
    a = open_checkpoint(write_checkpoint(tmp_path / "a", tensors))
    b = open_checkpoint(write_checkpoint(tmp_path / "b", modified))
    bases = row_space.update_bases(a, b, top_k=8)
    assert sorted(bases) == [0, 1]
    basis0, rank0, _ = bases[0]
    basis, rank, names = bases[1]
    assert rank0 == 0 and basis0.shape == (d, 0)
    assert rank == k and basis.shape == (d, k)
    assert names == ["model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    # the recovered subspace is the planted one
    # F32-ORDER: a projector from a float32 SVD of the planted update
    np.testing.assert_allclose(basis @ basis.T, rows_basis @ rows_basis.T, atol=1e-5)
    forget = rng.normal(size=(2000, k)) @ rows_basis.T  # inputs inside dW's row space
    retain = rng.normal(size=(2000, d))  # isotropic
    shares_f = row_space.split_shares(forget.T @ forget, basis, seed=0, layer=1)
    shares_r = row_space.split_shares(retain.T @ retain, basis, seed=0, layer=1)
    row = row_space.row_space_row(1, "base", basis, rank, shares_f, shares_r, names)
    assert row["share_forget"] == pytest.approx(1.0, abs=1e-8)
    assert row["share_retain"] == pytest.approx(k / d, abs=0.05)
    assert row["random_share_retain"] == pytest.approx(k / d, abs=0.05)
    assert row["chance_share"] == pytest.approx(k / d)
    assert row["selectivity_ratio"] > 3
    # direct numpy: share = sum ||V^T x||^2 / sum ||x||^2
    assert row["share_retain"] == pytest.approx((np.linalg.norm(retain @ basis, axis=1) ** 2).sum()
                                                / (np.linalg.norm(retain, axis=1) ** 2).sum())
    q = row_space.random_subspace(d, k, 0, 1)
    np.testing.assert_allclose(q.T @ q, np.eye(k), atol=1e-12)
    np.testing.assert_allclose(q, row_space.random_subspace(d, k, 0, 1))


def test_shape_mismatch_refused(tmp_path):
    from unlearn_lens.core.errors import UserError

    a = open_checkpoint(write_checkpoint(tmp_path / "a", llama_tensors(2, 8, 16, 20)))
    b = open_checkpoint(write_checkpoint(tmp_path / "b", llama_tensors(2, 8, 24, 20)))
    with pytest.raises(UserError, match="down_proj.weight has shape"):
        row_space.check_same_shapes(a, b, "base vs b")


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_final_norm_matches_formula(kind):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(3, 10)) * 4 + 1
    w, b = rng.normal(size=10), rng.normal(size=10)
    got = logit_lens.apply_final_norm(x, kind, w, b if kind == "layernorm" else None, 1e-5)
    assert got.dtype == np.float32
    # tolerance: F32-ORDER (the float32 result of apply_final_norm vs the float64 formula)
    np.testing.assert_allclose(got, final_norm(x, kind, w, b if kind == "layernorm" else 0.0, 1e-5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_lens_last_layer_reproduces_model_answers(kind):
    wmdp, cloze, U = make_wmdp_pair(7, num_layers=3, hidden=8, vocab=50, norm_kind=kind, seed=11)
    norm = {"kind": kind, "eps": 1e-5, "weight": wmdp["final_norm_weight"].values,
            "bias": wmdp["final_norm_bias"].values if kind == "layernorm" else None}
    letters = logit_lens.letter_predictions(wmdp["last"].values, wmdp["letter_unembed"].values, norm)
    np.testing.assert_array_equal(letters[-1], wmdp["final_letter_logits"].values.argmax(1))
    samples = np.arange(cloze.sizes["sample"])
    index, owner = logit_lens.cloze_positions(cloze["sample_offset"].values, cloze["cont_start"].values,
                                              cloze["cont_end"].values, samples)
    targets = cloze["input_ids"].values[index + 1]
    states = cloze["resid"].values[:, index]
    scores = logit_lens.cloze_scores(states, targets, owner, len(samples), U, norm)
    # tolerance: F32-ORDER (numpy float32 logit lens vs the torch model's cached log-prob)
    np.testing.assert_allclose(scores[-1], cloze["final_cloze_logprob"].values, atol=1e-4)
    # memory-bounded blocks (one position at a time) give the same log-probs
    tiny_blocks = logit_lens.token_logprobs(states[1], targets, U, norm, block_bytes=1)
    np.testing.assert_allclose(tiny_blocks, logit_lens.token_logprobs(states[1], targets, U, norm), rtol=1e-6)
    predictions = logit_lens.cloze_predictions(scores, cloze["question"].values, cloze["choice_index"].values,
                                               np.arange(7))
    table = scores[-1].reshape(7, 4)
    np.testing.assert_array_equal(predictions[-1], table.argmax(1))
    rows = logit_lens.accuracy_rows("cloze", predictions, wmdp["answer"].values)
    assert rows[-1]["delta_from_final"] == 0.0
    assert rows[0]["accuracy"] == pytest.approx((predictions[0] == wmdp["answer"].values).mean())
    assert list(rows[0]) == logit_lens.COLUMNS


def test_token_logprobs_score_each_distinct_state_once():
    rng = np.random.default_rng(5)
    U = rng.normal(size=(60, 8)).astype(np.float32)
    states = rng.normal(size=(9, 8)).astype(np.float16)
    states[[4, 6]] = states[1]  # e.g. three choices' continuations all follow the same context state
    states[8] = -states[0]  # equal magnitudes, other sign: a different state
    targets = rng.integers(0, 60, size=9)
    norm = {"kind": "layernorm", "eps": 1e-5, "weight": rng.normal(size=8), "bias": rng.normal(size=8)}
    scored = []

    def spy(function, blocks):
        blocks = list(blocks)
        scored.extend(block.stop - block.start for block in blocks)
        return map(function, blocks)

    got = logit_lens.token_logprobs(states, targets, U, norm, map_blocks=spy)
    assert sum(scored) == 7
    logits = logit_lens.apply_final_norm(states, **norm).astype(np.float64) @ U.T.astype(np.float64)
    expected = logits[np.arange(9), targets] - np.log(np.exp(logits).sum(axis=1))
    # tolerance: F32-ORDER (float32 log-softmax vs the float64 formula)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
