"""The SynthSAEBench-recipe generator (jsdl.data.synth) and its metrics (jsdl.metrics_synth)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsdl
from conftest import sampler_or_skip
from jsdl import metrics
from jsdl.data import SynthBench, SynthConfig, make_synth
from jsdl.data.synth import (
    SYNTH_16K,
    compensated_probabilities,
    orthogonalize,
    synth_config,
    synth_hierarchy,
    zipf_probabilities,
)

SMALL = dict(n_features=160, d_input=24, n_roots=4, branching=3, depth=2, correlation_rank=4,
             orthogonalize_steps=5, max_prob=0.3, min_prob=0.01)


def _sampler(name):
    """The two samplers of one distribution (SynthBench.uses_native): the statistical tests run on
    both; the native one is skipped where jsdl's native kernels cannot be built."""
    return sampler_or_skip(name)


@pytest.fixture(scope="module", params=["jax", "native"])
def sampler(request):
    return _sampler(request.param)


@pytest.fixture(scope="module")
def bench(sampler):
    b = make_synth(jax.random.PRNGKey(0), "tiny", sampler=sampler, **SMALL)
    assert b.uses_native() == (sampler == "native")
    return b


@pytest.fixture(scope="module")
def auto_bench():
    """The default sampler (native on a CPU where it builds): for tests of what consumes samples."""
    return make_synth(jax.random.PRNGKey(0), "tiny", **SMALL)


@pytest.fixture(scope="module")
def feats(bench):
    return np.asarray(jax.jit(bench.sample_features, static_argnums=1)(jax.random.PRNGKey(1), 40000))


def test_preset_is_the_16k_recipe():
    c = SYNTH_16K
    assert (c.n_features, c.d_input, c.n_roots, c.branching, c.depth) == (16384, 768, 128, 4, 3)
    assert (c.max_prob, c.min_prob, c.zipf_exponent) == (0.4, 5e-4, 0.5)
    assert c.mutually_exclusive_portion == 1.0 and c.compensate_probabilities and c.scale_children_by_parent
    assert (c.correlation_rank, c.correlation_scale, c.bias) == (25, 0.1, 0.5)
    assert (c.orthogonalize_steps, c.orthogonalize_lr) == (100, 3e-4)
    assert (c.magnitude_mean_start, c.magnitude_mean_end, c.magnitude_std_mean, c.magnitude_std_std) == (5, 4, 0.5, 0.5)


def test_shapes_and_batch(bench):
    assert isinstance(bench, SynthBench) and bench.n_features == 160 and bench.d_input == 24
    b = jax.jit(bench.sample, static_argnums=1)(jax.random.PRNGKey(3), 64)
    assert b.x_p.shape == (64, 24) and b.features.shape == (64, 160)
    np.testing.assert_array_equal(b.x_r, b.x_p)
    np.testing.assert_allclose(b.x_p, b.features @ bench.W_p.T + bench.bias, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(bench.W_p, axis=0), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(bench.bias), 0.5, rtol=1e-5)
    assert bench.W_r is bench.W_p and np.all(np.asarray(b.features) >= 0)


def test_deterministic_and_jit_equal(bench):
    b2 = make_synth(jax.random.PRNGKey(0), "tiny", sampler=bench.sampler, **SMALL)
    np.testing.assert_array_equal(bench.W_p, b2.W_p)
    np.testing.assert_array_equal(bench.probs, b2.probs)
    k = jax.random.PRNGKey(5)
    x1 = bench.sample(k, 128)
    x2 = jax.jit(b2.sample, static_argnums=1)(k, 128)
    np.testing.assert_allclose(x1.features, x2.features, rtol=1e-6)
    assert not np.array_equal(bench.sample(jax.random.PRNGKey(6), 128).features, x1.features)
    other = make_synth(jax.random.PRNGKey(1), "tiny", **SMALL)
    assert not np.allclose(other.W_p, bench.W_p)


def test_hierarchy_numbering_and_gating(bench, feats):
    parent_of, level, excl = synth_hierarchy(synth_config("tiny", **SMALL), 0)
    # 4 roots, 12 children, 36 grandchildren, numbered breadth first; the rest are free.
    assert (level[:4] == 0).all() and (level[4:16] == 1).all() and (level[16:52] == 2).all() and (level[52:] == -1).all()
    np.testing.assert_array_equal(parent_of[4:16], np.repeat(np.arange(4), 3))
    assert excl[:16].all() and not excl[16:].any()  # portion 1: every internal node
    act = feats > 0
    po = np.asarray(bench.parent_of)
    child = np.flatnonzero(po >= 0)
    assert not (act[:, child] & ~act[:, po[child]]).any()  # a child never fires without its parent
    for p in range(16):  # mutual exclusion: at most one child of a parent fires
        assert act[:, po == p].sum(axis=1).max() == 1
    assert act[:, child].any(axis=0).all()


def test_exclusion_portion_zero_lets_siblings_cofire(sampler):
    b = make_synth(jax.random.PRNGKey(0), "tiny", sampler=sampler,
                   **{**SMALL, "mutually_exclusive_portion": 0.0, "max_prob": 0.9})
    act = np.asarray(b.sample_features(jax.random.PRNGKey(1), 20000)) > 0
    po = np.asarray(b.parent_of)
    assert max(act[:, po == p].sum(axis=1).max() for p in range(16)) >= 2


def test_scale_children_by_parent_exact(sampler):
    """Rescaling changes no random draw: child = (gated child) * parent / mean_parent."""
    k = jax.random.PRNGKey(0)
    on = make_synth(k, "tiny", sampler=sampler, **SMALL)
    off = make_synth(k, "tiny", sampler=sampler, **{**SMALL, "scale_children_by_parent": False})
    fo = np.asarray(on.sample_features(jax.random.PRNGKey(2), 4000))
    ff = np.asarray(off.sample_features(jax.random.PRNGKey(2), 4000))
    po = np.asarray(on.parent_of)
    c = np.flatnonzero(po >= 0)
    np.testing.assert_array_equal(fo > 0, ff > 0)
    np.testing.assert_allclose(fo[:, c], ff[:, c] * fo[:, po[c]] / np.asarray(on.mean_mag)[po[c]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rank", [0, 6])
def test_firing_rates_of_free_features(rank, sampler):
    """Without hierarchy every feature fires at its probability (the copula keeps the marginals)."""
    b = make_synth(jax.random.PRNGKey(0), "tiny", sampler=sampler, **{**SMALL, "n_roots": 0, "correlation_rank": rank,
                                                      "correlation_scale": 0.3})
    N = 40000
    act = np.asarray(jax.jit(b.sample_features, static_argnums=1)(jax.random.PRNGKey(1), N)) > 0
    p = zipf_probabilities(160, 0.5, 0.3, 0.01)
    np.testing.assert_allclose(np.asarray(b.probs), p, rtol=1e-6)
    z = (act.mean(0) - p) / np.sqrt(p * (1 - p) / N)
    assert np.abs(z).max() < 5.0, np.abs(z).max()
    C = np.corrcoef(act[:, :20].T.astype(float))
    off = np.abs(C[np.triu_indices(20, 1)])
    if rank == 0:
        assert off.max() < 0.05
    else:  # rank-6 factor of scale 0.3: latent correlations ~ 6 * 0.09 = O(0.5)
        assert off.max() > 0.1


def test_magnitudes(feats, bench):
    mu, sd = np.asarray(bench.mean_mag), np.asarray(bench.std_mag)
    np.testing.assert_allclose(mu[[0, -1]], [5.0, 4.0], rtol=1e-6)
    free = np.arange(52, 160)
    act = feats[:, free] > 0
    m = np.array([feats[act[:, i], f].mean() for i, f in enumerate(free)])
    cnt = act.sum(0)
    # E[relu(mu + sd eps)] = mu (mu/sd >= 4 here); tolerance 6 standard errors
    assert np.all(np.abs(m - mu[free]) < 6 * sd[free] / np.sqrt(cnt) + 1e-3)
    assert np.all(sd >= 0)


def test_zipf_and_compensation():
    p = zipf_probabilities(100, 0.5, 0.4, 5e-4)
    assert p[0] == pytest.approx(0.4) and p[-1] == pytest.approx(5e-4) and np.all(np.diff(p) < 0)
    # root 0 (p=.5) with children 1, 2 (p=.1, .2); exclusive: 1/.5 * (1 + other/.5)
    po = np.array([-1, 0, 0, -1])
    pp = np.array([0.5, 0.1, 0.2, 0.3])
    out = compensated_probabilities(pp, po, np.array([True, False, False, False]))
    np.testing.assert_allclose(out, [0.5, 0.1 / 0.5 * (1 + 0.2 / 0.5), 0.2 / 0.5 * (1 + 0.1 / 0.5), 0.3], rtol=1e-6)
    out = compensated_probabilities(pp, po, np.zeros(4, bool))
    np.testing.assert_allclose(out, [0.5, 0.2, 0.4, 0.3], rtol=1e-6)


def test_orthogonalize_gradient_and_progress():
    """The O(n d^2) gradient equals autodiff of the objective through the pairwise Gram (float64),
    and the Adam steps lower the objective and return unit rows."""
    from jsdl.data.synth import _ortho_grad

    def objective(E):
        G = E @ E.T
        off = G - jnp.diag(jnp.diag(G))
        return jnp.sum(off**2) + E.shape[0] * jnp.sum((jnp.diag(G) - 1.0) ** 2)

    with jax.enable_x64(True):
        for n, d in ((50, 8), (7, 12)):  # more rows than dimensions, and fewer
            E = jax.random.normal(jax.random.PRNGKey(n), (n, d), jnp.float64)
            np.testing.assert_allclose(_ortho_grad(E), jax.grad(objective)(E), rtol=1e-10, atol=1e-10)
    E = jax.random.normal(jax.random.PRNGKey(0), (50, 8))
    a = orthogonalize(E, 30, 1e-2)
    np.testing.assert_allclose(orthogonalize(E, 30, 1e-2, chunk=16), a)  # chunk: accepted, no effect
    U = E / jnp.linalg.norm(E, axis=1, keepdims=True)
    off = lambda A: float(jnp.sum((A @ A.T - jnp.eye(50)) ** 2))  # noqa: E731
    assert off(a) < off(U)
    np.testing.assert_allclose(jnp.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    assert float(jnp.max(jnp.abs(orthogonalize(E, 0, 1e-2) - U))) < 1e-6


def test_config_errors():
    with pytest.raises(ValueError, match="min_prob"):
        SynthConfig(min_prob=0.5, max_prob=0.4)
    with pytest.raises(ValueError, match="branching"):
        SynthConfig(branching=1)
    with pytest.raises(ValueError, match="unknown synth key"):
        SynthConfig.from_dict({"n_feature": 3})
    with pytest.raises(ValueError, match="preset"):
        synth_config("32k")
    c = SynthConfig.from_dict({"preset": "cpu", "depth": 2, "branching": [2, 3]})
    assert c.n_features == 2048 and c.depth == 2 and c.branching == (2, 3)


def test_random_branching_and_cut_forest(sampler):
    cfg = synth_config("tiny", n_features=30, d_input=8, n_roots=3, branching=(2, 4), depth=3, orthogonalize_steps=0)
    po, lv, ex = synth_hierarchy(cfg, 7)
    kids = np.bincount(po[po >= 0], minlength=30)
    assert (lv >= 0).all()  # the forest is larger than 30 features: cut, every feature in it
    assert kids[:3].min() >= 2 and kids.max() <= 4 and kids.sum() == 27
    has = np.flatnonzero(kids > 0)
    assert np.array_equal(has, np.arange(has.size))  # breadth first: parents with children come first
    b = make_synth(jax.random.PRNGKey(0), cfg, sampler=sampler)
    act = np.asarray(b.sample_features(jax.random.PRNGKey(1), 2000)) > 0
    po = np.asarray(b.parent_of)  # the bench draws its own branching from its key
    c = np.flatnonzero(po >= 0)
    assert not (act[:, c] & ~act[:, po[c]]).any()


def test_metrics_on_ground_truth_and_counts(auto_bench):
    E = np.asarray(auto_bench.W_p).T
    perm = np.random.default_rng(0).permutation(160)
    assert metrics.synth_mcc(-E[perm], E) == pytest.approx(1.0)
    assert metrics.synth_uniqueness(E[perm], E) == 1.0
    assert metrics.synth_uniqueness(np.concatenate([E[:10], E[:10]]), E) == 0.5
    cl = metrics.synth_classification([2, 0], [2, 0], [0, 0], [1, 5])
    assert cl["precision"] == pytest.approx(0.25) and cl["recall"] == pytest.approx(0.5)
    assert cl["f1"] == pytest.approx((2 * 0.5 * 1 / 1.5) / 2)


def test_synth_eval_matches_direct_computation(auto_bench):
    spec = jsdl.make_spec("sae", "topk", n_latents=48, k=3)
    params = jsdl.init_params(jax.random.PRNGKey(0), spec, auto_bench.d_input)
    b = auto_bench.sample(jax.random.PRNGKey(9), 3000)
    r = metrics.synth_eval(params, spec, [auto_bench.sample(jax.random.PRNGKey(9), 3000)], features=np.asarray(auto_bench.W_p).T)
    r2 = metrics.synth_eval(params, spec, auto_bench, key=jax.random.PRNGKey(4), n_samples=3000, batch_size=1024)
    assert r2["n_samples"] == 3000 and set(r) == set(r2)
    x, f = np.asarray(b.x_p, np.float64), np.asarray(b.features)
    codes = np.asarray(jsdl.encode(params, b.x_p, spec, inference=True))
    xh = np.asarray(jsdl.decode(params, jnp.asarray(codes), spec), np.float64)
    assert r["sae_l0"] == pytest.approx(3.0) and r["true_l0"] == pytest.approx((f > 0).sum(1).mean())
    ev = 1 - ((x - xh) ** 2).sum(1).mean() / ((x**2).sum(1).mean() - (x.mean(0) ** 2).sum())
    assert r["explained_variance"] == pytest.approx(ev, rel=1e-4, abs=1e-5)
    assert r["shrinkage"] == pytest.approx(np.mean(np.linalg.norm(xh, axis=1) / np.linalg.norm(x, axis=1)), rel=1e-5)
    assert r["dead_latents"] == int(((codes != 0).sum(0) == 0).sum())
    best = np.argmax(np.abs(metrics.unit_rows(np.asarray(params.decoder).T) @ metrics.unit_rows(jnp.asarray(auto_bench.W_p).T).T), 1)
    gt = f[:, best] > 0
    fire = codes != 0
    cl = metrics.synth_classification((fire & gt).sum(0), (fire & ~gt).sum(0), (~fire & gt).sum(0), (~fire & ~gt).sum(0))
    for k in ("precision", "recall", "f1", "accuracy"):
        assert r[k] == pytest.approx(cl[k], abs=1e-12)
    with pytest.raises(ValueError, match="key"):
        metrics.synth_eval(params, spec, auto_bench)


def test_generic_metrics_and_train_config_accept_synth(auto_bench):
    from jsdl.train.cli import config_from_dict

    spec = jsdl.make_spec("sae", "relu", n_latents=32)
    params = jsdl.init_params(jax.random.PRNGKey(0), spec, auto_bench.d_input)
    fr = metrics.feature_recovery(params, auto_bench)
    assert 0 <= fr["m_ip"] <= 1
    st = metrics.code_statistics(params, spec, auto_bench, key=jax.random.PRNGKey(0), n_samples=512, batch_size=256)
    assert st["n_samples"] == 512
    assert auto_bench.feature_weights(n_samples=2048).shape == (160,)
    cfg = config_from_dict({"data": {"synth": {"preset": "tiny", **SMALL}}, "spec": {"n_latents": 16, "k": 2}})
    assert isinstance(cfg.data.build("sae"), SynthBench)
    cfg = config_from_dict({"data": {"synth": {"preset": "tiny", "sampler": "jax", **SMALL}}})
    assert cfg.data.build("sae").sampler == "jax"
    with pytest.raises(ValueError, match="sampler"):
        config_from_dict({"data": {"synth": {"preset": "tiny", "sampler": "gpu"}}})
    with pytest.raises(ValueError, match="unknown synth key"):
        config_from_dict({"data": {"synth": {"roots": 3}}})
    with pytest.raises(ValueError, match="one of files, bench or synth"):
        config_from_dict({"data": {"synth": {}, "files": "x/"}})


def test_compact_lists_true_entries_in_order():
    from jsdl.data.synth import _compact

    for seed, rate in enumerate([0.0, 0.01, 0.05, 0.2, 0.5]):
        m = np.asarray(jax.random.uniform(jax.random.PRNGKey(seed), (37, 101)) < rate)
        r, c, live, over = _compact(jnp.asarray(m), 200)
        nz = np.argwhere(m)
        k = min(len(nz), 200)
        assert bool(over) == (len(nz) > 200) and int(np.sum(live)) == k
        np.testing.assert_array_equal(np.stack([r, c], 1)[:k], nz[:k])


@pytest.mark.parametrize("path", ["sparse", "fallback"])
def test_sparse_free_block_equals_dense_draw(path, sampler):
    """The rare free features drawn sparsely (Poisson candidates, thinning and the residual of the
    violations; or the dense fallback when the violation slots overflow) have the firing rates and
    magnitudes of the dense draw (sparse_start = n: one uniform per feature)."""
    b = make_synth(jax.random.PRNGKey(0), "tiny", sampler=sampler, **{**SMALL, "n_roots": 0, "correlation_rank": 6,
                                                                       "correlation_scale": 0.15})
    n = b.n_features
    assert 0 < b.sparse_start < n and b.n_arrivals > 0 and b.viol_expected > 0
    if path == "fallback":
        b = b.replace(viol_expected=0.0 + 1e-9)  # 32 violation slots per batch: always overflows
    dense = b.replace(sparse_start=n)
    N = 60000
    fs = np.asarray(jax.jit(b.sample_features, static_argnums=1)(jax.random.PRNGKey(1), N))
    fd = np.asarray(jax.jit(dense.sample_features, static_argnums=1)(jax.random.PRNGKey(2), N))
    blk = slice(b.sparse_start, n)
    a_s, a_d = (fs[:, blk] > 0).mean(0), (fd[:, blk] > 0).mean(0)
    z = (a_s - a_d) / np.sqrt((a_s + a_d) / N + 1e-12)
    assert np.abs(z).max() < 5.0, np.abs(z).max()
    assert abs(a_s.sum() - a_d.sum()) < 5 * np.sqrt(a_d.sum() / N) * 2  # total rate of the block
    np.testing.assert_allclose(fs[:, blk][fs[:, blk] > 0].mean(), fd[:, blk][fd[:, blk] > 0].mean(), rtol=0.02)
    # Co-firing with the correlated dense part survives the sparse draw (same correlation).
    top = slice(0, b.sparse_start)
    c_s = np.corrcoef((fs[:, top] > 0).sum(1), (fs[:, blk] > 0).sum(1))[0, 1]
    c_d = np.corrcoef((fd[:, top] > 0).sum(1), (fd[:, blk] > 0).sum(1))[0, 1]
    assert abs(c_s - c_d) < 0.03, (c_s, c_d)


@pytest.mark.parametrize("case", ["sparse", pytest.param("dense", marks=pytest.mark.slow),  # ~20 s each
                                  pytest.param("overflow", marks=pytest.mark.slow), "uncorrelated"])
def test_draw_is_observe_of_the_features(case, sampler, monkeypatch):
    """Bench.draw (used by sample and by every training step) builds x_p from the active sets:
    its features are exactly sample_features(k_x) and x_p equals observe(features) up to float
    rounding, on the sparse path, the dense one, the overflow fallback of the violation slots and
    without correlation (no violations)."""
    import jsdl.data.synth as synth_mod

    kw = {**SMALL, "n_features": 640, "correlation_rank": 6, "correlation_scale": 0.15}
    if case == "uncorrelated":
        kw["correlation_rank"] = 0
    b = make_synth(jax.random.PRNGKey(0), "tiny", sampler=sampler, **kw)
    assert 0 < b.sparse_start < b.n_features
    if case == "overflow":
        assert b.viol_expected > 0
        b = b.replace(viol_expected=1e-9)  # 32 violation slots per batch: always overflows
    monkeypatch.setattr(synth_mod, "use_sparse_decode", lambda J, n: case != "dense")
    draw = jax.jit(b.draw, static_argnums=1)  # compiled once for the three keys
    features = jax.jit(b.sample_features, static_argnums=1)
    for i in range(3):
        key = jax.random.PRNGKey(i)
        batch = draw(key, 512)
        f = features(jax.random.split(key)[0], 512)
        np.testing.assert_array_equal(batch.features, f)
        ref = b.observe(f).x_p
        np.testing.assert_allclose(batch.x_p, ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(batch.x_r, batch.x_p)
    if case == "sparse":  # sample() is draw() for a fresh bench (the mixin's rule; one case suffices)
        np.testing.assert_array_equal(b.sample(jax.random.PRNGKey(0), 512).x_p, draw(jax.random.PRNGKey(0), 512).x_p)


def test_live_slots_are_the_positive_values():
    """The samplers mark live slots by u < p Phi(mu / sigma) instead of by value > 0
    (SynthBench._positive_fraction); the two agree up to float rounding."""
    b = make_synth(jax.random.PRNGKey(0), "tiny", **{**SMALL, "n_features": 640, "correlation_rank": 6,
                                                      "correlation_scale": 0.15})
    def slots_of(key):
        parts = b._parts(key, 4096)
        return list(parts["slots"]) + [parts["free"]["slots"]]

    slots = jax.jit(slots_of)(jax.random.PRNGKey(4))
    n_live = n_bad = 0
    for c, v in slots:
        c, v = np.asarray(c), np.asarray(v)
        n_live += int((c >= 0).sum())
        n_bad += int(((c >= 0) != (v > 0)).sum())
    assert n_live > 1000 and n_bad <= 2, (n_live, n_bad)


def test_native_sampler_matches_the_jax_sampler():
    """The native sampler (jsdl.native.synth_draw) draws the JAX sampler's distribution: on a
    recipe with every part (correlated roots, exclusive and non-exclusive parents, the frequent
    free block, the sparse block with violations), per-feature firing rates agree to binomial
    z < 5, magnitudes given firing to 6 standard errors, and the correlation of firing counts
    between the tree and the free features within 0.03. Then its own laws: sample b does not
    depend on the batch size, a key decides the draw, and vmap over keys equals the calls one by
    one."""
    _sampler("native")
    kw = {**SMALL, "n_features": 640, "correlation_rank": 6, "correlation_scale": 0.15,
          "mutually_exclusive_portion": 0.5, "max_prob": 0.8}
    bj = make_synth(jax.random.PRNGKey(0), "tiny", sampler="jax", **kw)
    bn = make_synth(jax.random.PRNGKey(0), "tiny", sampler="native", **kw)
    assert bn.tree_end < bn.sparse_start < bn.n_features and bn.viol_expected > 0
    assert not np.asarray(bn.exclusive)[:bn.n_roots].all() and np.asarray(bn.exclusive).any()
    N = 40000
    fj = np.asarray(jax.jit(bj.sample_features, static_argnums=1)(jax.random.PRNGKey(1), N))
    fn = np.asarray(jax.jit(bn.sample_features, static_argnums=1)(jax.random.PRNGKey(1), N))
    aj, an = fj > 0, fn > 0
    rj, rn = aj.mean(0), an.mean(0)
    z = (rn - rj) / np.sqrt((rj * (1 - rj) + rn * (1 - rn)) / N + 1e-12)
    assert np.abs(z).max() < 5.0, np.abs(z).max()
    cnt = np.minimum(aj.sum(0), an.sum(0))
    ok = cnt >= 30
    mj = np.where(aj, fj, 0).sum(0)[ok] / aj.sum(0)[ok]
    mn = np.where(an, fn, 0).sum(0)[ok] / an.sum(0)[ok]
    sd = np.sqrt(np.where(aj, (fj - np.where(aj, fj, 0).sum(0) / np.maximum(aj.sum(0), 1)) ** 2, 0).sum(0)[ok]
                 / aj.sum(0)[ok])
    assert np.all(np.abs(mn - mj) < 6 * sd * np.sqrt(2 / cnt[ok]) + 1e-3)
    T, Z = bn.tree_end, bn.sparse_start
    for a, b in ((slice(0, T), slice(T, None)), (slice(0, T), slice(Z, None))):
        c_j = np.corrcoef(aj[:, a].sum(1), aj[:, b].sum(1))[0, 1]
        c_n = np.corrcoef(an[:, a].sum(1), an[:, b].sum(1))[0, 1]
        assert abs(c_j - c_n) < 0.03, (c_j, c_n)
    # Its own laws.
    draw = jax.jit(bn.sample_features, static_argnums=1)
    key = jax.random.PRNGKey(7)
    np.testing.assert_array_equal(draw(key, 64), draw(key, 256)[:64])
    assert not np.array_equal(draw(key, 64), draw(jax.random.PRNGKey(8), 64))
    keys = jax.random.split(key, 3)
    many = jax.jit(jax.vmap(lambda k: bn.draw(k, 32)))(keys)
    for i in range(3):
        one = bn.draw(keys[i], 32)
        np.testing.assert_array_equal(many.features[i], one.features)
        np.testing.assert_array_equal(many.x_p[i], one.x_p)
    # vmap over benches (batched tables): each member draws from its own tables.
    two = jax.tree.map(lambda a, b: jnp.stack([a, b]), bn, bn.replace(bias=bn.bias + 1.0))
    xs = jax.jit(jax.vmap(lambda b: b.draw(key, 16).x_p))(two)
    np.testing.assert_allclose(xs[1] - xs[0], 1.0, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(xs[0], bn.draw(key, 16).x_p)


def test_sampler_choice_errors_and_fallback(monkeypatch):
    with pytest.raises(ValueError, match="sampler"):
        make_synth(jax.random.PRNGKey(0), "tiny", sampler="fast", **SMALL)
    from jsdl import native

    b = make_synth(jax.random.PRNGKey(0), "tiny", sampler="native", **SMALL)
    monkeypatch.setattr(native, "supports_synth", lambda dtype: False)  # float64, an accelerator, no compiler
    with pytest.raises(RuntimeError, match="native"):
        b.sample_features(jax.random.PRNGKey(1), 8)
    auto = b.replace(sampler="auto")
    assert not auto.uses_native()  # auto falls back to the JAX sampler
    assert auto.sample_features(jax.random.PRNGKey(1), 8).shape == (8, 160)


def test_native_sampler_on_a_data_mesh_draws_each_devices_rows():
    """On a "data" mesh axis the native samplers (SynthSAEBench; the Linear Representation Bench,
    a transcoder's, and the hierarchical bench: jsdl.native.sparse_draw) run per device inside a
    shard_map, each device drawing its own rows (B / 4 per call in the compiled program, not B),
    and the batch is bit for bit the one-device batch."""
    _sampler("native")
    from conftest import run_multidevice

    code = r'''
import json, re, jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jsdl.data import make_synth
from jsdl.train.mesh import make_mesh
b = make_synth(jax.random.PRNGKey(0), "tiny", sampler="native", n_features=640, d_input=24, n_roots=4, branching=3,
               depth=2, correlation_rank=6, correlation_scale=0.15, orthogonalize_steps=5, max_prob=0.3, min_prob=0.01)
key = jax.random.PRNGKey(3)
one = jax.jit(lambda k: b.draw(k, 64))(key)
mesh = make_mesh({"data": 4, "model": 2})
f = jax.jit(lambda k: b.draw(k, 64), out_shardings=NamedSharding(mesh, P("data")))
with jax.set_mesh(mesh):
    txt = f.lower(key).compile().as_text()
    many = f(key)
def shapes(txt, target):
    calls = [l for l in txt.splitlines() if target in l and "custom-call(" in l]
    return sorted({re.search(r"f32\[([0-9,]+)\]", l).group(1) for l in calls})
res = {"x_p": bool(np.array_equal(one.x_p, many.x_p)), "features": bool(np.array_equal(one.features, many.features)),
       "shapes": shapes(txt, "jsdl_synth_draw")}
from jsdl.data import make_bench, make_hierarchical_bench
others = {"bench": make_bench(jax.random.PRNGKey(1), 200, 12, 0.5, method="transcoder", d_target=10, sampler="native"),
          "hierarchical": make_hierarchical_bench(jax.random.PRNGKey(2), n_roots=10, branching=3, depth=2, d_input=12,
                                                  max_interference=0.6, child_rate=0.05, sampler="native")}
for name, ob in others.items():
    one = jax.jit(lambda k: ob.draw(k, 64))(key)
    f = jax.jit(lambda k: ob.draw(k, 64), out_shardings=NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh):
        txt = f.lower(key).compile().as_text()
        many = f(key)
    res[name] = [bool(np.array_equal(getattr(one, a), getattr(many, a))) for a in ("x_p", "x_r", "features")]
    res[name + " shapes"] = shapes(txt, "jsdl_sparse_draw")
print("RESULT" + json.dumps(res))
'''
    out = [ln for ln in run_multidevice(code, n_devices=8).splitlines() if ln.startswith("RESULT")][-1]
    r = __import__("json").loads(out[len("RESULT"):])
    assert r["x_p"] and r["features"], r
    assert r["shapes"] == ["16,24", "16,640"], r
    assert r["bench"] == [True] * 3 and r["bench shapes"] == ["16,10", "16,12", "16,200"], r
    assert r["hierarchical"] == [True] * 3 and r["hierarchical shapes"] == ["16,12", "16,130"], r
