"""The MSE-optimal encoder read-out (jsdl.landscape.readout): closed form against brute-force least
squares in float64, the dual-frame identity, the sampled solver against np.linalg.lstsq, the
aligned (selected alone) regime, targets on selected sets, and errors."""
import itertools

import numpy as np
import pytest

from jsdl.landscape import readout as R


def _frame(rng, dim, n):
    W = rng.standard_normal((dim, n))
    return W / np.linalg.norm(W, axis=0)


def _enumerated_law(n, sparsity, c_min, beta):
    """Every coefficient vector of a discrete law with the bench's activation probability and the
    same first two magnitude moments (two magnitudes mu -/+ sd, each w.p. 1/2): ``(X [3^n, n],
    probs [3^n])``. The closed form depends on the magnitudes only through mu and m2."""
    p, mu, m2 = R.law_moments(sparsity, c_min, beta)
    sd = np.sqrt(m2 - mu**2)
    vals = [(0.0, 1 - p), (mu - sd, p / 2), (mu + sd, p / 2)]
    X, P = [], []
    for combo in itertools.product(vals, repeat=n):
        X.append([v for v, _ in combo])
        P.append(np.prod([q for _, q in combo]))
    return np.array(X), np.array(P)


@pytest.mark.parametrize("intercept", [True, False])
@pytest.mark.parametrize("dims", [(6, 4), (5, 5), (4, 6)])
def test_active_readout_matches_bruteforce_least_squares(intercept, dims):
    n, dim = dims
    rng = np.random.default_rng(0)
    W = _frame(rng, dim, n)
    sparsity, c_min, beta = 0.7, 0.5, 0.5
    X, P = _enumerated_law(n, sparsity, c_min, beta)
    closed = R.active_readout(W, sparsity, c_min, beta, intercept=intercept)
    for d in range(n):
        on = X[:, d] > 0
        Z = X[on] @ W.T
        if intercept:
            Z = np.concatenate([Z, np.ones((Z.shape[0], 1))], axis=1)
        sw = np.sqrt(P[on])[:, None]
        sol = np.linalg.lstsq(sw * Z, sw[:, 0] * X[on, d], rcond=None)[0]
        np.testing.assert_allclose(closed[d], sol[:dim], atol=1e-8, rtol=0)


def test_centred_active_readout_is_the_dual_row_for_every_sparsity():
    rng = np.random.default_rng(1)
    W = _frame(rng, 12, 20)
    dual = R.dual_rows(W)
    for s in (0.5, 0.9, 0.99, 0.9999):
        E = R.active_readout(W, s, 0.5, 0.5, intercept=True)
        cos = np.sum(E * dual, 1) / np.linalg.norm(E, axis=1) / np.linalg.norm(dual, axis=1)
        np.testing.assert_allclose(cos, 1.0, atol=1e-10)
    # the dual direction is not w_d for a generic frame, so the identity is not vacuous
    assert R.dual_cosine(W).max() < 0.99


def test_dual_cosine_is_one_for_a_tight_frame_and_sqrt_one_minus_ratio_for_random():
    rng = np.random.default_rng(2)
    Q1, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    Q2, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    tight = np.concatenate([Q1, Q2], axis=1)  # W W^T = 2 I
    np.testing.assert_allclose(R.dual_cosine(tight), 1.0, atol=1e-12)
    W = _frame(rng, 300, 600)  # dim / n = 0.5: Marchenko-Pastur gives ~ sqrt(0.5)
    assert abs(R.dual_cosine(W).mean() - np.sqrt(0.5)) < 0.05


def test_alone_readout_is_w_over_norm_squared():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((5, 7))
    E = R.alone_readout(W)
    np.testing.assert_allclose(np.sum(E * W.T, 1), 1.0, atol=1e-12)
    np.testing.assert_allclose(R.row_cosines(E, W), 1.0, atol=1e-12)


@pytest.mark.parametrize("selection,k", [("topk", 2), ("active", None), ("threshold", None)])
def test_sampled_solver_matches_lstsq(selection, k):
    rng = np.random.default_rng(4)
    n, dim = 10, 8
    W = _frame(rng, dim, n)
    X = R.sample_law(rng, 4000, n, 0.8)
    kw = {"k": k} if k else {"threshold": 0.3} if selection == "threshold" else {}
    Ea, ba, sa = R.sampled_readout(X, W, selection=selection, method="normal", **kw)
    Eb, bb, _ = R.sampled_readout(X, W, selection=selection, method="lstsq", **kw)
    assert sa["n_selected"].min() > dim + 1
    np.testing.assert_allclose(Ea, Eb, atol=1e-8, rtol=0)
    np.testing.assert_allclose(ba, bb, atol=1e-8, rtol=0)


def test_topk_one_readout_is_aligned_even_with_coactive_features():
    """k = 1 selects d alone, so the target w_d . x_p / |w_d|^2 is linear in x_p whatever else is
    active (here ~2 features per sample): the least squares recovers w_d / |w_d|^2 exactly."""
    rng = np.random.default_rng(5)
    n, dim = 16, 12
    W = _frame(rng, dim, n)
    X = R.sample_law(rng, 6000, n, 1 - 2 / n)
    E, b, st = R.sampled_readout(X, W, selection="topk", k=1)
    ok = st["n_selected"] > dim + 1
    np.testing.assert_allclose(E[ok], R.alone_readout(W)[ok], atol=1e-8)
    np.testing.assert_allclose(b[ok], 0.0, atol=1e-8)
    assert np.all(st["co_selected"] == 0)
    # with k = 2 the same samples force the row off w_d
    E2, _, st2 = R.sampled_readout(X, W, selection="topk", k=2)
    ok2 = st2["n_selected"] > dim + 1
    assert R.row_cosines(E2[ok2], W, np.nonzero(ok2)[0]).mean() < 0.95


def test_closed_form_agrees_with_sampled_active_selection():
    rng = np.random.default_rng(6)
    n, dim = 12, 9
    W = _frame(rng, dim, n)
    X = R.sample_law(rng, 200000, n, 0.75)
    E, _, _ = R.sampled_readout(X, W, selection="active")
    closed = R.active_readout(W, 0.75)
    cos = np.sum(E * closed, 1) / np.linalg.norm(E, axis=1) / np.linalg.norm(closed, axis=1)
    assert cos.min() > 0.999


def test_selected_targets_recover_coefficients_on_a_superset_of_the_active_set():
    rng = np.random.default_rng(7)
    n, dim = 6, 10  # independent columns
    W = _frame(rng, dim, n)
    X = R.sample_law(rng, 200, n, 0.6)
    S = (X > 0) | (rng.random(X.shape) < 0.3)
    A = R.selected_targets(X @ W.T, S, W)
    np.testing.assert_allclose(A, np.where(S, X, 0.0), atol=1e-10)


def test_errors_name_the_argument():
    W = np.eye(3)
    with pytest.raises(ValueError, match="sparsity"):
        R.active_readout(W, 1.0)
    with pytest.raises(ValueError, match="selection"):
        R.sampled_readout(np.zeros((5, 3)), W, selection="nope")
    with pytest.raises(ValueError, match="k in"):
        R.sampled_readout(np.ones((5, 3)), W, selection="topk", k=9)
    with pytest.raises(ValueError, match="W_p"):
        R.dual_cosine(np.zeros(3))
    with pytest.raises(ValueError, match="features"):
        R.alone_readout(W, features=[5])


def test_theory_check_entry_holds():
    recs = R.check_encoder_readout(n=32, dim=24, sparsity=0.92, n_samples=15000)
    assert len(recs) == 1 and recs[0].id == "E1"
    assert recs[0].verdict == "holds", recs[0].measured
