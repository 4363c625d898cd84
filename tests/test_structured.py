"""Structured benches: hierarchy, correlated firing, rates/importance, noise, toy model."""
import math

import jax
import numpy as np
import pytest

from jsdl.data import (
    StructuredBench,
    build_hierarchy,
    make_hierarchical_bench,
    make_structured_bench,
    make_toy_model_bench,
    validate_hierarchy,
)
from jsdl.data.structured import hierarchy_depth, mask_to_gaussian_correlation


def _sample(b, key, B):
    return jax.jit(b.sample, static_argnums=1)(key, B)


def test_hierarchy_parent_fires_iff_child():
    b = make_hierarchical_bench(jax.random.PRNGKey(0), n_roots=4, branching=3, depth=2, d_input=48,
                                max_interference=0.35, child_rate=0.05)
    assert isinstance(b, StructuredBench) and b.depth == 2
    x = np.asarray(_sample(b, jax.random.PRNGKey(1), 4000).features) > 0
    po = np.asarray(b.parent_of)
    for p in range(po.shape[0]):
        kids = np.flatnonzero(po == p)
        if kids.size:
            np.testing.assert_array_equal(x[:, p], x[:, kids].any(axis=1))  # Definition 3.2, both ways
    assert x[:, po < 0].any() and x[:, po >= 0].any()


def test_parent_alone_rate():
    b = make_hierarchical_bench(jax.random.PRNGKey(0), n_roots=10, branching=2, depth=1, d_input=32,
                                max_interference=0.4, child_rate=0.02, parent_alone_rate=0.1)
    x = np.asarray(b.sample_features(jax.random.PRNGKey(2), 20000)) > 0
    po = np.asarray(b.parent_of)
    for p in range(10):
        kids = x[:, po == p].any(axis=1)
        assert np.all(x[kids, p])  # whenever a child fires
        alone = np.mean(x[~kids, p])
        assert abs(alone - 0.1) < 5 * math.sqrt(0.1 * 0.9 / (~kids).sum())


def test_hierarchy_validation():
    assert list(validate_hierarchy({0: [1, 2], 3: [4]}, 5)) == [-1, 0, 0, -1, 3]
    with pytest.raises(ValueError, match="two parents"):
        validate_hierarchy({0: [2], 1: [2]}, 3)
    with pytest.raises(ValueError, match="cycle"):
        validate_hierarchy([1, 0, -1], 3)
    with pytest.raises(ValueError, match="own"):
        validate_hierarchy({1: [1]}, 3)
    with pytest.raises(ValueError, match="outside"):
        validate_hierarchy({0: [5]}, 3)
    with pytest.raises(ValueError, match="two parents"):
        make_structured_bench(jax.random.PRNGKey(0), 6, 8, 0.5, hierarchy={0: [2, 3], 1: [3]})
    po = build_hierarchy(2, 3, 2)
    assert po.shape == (2 + 6 + 18,) and hierarchy_depth(po) == 2


def test_per_feature_rates_and_importance():
    rates = np.linspace(0.02, 0.3, 10)
    b = make_structured_bench(jax.random.PRNGKey(3), 10, 16, 0.5, firing_rates=rates, importance_decay=0.5)
    x = np.asarray(b.sample_features(jax.random.PRNGKey(4), 40000))
    emp = (x > 0).mean(0)
    assert np.all(np.abs(emp - rates) < 5 * np.sqrt(rates * (1 - rates) / 40000))
    m = np.array([x[x[:, d] > 0, d].mean() for d in range(10)])
    np.testing.assert_allclose(m, (b.c_min + b.beta) * 0.5 ** np.arange(10), rtol=0.05)
    # exact M_d for independent features against Monte Carlo
    mc = b.feature_weights(jax.random.PRNGKey(5))  # key ignored for independent features
    act = x > 0
    alone = act & (act.sum(1, keepdims=True) == 1)
    np.testing.assert_allclose(np.mean(alone * x**2, 0), mc, rtol=0.15, atol=1e-4)
    with pytest.raises(ValueError, match="firing_rates"):
        make_structured_bench(jax.random.PRNGKey(3), 10, 16, 0.5, firing_rates=np.full(10, 1.5))
    with pytest.raises(ValueError, match="not both"):
        make_structured_bench(jax.random.PRNGKey(3), 10, 16, 0.5, importance=np.ones(10), importance_decay=0.9)


def test_correlated_masks_match_target():
    n = 6
    C = np.eye(n)
    C[0, 1] = C[1, 0] = 0.4
    C[2, 3] = C[3, 2] = -0.1
    rates = np.array([0.1, 0.2, 0.3, 0.3, 0.1, 0.1])
    b = make_structured_bench(jax.random.PRNGKey(6), n, 8, 0.6, firing_rates=rates, correlation=C)
    B = 100000
    m = np.asarray(b.sample_features(jax.random.PRNGKey(7), B) > 0, float)
    emp = np.corrcoef(m.T)
    tol = 5 / math.sqrt(B)
    np.testing.assert_allclose(emp[0, 1], 0.4, atol=tol)
    np.testing.assert_allclose(emp[2, 3], -0.1, atol=tol)
    np.testing.assert_allclose(emp[0, 4], 0.0, atol=tol)
    assert np.all(np.abs(m.mean(0) - rates) < 5 * np.sqrt(rates / B))


def test_correlation_errors():
    C = np.eye(3)
    C[0, 1] = C[1, 0] = 0.9  # rates 0.05 vs 0.5: far above the Frechet bound
    with pytest.raises(ValueError, match="cannot be reached"):
        mask_to_gaussian_correlation(C, np.array([0.05, 0.5, 0.2]))
    with pytest.raises(ValueError, match="symmetric"):
        bad = np.eye(3)
        bad[0, 1] = 0.3
        make_structured_bench(jax.random.PRNGKey(0), 3, 8, 0.5, correlation=bad)
    C3 = np.full((3, 3), -0.6) + 1.6 * np.eye(3)
    with pytest.raises(ValueError, match="semi-definite"):
        make_structured_bench(jax.random.PRNGKey(0), 3, 8, 0.5, correlation=C3, correlation_kind="gaussian")


def test_noise_and_transcoder_targets():
    b = make_structured_bench(jax.random.PRNGKey(8), 30, 16, 0.45, 0.9, noise_std=0.1, method="transcoder",
                              target_noise_std=0.0)
    batch = _sample(b, jax.random.PRNGKey(9), 8000)
    resid = np.asarray(batch.x_p - batch.features @ b.W_p.T)
    assert abs(resid.std() - 0.1) < 0.005
    np.testing.assert_allclose(batch.x_r, batch.features @ b.W_r.T, atol=1e-5)
    sae = make_structured_bench(jax.random.PRNGKey(8), 30, 16, 0.45, 0.9, noise_std=0.1)
    bs = sae.sample(jax.random.PRNGKey(10), 4)
    np.testing.assert_array_equal(bs.x_r, bs.x_p)
    with pytest.raises(ValueError, match="key"):
        sae.observe(bs.features)


def test_determinism_and_finite_dataset():
    kw = dict(n_roots=3, branching=2, depth=1, d_input=16, max_interference=0.45, child_rate=0.2, dataset_size=20)
    a = make_hierarchical_bench(jax.random.PRNGKey(11), **kw)
    b = make_hierarchical_bench(jax.random.PRNGKey(11), **kw)
    np.testing.assert_array_equal(a.materialize().x_p, b.materialize().x_p)
    c = make_hierarchical_bench(jax.random.PRNGKey(12), **kw)
    assert not np.allclose(a.W_p, c.W_p)


def test_toy_model_superposition():
    b = make_toy_model_bench(jax.random.PRNGKey(0), n_features=12, d_hidden=4, sparsity=0.95,
                             importance_decay=0.9, steps=1500, batch_size=256, learning_rate=3e-3)
    toy = b.toy
    assert toy.W.shape == (4, 12) and b.W_p.shape == (4, 12)
    assert float(toy.losses[-200:].mean()) < float(toy.losses[:50].mean())
    norms = np.asarray(b.feature_norms())
    # at high sparsity the model represents more features than it has dimensions (superposition)
    assert (norms > 0.5).sum() > 4
    batch = b.sample(jax.random.PRNGKey(1), 64)
    np.testing.assert_allclose(batch.x_p, toy.hidden(batch.features), atol=1e-5)
    x = np.asarray(batch.features)
    assert x.max() <= 1.0 and x.min() >= 0.0
    assert b.config()["kind"] == "toy_model"
