"""Random bits for the on-device samplers: Threefry-2x32, both output words, unrolled.

The benches draw their batches inside the jitted training step, and on a CPU the random numbers
are a large share of a sampler's cost. ``jax.random.bits`` / ``uniform`` (jax 0.10, the default
partitionable Threefry) spend one Threefry-2x32 block (20 rounds on two words) per 32-bit output,
keeping ``x1 ^ x2``, and on CPU jax lowers the hash as a rolled loop of 5 iterations whose carried
state XLA copies each iteration. :func:`bits` computes the same hash (the same key schedule,
rotations and 20 rounds as ``jax.random``'s Threefry-2x32) on a counter per *pair* of outputs and
keeps both output words, with the rounds unrolled: measured on the 2-core CPU, 3.5-7x faster
per 32-bit word (``benchmarks/NOTES.md``). Counters run along the last axis within each row
(``[..., ceil(m / 2)]``), so every row is a function of the key and its index only: a batch
generated sharded along its leading axis needs no communication, as with jax's partitionable
Threefry.

The streams differ from ``jax.random.bits(key, shape)`` (another counter layout); the law is the
same (independent uniform 32-bit words, as far as Threefry-2x32 provides them). Keys are the
usual ``jax.random.PRNGKey`` / ``jax.random.key`` (threefry) keys; split and fold them with
``jax.random`` as everywhere else.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["bernoulli", "bits", "exponential", "normal", "threefry2x32", "uniform"]

_ROT = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotl(v, r: int):
    return (v << np.uint32(r)) | (v >> np.uint32(32 - r))


def threefry2x32(k1, k2, x1, x2):
    """The Threefry-2x32 hash (20 rounds), unrolled: ``(y1, y2)`` for counters ``(x1, x2)``
    (uint32 arrays) under the key words ``(k1, k2)``; equal to ``jax.random``'s primitive."""
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _ROT[i % 2]:
            x1 = x1 + x2
            x2 = _rotl(x2, r) ^ x1
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def _key_words(key):
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    if key.shape != (2,) or key.dtype != jnp.uint32:
        raise ValueError(f"expected a threefry key (uint32[2] or a typed threefry key), got {key.dtype}{key.shape}")
    return key[0], key[1]


def bits(key, shape: Sequence[int]) -> jax.Array:
    """Uniform random ``uint32`` words of ``shape`` (module docstring). Jit- and vmap-able."""
    shape = tuple(int(s) for s in shape)
    k1, k2 = _key_words(key)
    if not shape:
        return bits(key, (1,))[0]
    lead, m = shape[:-1], shape[-1]
    h = -(-m // 2)
    rows = int(np.prod(lead, dtype=np.int64)) if lead else 1
    if rows * h >= 2 ** 32:
        raise ValueError(f"too many random words for one call: {shape}")
    # Counter (row, j): x1 = row index, x2 = j (each < 2^32).
    x1 = jax.lax.broadcasted_iota(jnp.uint32, (rows, h), 0)
    x2 = jax.lax.broadcasted_iota(jnp.uint32, (rows, h), 1)

    def words():
        y1, y2 = threefry2x32(k1, k2, x1, x2)
        return jnp.concatenate([y1, y2], axis=1)

    # Both branches are the same computation: the conditional only makes XLA materialise the
    # words. Otherwise XLA CPU fuses the ~150-op hash into each consumer, and into gathers (the
    # samplers' slot layouts) where it runs element by element (measured: the Bench sampler's x_p
    # 0.56 ms with, 0.88 ms without, B = 1024, n = 512). An optimization_barrier does not survive
    # XLA CPU's pipeline. Under vmap with batched keys the conditional becomes a select of the
    # two (equal) branches.
    out = jax.lax.cond((k1 & np.uint32(1)) == 0, words, words)
    return out[:, :m].reshape(shape)


def uniform(key, shape: Sequence[int], dtype=jnp.float32, minval=0.0, maxval=1.0) -> jax.Array:
    """Uniform floats in ``[minval, maxval)`` from :func:`bits`, converted as ``jax.random.uniform``
    does (the top 23 bits of each word). Other dtypes than float32 (float64 in the theory mode)
    are drawn by ``jax.random.uniform`` itself."""
    dtype = jnp.dtype(dtype)
    if dtype != jnp.float32:
        return jax.random.uniform(key, shape, dtype, minval, maxval)
    w = bits(key, shape)
    f = jax.lax.bitcast_convert_type((w >> np.uint32(9)) | np.uint32(0x3F800000), jnp.float32) - 1.0
    minval = jnp.asarray(minval, dtype)
    maxval = jnp.asarray(maxval, dtype)
    return jnp.maximum(minval, f * (maxval - minval) + minval)


def exponential(key, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    """Standard exponential draws ``-log(1 - U)`` with ``U`` from :func:`uniform` (as
    ``jax.random.exponential``)."""
    dtype = jnp.dtype(dtype)
    if dtype != jnp.float32:
        return jax.random.exponential(key, shape, dtype)
    return -jnp.log1p(-uniform(key, shape, dtype))


def normal(key, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    """Standard normal draws ``sqrt(2) erfinv(V)``, ``V`` uniform on ``(-1, 1)`` (as
    ``jax.random.normal``)."""
    dtype = jnp.dtype(dtype)
    if dtype != jnp.float32:
        return jax.random.normal(key, shape, dtype)
    lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
    return np.float32(np.sqrt(2.0)) * jax.lax.erf_inv(uniform(key, shape, dtype, lo, 1.0))


def bernoulli(key, p, shape: Sequence[int]) -> jax.Array:
    """``uniform(key, shape) < p`` (as ``jax.random.bernoulli``)."""
    return uniform(key, shape) < p
