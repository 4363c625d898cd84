"""The sparse sampler of the S-sparse law (jsdl.data.bench): capacity bound, law of the active sets
(firing rates, counts, independence, magnitudes), determinism, jit/vmap, the Bench fast path; the
native sampler of the same laws (jsdl.native.sparse_draw: Bench and structured benches)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from conftest import sampler_or_skip
from jsdl.data.bench import (
    ACTIVE_TAIL, Bench, SparseLaw, active_capacity, decode_active, geometric_positions, make_bench,
)
from jsdl.kernels import densify

SAMPLERS = ["jax", "native"]


@pytest.mark.parametrize("n,p", [(512, 0.01), (1000, 0.01), (4096, 0.01), (16384, 0.01), (16384, 0.001),
                                 (120, 0.1), (64, 0.05), (2048, 0.2), (300, 0.5)])
def test_capacity_bounds_the_binomial_tail(n, p):
    K = active_capacity(n, p)
    assert stats.binom.sf(K, n, p) <= ACTIVE_TAIL  # P(count > K)
    exact = int(stats.binom.isf(ACTIVE_TAIL, n, p))  # smallest k with sf(k) <= tail, up to rounding
    assert exact - 1 <= K <= 1.05 * exact + 3  # the Chernoff bound is tight enough to be useful
    # a tighter tail needs more room, a looser one less
    assert active_capacity(n, p, 1e-30) >= K >= active_capacity(n, p, 1e-3)


def test_capacity_edges_and_errors():
    assert active_capacity(10, 0.0) == 0
    assert active_capacity(10, 1.0) == 10
    assert active_capacity(5, 0.9) == 5  # no K < n meets the bound
    with pytest.raises(ValueError, match="rate"):
        active_capacity(10, 1.5)
    with pytest.raises(ValueError, match="n must be"):
        active_capacity(0, 0.1)
    with pytest.raises(ValueError, match="tail"):
        active_capacity(10, 0.1, 0.0)


def _active(law, key, B, n, capacity=None):
    codes, count = jax.jit(law.sample_active, static_argnums=(1, 2, 4))(key, B, n, None, capacity)
    return codes, count


def test_active_sets_are_sorted_and_consistent():
    law = SparseLaw(0.9)
    codes, count = _active(law, jax.random.PRNGKey(0), 2000, 40)
    vals, cols, count = np.asarray(codes.vals), np.asarray(codes.cols), np.asarray(count)
    K = vals.shape[1]
    assert K == law.capacity(40) and cols.dtype == np.int32
    slot = np.arange(K)[None, :]
    live = slot < count[:, None]
    assert np.all((vals > 0) == live)  # magnitudes >= c_min > 0 exactly on the active slots
    assert np.all(cols[~live] == 39)
    d = np.diff(np.where(live, cols, 10**6), axis=1)
    assert np.all(d[live[:, 1:]] > 0)  # strictly increasing: no feature twice in a row
    x = np.asarray(densify(codes))
    np.testing.assert_array_equal((x > 0).sum(1), count)
    np.testing.assert_allclose(x.sum(1), vals.sum(1), rtol=1e-6)


@pytest.mark.parametrize("S", [0.98, 0.5])  # sparse sampler, dense fallback
def test_features_follow_the_law(S):
    n, B = 256, 60000
    law = SparseLaw(S, c_min=0.3, beta=0.7)
    assert law.sparse_sampler(n) == (S == 0.98)
    x = np.asarray(jax.jit(law.sample_features, static_argnums=(1, 2))(jax.random.PRNGKey(1), B, n), np.float64)
    m = x > 0
    p = 1 - S
    # firing rate of every feature (5 standard errors; 256 features)
    se = math.sqrt(p * (1 - p) / B)
    assert np.max(np.abs(m.mean(0) - p)) < 5 * se
    # count per row: Binomial(n, p), chi-square on the bins with expectation >= 20
    counts = m.sum(1)
    ks = np.arange(n + 1)
    expect = B * stats.binom.pmf(ks, n, p)
    big = expect >= 20
    obs = np.bincount(counts, minlength=n + 1)
    f_obs = np.append(obs[big], obs[~big].sum())
    f_exp = np.append(expect[big], expect[~big].sum())
    assert stats.chisquare(f_obs, f_exp * f_obs.sum() / f_exp.sum()).pvalue > 1e-4
    # rows are independent (the sparse sampler draws the whole batch as one sequence of gaps)
    assert abs(np.corrcoef(counts[:-1], counts[1:])[0, 1]) < 5 / math.sqrt(B)
    # independence: mask correlations of all pairs (neighbours included: the gaps link them) ~ 0
    C = np.corrcoef(m.T)
    off = C[~np.eye(n, dtype=bool)]
    assert np.max(np.abs(off)) < 6 / math.sqrt(B)  # 32640 pairs
    assert abs(np.mean(np.diag(C, 1))) < 4 / math.sqrt(B * (n - 1))
    # magnitudes c_min + Exp(beta): min, mean, second moment, and an Exp law of the excess
    a = x[m]
    assert a.min() >= law.c_min - 1e-6
    se_mean = law.beta / math.sqrt(a.size)
    assert abs(a.mean() - law.active_mean) < 5 * se_mean
    assert a.var() == pytest.approx(law.beta ** 2, rel=0.05)
    assert np.mean(a ** 2) == pytest.approx(law.second_moment, rel=0.02)
    assert stats.kstest(a - law.c_min, "expon", args=(0, law.beta)).pvalue > 1e-4


def test_gap_law_far_tail():
    # Positions of the first success for a small rate: P(first > g) = (1 - p)^(g+1), checked where a
    # 24-bit uniform would already have lost resolution.
    p, n, B = 0.002, 20000, 200000
    pos = np.asarray(jax.jit(geometric_positions, static_argnums=(1, 2, 3, 4))(jax.random.PRNGKey(2), B, n, p, 1))[:, 0]
    for g in (0, 100, 1000, 3000):
        expect = (1 - p) ** (g + 1)
        assert abs(np.mean(pos > g) - expect) < 5 * math.sqrt(expect * (1 - expect) / B) + 1e-6
    assert np.mean(pos >= n) == pytest.approx((1 - p) ** n, abs=1e-6)


def test_truncation_keeps_the_first_K_and_has_the_binomial_tail():
    # Forcing a tiny capacity shows the mechanism the default capacity makes (< 1e-15) improbable:
    # the count is min(Binomial(n, p), K) and the kept features are the first K of the row.
    n, p, B, K = 64, 0.05, 40000, 3
    law = SparseLaw(1 - p)
    cut, count = _active(law, jax.random.PRNGKey(3), B, n, capacity=K)
    count = np.asarray(count)
    expect = np.append(stats.binom.pmf(np.arange(K), n, p), stats.binom.sf(K - 1, n, p))
    np.testing.assert_allclose(np.bincount(count, minlength=K + 1) / B, expect, atol=5 * math.sqrt(0.25 / B))
    # the first kept feature is the first success of the row: P(col_0 > g | count >= 1) = ...
    first = np.asarray(cut.cols)[count >= 1, 0]
    for g in (0, 5, 20):
        pg = ((1 - p) ** (g + 1) - (1 - p) ** n) / (1 - (1 - p) ** n)
        assert abs(np.mean(first > g) - pg) < 5 * math.sqrt(pg * (1 - pg) / first.size)


def test_determinism_jit_and_vmap():
    law = SparseLaw(0.99)
    n, B = 3000, 16
    assert law.sparse_sampler(n)
    f = jax.jit(law.sample_features, static_argnums=(1, 2))
    k = jax.random.PRNGKey(4)
    a = f(k, B, n)
    np.testing.assert_array_equal(a, f(k, B, n))
    np.testing.assert_array_equal(a, law.sample_features(k, B, n))  # eager == jit
    assert not np.array_equal(a, f(jax.random.PRNGKey(5), B, n))
    keys = jax.random.split(k, 3)
    v = jax.jit(jax.vmap(lambda kk: law.sample_features(kk, B, n)))(keys)
    for i in range(3):
        np.testing.assert_array_equal(v[i], f(keys[i], B, n))
    assert f(jax.random.key(0), 2, n).shape == (2, n)  # typed keys


def test_decode_active_equals_the_dense_product():
    law = SparseLaw(0.97)
    n, m, B = 700, 24, 50
    W = jax.random.normal(jax.random.PRNGKey(6), (m, n))

    @jax.jit
    def check(key):
        codes, count = law.sample_active(key, B, n)
        zero = decode_active(codes.replace(vals=jnp.zeros_like(codes.vals)), jnp.zeros_like(count), W.T)
        return decode_active(codes, count, W.T), densify(codes) @ W.T, zero

    out, ref, zero = check(jax.random.PRNGKey(7))
    np.testing.assert_allclose(out, ref, atol=1e-5)
    np.testing.assert_array_equal(zero, 0.0)

    @jax.jit
    def check_vmap(key):  # vmapped over batches with different largest counts
        cs, ns = jax.vmap(lambda k: law.sample_active(k, 5, n))(jax.random.split(key, 4))
        return jax.vmap(decode_active, in_axes=(0, 0, None))(cs, ns, W.T), jax.vmap(densify)(cs) @ W.T

    out, ref = check_vmap(jax.random.PRNGKey(8))
    np.testing.assert_allclose(out, ref, atol=1e-5)

    @jax.jit
    def check_blocks(key):  # several blocks sharing count, decoded in one loop: the sum of their decodes
        codes, count = law.sample_active(key, B, n)
        other = codes.replace(vals=-2.0 * codes.vals, cols=(codes.cols * 7 + 3) % n)
        both = decode_active([codes, other], count, W.T)
        return both, decode_active(codes, count, W.T) + decode_active(other, count, W.T), (densify(codes) + densify(other)) @ W.T

    both, apart, ref = check_blocks(jax.random.PRNGKey(9))
    np.testing.assert_allclose(both, apart, atol=1e-5)
    np.testing.assert_allclose(both, ref, atol=1e-5)
    assert np.abs(ref).max() > 1.0
    codes, count = law.sample_active(jax.random.PRNGKey(9), B, n)
    with pytest.raises(ValueError, match="shapes"):
        decode_active([codes, law.sample_active(jax.random.PRNGKey(9), B + 1, n)[0]], count, W.T)


def _unit(key, d, n):
    W = jax.random.normal(key, (d, n))
    return W / jnp.linalg.norm(W, axis=0, keepdims=True)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("method", ["sae", "transcoder", "skip_transcoder", "crosscoder"])
def test_bench_fast_path_matches_observe(method, sampler):
    sampler_or_skip(sampler)
    n, d = 1024, 16
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(9), 3)
    W_p = jnp.concatenate([_unit(k1, d, n), _unit(k3, d, n)]) if method == "crosscoder" else _unit(k1, d, n)
    W_r = W_p if method in ("sae", "crosscoder") else _unit(k2, 12, n)
    W_skip = jax.random.normal(k3, (12, d)) if method == "skip_transcoder" else None
    b = Bench(W_p=W_p, W_r=W_r, W_skip=W_skip, sparsity=0.99, method=method, n_sources=2 if method == "crosscoder" else 1,
              sampler=sampler)
    assert b.law.sparse_sampler(n) and b.uses_native() == (sampler == "native")
    key = jax.random.PRNGKey(10)
    batch = jax.jit(b.sample, static_argnums=1)(key, 256)
    k_x, k_obs = jax.random.split(key)
    np.testing.assert_array_equal(batch.features, b.sample_features(k_x, 256))  # features as documented
    ref = b.observe(batch.features, k_obs)
    np.testing.assert_allclose(batch.x_p, ref.x_p, atol=1e-5)
    np.testing.assert_allclose(batch.x_r, ref.x_r, atol=1e-5)
    assert np.mean(np.asarray(batch.features) > 0) == pytest.approx(0.01, abs=0.002)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_finite_dataset_with_the_sparse_sampler(sampler):
    sampler_or_skip(sampler)
    n, d = 1024, 8
    W = _unit(jax.random.PRNGKey(11), d, n)
    b = Bench(W_p=W, W_r=W, sparsity=0.99, dataset_size=50, data_key=jax.random.PRNGKey(12), sampler=sampler)
    assert b.law.sparse_sampler(n)
    rows = jax.jit(lambda bb, idx: bb.dataset_batch(idx))
    full = rows(b, jnp.arange(50))
    np.testing.assert_allclose(full.x_p, full.features @ b.W_p.T, atol=1e-5)
    assert 0 < np.mean(np.asarray(full.features) > 0) < 0.03
    part = rows(b, jnp.array([3, 3, 49]))  # a row does not depend on the batch it is drawn in
    np.testing.assert_array_equal(part.features, full.features[jnp.array([3, 3, 49])])
    np.testing.assert_allclose(part.x_p, full.x_p[jnp.array([3, 3, 49])], atol=1e-6)
    # sampling draws rows of the fixed dataset only
    s = jax.jit(lambda bb, k: bb.sample(k, 40))(b, jax.random.PRNGKey(13))
    fixed = {tuple(r) for r in np.asarray(full.features)}
    assert all(tuple(r) in fixed for r in np.asarray(s.features))


def test_make_bench_uses_the_sparse_sampler_at_the_paper_setting():
    b = make_bench(jax.random.PRNGKey(0), 200, 48, 0.4, 0.99)
    assert b.law.sparse_sampler(200) and b.law.capacity(200) == active_capacity(200, 0.01)
    batch = jax.jit(b.sample, static_argnums=1)(jax.random.PRNGKey(1), 2000)
    np.testing.assert_allclose(batch.x_p, batch.features @ b.W_p.T, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Structured benches: thinning (per-feature rates) and the hierarchy closure on active sets
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_structured_thinning_follows_per_feature_rates(sampler):
    from jsdl.data import make_structured_bench

    sampler_or_skip(sampler)
    n = 600
    rates = np.linspace(0.001, 0.02, n)
    imp = np.linspace(0.5, 2.0, n)
    b = make_structured_bench(jax.random.PRNGKey(20), n, 24, 0.6, firing_rates=rates, importance=imp, sampler=sampler)
    assert b.sparse_capacity == active_capacity(n, 0.02) > 0
    B = 40000
    batch = jax.jit(b.sample, static_argnums=1)(jax.random.PRNGKey(21), B)
    x = np.asarray(batch.features, np.float64)
    m = x > 0
    z = (m.mean(0) - rates) / np.sqrt(rates * (1 - rates) / B)
    assert np.max(np.abs(z)) < 5.5  # 600 features
    # magnitudes scale with importance: x_d / importance_d ~ c_min + Exp(beta)
    a = (x / imp)[m]
    assert abs(a.mean() - (b.c_min + b.beta)) < 5 * b.beta / math.sqrt(a.size)
    assert stats.kstest(a - b.c_min, "expon", args=(0, b.beta)).pvalue > 1e-4
    np.testing.assert_allclose(batch.x_p, batch.features @ b.W_p.T, atol=1e-5)
    # a bench altered to exceed the bound the sampler was built for fails loudly
    bad = b.replace(rates=b.rates.at[0].set(0.5))
    assert np.all(np.isnan(jax.jit(bad.sample_features, static_argnums=1)(jax.random.PRNGKey(0), 4)))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_structured_hierarchy_closure_and_magnitudes(sampler):
    from jsdl.data import make_hierarchical_bench

    sampler_or_skip(sampler)
    b = make_hierarchical_bench(jax.random.PRNGKey(22), n_roots=60, branching=3, depth=2, d_input=32,
                                max_interference=0.5, child_rate=0.02, parent_alone_rate=0.005, sampler=sampler)
    assert b.sparse_capacity > 0 and b.depth == 2
    # x_p is summed block by block: each block's K slots are <= n / 8, the three together are not
    assert 8 * b.sparse_capacity <= b.n_features < 8 * (b.depth + 1) * b.sparse_capacity
    B = 30000
    key = jax.random.PRNGKey(23)
    batch = jax.jit(b.sample, static_argnums=1)(key, B)
    np.testing.assert_array_equal(batch.features, jax.jit(b.sample_features, static_argnums=1)(jax.random.split(key)[0], B))
    np.testing.assert_allclose(batch.x_p, batch.features @ b.W_p.T, atol=1e-5)
    x = np.asarray(batch.features, np.float64)
    m = x > 0
    po = np.asarray(b.parent_of)
    n = po.shape[0]
    kids = [np.flatnonzero(po == p) for p in range(n)]
    internal = np.array([k.size > 0 for k in kids])
    # Definition 3.2 with own rates: a leaf fires at child_rate; a parent fires iff it fires alone
    # or one of its children fires (closure over the two levels)
    leaf_rate = m[:, ~internal].mean()
    assert abs(leaf_rate - 0.02) < 5 * math.sqrt(0.02 * 0.98 / (B * (~internal).sum()))
    for p in np.flatnonzero(internal)[:20]:
        assert np.all(m[:, p] >= m[:, kids[p]].any(1))
    p_mid = 1 - (1 - 0.005) * (1 - 0.02) ** 3  # a depth-1 node
    p_root = 1 - (1 - 0.005) * (1 - p_mid) ** 3
    roots = po == -1
    assert abs(m[:, roots].mean() - p_root) < 5 * math.sqrt(p_root * (1 - p_root) / (B * roots.sum()))
    # a parent's magnitude is one c_min + Exp(beta) draw however many children fire (no max/sum)
    mid = np.flatnonzero(internal & ~roots)
    n_kids = np.stack([m[:, kids[p]].sum(1) for p in mid], 1)
    a = x[:, mid]
    for sel in (n_kids == 1, n_kids >= 2):
        v = a[sel]
        assert abs(v.mean() - (b.c_min + b.beta)) < 5 * b.beta / math.sqrt(v.size)
        assert stats.kstest(v - b.c_min, "expon", args=(0, b.beta)).pvalue > 1e-4


def test_sorted_parents_find_the_first_slots_without_a_dense_array(monkeypatch):
    """With a breadth-first hierarchy (parents_are_sorted) the sparse sampler finds repeated
    ancestors on the [B, K] blocks (_first_slots_sorted); the kept slots, features and x_p equal
    the dense scatter-min's exactly, with repeats inside a block (siblings) and across blocks (a
    parent that also fires alone). A hierarchy numbered otherwise is detected and keeps the dense
    rule."""
    from jsdl.data import make_hierarchical_bench, make_structured_bench
    from jsdl.data import structured
    from jsdl.data.structured import build_hierarchy, parents_are_sorted

    monkeypatch.setattr(structured, "SORTED_DEDUP_MIN_ENTRIES", 0)  # the block rule at any B n
    b = make_hierarchical_bench(jax.random.PRNGKey(22), n_roots=20, branching=3, depth=2, d_input=16,
                                max_interference=0.6, child_rate=0.05, parent_alone_rate=0.05, sampler="jax")
    assert b.sorted_parents and b.sparse_capacity > 0
    dense = b.replace(sorted_parents=False)
    key, B = jax.random.PRNGKey(3), 2000
    (blocks_s, cnt_s), (blocks_d, cnt_d) = [jax.jit(x.sample_active, static_argnums=1)(key, B) for x in (b, dense)]
    np.testing.assert_array_equal(cnt_s, cnt_d)
    for u, v in zip(blocks_s, blocks_d):
        np.testing.assert_array_equal(u.vals, v.vals)
        np.testing.assert_array_equal(u.cols, v.cols)
    # the test is not vacuous: repeats were dropped within the ancestor block and across blocks
    c0 = np.asarray(blocks_s[0].cols)
    live0, live1 = np.asarray(blocks_s[0].vals) > 0, np.asarray(blocks_s[1].vals) > 0
    po = np.asarray(b.parent_of)
    has_parent = live0 & (po[c0] >= 0)
    assert has_parent.sum() > live1.sum()  # siblings share a parent: fewer parents than children
    alone_and_parent = sum(len(set(c0[r][live0[r]]) & set(po[c0[r][live0[r]]])) for r in range(B))
    assert alone_and_parent > 0
    ref = jax.jit(dense.draw, static_argnums=1)(key, B)
    for x in (b, dense):
        out = jax.jit(x.draw, static_argnums=1)(key, B)
        np.testing.assert_array_equal(out.features, ref.features)
        np.testing.assert_allclose(out.x_p, out.features @ b.W_p.T, rtol=1e-5, atol=1e-5)
    po = build_hierarchy(20, 3, 2)
    assert parents_are_sorted(po)
    perm = np.r_[np.arange(20), 20 + np.random.default_rng(0).permutation(len(po) - 20)]  # renumber non-roots
    inv = np.argsort(perm)
    shuffled = np.where(po[perm] >= 0, inv[np.maximum(po[perm], 0)], -1)
    assert not parents_are_sorted(shuffled)
    s = make_structured_bench(jax.random.PRNGKey(1), len(po), 16, 0.7, sparsity=0.99, hierarchy=shuffled, sampler="jax")
    assert not s.sorted_parents and s.sparse_capacity > 0
    f = np.asarray(s.sample(jax.random.PRNGKey(2), 500).features) > 0
    child = np.flatnonzero(shuffled >= 0)
    assert not (f[:, child] & ~f[:, shuffled[child]]).any()  # the closure holds on the dense rule


def test_structured_dense_fallbacks():
    from jsdl.data import make_structured_bench

    n = 30
    C = np.eye(n)
    C[0, 1] = C[1, 0] = 0.3
    corr = make_structured_bench(jax.random.PRNGKey(24), n, 16, 0.6, sparsity=0.99, correlation=C)
    assert corr.sparse_capacity == 0  # the copula needs every latent Gaussian
    dense = make_structured_bench(jax.random.PRNGKey(24), n, 16, 0.6, sparsity=0.5)
    assert dense.sparse_capacity == 0  # K close to n
    with pytest.raises(ValueError, match="no sparse sampler"):
        dense.sample_active(jax.random.PRNGKey(0), 2)
    assert dense.sample(jax.random.PRNGKey(0), 5).x_p.shape == (5, 16)


@pytest.mark.slow  # compiles ten samplers and steps: ~27 s on 2 cores
def test_bench_data_script_smoke(capsys):
    """benchmarks/bench_data.py (the RESULTS section's generator) runs end to end at a tiny shape."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import bench_data

    bench_data.main(["--shapes", "tiny", "--reps", "1", "--no-crossover", "--no-pgd", "--no-write"])
    out = capsys.readouterr().out
    assert "| (16, 256, 4, 64) | 256 | Bench (K = " in out
    assert "| (16, 256, 4, 64) | 256 | hierarchical (K = " in out
    assert "| (16, 256, 4, 64) | 256 | topk |" in out
    # measured in a fresh process, untuned as `jsdl train` leaves a step this small
    assert "tiny (n = 256): host not tuned" in out


def test_eager_sampling_runs_one_compiled_program(compiles):
    """An eager ``sample`` / ``draw`` / ``sample_features`` call runs as one jitted program
    (jit_when_eager): one backend compile per (bench structure, batch size), none for a second key,
    bit-equal to the user's own ``jax.jit`` of the method; inside a trace it is the plain method
    (vmap over keys works); a bench that is not a pytree falls back to the plain method."""
    from jsdl.data import make_bench, make_hierarchical_bench
    from jsdl.data.bench import SamplingMixin, jit_when_eager

    for bench in (make_bench(jax.random.PRNGKey(0), n_features=40, d_input=12, max_interference=0.5),
                  make_hierarchical_bench(jax.random.PRNGKey(1), n_roots=4, branching=3, d_input=12,
                                          max_interference=0.5)):
        for name in ("sample", "draw", "sample_features") if hasattr(bench, "kind") else ("sample",):
            method = getattr(bench, name)
            compiles.clear()
            a = method(jax.random.PRNGKey(3), 24)
            assert len(compiles) == 1, (name, len(compiles))
            compiles.clear()
            b = method(jax.random.PRNGKey(4), 24)
            assert compiles == [], (name, "recompiled for a new key")
            ref = jax.jit(getattr(bench, name), static_argnums=1)(jax.random.PRNGKey(3), 24)
            for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(ref)):
                np.testing.assert_array_equal(u, v)
            assert not np.array_equal(jax.tree.leaves(a)[0], jax.tree.leaves(b)[0])
        xs = jax.vmap(lambda k: bench.sample(k, 8).x_p)(jax.random.split(jax.random.PRNGKey(5), 3))
        np.testing.assert_allclose(xs[1], bench.sample(jax.random.split(jax.random.PRNGKey(5), 3)[1], 8).x_p,
                                   rtol=1e-6, atol=1e-6)

    class Plain(SamplingMixin):  # not a pytree: the decorator must call the method as it is
        calls = 0

        @jit_when_eager
        def sample_features(self, key, batch_size):
            Plain.calls += 1
            return jnp.ones((batch_size, 3))

    assert Plain().sample_features(jax.random.PRNGKey(0), 2).shape == (2, 3) and Plain.calls == 1


def test_feature_rows_cache_changes_no_sample_and_removes_the_step_transpose():
    """``with_feature_rows`` keeps ``W^T`` on the bench (what ``jsdl.train`` passes to its step).
    Every bench that sums feature rows draws bit-identical samples with and without it; a bench
    that uses the dense product is returned unchanged; the training step drawing from the bench
    compiles without a transpose of the feature matrix, which it has without the cache."""
    import jsdl
    from jsdl.data import make_hierarchical_bench, make_synth
    from jsdl.train import Stepper, TrainConfig, init_state

    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    W = _unit(k1, 16, 1024)
    benches = {
        "bench": Bench(W_p=W, W_r=W, sparsity=0.99, sampler="jax"),
        "bench transcoder": Bench(W_p=W, W_r=_unit(k2, 12, 1024), sparsity=0.99, method="transcoder", sampler="jax"),
        "bench native transcoder": Bench(W_p=W, W_r=_unit(k2, 12, 1024), sparsity=0.99, method="transcoder"),
        "hierarchical": make_hierarchical_bench(jax.random.PRNGKey(22), n_roots=60, branching=3, depth=2,
                                                d_input=32, max_interference=0.5, child_rate=0.02,
                                                parent_alone_rate=0.005, sampler="jax"),
        "synth": make_synth(jax.random.PRNGKey(0), "tiny", n_features=160, d_input=24, n_roots=4, branching=3,
                            depth=2, correlation_rank=4, orthogonalize_steps=5, max_prob=0.3, min_prob=0.01),
    }
    draw = jax.jit(lambda b, key: b.sample(key, 64))
    for name, b in benches.items():
        assert b.decodes_rows(), name
        r = b.with_feature_rows()
        want = {"W_p", "W_r"} if "transcoder" in name else {"W_p"}
        assert b.rows_cache is None and set(r.rows_cache) == want, name
        for m in want:
            np.testing.assert_array_equal(r.rows_cache[m], np.asarray(getattr(b, m)).T)
        for i in range(2):
            key = jax.random.PRNGKey(40 + i)
            a, c = draw(b, key), draw(r, key)
            for f in ("x_p", "x_r", "features"):
                np.testing.assert_array_equal(getattr(a, f), getattr(c, f), err_msg=f"{name} {f}")
    dense = Bench(W_p=W[:, :64], W_r=W[:, :64], sparsity=0.5, sampler="jax")
    assert not dense.decodes_rows() and dense.with_feature_rows() is dense

    b = benches["bench"]
    spec = jsdl.make_spec("sae", "topk", 48, k=4)
    cfg = TrainConfig(steps=3, batch_size=32, progress=False, plots=False)
    st = Stepper(spec, cfg, data_mode="bench", devices=jax.devices()[:1], bench=b)
    state = st.place_state(init_state(jax.random.PRNGKey(0), spec, cfg, 16))
    placed = st.place_data(b)
    assert placed.rows_cache is not None

    def transposes(data):  # W_p^T read in the column-major layout of a transposed view, then copied
        hlo = st.step.lower(state, data, None).compile().as_text()
        return [l for l in hlo.splitlines() if "f32[1024,16]{0,1}" in l]

    assert not transposes(placed)
    assert transposes(jax.device_put(b))  # without the cache the step transposes W_p


# --------------------------------------------------------------------------------------------------
# The native sampler (jsdl.native.sparse_draw): the same laws, one sample at a time
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("S", [0.98, 0.5])  # the JAX sampler's sparse and dense regimes; one native path
def test_native_bench_sampler_follows_the_law(S):
    """The native Bench sampler draws the law of eqs. 30-31 (the checks of
    test_features_follow_the_law: per-feature rates, Binomial counts, independent rows and
    features, c_min + Exp(beta) magnitudes), x_p is features @ W_p^T, and its own laws hold:
    sample b does not depend on the batch size, a key decides the draw, vmap over keys equals the
    calls one by one, typed keys work."""
    sampler_or_skip("native")
    n, B, d = 256, 60000, 8
    W = _unit(jax.random.PRNGKey(30), d, n)
    b = Bench(W_p=W, W_r=W, sparsity=S, c_min=0.3, beta=0.7, sampler="native")
    law = b.law
    f = jax.jit(b.sample_features, static_argnums=1)
    x = np.asarray(f(jax.random.PRNGKey(1), B), np.float64)
    m = x > 0
    p = 1 - S
    assert np.max(np.abs(m.mean(0) - p)) < 5 * math.sqrt(p * (1 - p) / B)
    counts = m.sum(1)
    expect = B * stats.binom.pmf(np.arange(n + 1), n, p)
    big = expect >= 20
    obs = np.bincount(counts, minlength=n + 1)
    f_obs, f_exp = np.append(obs[big], obs[~big].sum()), np.append(expect[big], expect[~big].sum())
    assert stats.chisquare(f_obs, f_exp * f_obs.sum() / f_exp.sum()).pvalue > 1e-4
    assert abs(np.corrcoef(counts[:-1], counts[1:])[0, 1]) < 5 / math.sqrt(B)
    C = np.corrcoef(m.T)
    assert np.max(np.abs(C[~np.eye(n, dtype=bool)])) < 6 / math.sqrt(B)
    a = x[m]
    assert a.min() >= law.c_min - 1e-6
    assert abs(a.mean() - law.active_mean) < 5 * law.beta / math.sqrt(a.size)
    assert a.var() == pytest.approx(law.beta ** 2, rel=0.05)
    assert stats.kstest(a - law.c_min, "expon", args=(0, law.beta)).pvalue > 1e-4
    k = jax.random.PRNGKey(2)
    batch = jax.jit(b.draw, static_argnums=1)(k, 300)
    np.testing.assert_array_equal(batch.features, f(jax.random.split(k)[0], 300))
    np.testing.assert_allclose(batch.x_p, np.asarray(batch.features) @ np.asarray(W).T, atol=1e-5)
    np.testing.assert_array_equal(f(k, 7), f(k, 300)[:7])  # sample b whatever the batch size
    assert not np.array_equal(f(k, 7), f(jax.random.PRNGKey(3), 7))
    keys = jax.random.split(k, 3)
    v = jax.jit(jax.vmap(lambda kk: b.sample_features(kk, 5)))(keys)
    for i in range(3):
        np.testing.assert_array_equal(v[i], f(keys[i], 5))
    assert f(jax.random.key(0), 2).shape == (2, n)


def test_native_sampler_choice_errors_and_fallback(monkeypatch):
    """``sampler`` is checked; ``native`` where it cannot run is an error, ``auto`` falls back to
    the JAX sampler; a copula (correlated masks) has no native sampler; run records say which."""
    from jsdl import native
    from jsdl.data import make_hierarchical_bench, make_structured_bench

    with pytest.raises(ValueError, match="sampler"):
        make_bench(jax.random.PRNGKey(0), 40, 12, 0.5, sampler="fast")
    with pytest.raises(ValueError, match="sampler"):
        make_hierarchical_bench(jax.random.PRNGKey(0), n_roots=4, d_input=12, max_interference=0.5, sampler="numpy")
    C = np.eye(30)
    C[0, 1] = C[1, 0] = 0.3
    with pytest.raises(ValueError, match="correlation"):
        make_structured_bench(jax.random.PRNGKey(0), 30, 16, 0.6, correlation=C, sampler="native")
    corr = make_structured_bench(jax.random.PRNGKey(0), 30, 16, 0.6, correlation=C)
    assert not corr.uses_native() and corr.config()["sampler"] == "jax"
    with pytest.raises(ValueError, match="no native sampler"):
        corr.replace(sampler="native").uses_native()
    b = make_bench(jax.random.PRNGKey(0), 40, 12, 0.5, sampler="native")
    h = make_hierarchical_bench(jax.random.PRNGKey(0), n_roots=4, d_input=12, max_interference=0.5, sampler="native")
    monkeypatch.setattr(native, "supports_synth", lambda dtype: False)  # float64, an accelerator, no compiler
    for bench in (b, h):
        with pytest.raises(RuntimeError, match="native"):
            bench.sample_features(jax.random.PRNGKey(1), 8)
        auto = bench.replace(sampler="auto")
        assert not auto.uses_native() and auto.config()["sampler"] == "jax"
        assert auto.sample(jax.random.PRNGKey(1), 8).x_p.shape == (8, 12)


def test_yaml_bench_options_choose_the_sampler():
    from jsdl.train.cli import config_from_dict

    data = {"n_features": 40, "d_input": 12, "max_interference": 0.5}
    cfg = config_from_dict({"data": {**data, "options": {"sampler": "jax"}}})
    assert cfg.data.build("sae").sampler == "jax"
    assert config_from_dict({"data": data}).data.build("sae").sampler == "auto"
    with pytest.raises(ValueError, match="sampler"):
        config_from_dict({"data": {**data, "options": {"sampler": "gpu"}}}).data.build("sae")
