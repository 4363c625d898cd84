"""jsdl.data.rng: the samplers' Threefry-2x32 random words (both output words, unrolled)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jsdl.data import rng


def test_hash_is_jax_threefry():
    """Same hash as jax.random: with the partitionable Threefry (jax's default), the 32-bit words
    of jax.random.bits(key, (N,)) are y1 ^ y2 of the hash of the counters (0, i)."""
    if not jax.config.jax_threefry_partitionable:
        pytest.skip("jax_threefry_partitionable is off")
    key = jax.random.PRNGKey(123)
    N = 5000
    y1, y2 = rng.threefry2x32(key[0], key[1], jnp.zeros(N, jnp.uint32), jnp.arange(N, dtype=jnp.uint32))
    np.testing.assert_array_equal(np.asarray(y1 ^ y2), np.asarray(jax.random.bits(key, (N,), jnp.uint32)))


def test_shapes_determinism_and_keys():
    k = jax.random.PRNGKey(0)
    for shape in [(7,), (3, 5), (2, 3, 4), (1, 1)]:
        w = rng.bits(k, shape)
        assert w.shape == shape and w.dtype == jnp.uint32
    np.testing.assert_array_equal(rng.bits(k, (64, 33)), jax.jit(rng.bits, static_argnums=1)(k, (64, 33)))
    assert not np.array_equal(rng.bits(k, (64,)), rng.bits(jax.random.PRNGKey(1), (64,)))
    # A typed key gives the words of its raw data.
    np.testing.assert_array_equal(rng.bits(jax.random.key(5), (9, 4)), rng.bits(jax.random.PRNGKey(5), (9, 4)))
    keys = jax.random.split(k, 4)
    np.testing.assert_array_equal(jax.vmap(lambda kk: rng.uniform(kk, (6, 5)))(keys),
                                  np.stack([rng.uniform(kk, (6, 5)) for kk in keys]))
    with pytest.raises(ValueError, match="threefry key"):
        rng.bits(jnp.zeros((4,), jnp.uint32), (3,))


def test_rows_depend_on_key_and_index_only():
    """Row r of a [R, m] draw is the same whatever R (counters per row): sharding along rows
    needs no communication, and a smaller batch is a prefix of a larger one."""
    k = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(rng.bits(k, (10, 6)), rng.bits(k, (40, 6))[:10])


def test_uniform_law():
    u = np.asarray(rng.uniform(jax.random.PRNGKey(11), (400, 501)))
    assert u.dtype == np.float32 and u.min() >= 0.0 and u.max() < 1.0
    assert stats.kstest(u.ravel(), "uniform").pvalue > 1e-3
    # Independence: neighbours along a row, across rows, and the two words of one hash (j, j + h).
    h = (501 + 1) // 2
    for a, b in [(u[:, :-1], u[:, 1:]), (u[:-1], u[1:]), (u[:, :h - 1], u[:, h:])]:
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.01
    # Every bit of the words is fair.
    w = np.asarray(rng.bits(jax.random.PRNGKey(12), (256, 1000)))
    frac = np.array([((w >> i) & 1).mean() for i in range(32)])
    assert np.abs(frac - 0.5).max() < 0.005
    v = rng.uniform(jax.random.PRNGKey(1), (1000,), minval=-2.0, maxval=3.0)
    assert float(v.min()) >= -2.0 and float(v.max()) < 3.0


def test_float64_falls_back_to_jax_random():
    jax.config.update("jax_enable_x64", True)
    try:
        k = jax.random.PRNGKey(2)
        np.testing.assert_array_equal(rng.uniform(k, (5,), jnp.float64), jax.random.uniform(k, (5,), jnp.float64))
    finally:
        jax.config.update("jax_enable_x64", False)
