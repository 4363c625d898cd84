"""Linear Representation Bench: constraints, sampling statistics, determinism, errors."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsdl
from jsdl.data import InfeasibleInterferenceError, generate_feature_matrix, interference_lower_bound_check, make_bench

N, D, M, S = 120, 48, 0.3, 0.9


@pytest.fixture(scope="module")
def bench():
    return make_bench(jax.random.PRNGKey(0), N, D, M, S)


def _gram64(W):
    W = np.asarray(W, np.float64)
    return W.T @ W


def test_unit_columns_and_signed_overlap(bench):
    G = _gram64(bench.W_p)
    np.testing.assert_allclose(np.diag(G), 1.0, atol=1e-5)
    off = G[~np.eye(N, dtype=bool)]
    assert off.max() <= M
    assert bench.realized_interference == pytest.approx(off.max(), abs=1e-6)
    # a Gaussian start of this size violates M, so PGD did real work
    W0 = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (D, N)), np.float64)
    W0 /= np.linalg.norm(W0, axis=0)
    assert (W0.T @ W0)[~np.eye(N, dtype=bool)].max() > M


def test_signed_not_absolute():
    # negative overlaps are allowed: with n > d + 1 the most negative overlap is typically below -M
    W, info = generate_feature_matrix(jax.random.PRNGKey(2), 60, 12, 0.35)
    G = _gram64(W)
    off = G[~np.eye(60, dtype=bool)]
    assert off.max() <= 0.35 and off.min() < -0.35
    assert info["realized_interference"] <= 0.35 and info["iterations"] >= 1


def test_sparsity_within_sampling_error(bench):
    B = 20000
    x = jax.jit(bench.sample_features, static_argnums=1)(jax.random.PRNGKey(3), B)
    p0 = float(jnp.mean(x == 0))
    se = math.sqrt(S * (1 - S) / (B * N))
    assert abs(p0 - S) < 5 * se
    # magnitudes c_min + Exp(beta): min >= c_min, conditional mean c_min + beta
    act = np.asarray(x)[np.asarray(x) > 0]
    assert act.min() >= bench.c_min - 1e-6
    assert act.mean() == pytest.approx(bench.c_min + bench.beta, rel=0.02)
    # empirical second moment matches second_moment()
    np.testing.assert_allclose(np.mean(np.asarray(x) ** 2), float(bench.second_moment()[0]), rtol=0.03)


def test_sample_is_jittable_and_consistent(bench):
    key = jax.random.PRNGKey(4)
    eager = bench.sample(key, 64)
    jitted = jax.jit(bench.sample, static_argnums=1)(key, 64)
    chex.assert_trees_all_close(eager, jitted, atol=1e-5)
    chex.assert_shape(eager.x_p, (64, D))
    np.testing.assert_allclose(eager.x_p, eager.features @ bench.W_p.T, atol=1e-5)
    np.testing.assert_array_equal(eager.x_r, eager.x_p)
    # a Bench passes through jit as a pytree argument
    f = jax.jit(lambda b, k: b.sample(k, 8).x_p)
    chex.assert_trees_all_close(f(bench, key), bench.sample(key, 8).x_p, atol=1e-5)


def test_same_key_same_bench_different_keys_differ(bench):
    again = make_bench(jax.random.PRNGKey(0), N, D, M, S)
    np.testing.assert_array_equal(again.W_p, bench.W_p)
    other = make_bench(jax.random.PRNGKey(1), N, D, M, S)
    assert not np.allclose(other.W_p, bench.W_p)
    k = jax.random.PRNGKey(5)
    np.testing.assert_array_equal(bench.sample(k, 16).x_p, again.sample(k, 16).x_p)
    assert not np.allclose(bench.sample(k, 16).x_p, bench.sample(jax.random.PRNGKey(6), 16).x_p)


def test_typed_keys_work():
    b = make_bench(jax.random.key(0), 30, 16, 0.4, 0.9)
    assert b.sample(jax.random.key(1), 4).x_p.shape == (4, 16)


@pytest.mark.parametrize("method", ["transcoder", "skip_transcoder", "crosscoder"])
def test_method_targets(method):
    b = make_bench(jax.random.PRNGKey(7), 40, 16, 0.45, 0.9, method=method,
                   d_target=None if method == "crosscoder" else 12, n_sources=3)
    batch = b.sample(jax.random.PRNGKey(8), 32)
    x = np.asarray(batch.features, np.float64)
    if method == "crosscoder":
        assert b.W_p.shape == (48, 40) and b.n_sources == 3 and b.d_input == 16
        for l in range(3):  # each source: unit columns, bound met
            G = _gram64(b.W_p[16 * l:16 * (l + 1)])
            np.testing.assert_allclose(np.diag(G), 1, atol=1e-5)
            assert G[~np.eye(40, dtype=bool)].max() <= 0.45
        np.testing.assert_array_equal(batch.x_r, batch.x_p)
        spec = jsdl.make_spec("crosscoder", "relu", 64, n_sources=3)
        params = jsdl.init_params(jax.random.PRNGKey(0), spec, b.d_input)
        jsdl.sdl_loss(params, batch, spec)  # shapes accepted by the core
        return
    G = _gram64(b.W_r)
    assert b.W_r.shape == (12, 40)
    np.testing.assert_allclose(np.diag(G), 1, atol=1e-5)
    assert G[~np.eye(40, dtype=bool)].max() <= 0.45 and b.realized_interference_r <= 0.45
    assert not np.allclose(b.W_r[:12], b.W_p[:12])  # independent
    expect = x @ np.asarray(b.W_r, np.float64).T
    if method == "skip_transcoder":
        assert b.W_skip.shape == (12, 16)
        expect = expect + np.asarray(batch.x_p, np.float64) @ np.asarray(b.W_skip, np.float64).T
    else:
        assert b.W_skip is None
    np.testing.assert_allclose(batch.x_r, expect, atol=1e-4)
    spec = jsdl.make_spec(method, "relu", 64)
    params = jsdl.init_params(jax.random.PRNGKey(0), spec, b.d_input, b.d_target)
    jsdl.sdl_loss(params, batch, spec)


def test_finite_dataset_fixed_rows():
    b = make_bench(jax.random.PRNGKey(9), 30, 16, 0.4, 0.8, dataset_size=50)
    full = b.materialize()
    assert full.x_p.shape == (50, 16)
    rows = b.dataset_batch(jnp.array([3, 3, 49]))
    np.testing.assert_allclose(rows.x_p[0], full.x_p[3], atol=1e-6)
    np.testing.assert_array_equal(rows.x_p[0], rows.x_p[1])
    # sample() draws only dataset rows
    s = jax.jit(b.sample, static_argnums=1)(jax.random.PRNGKey(10), 200)
    d = np.abs(np.asarray(s.features)[:, None, :] - np.asarray(full.features)[None]).sum(-1).min(1)
    assert d.max() < 1e-5
    with pytest.raises(ValueError, match="dataset_size"):
        make_bench(jax.random.PRNGKey(9), 30, 16, 0.4, 0.8).materialize()


def test_stream_yields_distinct_batches(bench):
    bs = list(bench.stream(jax.random.PRNGKey(11), 8, n_batches=3))
    assert len(bs) == 3 and not np.allclose(bs[0].x_p, bs[1].x_p)


def test_feature_weights_formula(bench):
    c, b = bench.c_min, bench.beta
    expect = (1 - S) * S ** (N - 1) * (c * c + 2 * c * b + 2 * b * b)
    np.testing.assert_allclose(bench.feature_weights(), expect, rtol=1e-5)
    full = np.asarray(bench.second_moment(full=True))
    assert full.shape == (N, N)
    np.testing.assert_allclose(np.diag(full), bench.second_moment(), rtol=1e-6)
    assert bench.config()["realized_interference"] <= M


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(max_interference=1.0), "max_interference"),
        (dict(max_interference=-1.0), "max_interference"),
        (dict(sparsity=1.0), "sparsity"),
        (dict(sparsity=-0.1), "sparsity"),
        (dict(d_input=0), "d_input"),
        (dict(n_features=0), "n_features"),
        (dict(c_min=-1.0), "c_min"),
        (dict(beta=0.0), "beta"),
        (dict(method="nope"), "unknown method"),
        (dict(method="sae", d_target=7), "d_target"),
        (dict(dataset_size=0), "dataset_size"),
    ],
)
def test_invalid_settings(kw, match):
    args = dict(n_features=20, d_input=8, max_interference=0.4, sparsity=0.9) | kw
    with pytest.raises(ValueError, match=match):
        make_bench(jax.random.PRNGKey(0), **args)


def test_infeasible_by_bound_fails_before_work():
    # n > 2d with M <= 0 is impossible (Rankin); the simplex bound for tiny M
    with pytest.raises(InfeasibleInterferenceError, match="Rankin"):
        make_bench(jax.random.PRNGKey(0), 20, 4, 0.0)
    with pytest.raises(InfeasibleInterferenceError, match="simplex"):
        make_bench(jax.random.PRNGKey(0), 5, 8, -0.5)
    assert interference_lower_bound_check(1000, 768, 0.1) is None
    assert "Delsarte" in interference_lower_bound_check(2000, 768, 0.0005)


def test_infeasible_by_pgd_fails_loudly():
    # 20 points on S^3 cannot have max cosine 0.3 (no bound catches it; PGD stalls): clear error
    with pytest.raises(InfeasibleInterferenceError, match="could not reach max_interference=0.3"):
        make_bench(jax.random.PRNGKey(0), 20, 4, 0.3, max_iters=300)


def test_bound_is_never_violated_silently():
    # whatever happens, a returned matrix satisfies the bound (the tight M=0.47 for 20 in R^4)
    try:
        W, _ = generate_feature_matrix(jax.random.PRNGKey(3), 20, 4, 0.47, max_iters=400)
    except InfeasibleInterferenceError:
        return
    G = _gram64(W)
    assert G[~np.eye(20, dtype=bool)].max() <= 0.47


def test_max_interference_by_blocks_equals_the_whole_gram_matrix():
    """The Gram matrix is formed a block of rows at a time (the whole matrix crashed numpy's
    OpenBLAS at n = 16384); every block size gives the whole matrix's largest off-diagonal entry,
    including a block that straddles the diagonal unevenly and a largest entry in the last block."""
    from jsdl.data.bench import max_interference

    rng = np.random.default_rng(0)
    W = rng.standard_normal((6, 37))
    W[:, 36] = W[:, 2] + 1e-3 * rng.standard_normal(6)  # the largest overlap: columns 2 and 36
    Wn = W / np.linalg.norm(W, axis=0)
    G = Wn.T @ Wn
    np.fill_diagonal(G, -np.inf)
    want = float(G.max())
    assert want > 0.99
    for entries in (1, 37, 5 * 37, 36 * 37, 10**6):
        assert max_interference(W, block_entries=entries) == pytest.approx(want, abs=1e-12), entries
    assert max_interference(W[:, :1]) == -np.inf
