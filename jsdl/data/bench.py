"""Linear Representation Bench (paper App. C, summary section 4): synthetic superposition data whose
ground-truth features are known.

Generative model (Assumption 2.1)::

    x    in R^n_+ ,  x_d = m_d (c_min + Exp(beta)),  m_d ~ Bernoulli(1 - S)        (eqs. 30-31)
    x_p  = W_p x                   W_p [n_p, n], unit-norm columns                 (eq. 32)
    x_r  = W_r x  (+ W_skip x_p)   W_r [n_r, n], unit-norm columns

``W_p`` is drawn Gaussian, its columns normalised (eq. 27), then refined by projected gradient
descent (eq. 29) on the interference loss (eq. 28)

    L_int = sum_{i != j} relu(<w_i, w_j> - (M - eps))^2  +  lambda sum_{i != j} relu(<w_i, w_j>)^2

until the largest *signed* off-diagonal overlap is <= M. Targets per method:

* ``sae`` / ``tied_sae`` / ``matryoshka``: ``W_r = W_p`` (x_r = x_p).
* ``transcoder``: an independent unit-column ``W_r [d_target, n]`` generated the same way (the paper
  does not say how its W_r was made; this is the natural reading).
* ``skip_transcoder``: as transcoder, plus a linear part ``x_r = W_skip x_p + W_r x`` with
  ``W_skip [d_target, n_p]`` i.i.d. N(0, skip_scale^2 / n_p) (so ||W_skip v|| ~ skip_scale ||v||).
* ``crosscoder``: ``L = n_sources`` independent unit-column matrices ``W_p^(l) [d, n]`` (each meeting
  the interference bound) stacked vertically, ``W_p [L d, n]``, so ``x_p = W_p x`` is the
  concatenation of the L sources, ``[B, L d]``; ``x_r = x_p``.

Choices where the paper is silent (recorded on every Bench, see :meth:`Bench.config`):

* ``c_min = 0.5``, ``beta = 0.5``: an active feature has magnitude >= 0.5 and mean 1
  (E[x_d | x_d > 0] = c_min + beta, E[x_d^2 | x_d > 0] = c_min^2 + 2 c_min beta + 2 beta^2 = 1.25).
  ``Exp(beta)`` has mean ``beta`` (scale parameterisation, as numpy's ``exponential(scale)``).
* PGD: initial step ``eta = 0.1`` made adaptive (a step is accepted only if L_int does not increase;
  accepted steps grow eta by 1.25, rejected ones halve it), which never diverges where a fixed step
  of 1.0 collapses the columns; margin ``eps = max(0.1 |M|, 1e-3)``; ``lambda = 1e-3``;
  ``max_iters = 2000``. The loop stops when max overlap <= M - 1e-5 (float32 slack) and fails with a
  :class:`InfeasibleInterferenceError` if it stalls (step below 1e-8) or runs out of iterations.
* Provably infeasible targets are rejected before any work, from the simplex bound (M >= -1/(n-1)),
  Rankin's bounds (n > d+1 needs M >= 0; n > 2d needs M > 0) and the Delsarte linear-programming
  bounds with f(t) = (t+1)(t-M) and (t+1)^2 (t-M) (see :func:`interference_lower_bound_check`).

Sampling (:class:`SparseLaw`, :meth:`Bench.sample`): at high sparsity only ``(1-S) n`` of the ``n``
features of a sample are active, so the active sets are drawn directly, as geometric gaps between
active features over the whole batch (:func:`active_slots`), into a static capacity of ``K`` slots
per row that a row overflows with probability < 1e-15 (:func:`active_capacity`); magnitudes are
drawn for the active features only, the dense features ``[B, n]`` are their scatter, and ``x_p = W_p x``
is the sum of the active columns of ``W_p`` (:func:`decode_active`, built on
:func:`jsdl.kernels.sparse_decode`) when that is cheaper than the dense product. The law is the
same as drawing a Bernoulli mask and a magnitude for every entry, which is what is done when ``K``
is close to ``n`` (low sparsity); the random stream of the two differs. Static rules and their
measurements: :data:`SPARSE_SAMPLER_RATIO`, :data:`SPARSE_DECODE_RATIO`; numbers in
benchmarks/RESULTS.md, "Data generation".
"""
from __future__ import annotations

import functools
import math
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec as P

from jsdl import methods as _methods
from jsdl import shardops
from jsdl.data import rng as _rng
from jsdl.kernels import SparseCodes, densify
from jsdl.objective import Batch

__all__ = [
    "ACTIVE_TAIL",
    "SPARSE_DECODE_RATIO",
    "SPARSE_SAMPLER_RATIO",
    "Bench",
    "InfeasibleInterferenceError",
    "SAMPLERS",
    "SparseLaw",
    "active_capacity",
    "active_slots",
    "decode_active",
    "geometric_positions",
    "use_sparse_decode",
    "make_bench",
    "generate_feature_matrix",
    "interference_lower_bound_check",
    "max_interference",
    "DEFAULT_C_MIN",
    "DEFAULT_BETA",
]

DEFAULT_C_MIN = 0.5
DEFAULT_BETA = 0.5
_STOP_SLACK = 1e-5  # stop a little below M so float32 recomputation of the Gram matrix stays <= M


class InfeasibleInterferenceError(ValueError):
    """The requested maximum interference M cannot be reached for these n, d."""


# --------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------


def check_positive_int(name: str, v: Any) -> int:
    """``v`` as an int >= 1 (ValueError naming ``name`` otherwise)."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return int(v)


def check_float_in(name: str, v: Any, lo: float, hi: float, *, lo_open: bool, hi_open: bool) -> float:
    """``v`` as a float in the interval from ``lo`` to ``hi`` (open or closed at each end)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {v!r}") from None
    ok_lo = f > lo if lo_open else f >= lo
    ok_hi = f < hi if hi_open else f <= hi
    if not (ok_lo and ok_hi) or f != f:
        iv = ("(" if lo_open else "[") + f"{lo}, {hi}" + (")" if hi_open else "]")
        raise ValueError(f"{name} must be in {iv}, got {v!r}")
    return f


def check_magnitudes(c_min: Any, beta: Any) -> tuple[float, float]:
    """``(c_min >= 0, beta > 0)`` of the magnitude law ``c_min + Exp(beta)``."""
    c_min = check_float_in("c_min", c_min, 0.0, math.inf, lo_open=False, hi_open=True)
    beta = check_float_in("beta", beta, 0.0, math.inf, lo_open=True, hi_open=True)
    return c_min, beta


def interference_lower_bound_check(n: int, d: int, M: float) -> Optional[str]:
    """Return ``None`` if no known bound rules out ``n`` unit vectors in ``R^d`` with all pairwise
    inner products <= ``M``; otherwise a sentence saying which bound is violated.

    Bounds used (all rigorous necessary conditions):

    * simplex: the average off-diagonal inner product is >= -1/(n-1), so M >= -1/(n-1);
    * Rankin: at most d+1 vectors have pairwise negative inner products, at most 2d pairwise
      non-positive ones;
    * Delsarte LP bound with f(t) = (t+1)(t-M): n <= 2d(1-M)/(1-dM) when 0 <= M < 1/d;
    * Delsarte LP bound with f(t) = (t+1)^2 (t-M): n <= 4d(1-M)/(2-M-dM) when 0 <= M < 2/(d+1).

    Passing this check does not prove feasibility: PGD then decides, and fails loudly if it stalls.
    """
    if n >= 2 and M < -1.0 / (n - 1):
        return f"n={n} unit vectors always have max overlap >= -1/(n-1) = {-1.0 / (n - 1):.4g} (simplex bound)"
    if n > d + 1 and M < 0:
        return f"more than d+1={d + 1} vectors cannot have pairwise negative overlaps (Rankin), so M must be >= 0"
    if n > 2 * d and M <= 0:
        return f"more than 2d={2 * d} vectors cannot have pairwise non-positive overlaps (Rankin), so M must be > 0"
    if 0 <= M < 1.0 / d:
        cap = 2 * d * (1 - M) / (1 - d * M)
        if n > cap:
            return f"at most 2d(1-M)/(1-dM) = {cap:.1f} vectors fit in d={d} with max overlap {M} (Delsarte LP bound)"
    if 0 <= M < 2.0 / (d + 1):
        cap = 4 * d * (1 - M) / (2 - M - d * M)
        if n > cap:
            return f"at most 4d(1-M)/(2-M-dM) = {cap:.1f} vectors fit in d={d} with max overlap {M} (Delsarte LP bound)"
    return None


# Entries of one block of the Gram matrix in max_interference (float64: 256 MiB).
_GRAM_BLOCK_ENTRIES = 1 << 25


def max_interference(W: Any, *, block_entries: int = _GRAM_BLOCK_ENTRIES) -> float:
    """Largest signed off-diagonal overlap max_{i != j} <w_i, w_j> of the normalised columns of
    ``W [dim, n]``, computed in float64 on the host.

    The Gram matrix is formed a block of rows at a time (at most ``block_entries`` entries each):
    the whole ``[n, n]`` matrix is 2 GiB at n = 16384, and numpy's OpenBLAS (0.3.31, numpy 2.4)
    crashed the process with a segmentation fault on that product."""
    W = np.asarray(W, dtype=np.float64)
    W = W / np.maximum(np.linalg.norm(W, axis=0, keepdims=True), 1e-300)
    n = W.shape[1]
    if n < 2:
        return -math.inf
    rows = max(1, int(block_entries) // n)
    best = -math.inf
    for i in range(0, n, rows):
        G = W[:, i:i + rows].T @ W
        r = np.arange(G.shape[0])
        G[r, i + r] = -np.inf
        best = max(best, float(G.max()))
    return best


_max_overlap = max_interference  # alias: `max_interference` is also an argument name below


# --------------------------------------------------------------------------------------------------
# W_p by projected gradient descent (eqs. 27-29)
# --------------------------------------------------------------------------------------------------


def _normalise_columns(W):
    return W / jnp.linalg.norm(W, axis=0, keepdims=True)


def _pgd(key, n, d, M, margin, neg_weight, step_size, max_iters, dtype):
    """Jitted PGD loop. Returns (W, max_overlap, iterations, final_step)."""
    W = _normalise_columns(jax.random.normal(key, (d, n), dtype))  # eq. 27
    off = ~jnp.eye(n, dtype=bool)
    target = M - margin

    def loss_of(G):  # eq. 28 (each unordered pair counted twice, as in the sum over i != j)
        G = jnp.where(off, G, 0.0)
        return jnp.sum(jnp.maximum(G - target, 0.0) ** 2) + neg_weight * jnp.sum(jnp.maximum(G, 0.0) ** 2)

    def max_off(G):
        return jnp.max(jnp.where(off, G, -jnp.inf))

    def body(carry):
        W, G, L, m, eta, it = carry
        # dL/dW = W (F + F^T) = 2 W F with F_ij = f'(G_ij) symmetric, zero on the diagonal.
        F = 2.0 * jnp.maximum(G - target, 0.0) + 2.0 * neg_weight * jnp.maximum(G, 0.0)
        F = jnp.where(off, F, 0.0)
        W_new = _normalise_columns(W - eta * 2.0 * (W @ F))  # eq. 29: step, then project
        G_new = W_new.T @ W_new
        L_new = loss_of(G_new)
        accept = L_new <= L
        W = jnp.where(accept, W_new, W)
        G = jnp.where(accept, G_new, G)
        m = jnp.where(accept, max_off(G_new), m)
        L = jnp.where(accept, L_new, L)
        eta = jnp.where(accept, eta * 1.25, eta * 0.5)
        return W, G, L, m, eta, it + 1

    def cond(carry):
        _, _, _, m, eta, it = carry
        return (m > M - _STOP_SLACK) & (it < max_iters) & (eta > 1e-8)

    G = W.T @ W
    init = (W, G, loss_of(G), max_off(G), jnp.asarray(step_size, dtype), jnp.asarray(0, jnp.int32))
    W, _, _, m, eta, it = jax.lax.while_loop(cond, body, init)
    return W, m, it, eta


_pgd_jit = jax.jit(_pgd, static_argnums=(1, 2, 3, 4, 5, 6, 7, 8))


def generate_feature_matrix(
    key: jax.Array,
    n_features: int,
    dim: int,
    max_interference: float = 0.1,
    *,
    step_size: float = 0.1,
    margin: float | None = None,
    neg_weight: float = 1e-3,
    max_iters: int = 2000,
    dtype: Any = None,
) -> tuple[jax.Array, dict]:
    """Unit-column ``W [dim, n_features]`` with max_{i != j} <w_i, w_j> <= ``max_interference``
    (signed), by projected gradient descent on the interference loss (paper eqs. 27-29).

    Returns ``(W, info)`` with ``info = {"realized_interference", "iterations", "final_step",
    "step_size", "margin", "neg_weight", "max_iters"}``. Raises
    :class:`InfeasibleInterferenceError` (a ``ValueError``) if a bound rules the target out, or if
    PGD stalls or runs out of iterations; it never returns a matrix that violates the bound."""
    n = check_positive_int("n_features", n_features)
    d = check_positive_int("dim", dim)
    M = check_float_in("max_interference", max_interference, -1.0, 1.0, lo_open=True, hi_open=True)
    max_iters = check_positive_int("max_iters", max_iters)
    step_size = check_float_in("step_size", step_size, 0.0, math.inf, lo_open=True, hi_open=True)
    neg_weight = check_float_in("neg_weight", neg_weight, 0.0, math.inf, lo_open=False, hi_open=True)
    if margin is None:
        margin = max(0.1 * abs(M), 1e-3)
    margin = check_float_in("margin", margin, 0.0, 2.0, lo_open=False, hi_open=True)
    why = interference_lower_bound_check(n, d, M)
    if why is not None:
        raise InfeasibleInterferenceError(
            f"max_interference={M} is infeasible for n_features={n}, dim={d}: {why}. "
            "Raise max_interference or dim, or lower n_features."
        )
    dtype = dtype or jnp.zeros(()).dtype
    if n == 1:
        W = _normalise_columns(jax.random.normal(key, (d, 1), dtype))
        return W, dict(realized_interference=-math.inf, iterations=0, final_step=step_size,
                       step_size=step_size, margin=margin, neg_weight=neg_weight, max_iters=max_iters)
    W, m, it, eta = _pgd_jit(key, n, d, M, margin, neg_weight, step_size, max_iters, dtype)
    # Final projection in float64 so the columns are unit norm to float32 precision, and a host-side
    # re-check of the constraint: the result is only returned if it satisfies it.
    W64 = np.array(W, np.float64)  # a copy: under x64 np.asarray is a read-only view
    W64 /= np.linalg.norm(W64, axis=0, keepdims=True)
    W = jnp.asarray(W64, dtype)
    realized = _max_overlap(W)
    it, eta = int(it), float(eta)
    if realized > M:
        reason = (
            f"ran out of iterations (max_iters={max_iters})" if it >= max_iters
            else f"stalled after {it} iterations (step size fell to {eta:.2g}: no descent direction)"
        )
        raise InfeasibleInterferenceError(
            f"could not reach max_interference={M} for n_features={n} in dim={d}: PGD {reason} with "
            f"max overlap {realized:.4f}. The target is too small for n/d={n / d:.3g} (or too close to the "
            "limit for this start): raise max_interference or dim, lower n_features, or raise max_iters."
        )
    return W, dict(realized_interference=realized, iterations=it, final_step=eta, step_size=step_size,
                   margin=margin, neg_weight=neg_weight, max_iters=max_iters)


# --------------------------------------------------------------------------------------------------
# The feature law (eqs. 30-31): the one sampler of x used by Bench, the landscape code and the lab
# --------------------------------------------------------------------------------------------------


#: Per-row probability that the active set of a row overflows the static capacity of the sparse
#: sampler (see :func:`active_capacity`).
ACTIVE_TAIL = 1e-15
#: The sparse sampler is used when its capacity K is at most ``n / SPARSE_SAMPLER_RATIO``: it draws
#: a random word per active feature (the gap) and a magnitude per slot (``B K``) against 2 per
#: feature for the dense draw, plus a cumulative sum, the [B, K] slot layout and a scatter into
#: the dense features (the measurements below predate jsdl.data.rng).
#: Measured on CPU (B = 4096, benchmarks/bench_data.py "crossover" table): at n = 4096 the sparse
#: draw is 7.7x faster at K/n = 0.025 (S = 0.99), 1.6x at K/n = 0.14 and 0.85x at K/n = 0.25; at
#: n = 1024 still 1.7x at K/n = 0.31.
SPARSE_SAMPLER_RATIO = 5
#: ``x W^T`` is a sum of the K active rows of ``W^T`` (:func:`decode_active`) when
#: ``K <= n / SPARSE_DECODE_RATIO``, else the dense product. Measured on CPU (benchmarks/bench_data.py
#: "crossover" table): the sum is 2x faster at S = 0.99 and as fast at K/n = 0.15-0.2 for d = 64,
#: n = 512, B = 1024; 1.6x faster at K/n = 0.14 for d = 512 and at K/n = 0.12 for d = 768.
SPARSE_DECODE_RATIO = 8
_DECODE_UNROLL = 8  # slots per step of decode_active's loop (see there)


def active_capacity(n: int, rate: float, tail: float = ACTIVE_TAIL) -> int:
    """Static capacity ``K`` of the sparse sampler: the smallest ``K`` with
    ``P(X > K) <= tail`` for ``X ~ Binomial(n, rate)`` (the number of active features of a row),
    certified by the Chernoff bound

        P(X >= a) <= exp(-n KL(a/n || rate)),  KL(q || p) = q log(q/p) + (1-q) log((1-q)/(1-p)),

    valid for every ``a > n rate``: ``K = a* - 1`` for the smallest integer ``a*`` whose bound is
    ``<= tail``. So a row is truncated (an active feature beyond the K-th dropped) with probability
    < ``tail`` (1e-15 by default; a batch of B rows with probability < B tail). The bound is within
    ~2% of the exact binomial quantile at the benchmark shapes (n = 16384, rate 0.01: K = 280,
    exact 275). Returns ``n`` when no ``K < n`` meets the bound (then nothing can be truncated)."""
    n = check_positive_int("n", n)
    p = check_float_in("rate", rate, 0.0, 1.0, lo_open=False, hi_open=False)
    tail = check_float_in("tail", tail, 0.0, 1.0, lo_open=True, hi_open=True)
    if p == 0.0:
        return 0
    if p == 1.0:
        return n
    def bound_ok(a):  # exp(-n KL(a/n || p)) <= tail, for n p < a <= n (the exponent grows with a)
        q = a / n
        kl = q * math.log(q / p) + ((1 - q) * math.log((1 - q) / (1 - p)) if q < 1 else 0.0)
        return -n * kl <= math.log(tail)

    lo, hi = int(math.floor(n * p)) + 1, n  # smallest a in [lo, hi] with bound_ok(a), by bisection
    if not bound_ok(hi):
        return n
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if bound_ok(mid) else (mid + 1, hi)
    return lo - 1


def geometric_positions(key: jax.Array, batch_size: int, n: int, rate: float, capacity: int) -> jax.Array:
    """Sorted positions ``[B, K]`` (int32) of the first ``K = capacity`` successes of ``n``
    independent Bernoulli(``rate``) trials per row; entries ``>= n`` mean "no further success".

    The gaps between successes are i.i.d. geometric: ``G = floor(-log(U) / lambda)``,
    ``lambda = -log(1 - rate)``, has ``P(G >= g) = P(U <= (1-rate)^g) = (1 - rate)^g`` (failures
    before the next success), and the position of the j-th success is ``sum_{i<=j} (G_i + 1) - 1``.
    ``U = (u + 1/2) 2^-32`` from one 32-bit word ``u``, so the law is the exact one up to the
    2^-32 grid of U and float32 rounding of ``-log U`` (the dense sampler compares a 23-bit uniform
    with the rate). Jit-able (``batch_size``, ``n``, ``capacity`` static; ``rate`` a Python float)."""
    B, K = batch_size, capacity
    if K == 0:
        return jnp.zeros((B, 0), jnp.int32)
    lam = -math.log1p(-rate)
    u = _rng.bits(key, (B, K))
    neg_log_u = 32.0 * math.log(2.0) - jnp.log(u.astype(jnp.float32) + 0.5)
    # A gap >= n already ends the row; clamping keeps the running sum in int32.
    gaps = jnp.minimum(jnp.floor(neg_log_u * (1.0 / lam)), float(n)).astype(jnp.int32) + 1
    g_max = min(n, math.floor(33.0 * math.log(2.0) / lam) + 1) + 1  # -log U <= 33 log 2
    if K * g_max < 2**31 - 1:
        return jnp.cumsum(gaps, axis=1) - 1
    # Saturating sum (associative for non-negative terms): positions stay <= n, no overflow.
    return jax.lax.associative_scan(lambda a, b: jnp.minimum(a + b, n + 1), gaps, axis=1) - 1


def active_slots(key: jax.Array, batch_size: int, n: int, rate: float, capacity: int):
    """Active sets of ``batch_size`` rows of ``n`` independent Bernoulli(``rate``) features, laid out
    in ``K = capacity`` slots per row: ``(cols [B, K], live [B, K], count [B])``. ``cols`` are
    ascending in the live slots (``n - 1`` elsewhere) and ``count = sum(live, 1)``. Per-active
    randomness (magnitudes, thinning) is drawn per slot, ``[B, K]``, by the callers: with
    :mod:`jsdl.data.rng` that is cheaper than drawing one number per active and gathering it
    (XLA CPU fused the random words into the gather and computed them element by element).

    The ``B n`` trials are one sequence of geometric gaps (:func:`geometric_positions` with one row
    of length ``B n``), with capacity ``E = active_capacity(B n, rate)`` (overflow < 1e-15
    per batch); row b's actives are the positions in ``[b n, (b+1) n)``, of which the first ``K``
    are kept (a row has more than ``K = active_capacity(n, rate)`` actives with probability < 1e-15).
    When ``B n`` does not fit in int32, each row is drawn as its own sequence of ``K`` gaps."""
    B, K = batch_size, capacity
    slot = jnp.arange(K, dtype=jnp.int32)
    if B * n >= 2**31 - 1 or B == 1:
        pos = geometric_positions(key, B, n, rate, K)
        live = pos < n
        return jnp.minimum(pos, n - 1), live, jnp.sum(live, axis=1, dtype=jnp.int32)
    E = max(active_capacity(B * n, rate), 1)
    flat = geometric_positions(key, 1, B * n, rate, E)[0]  # [E] ascending; >= B n: no more actives
    start = jnp.searchsorted(flat, jnp.arange(B + 1, dtype=jnp.int32) * n).astype(jnp.int32)  # row b: [start_b, start_b+1)
    count = jnp.minimum(start[1:] - start[:-1], K)
    live = slot[None, :] < count[:, None]
    at = jnp.where(live, start[:-1, None] + slot[None, :], 0)
    cols = jnp.where(live, flat[at] - jnp.arange(B, dtype=jnp.int32)[:, None] * n, n - 1)
    return cols, live, count


def decode_active(codes, count: jax.Array, W_rows: jax.Array) -> jax.Array:
    """``x W^T [B, m]`` for ``x`` given by its active set ``codes`` (:class:`jsdl.kernels.SparseCodes`
    with ``rows=None``, the active slots of a row first, later slots holding value 0) and
    ``W_rows = W^T [n, m]``: the sum of the ``count[b]`` rows ``vals[b, j] W_rows[cols[b, j]]`` of
    each sample, one slot at a time (a gather of ``B`` rows and a multiply-add), stopping after the
    batch's largest ``count``. ``codes`` may also be a sequence of such blocks of the same shape
    whose non-zero slots all lie within the first ``count[b]`` (the hierarchical bench's feature
    and ancestor blocks): their sum, decoded in one loop. Jit- and vmap-able.

    The loop body decodes ``_DECODE_UNROLL`` single slots of every block, which XLA fuses into one
    pass over the ``[B, m]`` accumulator: measured on CPU (B = 4096, m = 768), 2.3x faster than the
    same slots in one ``jsdl.kernels.sparse_decode`` call (one accumulator pass per slot)."""
    blocks = list(codes) if isinstance(codes, (list, tuple)) else [codes]
    B, K = blocks[0].vals.shape
    if any(b.vals.shape != (B, K) for b in blocks):
        raise ValueError(f"blocks of different shapes: {[b.vals.shape for b in blocks]}")
    U = _DECODE_UNROLL
    pad = (-K) % U
    vals = [jnp.pad(b.vals, ((0, 0), (0, pad))) for b in blocks]
    cols = [jnp.pad(b.cols, ((0, 0), (0, pad))) for b in blocks]
    n_steps = (jnp.max(count, initial=0) + U - 1) // U

    def body(j, acc):
        for u in range(U):
            for v, c in zip(vals, cols):
                v1 = jax.lax.dynamic_slice_in_dim(v, j * U + u, 1, axis=1)
                c1 = jax.lax.dynamic_slice_in_dim(c, j * U + u, 1, axis=1)
                # XLA's gather-multiply-add, fused over the unrolled slots (not the native decode
                # of jsdl.kernels, whose per-call sort costs more than one slot of B rows).
                acc = acc + v1 * jnp.take(W_rows, c1[:, 0], axis=0)
        return acc

    return jax.lax.fori_loop(0, n_steps, body, jnp.zeros((B, W_rows.shape[1]), W_rows.dtype))


def use_sparse_decode(capacity: int, n: int) -> bool:
    """Whether ``x W^T`` is computed from the active set (:func:`decode_active`) rather than as the
    dense product (see :data:`SPARSE_DECODE_RATIO`)."""
    return capacity * SPARSE_DECODE_RATIO <= n


@struct.dataclass
class SparseLaw:
    """Independent features ``x_d = m_d (c_min + Exp(beta))``, ``m_d ~ Bernoulli(1 - S)`` (eqs.
    30-31), the law of :class:`Bench`; ``Exp(beta)`` has mean ``beta``. Everything that samples or
    integrates this law (:meth:`Bench.sample_features`, :meth:`Bench.feature_weights`, the
    Monte-Carlo gap of :func:`jsdl.landscape.multi_feature_gap`) goes through this type.

    Two samplers of the same law, chosen statically by :meth:`sparse_sampler`:

    * dense: a Bernoulli mask and a magnitude for each of the ``B n`` entries;
    * sparse (when the capacity ``K`` of :func:`active_capacity` is at most
      ``n / SPARSE_SAMPLER_RATIO``, e.g. S = 0.99): the active set of each row drawn directly as
      geometric gaps over the whole batch (:func:`active_slots`), magnitudes for the active
      features only, so about ``2 (1-S) B n`` random words instead of ``2 B n``, laid out in ``K``
      slots per row. A row with more than ``K`` active features would be truncated; that has
      probability < 1e-15 per row (:data:`ACTIVE_TAIL`), and the batch's draw overflows with
      probability < 1e-15 per batch."""

    sparsity: float = struct.field(pytree_node=False, default=0.99)
    c_min: float = struct.field(pytree_node=False, default=DEFAULT_C_MIN)
    beta: float = struct.field(pytree_node=False, default=DEFAULT_BETA)

    @property
    def second_moment(self) -> float:
        """``E[x_d^2 | x_d > 0] = c_min^2 + 2 c_min beta + 2 beta^2``."""
        c, b = self.c_min, self.beta
        return c * c + 2 * c * b + 2 * b * b

    @property
    def active_mean(self) -> float:
        """``E[x_d | x_d > 0] = c_min + beta``."""
        return self.c_min + self.beta

    def weights(self, n: int) -> np.ndarray:
        """``M_d [n]`` of Thm 3.1: P(only feature d active) E[x_d^2 | x_d > 0]
        = (1-S) S^(n-1) (c_min^2 + 2 c_min beta + 2 beta^2), float64 numpy."""
        S = self.sparsity
        return np.full((n,), (1 - S) * S ** (n - 1) * self.second_moment)

    def sample_magnitudes(self, key: jax.Array, shape: tuple, dtype: Any = None) -> jax.Array:
        """``c_min + Exp(beta)`` of the given shape (eq. 31)."""
        dtype = dtype or jnp.zeros(()).dtype
        return self.c_min + self.beta * _rng.exponential(key, shape, dtype)

    def capacity(self, n: int) -> int:
        """Static slots per row of the sparse sampler (:func:`active_capacity` at rate 1 - S)."""
        return active_capacity(n, 1.0 - self.sparsity)

    def sparse_sampler(self, n: int) -> bool:
        """Whether :meth:`sample_features` draws the active sets (``capacity(n) <= n /
        SPARSE_SAMPLER_RATIO``) rather than dense masks."""
        return self.capacity(n) * SPARSE_SAMPLER_RATIO <= n

    def sample_active(self, key: jax.Array, batch_size: int, n: int, dtype: Any = None,
                      capacity: Optional[int] = None) -> tuple[Any, jax.Array]:
        """The active features of ``batch_size`` rows: ``(codes, count)`` with ``codes`` a
        :class:`jsdl.kernels.SparseCodes` (``vals [B, K]`` the magnitudes ``c_min + Exp(beta)``,
        ``cols [B, K]`` int32 the feature indices, ascending; slots past a row's ``count [B]``
        hold value 0 at column ``n - 1``). ``K = capacity`` (default :meth:`capacity`). The gaps
        (:func:`active_slots`) come from the first half of ``key``, the magnitudes from the
        second. Jit- and vmap-able (``batch_size``, ``n``, ``capacity`` static)."""
        dtype = dtype or jnp.zeros(()).dtype
        K = self.capacity(n) if capacity is None else int(capacity)
        k_g, k_e = jax.random.split(key)
        cols, live, count = active_slots(k_g, batch_size, n, 1.0 - self.sparsity, K)
        vals = jnp.where(live, self.sample_magnitudes(k_e, (batch_size, K), dtype), jnp.zeros((), dtype))
        return SparseCodes(vals=vals, cols=cols, rows=None, n_latents=n), count

    def sample_features(self, key: jax.Array, batch_size: int, n: int, dtype: Any = None) -> jax.Array:
        """``x [batch_size, n]`` drawn from the law. With the sparse sampler
        (:meth:`sparse_sampler`) the dense ``x`` is the scatter of :meth:`sample_active`; otherwise
        the mask comes from the first half of ``key``, the magnitudes from the second. Jit-able
        with ``batch_size`` and ``n`` static."""
        dtype = dtype or jnp.zeros(()).dtype
        if self.sparse_sampler(n):
            return densify(self.sample_active(key, batch_size, n, dtype)[0])
        k_m, k_e = jax.random.split(key)
        mask = _rng.bernoulli(k_m, 1.0 - self.sparsity, (batch_size, n))
        return jnp.where(mask, self.sample_magnitudes(k_e, (batch_size, n), dtype), jnp.zeros((), dtype))

    @classmethod
    def from_bench(cls, bench: Any) -> "SparseLaw":
        """The law of a bench-like object with ``sparsity``, ``c_min`` and ``beta``."""
        for f in ("sparsity", "c_min", "beta"):
            if not hasattr(bench, f):
                raise TypeError(f"bench of type {type(bench).__name__} has no field {f!r}; pass a SparseLaw")
        return cls(float(bench.sparsity), float(bench.c_min), float(bench.beta))


# --------------------------------------------------------------------------------------------------
# Sampling (eqs. 30-32) shared by Bench and the structured benches
# --------------------------------------------------------------------------------------------------


SAMPLERS = ("auto", "jax", "native")
"""The choices of a bench's ``sampler`` field (:meth:`SamplingMixin.uses_native`)."""


def check_sampler(sampler: Any) -> str:
    """``sampler`` if it is one of :data:`SAMPLERS`, else a ValueError."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be 'auto', 'jax' or 'native', not {sampler!r}")
    return sampler


def native_batch(draw, args: tuple, batch_size: int, **kw) -> jax.Array:
    """``draw(*args, B, offset=..., **kw)`` of a native sampler (:mod:`jsdl.native`: sample ``b``
    depends on the key and ``offset + b`` only) for a batch of ``batch_size`` rows. On a ``"data"``
    mesh axis of ``D`` devices each device draws its own ``B / D`` rows, so the batch is the
    unsharded one; a custom call left to XLA's partitioner would draw the whole batch on every
    device."""
    D = shardops.data_axis_size()
    if D > 1 and batch_size % D == 0 and args[0].ndim == 1:
        B_loc = batch_size // D

        def local(*a):
            return draw(*a, B_loc, offset=jax.lax.axis_index("data") * B_loc, **kw)

        return jax.shard_map(local, mesh=shardops._mesh(), in_specs=(P(),) * len(args), out_specs=P("data"),
                             axis_names={"data"}, check_vma=False)(*args)
    return draw(*args, batch_size, **kw)


def key_words(key: jax.Array) -> jax.Array:
    """The uint32 words of a key (typed or raw)."""
    return jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key


def _is_traced(*trees) -> bool:
    return any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(trees))


@functools.lru_cache(maxsize=None)
def _jitted_method(fn):
    return jax.jit(fn, static_argnums=2)


def jit_when_eager(fn):
    """Decorator for a bench method ``fn(self, key, batch_size)`` (``sample``, ``draw``,
    ``sample_features``): called eagerly (no argument is traced), it runs as one cached ``jax.jit``
    program with ``batch_size`` static, instead of dispatching the sampler op by op. Measured on the
    2-core CPU: an eager ``sample(key, 64)`` of a small :class:`jsdl.data.SynthBench` took 12.6 s,
    the jitted call ~2.5 s (compile included) and ~1 ms once compiled. Inside ``jit``, ``vmap`` or
    ``grad`` (a traced key or bench) it is the plain method, so nesting changes nothing. Benches that
    are not pytrees (a user's subclass) or whose static fields do not hash also run the plain method."""

    @functools.wraps(fn)
    def wrapper(self, key, batch_size):
        if _is_traced(self, key) or not isinstance(batch_size, (int, np.integer)):
            return fn(self, key, batch_size)
        try:
            leaves, treedef = jax.tree.flatten(self)
            hash(treedef)
        except TypeError:
            return fn(self, key, batch_size)
        if len(leaves) == 1 and leaves[0] is self:  # not a registered pytree
            return fn(self, key, batch_size)
        return _jitted_method(fn)(self, key, int(batch_size))

    return wrapper


class SamplingMixin:
    """Sampling API shared by :class:`Bench` and :class:`jsdl.data.structured.StructuredBench`.

    Subclasses define ``sample_features(key, batch_size) -> x [B, n]`` and
    ``observe(x, key=None) -> Batch``, and carry ``data_key`` / ``dataset_size`` (finite dataset).
    ``sample`` and ``draw`` (and the jsdl benches' ``sample_features``) called eagerly run as one
    compiled program per batch size (:func:`jit_when_eager`); decorate a subclass's own
    ``sample_features`` with it to get the same."""

    # -- native sampler ---------------------------------------------------------------------------
    def _native_law(self) -> bool:
        """Whether this bench's law has a native sampler (subclasses that have one say when)."""
        return False

    def uses_native(self) -> bool:
        """Whether draws come from jsdl's native CPU sampler (:mod:`jsdl.native`: the same law one
        sample at a time, another random stream) rather than from the JAX sampler. The field
        ``sampler``: ``"jax"`` (always JAX: one random stream on every backend), ``"native"``
        (always native; an error where it is unavailable) or ``"auto"`` (default: native for
        float32 on the CPU backend when jsdl's native kernels are available, see ``JSDL_NATIVE``,
        and the law has a native sampler). One key gives different samples on the two paths."""
        sampler = getattr(self, "sampler", "jax")
        if sampler == "jax":
            return False
        name = type(self).__name__
        if not self._native_law():
            if sampler == "native":
                raise ValueError(f"{name}(sampler='native'): this bench's law has no native sampler "
                                 f"(correlated masks, or no rate bound); use sampler='auto' or 'jax'")
            return False
        from jsdl import native

        ok = native.supports_synth(self.W_p.dtype)
        if sampler == "native" and not ok:
            raise RuntimeError(f"{name}(sampler='native') needs float32 on the CPU backend with jsdl's native "
                               f"kernels ({native.status()}); got {self.W_p.dtype} on {jax.default_backend()}")
        return ok

    # -- feature rows for the sparse decode -------------------------------------------------------
    def feature_rows(self, name: str) -> jax.Array:
        """``W^T [n, dim]`` of the feature matrix ``name`` (``"W_p"`` or ``"W_r"``): the copy kept by
        :meth:`with_feature_rows` when there is one, else ``W.T``."""
        cache = getattr(self, "rows_cache", None)
        if cache is not None and name in cache:
            return cache[name]
        return getattr(self, name).T

    def decodes_rows(self) -> bool:
        """Whether :meth:`draw` sums feature rows (:func:`decode_active`), so that it reads
        :meth:`feature_rows`."""
        return False

    def with_feature_rows(self):
        """This bench with ``W^T`` of the feature matrices its draw decodes kept alongside (field
        ``rows_cache``), when it decodes feature rows (:meth:`decodes_rows`); else ``self``.

        The training step receives the bench as an argument and draws its batch inside the compiled
        program, so a ``W.T`` there is a transpose every step: 30 ms of a 0.9 s step at n = 16384,
        d = 768 (benchmarks/NOTES.md, "Speed round 7"). ``jsdl.train`` keeps the rows on the bench it
        passes (``Stepper.place_data``). Samples are identical either way; the cache costs one more
        copy of the feature matrices."""
        if not self.decodes_rows() or not hasattr(self, "rows_cache"):
            return self
        names = ("W_p",) if getattr(self, "method", "sae") in _SELF else ("W_p", "W_r")
        return self.replace(rows_cache={n: np.ascontiguousarray(np.asarray(getattr(self, n)).T) for n in names})

    # -- shapes ----------------------------------------------------------------------------------
    @property
    def n_features(self) -> int:
        return self.W_p.shape[1]

    @property
    def d_input(self) -> int:
        """Per-source input width (``n_p / n_sources``): what :func:`jsdl.init_params` wants."""
        return self.W_p.shape[0] // self.n_sources

    @property
    def d_target(self) -> int:
        """Per-source target width."""
        return self.W_r.shape[0] // self.n_sources

    # -- moments ---------------------------------------------------------------------------------
    def _alone_weights_mc(self, key: jax.Array, n_samples: int) -> jax.Array:
        """Monte Carlo ``M_d [n]`` of Thm 3.1: ``E[x_d^2 1(only d active)]`` over ``n_samples`` draws
        of :meth:`sample_features` (for laws where it has no closed form)."""
        x = jax.jit(self.sample_features, static_argnums=1)(key, n_samples)
        act = x > 0
        alone = act & (jnp.sum(act, axis=1, keepdims=True) == 1)
        return jnp.mean(alone * x**2, axis=0)

    # -- streaming -------------------------------------------------------------------------------
    @jit_when_eager
    def sample(self, key: jax.Array, batch_size: int) -> Batch:
        """A batch ``Batch(x_p [B, n_p], x_r [B, n_r], features [B, n])``; jit-able (``batch_size``
        static). With a finite dataset (``dataset_size = N``) the rows are drawn uniformly with
        replacement from the N fixed samples; otherwise fresh samples are generated."""
        if self.dataset_size:
            idx = jax.random.randint(key, (batch_size,), 0, self.dataset_size)
            return self.dataset_batch(idx)
        return self.draw(key, batch_size)

    @jit_when_eager
    def draw(self, key: jax.Array, batch_size: int) -> Batch:
        """Fresh samples: ``observe(sample_features(k_x, B), k_obs)`` with ``k_x, k_obs = split(key)``
        (a subclass may compute the same batch faster, e.g. from the active sets; ``features`` is
        always ``sample_features(k_x, B)``). Row ``i`` of a finite dataset is ``draw(fold_in(data_key,
        i), 1)``."""
        k_x, k_obs = jax.random.split(key)
        return self.observe(self.sample_features(k_x, batch_size), k_obs)

    def _fixed_row(self, i):
        b = self.draw(jax.random.fold_in(self.data_key, i), 1)
        return jax.tree.map(lambda a: a[0], b)

    def dataset_batch(self, indices: jax.Array) -> Batch:
        """Rows ``indices [B]`` of the fixed finite dataset (jit-able). Row i is a deterministic
        function of ``(data_key, i)``, so the dataset is fixed without holding ``N x n_p`` arrays."""
        if not self.dataset_size:
            raise ValueError("this bench streams fresh samples (dataset_size=None); make it with dataset_size=N")
        return jax.vmap(self._fixed_row)(jnp.asarray(indices))

    def materialize(self, start: int = 0, stop: Optional[int] = None) -> Batch:
        """Rows ``start:stop`` of the fixed dataset as one Batch (host memory permitting)."""
        if not self.dataset_size:
            raise ValueError("materialize needs a finite dataset: make the bench with dataset_size=N")
        stop = self.dataset_size if stop is None else stop
        if not 0 <= start <= stop <= self.dataset_size:
            raise ValueError(f"need 0 <= start <= stop <= dataset_size={self.dataset_size}, got {start}:{stop}")
        return jax.jit(self.dataset_batch)(jnp.arange(start, stop))

    def stream(self, key: jax.Array, batch_size: int, n_batches: Optional[int] = None) -> Iterator[Batch]:
        """Endless (or ``n_batches``-long) iterator of jitted batches generated on device."""
        check_positive_int("batch_size", batch_size)
        fn = jax.jit(self.sample, static_argnums=1)
        i = 0
        while n_batches is None or i < n_batches:
            yield fn(jax.random.fold_in(key, i), batch_size)
            i += 1


@struct.dataclass
class Bench(SamplingMixin):
    """The Linear Representation Bench (paper App. C). Build it with :func:`make_bench`.

    Fields: ``W_p [n_p, n]`` (crosscoder: the L per-source unit-column matrices stacked, n_p = L d),
    ``W_r [n_r, n]`` (``== W_p`` for self-reconstruction methods), ``W_skip [n_r, n_p]`` or None
    (skip transcoder), ``data_key`` (finite dataset, else None), ``rows_cache`` (None, or the
    feature matrices' transposes: :meth:`with_feature_rows`); static: ``sparsity`` S, ``c_min``,
    ``beta``, ``method``, ``n_sources``, ``max_interference`` M, ``realized_interference`` (max over
    sources of W_p's realised M), ``realized_interference_r`` (W_r's), ``dataset_size`` (0 =
    streaming), ``skip_scale``, ``generation`` (PGD settings and iteration counts, as (name, value)
    pairs), ``sampler`` (``auto``, ``jax`` or ``native``: :meth:`SamplingMixin.uses_native`)."""

    W_p: jax.Array
    W_r: jax.Array
    W_skip: Optional[jax.Array] = None
    data_key: Optional[jax.Array] = None
    rows_cache: Optional[dict] = None
    sparsity: float = struct.field(pytree_node=False, default=0.99)
    c_min: float = struct.field(pytree_node=False, default=DEFAULT_C_MIN)
    beta: float = struct.field(pytree_node=False, default=DEFAULT_BETA)
    method: str = struct.field(pytree_node=False, default="sae")
    n_sources: int = struct.field(pytree_node=False, default=1)
    max_interference: float = struct.field(pytree_node=False, default=0.1)
    realized_interference: float = struct.field(pytree_node=False, default=float("nan"))
    realized_interference_r: float = struct.field(pytree_node=False, default=float("nan"))
    dataset_size: int = struct.field(pytree_node=False, default=0)
    skip_scale: float = struct.field(pytree_node=False, default=0.0)
    generation: tuple = struct.field(pytree_node=False, default=())
    sampler: str = struct.field(pytree_node=False, default="auto")

    @property
    def law(self) -> SparseLaw:
        """The feature law (eqs. 30-31) this bench samples."""
        return SparseLaw(self.sparsity, self.c_min, self.beta)

    @jit_when_eager
    def sample_features(self, key: jax.Array, batch_size: int) -> jax.Array:
        """Coefficients ``x [B, n]``: ``x_d = Bernoulli(1-S) * (c_min + Exp(beta))`` (eqs. 30-31),
        independent over features and samples (:meth:`SparseLaw.sample_features`, or the native
        sampler: :meth:`SamplingMixin.uses_native`). Jit-able."""
        if self.uses_native():
            return self._native(key, batch_size, None)
        return self.law.sample_features(key, batch_size, self.n_features, self.W_p.dtype)

    def _native_law(self) -> bool:
        return True

    def _native(self, key: jax.Array, batch_size: int, rows: Optional[jax.Array]) -> jax.Array:
        """The native sampler's ``x W^T`` for ``rows = W^T [n, m]``, or with ``rows=None`` its
        dense features ``[B, n]``: the same samples for one key (:func:`jsdl.native.sparse_draw`)."""
        from jsdl import native

        n, dt = self.n_features, self.W_p.dtype
        law = self.law
        W_rows = self.feature_rows("W_p") if rows is None else rows
        kw = dict(rate_bound=1.0 - law.sparsity, thin=False, c_min=law.c_min, beta=law.beta, features=rows is None)
        args = (key_words(key), W_rows, jnp.zeros((n,), dt), jnp.ones((n,), dt), jnp.full((n,), -1, jnp.int32))
        return native_batch(native.sparse_draw, args, batch_size, **kw)

    def observe(self, x: jax.Array, key: Optional[jax.Array] = None) -> Batch:
        """``Batch(x_p = x W_p^T, x_r = x W_r^T (+ x_p W_skip^T), features = x)`` (eq. 32); the
        Bench is noiseless so ``key`` is unused."""
        return self._observe(x, lambda name: x @ getattr(self, name).T)

    def _observe(self, x, project):
        # project(name): x W^T for the feature matrix "W_p" or "W_r"
        x_p = project("W_p")
        if self.method in _SELF:
            x_r = x_p
        else:
            x_r = project("W_r")
            if self.W_skip is not None:
                x_r = x_r + x_p @ self.W_skip.T
        return Batch(x_p=x_p, x_r=x_r, features=x)

    @jit_when_eager
    def draw(self, key: jax.Array, batch_size: int) -> Batch:
        """Fresh samples (eqs. 30-32). With the sparse sampler (:meth:`SparseLaw.sparse_sampler`)
        the active sets are drawn once: ``features`` is their scatter (equal to
        ``sample_features(k_x, B)``), and ``x_p = x W_p^T`` (``x_r``) is the sum of the active
        columns (:func:`decode_active`) when :func:`use_sparse_decode` says it is cheaper than the
        dense product, which is equal up to float rounding. Otherwise as :meth:`SamplingMixin.draw`."""
        law, n = self.law, self.n_features
        if self.uses_native():  # one stream per key: XLA drops the features' call when they are unused
            k_x, _ = jax.random.split(key)
            return self._observe(self._native(k_x, batch_size, None),
                                 lambda name: self._native(k_x, batch_size, self.feature_rows(name)))
        if not law.sparse_sampler(n):
            return SamplingMixin.draw(self, key, batch_size)
        k_x, _ = jax.random.split(key)
        codes, count = law.sample_active(k_x, batch_size, n, self.W_p.dtype)
        x = densify(codes)
        if self.decodes_rows():
            return self._observe(x, lambda name: decode_active(codes, count, self.feature_rows(name)))
        return self._observe(x, lambda name: x @ getattr(self, name).T)

    def decodes_rows(self) -> bool:
        # the native sampler, or the sparse sampler's K = law.capacity(n) slots per row, summed when
        # use_sparse_decode says so
        law, n = self.law, self.n_features
        return self.uses_native() or (bool(law.sparse_sampler(n)) and use_sparse_decode(law.capacity(n), n))

    # -- moments (paper Thm 3.1) -----------------------------------------------------------------
    def feature_weights(self) -> jax.Array:
        """``M_d [n]`` of Thm 3.1 (:meth:`SparseLaw.weights`): P(only feature d active) *
        E[x_d^2 | x_d > 0] = (1-S) S^(n-1) (c_min^2 + 2 c_min beta + 2 beta^2)."""
        return jnp.asarray(self.law.weights(self.n_features), self.W_p.dtype)

    def mean(self) -> jax.Array:
        """``E[x] [n]`` = (1-S)(c_min + beta)."""
        return jnp.full((self.n_features,), (1 - self.sparsity) * (self.c_min + self.beta), self.W_p.dtype)

    def second_moment(self, full: bool = False) -> jax.Array:
        """``E[x_d^2] [n]`` = (1-S) E[x_d^2 | x_d > 0]; with ``full=True`` the matrix ``E[x x^T]
        [n, n]`` (off-diagonal (1-S)^2 (c_min + beta)^2, features being independent)."""
        p, n = 1 - self.sparsity, self.n_features
        diag = p * self.law.second_moment
        if not full:
            return jnp.full((n,), diag, self.W_p.dtype)
        off = (p * (self.c_min + self.beta)) ** 2
        return jnp.full((n, n), off, self.W_p.dtype) + (diag - off) * jnp.eye(n, dtype=self.W_p.dtype)

    def config(self) -> dict:
        """Every setting needed to regenerate or report the bench (JSON-serialisable)."""
        return dict(
            kind="linear_representation_bench", n_features=self.n_features, d_input=self.d_input,
            d_target=self.d_target, method=self.method, n_sources=self.n_sources, sparsity=self.sparsity,
            c_min=self.c_min, beta=self.beta, max_interference=self.max_interference,
            realized_interference=self.realized_interference,
            realized_interference_r=self.realized_interference_r, dataset_size=self.dataset_size,
            skip_scale=self.skip_scale, sampler="native" if self.uses_native() else "jax", **dict(self.generation),
        )


_SELF = ("sae", "tied_sae", "matryoshka", "crosscoder")


def _resolve_method(method: str, d_input: int, d_target: Optional[int], n_sources: int):
    info = _methods.get(method)  # ValueError naming the known methods
    if info.multi_source:
        n_sources = check_positive_int("n_sources", n_sources)
        if n_sources < 2:
            raise ValueError(f"crosscoder needs n_sources >= 2, got {n_sources}")
    else:
        n_sources = 1
    if info.self_target:
        if d_target is not None and d_target != d_input:
            raise ValueError(f"method {method!r} reconstructs its input: d_target must be None or {d_input}, got {d_target}")
        d_target = d_input
    else:
        d_target = d_input if d_target is None else check_positive_int("d_target", d_target)
    return info, d_target, n_sources


def build_targets(key, method, n, d_input, d_target, n_sources, M, skip_scale, pgd_kw, dtype):
    """W_p, W_r, W_skip, realised interferences, n_sources and the generation record for ``method``
    (shared by :func:`make_bench` and the structured benches)."""
    info, d_target, n_sources = _resolve_method(method, d_input, d_target, n_sources)
    k_p, k_r, k_s = jax.random.split(key, 3)
    if info.multi_source:
        mats, infos = [], []
        for l, k in enumerate(jax.random.split(k_p, n_sources)):
            W, inf = generate_feature_matrix(k, n, d_input, M, dtype=dtype, **pgd_kw)
            mats.append(W)
            infos.append(inf)
        W_p = jnp.concatenate(mats, axis=0)
        realized = max(i["realized_interference"] for i in infos)
        its = tuple(i["iterations"] for i in infos)
        gen = infos[0]
    else:
        W_p, gen = generate_feature_matrix(k_p, n, d_input, M, dtype=dtype, **pgd_kw)
        realized, its = gen["realized_interference"], (gen["iterations"],)
    W_skip, realized_r, its_r = None, realized, ()
    if info.self_target:
        W_r = W_p
    else:
        W_r, gen_r = generate_feature_matrix(k_r, n, d_target, M, dtype=dtype, **pgd_kw)
        realized_r, its_r = gen_r["realized_interference"], (gen_r["iterations"],)
        if info.skip:
            W_skip = skip_scale / math.sqrt(d_input) * jax.random.normal(k_s, (d_target, d_input), W_p.dtype)
    record = (
        ("step_size", gen["step_size"]), ("margin", gen["margin"]), ("neg_weight", gen["neg_weight"]),
        ("max_iters", gen["max_iters"]), ("iterations_p", its), ("iterations_r", its_r),
    )
    return W_p, W_r, W_skip, float(realized), float(realized_r), n_sources, record


def check_bench_args(n_features, d_input, max_interference, sparsity, c_min, beta, dataset_size):
    """The validated ``(n, d, M, S, c_min, beta, N)`` shared by :func:`make_bench` and the structured
    benches (ValueError/TypeError naming the argument otherwise)."""
    n = check_positive_int("n_features", n_features)
    d = check_positive_int("d_input", d_input)
    M = check_float_in("max_interference", max_interference, -1.0, 1.0, lo_open=True, hi_open=True)
    S = check_float_in("sparsity", sparsity, 0.0, 1.0, lo_open=False, hi_open=True)
    c_min, beta = check_magnitudes(c_min, beta)
    N = 0 if dataset_size is None else check_positive_int("dataset_size", dataset_size)
    return n, d, M, S, c_min, beta, N


def make_bench(
    key: jax.Array,
    n_features: int = 1000,
    d_input: int = 768,
    max_interference: float = 0.1,
    sparsity: float = 0.99,
    *,
    method: str = "sae",
    d_target: Optional[int] = None,
    n_sources: int = 2,
    c_min: float = DEFAULT_C_MIN,
    beta: float = DEFAULT_BETA,
    dataset_size: Optional[int] = None,
    skip_scale: float = 1.0,
    step_size: float = 0.1,
    margin: Optional[float] = None,
    neg_weight: float = 1e-3,
    max_iters: int = 2000,
    dtype: Any = None,
    sampler: str = "auto",
) -> Bench:
    """Build a Linear Representation Bench (paper App. C; defaults of Table 3: n = 1000, d = 768,
    M = 0.1, S = 0.99).

    Args:
      key: PRNG key; the same key gives the same bench (and, for a finite dataset, the same data).
      n_features: n, number of ground-truth features.
      d_input: d = n_p per source (the crosscoder's x_p has L d entries).
      max_interference: M in (-1, 1), bound on the signed max pairwise overlap of W_p's columns
        (and W_r's).
      sparsity: S in [0, 1); each feature is active with probability 1 - S.
      method: one of :func:`jsdl.methods.names` (decides the target, see the module docstring).
      d_target: n_r for (skip) transcoders (default d_input).
      n_sources: L for the crosscoder (>= 2; ignored otherwise).
      c_min, beta: magnitude c_min + Exp(beta) of an active feature (eq. 31).
      dataset_size: N for a fixed finite dataset (paper: 100,000); ``None`` streams fresh samples.
      skip_scale: scale of the skip transcoder's linear part W_skip.
      step_size, margin, neg_weight, max_iters: PGD settings (eta, eps, lambda of eq. 28; see
        :func:`generate_feature_matrix`).
      dtype: of the feature matrices (default float32, float64 under x64).
      sampler: ``"auto"`` (default), ``"jax"`` or ``"native"``: which sampler draws the data
        (:meth:`SamplingMixin.uses_native`; same law, different random streams).

    Raises ValueError/TypeError on invalid settings and :class:`InfeasibleInterferenceError` (a
    ValueError) when M cannot be reached for n/d."""
    n, d, M, S, c_min, beta, N = check_bench_args(n_features, d_input, max_interference, sparsity, c_min, beta, dataset_size)
    sampler = check_sampler(sampler)
    skip_scale = check_float_in("skip_scale", skip_scale, 0.0, math.inf, lo_open=False, hi_open=True)
    k_w, k_data = jax.random.split(key)
    W_p, W_r, W_skip, realized, realized_r, L, record = build_targets(
        k_w, method, n, d, d_target, n_sources, M, skip_scale,
        dict(step_size=step_size, margin=margin, neg_weight=neg_weight, max_iters=max_iters), dtype,
    )
    return Bench(
        W_p=W_p, W_r=W_r, W_skip=W_skip, data_key=k_data if N else None, sparsity=S, c_min=c_min, beta=beta,
        method=method, n_sources=L, max_interference=M, realized_interference=realized,
        realized_interference_r=realized_r, dataset_size=N,
        skip_scale=skip_scale if W_skip is not None else 0.0, generation=record, sampler=sampler,
    )
