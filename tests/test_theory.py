"""Numeric checks of the paper's theory: every check of jsdl.landscape.theory at small size,
the constructions on their own, and the `jsdl theory-check` command."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsdl import landscape as ls
from jsdl.landscape import theory as th

KEY = jax.random.PRNGKey(0)


def _by_id(records):
    return {r.id: r for r in records}


def _assert_serialisable(records):
    for r in records:
        json.dumps(r.to_json())
        assert r.verdict in (th.HOLDS, th.FAILS, th.CONDITIONAL, th.DEFERRED)
        assert r.claim and r.id


@pytest.mark.slow  # ~30 s; its parts are covered fast by test_landscape's gap tests
def test_p1_loss_approximation(x64):
    recs = _by_id(th.check_loss_approximation(KEY, n=6, n_p=5, n_q=8, sparsity=0.9, n_per_m=1024, mc_samples=32768))
    _assert_serialisable(recs.values())
    assert recs["P1"].verdict == th.HOLDS, recs["P1"].measured
    assert recs["P1"].measured["max_gap_over_bound"] < 1
    assert recs["P1.scaling"].verdict == th.HOLDS, recs["P1.scaling"].measured["loglog_slope_n(1-S)<=0.05"]
    assert recs["P1.mc"].verdict == th.HOLDS, recs["P1.mc"].measured


def test_p1_default_regime_is_outside_the_theory(x64):
    # the default has n(1-S) = 10; keep that at a tenth of the size
    (r,) = th.check_default_regime(KEY, n=100, n_p=90, sparsity=0.9, samples=2048)
    assert r.verdict == th.HOLDS and r.measured["ratio_Lapprox_over_L"] < 0.01


def test_p2_decoder_block(x64):
    (r,) = th.check_decoder_block(KEY, n_points=2, batch=128)
    assert r.verdict == th.HOLDS, r.measured


def test_p3_encoder_block_joint_and_consistency(x64):
    recs = _by_id(th.check_encoder_block(KEY, n_points=2))
    assert recs["P3"].verdict == th.HOLDS, recs["P3"].measured
    assert recs["P3.joint"].verdict == th.HOLDS and recs["P3.joint"].measured["most_negative_lambda_min_over_max_abs"] < 0
    assert recs["H1"].verdict == th.HOLDS, recs["H1"].measured


def test_h2_lanczos_matches_dense(x64):
    (r,) = th.check_lanczos(KEY, n=10, n_p=8, n_q=12, batch=256, iters=50)
    assert r.verdict == th.HOLDS, r.measured


def test_p4_theorem_3_3(x64):
    recs = _by_id(th.check_theorem_3_3(KEY))
    for k in ("P4.sae", "P4.transcoder", "P4.obtuse"):
        assert recs[k].verdict == th.HOLDS, (k, recs[k].measured)
    m = recs["P4.sae"].measured
    assert 0 < m["L_approx"] <= m["bound_tight"] <= m["bound_paper"]
    assert m["tied"] is True


def test_theorem_3_3_loss_is_exactly_the_leak_of_positive_overlaps(x64):
    """Feature d's error is sum_{k != d, <w_p^k, w_p^d> > 0} <w_p^k, w_p^d> w_r^k (proof of Thm 3.3)."""
    k1, k2 = jax.random.split(KEY)
    W_p = jax.random.normal(k1, (4, 6))
    W_p = W_p / jnp.linalg.norm(W_p, axis=0)
    W_r = jax.random.normal(k2, (5, 6))
    W_r = W_r / jnp.linalg.norm(W_r, axis=0)
    M = jnp.linspace(1, 2, 6)
    prob = ls.make_problem(W_p, W_r, M)
    G = np.asarray(W_p.T @ W_p)
    ref = 0.0
    for d in range(6):
        c = np.where((np.arange(6) != d) & (G[:, d] > 0), G[:, d], 0.0)
        ref += float(M[d]) * np.sum((np.asarray(W_r) @ c) ** 2)
    np.testing.assert_allclose(float(ls.approx_loss(th.theorem_3_3_solution(W_p, W_r, 8), prob)), ref, rtol=1e-12)
    b = th.theorem_3_3_bounds(prob)
    assert ref <= b["tight"] <= b["paper"]
    with pytest.raises(ValueError, match="n_q >= n"):
        th.theorem_3_3_solution(W_p, W_r, 5)


@pytest.mark.slow  # ~30 s; the construction is covered fast by test_zero_loss_solution_reproduces_every_feature
def test_p5_non_identifiability(x64):
    recs = _by_id(th.check_non_identifiability(KEY, n_solutions=3, n_per_m=1024, mc_samples=16384))
    assert recs["P5"].verdict == th.HOLDS, recs["P5"].measured
    assert recs["P5.true_loss"].verdict == th.HOLDS


def test_zero_loss_solution_reproduces_every_feature(x64):
    W_p = jnp.asarray(np.linalg.qr(np.random.default_rng(0).normal(size=(6, 6)))[0][:, :5])
    prob = ls.make_problem(W_p, None, 1.0)
    p = th.zero_loss_solution(KEY, prob, 9)
    Z = ls.codes_per_feature(p, prob)
    np.testing.assert_allclose(p.W_D @ Z, prob.W_r, atol=1e-10)
    with pytest.raises(ValueError, match="n_q >= n"):
        th.zero_loss_solution(KEY, prob, 4)


def test_p6_example_3_5(x64):
    (r,) = th.check_example_3_5()
    assert r.verdict == th.HOLDS
    assert r.measured["L_approx"] == pytest.approx(1.0, abs=1e-12)
    assert r.measured["classification"] == "degenerate_minimum"
    ev = np.asarray(r.measured["hessian_eigenvalues"])
    assert ev.min() >= -1e-12 and np.sum(np.abs(ev) < 1e-9) >= 2


def test_p7_theorem_3_6(x64):
    recs = _by_id(th.check_theorem_3_6(KEY))
    lit = recs["P7.literal"]
    assert lit.verdict == th.FAILS
    assert lit.measured["case_a"]["grad_W_D"] < 1e-12 and lit.measured["case_a"]["grad_W_E"] > 0.1
    assert lit.measured["case_b"]["grad_W_D"] < 1e-12 and lit.measured["case_b"]["grad_W_E"] > 0.1
    assert recs["P7.corrected"].verdict == th.HOLDS, recs["P7.corrected"].measured
    assert recs["P7.acs"].verdict == th.HOLDS, recs["P7.acs"].measured
    assert recs["P7.theorem"].verdict == th.CONDITIONAL and recs["P7.theorem"].condition


def test_theorem_3_6_literal_gradient_closed_form(x64):
    """Orthonormal features, one neuron for {0, 1}: the encoder gradient is -2 sum_d M_d (u^T r_d) w_p^d with
    u = (M_0 e_0 + M_1 e_1)/(M_0 + M_1); it vanishes iff M_0 = M_1."""
    for M0, M1 in ((1.0, 2.0), (1.5, 1.5)):
        prob = ls.make_problem(jnp.eye(2), None, jnp.array([M0, M1]))
        p = th.theorem_3_6_literal(prob, [[0, 1]], n_q=2)
        u = np.array([M0, M1]) / (M0 + M1)
        r = np.eye(2) - u[:, None]
        expect = -2 * np.array([M0 * u @ r[:, 0], M1 * u @ r[:, 1]])
        g = jax.grad(ls.approx_loss_frozen)(p, prob, ls.activation_pattern(p, prob))
        np.testing.assert_allclose(g.W_E[0], expect, atol=1e-12)
        assert (np.abs(expect).max() > 0.1) == (M0 != M1)


def test_p8_dead_latents(x64):
    recs = _by_id(th.check_dead_latents(KEY, batch=512))
    for k in ("P8.pigeonhole", "P8.gradient", "P8.resampling"):
        assert recs[k].verdict == th.HOLDS, (k, recs[k].measured)
    assert recs["P8.gradient"].measured["grad_norm_mse"] == 0.0


def test_p9_theorem_3_8(x64):
    recs = _by_id(th.check_theorem_3_8())
    r = recs["P9"]
    assert r.verdict == th.CONDITIONAL
    assert r.measured["per_latent_thresholds"] == r.measured["expected"]
    assert r.measured["global_threshold"] != r.measured["expected"]
    assert recs["P9.partial_optimum"].verdict == th.HOLDS, recs["P9.partial_optimum"].measured


def test_theorem_3_8_needs_a_multi_feature_latent(x64):
    W_p = jnp.eye(3)
    W_E = jnp.array([[1.0, -1.0, -1.0], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="needs >= 2"):
        th.theorem_3_8_absorption(W_E, jnp.full((2,), 0.1), W_p, parent=0, spare=1)


def test_p14_activation_property():
    (r,) = th.check_activation_property(KEY)
    assert r.verdict == th.HOLDS
    assert r.measured["author_jumprelu_property"] is False
    assert r.measured["positively_homogeneous"]["relu"] and not r.measured["positively_homogeneous"]["jumprelu"]


def test_training_claims_are_deferred_with_reasons():
    recs = th.check_training_claims(KEY)
    assert [r.id for r in recs] == ["P10", "P11", "P12", "P13"]
    assert all(r.verdict == th.DEFERRED and r.note for r in recs)


def test_every_prediction_has_a_check():
    ids = set(th.CHECKS)
    for p in ["P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8", "P9", "P14"]:
        assert p in ids
    assert "P10-13" in ids


def test_register_a_check_with_one_line():
    """A new check registers with one line, runs after the others with its own key (the others'
    numbers do not move), and a duplicate name is refused unless replace=True."""
    from jsdl.landscape import claims

    def check_extra(key):
        return [th.Record("X1", "a claim", {}, {"u": float(jax.random.uniform(key))}, "", th.HOLDS)]

    before = dict(claims.CHECKS)
    try:
        th.register("X1", check_extra)
        assert list(th.CHECKS)[-1] == "X1"
        key = jax.random.PRNGKey(3)
        recs = th.run_all(key, only={"P6", "X1"})
        assert [r.id for r in recs][-1] == "X1"
        assert [r.to_json() for r in th.run_all(key, only={"P6"})] == [r.to_json() for r in recs[:-1]]
        with pytest.raises(ValueError, match="already registered"):
            th.register("X1", check_extra)
        th.register("X1", check_extra, replace=True)
        with pytest.raises(TypeError, match="callable"):
            th.register("X2", 3)
    finally:
        claims.CHECKS.clear()
        claims.CHECKS.update(before)


def test_theory_check_cli_writes_report(tmp_path):
    from jsdl import cli

    out = tmp_path / "rep"
    rc = cli.main(["theory-check", "--only", "P6", "P14", "P10-13", "--out", str(out), "--no-plots"])
    assert rc == 0
    data = json.loads((out / "report.json").read_text())
    assert {d["id"] for d in data} >= {"P6", "P14", "P10"}
    for d in data:
        assert {"id", "claim", "measured", "tolerance", "verdict"} <= set(d)
    md = (out / "report.md").read_text()
    assert "| P6 | holds |" in md
    assert cli.main(["theory-check", "--only", "P99", "--out", str(out)]) == 2


@pytest.mark.slow
def test_full_theory_check_run(tmp_path):
    from jsdl import cli

    rc = cli.main(["theory-check", "--out", str(tmp_path), "--x64"])
    jax.config.update("jax_enable_x64", False)
    assert rc == 0
    for f in ("report.json", "report.md", "hessian_spectra.png", "loss_vs_sparsity.png", "zero_loss_solutions.png"):
        assert os.path.exists(tmp_path / f)
