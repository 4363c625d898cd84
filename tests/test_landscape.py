"""Landscape tooling: approximate loss and regions, Hessians (closed forms, HVP, finite
differences, Lanczos, symmetry projection), stationary points. Everything runs under float64 via
the ``x64`` fixture (conftest), which restores the flag afterwards."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsdl
from jsdl import landscape as ls
from jsdl.landscape import hessian as hs
from jsdl.landscape import stationary as st


def _unit_columns(key, d, n):
    w = jax.random.normal(key, (d, n))
    return w / jnp.linalg.norm(w, axis=0)


def _setup(seed=0, n=7, n_p=5, n_q=9, transcoder=False, M=None):
    k = jax.random.PRNGKey(seed)
    k1, k2, k3, k4, k5 = jax.random.split(k, 5)
    W_p = _unit_columns(k1, n_p, n)
    W_r = _unit_columns(k2, n_p + 1, n) if transcoder else None
    M = jnp.linspace(0.5, 2.0, n) if M is None else M
    prob = ls.make_problem(W_p, W_r, M)
    n_r = prob.W_r.shape[0]
    params = ls.theory_params(jax.random.normal(k3, (n_q, n_p)) / math.sqrt(n_p), jax.random.normal(k4, (n_r, n_q)))
    return prob, params, k5


# ------------------------------------------------------------------------------------------------
# approx.py
# ------------------------------------------------------------------------------------------------


def test_approx_loss_matches_a_loop(x64):
    prob, params, _ = _setup(transcoder=True)
    W_E, W_D = np.asarray(params.W_E), np.asarray(params.W_D)
    ref = 0.0
    for d in range(prob.n_features):
        z = np.maximum(W_E @ np.asarray(prob.W_p[:, d]), 0)
        ref += float(prob.M[d]) * np.sum((np.asarray(prob.W_r[:, d]) - W_D @ z) ** 2)
    np.testing.assert_allclose(float(ls.approx_loss(params, prob)), ref, rtol=1e-12)
    # the frozen-mask loss equals L~ at the point where the mask is taken
    np.testing.assert_allclose(float(ls.approx_loss_frozen(params, prob)), ref, rtol=1e-12)


def test_approx_loss_is_m1_term_of_true_loss(x64):
    """Features appearing alone, magnitude a: per-sample loss = a^2 ||w_r^d - W_D z_d||^2 (homogeneity)."""
    prob, params, _ = _setup()
    spec = ls.spec_for(prob, params.W_E.shape[0])
    d, a = 3, 2.7
    x = jnp.zeros((1, prob.n_features)).at[0, d].set(a)
    batch = jsdl.Batch(x @ prob.W_p.T, x @ prob.W_r.T)
    mse = float(jsdl.sdl_loss(params, batch, spec)[1]["mse"])
    one = ls.make_problem(prob.W_p, prob.W_r, jnp.zeros(prob.n_features).at[d].set(1.0))
    np.testing.assert_allclose(mse, a * a * float(ls.approx_loss(params, one)), rtol=1e-12)


def test_sparse_law_weights_formula():
    law = ls.SparseLaw(sparsity=0.9, c_min=0.5, beta=2.0)
    M = law.weights(5)
    np.testing.assert_allclose(M, 0.1 * 0.9**4 * (0.25 + 2 * 0.5 * 2 + 2 * 4))


def test_pattern_summary_on_handmade_patterns():
    P = np.array([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]], bool)
    s = ls.pattern_summary(P)
    assert s["dead"] == [3] and s["monosemantic"] == [1, 2] and s["polysemantic"] == [0]
    assert s["is_partition"] and s["is_polysemantic"] and s["uncovered"] == []
    P2 = P.copy()
    P2[1, 0] = True  # feature 0 now fires two latents
    s2 = ls.pattern_summary(P2)
    assert not s2["is_partition"] and s2["multi_covered"] == [0]
    with pytest.raises(ValueError, match="bool matrix"):
        ls.pattern_summary(np.zeros(3, bool))


def test_activation_pattern_and_in_region(x64):
    prob, params, key = _setup()
    P = np.asarray(ls.activation_pattern(params, prob))
    pre = np.asarray(params.W_E @ prob.W_p)
    np.testing.assert_array_equal(P, pre > 0)
    margin = np.min(np.abs(pre))
    zero_d = jax.tree.map(jnp.zeros_like, params)
    # a perturbation of W_E smaller than the margin keeps every sign; a large one does not
    d = jax.random.normal(key, params.W_E.shape)
    d = d / jnp.linalg.norm(d) * 0.5 * margin  # |<dW_E row, w_p>| <= ||d|| < margin
    assert bool(ls.in_region(params, zero_d.replace(W_E=d), prob))
    assert not bool(ls.in_region(params, zero_d.replace(W_E=-2 * params.W_E), prob))
    # decoder perturbations never change the region
    assert bool(ls.in_region(params, zero_d.replace(W_D=10 * jnp.ones_like(params.W_D)), prob))


def test_make_problem_errors():
    W = jnp.eye(3)
    with pytest.raises(ValueError, match="W_r must be"):
        ls.make_problem(W, jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="M must be"):
        ls.make_problem(W, None, jnp.ones(4))
    with pytest.raises(ValueError, match="couples samples"):
        ls.make_problem(W, None, 1.0, "batchtopk", k=1)
    prob = ls.make_problem(W)
    with pytest.raises(ValueError, match="no biases"):
        ls.approx_loss(jsdl.SDLParams(W_E=jnp.eye(3), W_D=jnp.eye(3), b_E=jnp.zeros(3)), prob)


def test_multi_feature_gap_matches_plain_monte_carlo(x64):
    """The stratified L = L~ + sum_m P(m) e_m agrees with plain Monte Carlo through jsdl.sdl_loss."""
    prob, params, key = _setup(n=6, n_p=5, n_q=8, M=1.0)
    law = ls.SparseLaw(sparsity=0.8, c_min=0.1, beta=1.0)

    class Data:
        def sample(self, k, B):
            x = law.sample_features(k, B, prob.n_features)
            return jsdl.Batch(x @ prob.W_p.T, x @ prob.W_r.T, x)

    spec = ls.spec_for(prob, 8)
    mc, se = ls.mc_loss(key, params, spec, Data(), n_samples=65536, batch_size=16384)
    g = ls.multi_feature_gap(jax.random.fold_in(key, 1), params, prob, law, [0.8], n_per_m=8192, m_max=6)
    assert abs(mc - g["mean_loss"][0]) <= 4 * math.hypot(se, g["gap_se"][0])
    assert g["tail_bound"][0] == 0.0  # m_max = n covers every m


def test_gap_shrinks_like_one_minus_s_squared(x64):
    """|L - L~| ~ (1-S)^2 as S -> 1 (n(1-S) << 1), and it is below n^2 C (1-S)^2."""
    prob, params, key = _setup(n=6, n_p=5, n_q=8, M=1.0)
    law = ls.SparseLaw(sparsity=0.99, c_min=0.0, beta=1.0)
    om = np.array([1e-4, 3e-4, 1e-3, 3e-3])
    g = ls.multi_feature_gap(key, params, prob, law, 1 - om, n_per_m=2048, m_max=6)
    slope = np.polyfit(np.log(om), np.log(g["gap"]), 1)[0]
    assert 1.95 <= slope <= 2.05
    assert np.all(g["gap"] <= ls.theorem_3_1_bound(6, g["C_hat"], 1 - om))
    ratio = g["gap"] / om**2
    np.testing.assert_allclose(ratio, math.comb(6, 2) * g["e_m"][0], rtol=0.02)


# ------------------------------------------------------------------------------------------------
# hessian.py
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 2])
def test_decoder_block_psd_and_closed_form_at_any_encoder(x64, seed):
    prob, params, _ = _setup(seed=seed, transcoder=seed == 2)
    H = hs.full_hessian(ls.approx_loss, params, prob)
    HD = np.asarray(H.block("W_D"))
    A = hs.decoder_block_closed_form(ls.codes_per_feature(params, prob), prob.M)
    n_r = prob.W_r.shape[0]
    np.testing.assert_allclose(HD, 2 * np.kron(np.eye(n_r), A), atol=1e-11 * np.abs(HD).max())
    assert np.linalg.eigvalsh(HD)[0] >= -1e-10 * np.abs(HD).max()


def test_encoder_block_psd_in_region_and_joint_negative(x64):
    prob, params0, _ = _setup(seed=3)
    params = st.least_squares_decoder(params0, prob)
    mask = ls.activation_pattern(params, prob)
    H = hs.full_hessian(ls.approx_loss_frozen, params, prob, mask)
    HE = np.asarray(H.block("W_E"))
    CF = np.asarray(hs.encoder_block_closed_form(params.W_D, prob.W_p, prob.M, mask))
    np.testing.assert_allclose(HE, CF, atol=1e-11 * np.abs(HE).max())
    assert np.linalg.eigvalsh(HE)[0] >= -1e-10 * np.abs(HE).max()
    # sub() of both blocks is the joint Hessian
    np.testing.assert_allclose(H.sub(["W_E", "W_D"]), H.matrix)
    # here L~ = 0 (n_q >= n, rank-n codes): a global minimum, so the joint Hessian is PSD; at the random
    # starting point it is not (bilinear coupling of W_D and W_E)
    assert float(ls.approx_loss(params, prob)) < 1e-20
    assert H.eigvalsh()[0] >= -1e-10 * np.abs(HE).max()
    ev = hs.full_hessian(ls.approx_loss_frozen, params0, prob).eigvalsh()
    assert ev[0] < -1e-3 * np.abs(ev).max(), f"joint Hessian unexpectedly PSD: {ev[:3]}"


def test_full_hessian_hvp_and_finite_differences_agree(x64):
    prob, params, key = _setup(seed=4)
    mask = ls.activation_pattern(params, prob)
    H = hs.full_hessian(ls.approx_loss_frozen, params, prob, mask)
    ref = jax.hessian(lambda x: ls.approx_loss_frozen(hs.flatten(params)[1](x), prob, mask))(hs.flatten(params)[0])
    np.testing.assert_allclose(H.matrix, ref, rtol=1e-10, atol=1e-10)
    mv, dim = hs.make_hvp(ls.approx_loss_frozen, params, prob, mask)
    for i in range(3):
        v = jax.random.normal(jax.random.fold_in(key, i), (dim,))
        Hv = H.matrix @ v
        np.testing.assert_allclose(mv(v), Hv, rtol=1e-11, atol=1e-11)
        tree_v = hs.flatten(params)[1](v)
        np.testing.assert_allclose(hs.flatten(hs.hvp(ls.approx_loss_frozen, params, tree_v, prob, mask))[0], Hv, atol=1e-10)
        fd = hs.finite_difference_hvp(ls.approx_loss_frozen, params, v, prob, mask, eps=1e-4)
        np.testing.assert_allclose(fd, Hv, rtol=1e-6, atol=1e-6 * float(jnp.abs(Hv).max()))


def test_block_names_and_errors(x64):
    prob, params, _ = _setup()
    x, unravel, blocks = hs.flatten(params)
    assert list(blocks) == ["W_E", "W_D"]
    assert blocks["W_E"] == slice(0, params.W_E.size)
    H = hs.full_hessian(ls.approx_loss, params, prob)
    with pytest.raises(ValueError, match="unknown block"):
        H.block("b_E")


def test_lanczos_extremes_match_dense(x64):
    """Lanczos (full reorthogonalisation) extremes vs numpy on the empirical SDL loss."""
    prob, params, key = _setup(seed=5, n=10, n_p=8, n_q=12)
    spec = ls.spec_for(prob, 12)
    x = ls.SparseLaw(0.7).sample_features(key, 256, 10)
    batch = jsdl.Batch(x @ prob.W_p.T, x @ prob.W_r.T)

    def f(p, b):
        return jsdl.sdl_loss(p, b, spec)[0]

    H = hs.full_hessian(f, params, batch)
    ev = H.eigvalsh()
    mv, dim = hs.make_hvp(f, params, batch)
    r = hs.lanczos_extremes(mv, dim, key, num_iters=50)
    sc = np.abs(ev).max()
    assert abs(r["min"] - ev[0]) <= 1e-8 * sc and abs(r["max"] - ev[-1]) <= 1e-8 * sc
    assert r["residual_max"] <= 1e-6 * sc
    # with the symmetry deflated
    Q = hs.rescaling_tangents(params)
    evq = hs.complement_eigvalsh(H.matrix, Q)
    rq = hs.lanczos_extremes(mv, dim, key, num_iters=50, ortho=Q)
    assert abs(rq["min"] - evq[0]) <= 1e-8 * sc and abs(rq["max"] - evq[-1]) <= 1e-8 * sc


def test_lanczos_breakdown_and_orthogonality(x64):
    """An operator with 3 distinct eigenvalues breaks down after 3 steps; restarts keep V orthonormal
    and the Ritz values exact."""
    d = jnp.array([1.0] * 10 + [-2.0] * 10 + [5.0] * 10)
    alpha, beta, V = jax.jit(lambda v: hs.lanczos(lambda u: d * u, v, 12, key=jax.random.PRNGKey(1)))(jnp.ones(30))
    np.testing.assert_allclose(V @ V.T, np.eye(12), atol=1e-10)
    T = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
    theta = np.linalg.eigvalsh(T)
    assert np.all(np.min(np.abs(theta[:, None] - np.array([1.0, -2.0, 5.0])[None]), axis=1) < 1e-8)
    with pytest.raises(ValueError, match="num_iters"):
        hs.lanczos(lambda u: u, jnp.ones(3), 4)


def test_spectral_density_integrates_to_one_and_locates_mass(x64):
    d = jnp.concatenate([jnp.zeros(40), jnp.full(10, 3.0)])
    sd = hs.spectral_density(lambda u: d * u, 50, jax.random.PRNGKey(0), num_iters=10, num_probes=16,
                             grid=np.linspace(-1, 4, 2001), sigma=0.05)
    assert abs(np.trapezoid(sd["density"], sd["grid"]) - 1) < 1e-3
    near3 = (sd["grid"] > 2) & (sd["grid"] < 4)
    assert abs(np.trapezoid(sd["density"][near3], sd["grid"][near3]) - 0.2) < 0.1


def test_rescaling_tangents_are_null_at_a_stationary_point(x64):
    """At a stationary point (g = 0) H xi_i = 0 for every rescaling tangent; off it, only the loss is invariant."""
    from jsdl.landscape import theory as th

    prob = ls.make_problem(jnp.array([[1.0, 0.6], [0.0, 0.8]]), None, jnp.array([1.0, 2.0]))
    params, _ = th.eigen_partial_optimum(prob, [[0, 1]], n_q=2)
    params = params.replace(W_D=params.W_D * 1.7, W_E=params.W_E / 1.7)  # a non-unit rescaling, still stationary
    mask = ls.activation_pattern(params, prob)
    g = hs.flatten(jax.grad(ls.approx_loss_frozen)(params, prob, mask))[0]
    assert float(jnp.linalg.norm(g)) < 1e-12
    Q = hs.rescaling_tangents(params)
    assert Q.shape[0] == 1  # latent 2 is all-zero, so its tangent is dropped
    np.testing.assert_allclose(Q @ Q.T, np.eye(1), atol=1e-12)
    H = hs.full_hessian(ls.approx_loss_frozen, params, prob, mask)
    assert float(jnp.abs(H.matrix @ Q[0]).max()) < 1e-10
    # the loss is exactly invariant along the orbit
    a = 1.3
    moved = params.replace(W_E=params.W_E.at[0].multiply(a), W_D=params.W_D.at[:, 0].divide(a))
    np.testing.assert_allclose(ls.approx_loss(moved, prob), ls.approx_loss(params, prob), rtol=1e-12)
    # tied models have no continuous rescaling symmetry
    assert hs.rescaling_tangents(jsdl.SDLParams(W_E=params.W_E)).shape[0] == 0


# ------------------------------------------------------------------------------------------------
# stationary.py
# ------------------------------------------------------------------------------------------------


def test_least_squares_decoder_is_exact_minimiser(x64):
    prob, params, key = _setup(seed=6)
    pl = st.least_squares_decoder(params, prob)
    g = jax.grad(ls.approx_loss)(pl, prob).W_D
    assert float(jnp.abs(g).max()) < 1e-10
    L0 = float(ls.approx_loss(pl, prob))
    for i in range(5):
        d = 1e-3 * jax.random.normal(jax.random.fold_in(key, i), pl.W_D.shape)
        assert float(ls.approx_loss(pl.replace(W_D=pl.W_D + d), prob)) >= L0


def test_acs_decreases_loss_and_stays_in_region(x64):
    prob, params, _ = _setup(seed=7)
    P0 = np.asarray(ls.activation_pattern(params, prob))
    out, hist = st.alternating_convex_search(params, prob, iters=30)
    assert np.all(np.diff(hist["loss"]) <= 1e-12 * max(1.0, hist["loss"][0]))
    np.testing.assert_array_equal(np.asarray(ls.activation_pattern(out, prob)), P0)
    assert hist["final_loss"] <= float(ls.approx_loss(params, prob))


def test_classify_known_functions(x64):
    def f(p):
        x, y = p["x"], p["y"]
        return x**2 + 3 * y**2

    def saddle(p):
        return p["x"] ** 2 - p["y"] ** 2

    def flat(p):
        return p["x"] ** 2 + p["y"] ** 4

    def flat_saddle(p):
        return p["x"] ** 2 + p["y"] ** 3

    z = {"x": jnp.array(0.0), "y": jnp.array(0.0)}
    assert st.classify(f, z)["kind"] == "strict_minimum"
    c = st.classify(saddle, z)
    assert c["kind"] == "strict_saddle" and c["index"] == 1
    assert st.classify(flat, z)["kind"] == "degenerate_minimum"
    assert st.classify(flat_saddle, z)["kind"] == "degenerate_saddle"
    assert st.classify(f, {"x": jnp.array(0.1), "y": jnp.array(0.0)})["kind"] == "not_stationary"


def test_newton_converges_to_a_saddle(x64):
    def f(p):  # stationary points (+-1, 0); (-1, 0) is a saddle of index 1
        return p["x"] ** 3 - 3 * p["x"] + p["y"] ** 2

    out, info = st.newton_stationary(f, {"x": jnp.array(-0.7), "y": jnp.array(0.4)})
    assert info["converged"]
    np.testing.assert_allclose([float(out["x"]), float(out["y"])], [-1.0, 0.0], atol=1e-8)
    c = st.classify(f, out)
    assert c["kind"] == "strict_saddle" and c["index"] == 1
