"""Metrics: ground truth scores 1, random scores chance, invariances, absorption on hand-built dictionaries."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsdl
from jsdl import metrics
from jsdl.data import make_bench, make_hierarchical_bench

KEY = jax.random.PRNGKey(0)


@pytest.fixture(scope="module")
def bench():
    return make_bench(KEY, 40, 24, 0.3, 0.9)


def _gt_params(b, bias=False):
    n_r = b.W_r.shape[0]
    return jsdl.SDLParams(
        W_E=b.W_p.T, W_D=b.W_r,
        b_E=jnp.zeros(b.n_features) if bias else None, b_D=jnp.zeros(n_r) if bias else None,
    )


def _spec(n_q, method="sae", bias=False):
    return jsdl.make_spec(method, "relu", n_q, bias=bias)


def _noisy_dictionary(b, key, extra=30, noise=0.05):
    """Ground truth + noise, plus random extra latents, with biases: a 'trained-looking' dictionary."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    n, d = b.n_features, b.W_p.shape[0]
    W_E = jnp.concatenate([b.W_p.T + noise * jax.random.normal(k1, (n, d)), jax.random.normal(k2, (extra, d)) / np.sqrt(d)])
    W_D = jnp.concatenate([b.W_r + noise * jax.random.normal(k3, b.W_r.shape), jax.random.normal(k4, (b.W_r.shape[0], extra)) / np.sqrt(d)], axis=1)
    b_E = -0.05 * jnp.ones(n + extra)
    return jsdl.SDLParams(W_E=W_E, W_D=W_D, b_E=b_E, b_D=jnp.zeros(b.W_r.shape[0]))


def _permute_rescale(p, key):
    n_q = p.W_E.shape[0]
    k1, k2 = jax.random.split(key)
    perm = jax.random.permutation(k1, n_q)
    c = jnp.exp(jax.random.uniform(k2, (n_q,), minval=-1.0, maxval=1.0))
    return jsdl.SDLParams(W_E=c[:, None] * p.W_E[perm], W_D=p.W_D[:, perm] / c, b_E=c * p.b_E[perm], b_D=p.b_D)


def test_generating_dictionary_scores_one(bench):
    r = metrics.feature_recovery(_gt_params(bench), bench, with_mcc=True)
    for k in ("m_gt", "m_ip", "m_gt_dec", "m_ip_dec", "mcc", "mcc_dec"):
        assert r[k] == pytest.approx(1.0, abs=1e-5), k
    assert metrics.dictionary_mcc(_gt_params(bench), bench) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("method", ["transcoder", "crosscoder"])
def test_generating_dictionary_other_methods(method):
    b = make_bench(KEY, 30, 16, 0.45, 0.9, method=method, d_target=None if method == "crosscoder" else 12)
    r = metrics.feature_recovery(_gt_params(b), b, with_mcc=True)
    assert r["m_gt"] == pytest.approx(1.0) and r["m_gt_dec"] == pytest.approx(1.0)
    assert r["mcc"] == pytest.approx(1.0, abs=1e-5) and r["mcc_dec"] == pytest.approx(1.0, abs=1e-5)
    # encoder rows and decoder columns are checked against different matrices for a transcoder:
    if method == "transcoder":
        swapped = jsdl.SDLParams(W_E=jax.random.normal(KEY, (30, 16)), W_D=b.W_r)
        r2 = metrics.feature_recovery(swapped, b)
        assert r2["m_gt_dec"] == pytest.approx(1.0) and r2["m_gt"] == 0.0


def test_random_dictionary_near_chance(bench):
    spec = _spec(200)
    p = jsdl.init_params(jax.random.PRNGKey(1), spec, 24)
    r = metrics.feature_recovery(p, bench)
    base = metrics.random_baseline(jax.random.PRNGKey(2), 200, 24, n_features=4000)
    assert r["m_gt"] == 0.0 and r["m_gt_dec"] == 0.0
    assert abs(r["m_ip"] - base["m_ip"]) < 0.05 and abs(r["m_ip_dec"] - base["m_ip"]) < 0.05
    assert r["m_ip"] < 0.9
    assert metrics.dictionary_mcc(p, bench) < 0.6


def test_exclude_and_curve(bench):
    n = bench.n_features
    half = n // 2
    W_E = jnp.concatenate([bench.W_p.T[:half], jax.random.normal(KEY, (half, 24)) / 5.0])
    p = jsdl.SDLParams(W_E=W_E, W_D=W_E.T)
    r = metrics.feature_recovery(p, bench)
    assert r["m_gt"] == pytest.approx(0.5) and r["n_evaluated"] == n
    r_ex = metrics.feature_recovery(p, bench, exclude=np.arange(half, n))
    assert r_ex["m_gt"] == 1.0 and r_ex["n_evaluated"] == half
    mask = np.zeros(n, bool)
    mask[half:] = True
    assert metrics.feature_recovery(p, bench, exclude=mask) == r_ex
    # excluding the matching latents makes recovery drop
    assert metrics.feature_recovery(p, bench, exclude_latents=np.arange(half))["m_gt"] == 0.0
    taus, curve = metrics.m_gt_curve(p, bench)
    assert curve[0] == 1.0 and np.all(np.diff(curve) <= 0)
    assert curve[np.argmin(np.abs(taus - 0.95))] == pytest.approx(r["m_gt"])
    with pytest.raises(ValueError, match="exclude"):
        metrics.feature_recovery(p, bench, exclude=np.arange(n))
    with pytest.raises(ValueError, match="width"):
        metrics.feature_recovery(jsdl.SDLParams(W_E=jnp.ones((3, 5)), W_D=jnp.ones((5, 3))), bench)


def test_mcc_matching():
    A = np.eye(4)[:, [2, 0, 3, 1]] * np.array([1.0, -2.0, 3.0, 0.5])  # permuted, rescaled, sign-flipped
    assert metrics.mcc(A, np.eye(4)) == pytest.approx(1.0)
    # codes vs features: Pearson MCC after Hungarian matching
    x = np.asarray(jax.random.uniform(KEY, (500, 3)))
    assert metrics.mcc(2.0 * x[:, ::-1] + 1.0, x, center=True) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same m"):
        metrics.mcc(np.ones((3, 2)), np.ones((4, 2)))


def test_sample_metrics_and_consistency_with_loss(bench):
    spec = _spec(70, bias=True)
    p = _noisy_dictionary(bench, jax.random.PRNGKey(3))
    batch = bench.sample(jax.random.PRNGKey(4), 512)
    _, aux = jsdl.sdl_loss(p, batch, spec)
    st = metrics.code_statistics(p, spec, batch)
    assert st["fvu"] == pytest.approx(float(aux["fvu"]), rel=1e-4)
    assert st["l0"] == pytest.approx(float(aux["l0"]), rel=1e-5)
    assert st["mse"] == pytest.approx(float(aux["mse"]), rel=1e-4)
    codes = jsdl.encode(p, batch.x_p, spec)
    assert metrics.l0(codes) == pytest.approx(st["l0"])
    # dead latents: a huge negative bias silences latents 0..9
    dead = p.replace(b_E=p.b_E.at[:10].set(-1e6))
    st_d = metrics.code_statistics(dead, spec, bench, key=jax.random.PRNGKey(5), n_samples=3000, batch_size=1000)
    alive_before = metrics.code_statistics(p, spec, bench, key=jax.random.PRNGKey(5), n_samples=3000, batch_size=1000)
    assert st_d["n_samples"] == 3000
    assert np.all(st_d["fire_rate"][:10] == 0)
    before_dead = alive_before["fire_rate"][10:] == 0
    assert st_d["dead_fraction"] == pytest.approx((10 + before_dead.sum()) / 70)
    assert metrics.dead_fraction(dead, spec, bench, key=jax.random.PRNGKey(5), n_samples=3000,
                                 batch_size=1000, exclude_latents=np.arange(10)) == pytest.approx(before_dead.mean())
    assert metrics.fvu(p, spec, batch) == pytest.approx(st["fvu"])


def test_shrinkage(bench):
    spec = _spec(40)
    p = _gt_params(bench)
    s = metrics.shrinkage(p, spec, bench, key=jax.random.PRNGKey(6), n_samples=4000)
    assert 0.9 < s["mean"] < 1.5  # interference adds, never removes, for positively overlapping features
    half = p.replace(W_D=0.5 * p.W_D)
    s2 = metrics.shrinkage(half, spec, bench, key=jax.random.PRNGKey(6), n_samples=4000)
    np.testing.assert_allclose(s2["per_feature"], 0.5 * s["per_feature"], rtol=1e-5)


def _orthonormal_hierarchy(n_roots=5, branching=3):
    b = make_hierarchical_bench(KEY, n_roots=n_roots, branching=branching, depth=1, d_input=64,
                                max_interference=0.5, child_rate=0.1)
    Q, _ = np.linalg.qr(np.asarray(jax.random.normal(jax.random.PRNGKey(7), (64, b.n_features))))
    Q = jnp.asarray(Q, jnp.float32)
    return b.replace(W_p=Q, W_r=Q)


def _absorbed(b, which_children):
    """Hand-built absorption (Fig. 5): the parent latent is suppressed by the absorbed children,
    whose latents decode child + parent."""
    W = np.asarray(b.W_p)
    po = np.asarray(b.parent_of)
    W_E = W.T.copy()
    W_D = W.copy()
    for c in which_children:
        p = po[c]
        W_E[p] -= 10.0 * W[:, c]
        W_D[:, c] = (W[:, c] + W[:, p]) / np.sqrt(2.0)
    return jsdl.SDLParams(W_E=jnp.asarray(W_E), W_D=jnp.asarray(W_D), b_E=jnp.zeros(W.shape[1]), b_D=jnp.zeros(W.shape[0]))


def test_absorption_faithful_zero_absorbed_high():
    b = _orthonormal_hierarchy()
    spec = _spec(b.n_features, bias=True)
    po = np.asarray(b.parent_of)
    children = np.flatnonzero(po >= 0)
    kw = dict(key=jax.random.PRNGKey(8), n_samples=4000, batch_size=2000)
    faithful = _absorbed(b, [])
    assert metrics.absorption_score(faithful, spec, b, **kw) == 0.0
    full = _absorbed(b, children)
    assert metrics.absorption_score(full, spec, b, **kw) > 0.95
    first = children[::3]  # the first child of each parent
    score, per = metrics.absorption_score(_absorbed(b, first), spec, b, return_per_child=True, **kw)
    assert np.all(per[first] > 0.95)
    assert np.all(per[np.setdiff1d(children, first)] == 0.0)
    assert np.all(np.isnan(per[po < 0]))
    assert 0.2 < score < 0.45
    with pytest.raises(ValueError, match="hierarchical"):
        metrics.absorption_score(faithful, spec, make_bench(KEY, 20, 64, 0.5, 0.9), **kw)


def test_invariance_to_permutation_and_rescaling():
    b = make_hierarchical_bench(KEY, n_roots=4, branching=2, depth=1, d_input=32, max_interference=0.3,
                                child_rate=0.1)
    spec = _spec(b.n_features + 30, bias=True)
    p = _noisy_dictionary(b, jax.random.PRNGKey(9))
    q = _permute_rescale(p, jax.random.PRNGKey(10))
    assert metrics.feature_recovery(p, b, with_mcc=True) == pytest.approx(metrics.feature_recovery(q, b, with_mcc=True), abs=1e-5)
    np.testing.assert_allclose(metrics.m_gt_curve(p, b)[1], metrics.m_gt_curve(q, b)[1], atol=1e-6)
    np.testing.assert_allclose(metrics.m_gt_curve(p, b, which="decoder")[1], metrics.m_gt_curve(q, b, which="decoder")[1], atol=1e-6)
    kw = dict(key=jax.random.PRNGKey(11), n_samples=4000, batch_size=2000)
    sp, sq = metrics.code_statistics(p, spec, b, **kw), metrics.code_statistics(q, spec, b, **kw)
    for k in ("l0", "fvu", "dead_fraction", "mse"):
        assert sp[k] == pytest.approx(sq[k], rel=1e-4, abs=1e-6), k
    assert metrics.shrinkage(p, spec, b, **kw)["mean"] == pytest.approx(metrics.shrinkage(q, spec, b, **kw)["mean"], rel=1e-4)
    assert metrics.absorption_score(p, spec, b, **kw) == pytest.approx(metrics.absorption_score(q, spec, b, **kw))


def test_evaluate_on_a_fixed_batch_agrees_with_the_parts(bench):
    """metrics.evaluate is the one path the lab, training and experiments share: on a fixed batch
    it equals the individual metrics on that batch, and shrinkage_matched halves with the decoder."""
    spec = _spec(70, bias=True)
    p = _noisy_dictionary(bench, jax.random.PRNGKey(11))
    batch = bench.sample(jax.random.PRNGKey(12), 3000)
    ev = metrics.evaluate(p, spec, bench, batch)
    st = metrics.code_statistics(p, spec, batch, inference=True)
    for k in ("l0", "fvu", "mse", "dead_fraction"):
        assert ev[k] == pytest.approx(st[k], rel=1e-6), k
    fr = metrics.feature_recovery(p, bench)
    for k in ("m_gt", "m_ip", "m_gt_dec", "m_ip_dec"):
        assert ev[k] == pytest.approx(fr[k]), k
    taus, curve = metrics.m_gt_curve(p, bench, metrics.TAUS)
    np.testing.assert_allclose(ev["m_gt_curve"], curve)
    assert ev["shrinkage"] == pytest.approx(metrics.shrinkage(p, spec, bench, data=batch, inference=True)["mean"])
    half = p.replace(W_D=0.5 * p.W_D)
    ev2 = metrics.evaluate(half, spec, bench, batch)
    assert ev2["n_matched"] == ev["n_matched"] > 0
    assert ev2["shrinkage_matched"] == pytest.approx(0.5 * ev["shrinkage_matched"], rel=1e-5)
    with pytest.raises(ValueError, match="features"):
        metrics.evaluate(p, spec, bench, jsdl.Batch(batch.x_p))


def test_absorption_on_a_fixed_batch_equals_sampling_the_same_rows():
    b = _orthonormal_hierarchy()
    spec = _spec(b.n_features, bias=True)
    params = _absorbed(b, np.flatnonzero(np.asarray(b.parent_of) >= 0)[::2])
    key = jax.random.PRNGKey(8)
    sampled = metrics.absorption_score(params, spec, b, key=key, n_samples=3000, batch_size=3000)
    rows = jax.jit(b.sample, static_argnums=1)(jax.random.fold_in(key, 0), 3000)  # the rows _batches draws
    assert metrics.absorption_score(params, spec, b, data=rows) == pytest.approx(sampled)
