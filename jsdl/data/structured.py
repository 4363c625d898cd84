"""Structured synthetic benches beyond the paper's Bench: hierarchy, correlated firing, per-feature
firing rates and importance, additive noise, and the toy model of superposition (Elhage et al. 2022).

Every bench here is a :class:`StructuredBench` with the same interface as
:class:`jsdl.data.Bench`: ``sample(key, B) -> Batch(x_p, x_r, features)`` (jit-able), ``W_p [n_p, n]``,
``W_r [n_r, n]``, plus its structure (``parent_of [n]``, -1 for roots; ``rates``; ``importance``).

Sampling of the coefficients ``x [B, n]``:

1. base masks ``m_d``: independent ``Bernoulli(rate_d)``, or correlated through a Gaussian copula
   (``m_d = 1{z_d < Phi^-1(rate_d)}``, ``z ~ N(0, R)``), where ``R`` is chosen so that the *masks*
   have the requested correlation matrix (``correlation_kind="mask"``, pairwise inversion of the
   bivariate normal CDF) or is the given matrix itself (``correlation_kind="gaussian"``);
2. hierarchy (Definition 3.2): a parent fires whenever any of its children fires,
   ``m_p <- m_p OR any_c m_c``, propagated leaves-up. A parent's own base rate is the probability
   of firing *without* any child; with rate 0 (the :func:`make_hierarchical_bench` default) the
   definition's "p > 0 iff some child > 0" holds exactly;
3. magnitudes ``x_d = m_d * importance_d * a_d`` with ``a_d = c_min + Exp(beta)`` (``"exponential"``,
   eq. 31) or ``U(c_min, c_min + beta)`` (``"uniform"``, the toy model's U[0, 1]). Importance enters
   an unweighted reconstruction loss through the magnitude: feature d's share of the MSE scales with
   ``importance_d^2``.
4. observation ``x_p = W_p x + noise_std * eps`` (``x_r = x_p`` for self-reconstruction; otherwise
   ``x_r = W_r x (+ W_skip x_p) + target_noise_std * eps'``). ``features`` are the clean ``x``.

With independent base masks whose largest rate is low (``sparse_capacity > 0``, e.g. the
hierarchical benches at rate 0.01) steps 1-3 run on active sets instead of ``[B, n]`` arrays
(:meth:`StructuredBench.sample_active`: geometric gaps at the largest rate, thinned to each
feature's rate, then the ancestors of every firing feature), and ``W_p x`` is summed over the
active columns when that is cheaper (as :class:`jsdl.data.Bench` does); same law, another random
stream. Correlated masks (the copula needs all ``n`` latent Gaussians) use the dense draw.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jsdl.data import bench as _bench
from jsdl.data import rng as _rng
from jsdl.data.bench import SamplingMixin, _SELF, jit_when_eager
from jsdl.kernels import SparseCodes, densify
from jsdl.objective import Batch

__all__ = [
    "StructuredBench",
    "ToyModel",
    "build_hierarchy",
    "validate_hierarchy",
    "hierarchy_depth",
    "mask_to_gaussian_correlation",
    "make_structured_bench",
    "make_hierarchical_bench",
    "train_toy_model",
    "make_toy_model_bench",
]


# --------------------------------------------------------------------------------------------------
# Hierarchy
# --------------------------------------------------------------------------------------------------


def validate_hierarchy(hierarchy: Any, n_features: int) -> np.ndarray:
    """Check a hierarchy and return ``parent_of [n]`` (int, -1 for roots).

    ``hierarchy`` is either a ``parent_of`` sequence of length n, or a mapping ``{parent: [children,
    ...]}``. Errors: an index outside ``[0, n)``, a feature that is its own parent, a child listed
    under two parents (a tree has one parent per child), a cycle."""
    n = n_features
    if isinstance(hierarchy, Mapping):
        parent_of = np.full(n, -1, np.int64)
        for p, children in hierarchy.items():
            p = int(p)
            if not 0 <= p < n:
                raise ValueError(f"hierarchy: parent index {p} is outside [0, n_features={n})")
            for c in children:
                c = int(c)
                if not 0 <= c < n:
                    raise ValueError(f"hierarchy: child index {c} (of parent {p}) is outside [0, n_features={n})")
                if c == p:
                    raise ValueError(f"hierarchy: feature {p} is listed as its own child")
                if parent_of[c] >= 0 and parent_of[c] != p:
                    raise ValueError(
                        f"hierarchy: child {c} is listed under two parents ({parent_of[c]} and {p}); "
                        "each child may have one parent (Definition 3.2 describes a tree)"
                    )
                parent_of[c] = p
    else:
        parent_of = np.asarray(hierarchy)
        if parent_of.shape != (n,) or not np.issubdtype(parent_of.dtype, np.integer):
            raise ValueError(
                f"hierarchy: a parent_of array must be ints of shape ({n},), got dtype {parent_of.dtype} "
                f"shape {parent_of.shape}"
            )
        parent_of = parent_of.astype(np.int64)
        bad = np.flatnonzero((parent_of < -1) | (parent_of >= n))
        if bad.size:
            raise ValueError(f"hierarchy: parent_of[{bad[0]}]={parent_of[bad[0]]} is not -1 or in [0, {n})")
        selfp = np.flatnonzero(parent_of == np.arange(n))
        if selfp.size:
            raise ValueError(f"hierarchy: feature {selfp[0]} is its own parent")
    hierarchy_depth(parent_of)  # raises on cycles
    return parent_of


def hierarchy_depth(parent_of: np.ndarray) -> int:
    """Number of edges on the longest child-to-root chain (0 without hierarchy). Raises on cycles."""
    parent_of = np.asarray(parent_of)
    n = parent_of.shape[0]
    depth = 0
    cur = parent_of.copy()
    # After k steps, cur[i] is the k-th ancestor of i (or -1); a cycle never reaches -1.
    while np.any(cur >= 0):
        depth += 1
        if depth > n:
            i = int(np.flatnonzero(cur >= 0)[0])
            raise ValueError(f"hierarchy: the parent chain of feature {i} has a cycle")
        cur = np.where(cur >= 0, parent_of[np.maximum(cur, 0)], -1)
    return depth


def parents_are_sorted(parent_of: Any) -> bool:
    """Whether ``parent_of`` is non-decreasing over the features that have a parent (as
    :func:`build_hierarchy`'s breadth-first numbering is). Then the l-th ancestors of ascending
    features are non-decreasing too, which :func:`_first_slots_sorted` relies on."""
    p = np.asarray(parent_of)
    p = p[p >= 0]
    return bool(np.all(np.diff(p) >= 0))


# The sparse sampler finds repeated ancestors on the [B, K] blocks (_first_slots_sorted) from this
# many B n on, else with one scatter-min into a dense [B, n] int32 array, which is faster while that
# array is small. Measured (benchmarks/NOTES.md, "Speed round 6"), dense vs blocks: B n = 4.2M
# (n 4096, B 1024) 2.0 vs 3.5 ms; 8.4M (n 4096, B 2048) 18.3 vs 6.2 ms; 67M (n 16384, B 4096)
# ~115 vs ~47 ms (the difference of two variants of the whole draw).
SORTED_DEDUP_MIN_ENTRIES = 1 << 23


def _first_slots_sorted(cols: list, valid: list) -> list:
    """For blocks ``cols[l], valid[l] [B, K]`` (block l: the l-th ancestors of block 0's features;
    in each block the valid columns of a row are non-decreasing, which holds when block 0 is
    ascending and :func:`parents_are_sorted`), the valid slots that hold the first occurrence of
    their column in the row, slots ordered block by block. Equal to the dense scatter-min of
    :meth:`StructuredBench.sample_active`, with ``[B, K]`` work only: within a block a repeat
    follows an equal valid column (an exclusive running maximum finds the previous valid
    column); across blocks, a binary search of each column in every earlier block's valid
    columns (made non-decreasing by a running maximum that repeats the last valid column)."""
    keep, searchable = [], []
    for c, v in zip(cols, valid):
        run = jax.lax.cummax(jnp.where(v, c, -1), axis=1)  # the last valid column up to each slot
        prev = jnp.pad(run[:, :-1], ((0, 0), (1, 0)), constant_values=-1)  # ... before each slot
        k = v & (prev != c)
        for s in searchable:
            at = jnp.minimum(jax.vmap(lambda a, q: jnp.searchsorted(a, q))(s, c), s.shape[1] - 1)
            k = k & (jnp.take_along_axis(s, at, axis=1) != c)
        keep.append(k)
        searchable.append(run)
    return keep


def build_hierarchy(n_roots: int, branching: int, depth: int = 1) -> np.ndarray:
    """``parent_of`` of a forest of ``n_roots`` complete trees, each node with ``branching``
    children, ``depth`` levels below the roots; features are numbered level by level (roots first).
    n = n_roots * (1 + b + ... + b^depth)."""
    n_roots = _bench.check_positive_int("n_roots", n_roots)
    branching = _bench.check_positive_int("branching", branching)
    depth = _bench.check_positive_int("depth", depth)
    parent_of = [-1] * n_roots
    level = list(range(n_roots))
    for _ in range(depth):
        nxt = []
        for p in level:
            for _ in range(branching):
                nxt.append(len(parent_of))
                parent_of.append(p)
        level = nxt
    return np.asarray(parent_of, np.int64)


# --------------------------------------------------------------------------------------------------
# Correlation of the Bernoulli masks (Gaussian copula)
# --------------------------------------------------------------------------------------------------

_GL_X, _GL_W = np.polynomial.legendre.leggauss(96)


def _bvn_cdf(h, k, rho):
    """P(Z1 < h, Z2 < k) for a standard bivariate normal with correlation rho (vectorised), from
    Phi2 = Phi(h) Phi(k) + int_0^rho phi2(h, k; r) dr (Gauss-Legendre, 96 nodes)."""
    from scipy.special import ndtr

    h, k, rho = np.broadcast_arrays(np.asarray(h, float), np.asarray(k, float), np.asarray(rho, float))
    r = 0.5 * rho[..., None] * (_GL_X + 1.0)  # nodes on [0, rho]
    one = 1.0 - r * r
    dens = np.exp(-(h[..., None] ** 2 - 2 * r * h[..., None] * k[..., None] + k[..., None] ** 2) / (2 * one))
    dens /= 2 * np.pi * np.sqrt(one)
    return ndtr(h) * ndtr(k) + 0.5 * rho * np.sum(_GL_W * dens, axis=-1)


def mask_to_gaussian_correlation(corr: Any, rates: Any, *, tol: float = 1e-7) -> np.ndarray:
    """Latent Gaussian correlation ``R`` such that ``m_d = 1{z_d < Phi^-1(rate_d)}``, ``z ~ N(0, R)``,
    has Bernoulli masks with correlation matrix ``corr`` (pairwise bisection on the bivariate
    normal CDF, only for non-zero off-diagonal entries).

    Raises ValueError naming the pair if a requested correlation is outside what a Gaussian copula
    can reach for those rates (close to the Frechet bounds), or if the resulting ``R`` is not
    positive semi-definite."""
    from scipy.special import ndtri

    C = np.asarray(corr, float)
    p = np.asarray(rates, float)
    n = p.shape[0]
    R = np.eye(n)
    iu, ju = np.nonzero(np.triu(C, 1))
    if iu.size == 0:
        return R
    if np.any((p[iu] <= 0) | (p[iu] >= 1) | (p[ju] <= 0) | (p[ju] >= 1)):
        raise ValueError("correlation: features with firing rate 0 or 1 cannot be correlated")
    t_i, t_j = ndtri(p[iu]), ndtri(p[ju])
    sd = np.sqrt(p[iu] * (1 - p[iu]) * p[ju] * (1 - p[ju]))
    target = C[iu, ju]

    def mask_corr(rho):
        return (_bvn_cdf(t_i, t_j, rho) - p[iu] * p[ju]) / sd

    lo_r, hi_r = np.full(iu.shape, -0.995), np.full(iu.shape, 0.995)
    reach_lo, reach_hi = mask_corr(lo_r), mask_corr(hi_r)
    bad = np.flatnonzero((target < reach_lo - 1e-6) | (target > reach_hi + 1e-6))
    if bad.size:
        b = bad[0]
        raise ValueError(
            f"correlation[{iu[b]}, {ju[b]}]={target[b]:.4g} cannot be reached by Bernoulli masks with rates "
            f"{p[iu[b]]:.4g} and {p[ju[b]]:.4g} through a Gaussian copula (reachable about "
            f"[{reach_lo[b]:.4g}, {reach_hi[b]:.4g}]; the Frechet bounds limit mask correlations of unequal rates)"
        )
    for _ in range(60):
        mid = 0.5 * (lo_r + hi_r)
        up = mask_corr(mid) < target
        lo_r = np.where(up, mid, lo_r)
        hi_r = np.where(up, hi_r, mid)
        if np.max(hi_r - lo_r) < tol:
            break
    rho = 0.5 * (lo_r + hi_r)
    R[iu, ju] = rho
    R[ju, iu] = rho
    ev = np.linalg.eigvalsh(R).min()
    if ev < -1e-8:
        raise ValueError(
            f"correlation: the latent Gaussian correlation implied by the requested mask correlations is not "
            f"positive semi-definite (smallest eigenvalue {ev:.3g}); the requested mask correlation matrix "
            "is not reachable by a Gaussian copula. Use smaller correlations."
        )
    return R


def _check_correlation(corr, n):
    C = np.asarray(corr, float)
    if C.shape != (n, n):
        raise ValueError(f"correlation must have shape ({n}, {n}), got {C.shape}")
    if not np.allclose(C, C.T, atol=1e-8):
        raise ValueError("correlation must be symmetric")
    if not np.allclose(np.diag(C), 1.0, atol=1e-8):
        raise ValueError("correlation must have a unit diagonal")
    if np.any(np.abs(C) > 1):
        raise ValueError("correlation entries must be in [-1, 1]")
    return C


# --------------------------------------------------------------------------------------------------
# The structured bench
# --------------------------------------------------------------------------------------------------


@struct.dataclass
class ToyModel:
    """Trained toy model of superposition (Elhage et al. 2022): ``h = W x``, ``x' = ReLU(W^T h + b)``,
    trained on ``sum_i I_i (x_i - x'_i)^2``. ``W [m, n]``, ``b [n]``, ``importance [n]``,
    ``losses [steps]`` (training curve)."""

    W: jax.Array
    b: jax.Array
    importance: jax.Array
    losses: jax.Array

    def hidden(self, x: jax.Array) -> jax.Array:
        """Hidden states ``h = x W^T`` ``[B, m]``."""
        return x @ self.W.T

    def __call__(self, x: jax.Array) -> jax.Array:
        """Reconstruction ``ReLU(h W + b)`` ``[B, n]``."""
        return jax.nn.relu(self.hidden(x) @ self.W + self.b)


@struct.dataclass
class StructuredBench(SamplingMixin):
    """A synthetic bench with structure (see the module docstring). Same interface as
    :class:`jsdl.data.Bench`. Array fields: ``W_p [n_p, n]``, ``W_r [n_r, n]``, ``W_skip``,
    ``data_key``, ``rates [n]`` (base firing probabilities), ``importance [n]``, ``parent_of [n]``
    (-1 for roots), ``child_idx``/``parent_idx [n_edges]`` (the hierarchy's edges), ``corr_chol
    [n, n]`` (Cholesky factor of the copula's Gaussian correlation) or None, ``toy`` (the trained
    :class:`ToyModel`) or None. Static: ``c_min``, ``beta``, ``magnitude``, ``method``,
    ``n_sources``, ``max_interference``, ``realized_interference(_r)``, ``dataset_size``,
    ``skip_scale``, ``noise_std``, ``target_noise_std``, ``depth``, ``kind``, ``generation``,
    ``rate_bound`` (the largest base rate, set by the constructors for the sparse sampler; None
    switches it off), ``sorted_parents`` (set by the constructors: :func:`parents_are_sorted` of
    ``parent_of``, which lets the sparse sampler find repeated ancestors without a dense
    ``[B, n]`` array), ``sampler`` (``auto``, ``jax`` or ``native``:
    :meth:`jsdl.data.bench.SamplingMixin.uses_native`; the native sampler needs independent base
    masks and ``rate_bound``, like the sparse one)."""

    W_p: jax.Array
    W_r: jax.Array
    rates: jax.Array
    importance: jax.Array
    parent_of: jax.Array
    child_idx: jax.Array
    parent_idx: jax.Array
    W_skip: Optional[jax.Array] = None
    data_key: Optional[jax.Array] = None
    corr_chol: Optional[jax.Array] = None
    toy: Optional[ToyModel] = None
    rows_cache: Optional[dict] = None
    c_min: float = struct.field(pytree_node=False, default=_bench.DEFAULT_C_MIN)
    beta: float = struct.field(pytree_node=False, default=_bench.DEFAULT_BETA)
    magnitude: str = struct.field(pytree_node=False, default="exponential")
    method: str = struct.field(pytree_node=False, default="sae")
    n_sources: int = struct.field(pytree_node=False, default=1)
    max_interference: float = struct.field(pytree_node=False, default=0.1)
    realized_interference: float = struct.field(pytree_node=False, default=float("nan"))
    realized_interference_r: float = struct.field(pytree_node=False, default=float("nan"))
    dataset_size: int = struct.field(pytree_node=False, default=0)
    skip_scale: float = struct.field(pytree_node=False, default=0.0)
    noise_std: float = struct.field(pytree_node=False, default=0.0)
    target_noise_std: float = struct.field(pytree_node=False, default=0.0)
    depth: int = struct.field(pytree_node=False, default=0)
    kind: str = struct.field(pytree_node=False, default="structured")
    generation: tuple = struct.field(pytree_node=False, default=())
    rate_bound: Optional[float] = struct.field(pytree_node=False, default=None)
    sorted_parents: bool = struct.field(pytree_node=False, default=False)
    sampler: str = struct.field(pytree_node=False, default="auto")

    @property
    def sparsity(self) -> float:
        """1 - mean base firing rate (informational; rates may differ per feature)."""
        return float(1.0 - jnp.mean(self.rates))

    def _base_mask(self, key, batch_size):
        n = self.n_features
        if self.corr_chol is None:
            return _rng.uniform(key, (batch_size, n), self.rates.dtype) < self.rates
        z = _rng.normal(key, (batch_size, n), self.rates.dtype) @ self.corr_chol.T
        return z < jax.scipy.special.ndtri(self.rates)

    def _propagate(self, mask):
        # Definition 3.2: a parent fires whenever any of its children fires; `depth` passes carry a
        # leaf's activity up to its root.
        for _ in range(self.depth):
            up = jnp.zeros_like(mask).at[:, self.parent_idx].max(mask[:, self.child_idx])
            mask = mask | up
        return mask

    def _magnitudes(self, key, shape, dtype):
        if self.magnitude == "uniform":
            return self.c_min + self.beta * _rng.uniform(key, shape, dtype)
        return self.c_min + self.beta * _rng.exponential(key, shape, dtype)

    @property
    def sparse_capacity(self) -> int:
        """Slots per row of the sparse sampler (0: the dense sampler is used). The sparse sampler
        needs independent base masks (no copula) and ``rate_bound`` (set by the constructors: the
        largest base rate); its candidates are Binomial(n, rate_bound), with capacity
        :func:`jsdl.data.bench.active_capacity` (P(truncation) < 1e-15 per row)."""
        if self.corr_chol is not None or self.rate_bound is None:
            return 0
        n = self.n_features
        K = _bench.active_capacity(n, self.rate_bound) if self.rate_bound > 0 else 0
        return K if K * _bench.SPARSE_SAMPLER_RATIO <= n else 0

    def sample_active(self, key: jax.Array, batch_size: int) -> tuple[list, jax.Array]:
        """Active features of ``batch_size`` rows without a dense draw (needs
        ``sparse_capacity > 0``): ``(blocks, count)`` with ``blocks`` a list of ``depth + 1``
        :class:`jsdl.kernels.SparseCodes` ``[B, K]`` (block 0: the features firing on their own;
        block l: the l-th ancestors of block 0's features) and ``count [B]``: only the first
        ``count[b]`` slots of each block can be non-zero.

        Base masks by thinning: candidates are Bernoulli(``rate_bound``) trials drawn as geometric
        gaps (:func:`jsdl.data.bench.active_slots`); candidate d is kept with probability
        ``rate_d / rate_bound``, so feature d fires on its own with probability ``rate_d``,
        independently. The hierarchy adds every ancestor of a firing feature (the closure that
        :meth:`_propagate` computes on dense masks); a feature reached several times keeps the
        magnitude of its first slot (chosen by position only, so magnitudes stay i.i.d.): with
        ``sorted_parents`` and ``B n >= SORTED_DEDUP_MIN_ENTRIES`` by :func:`_first_slots_sorted`
        on the ``[B, K]`` blocks, otherwise through a dense ``[B, n]`` scatter-min. Slots
        not active hold value 0 at a valid column. All values are NaN if some ``rates`` exceed
        ``rate_bound`` (a bench altered after construction), and so are the dense features."""
        K = self.sparse_capacity
        if K == 0:
            raise ValueError("this bench has no sparse sampler (correlated masks, or rates too high); use sample_features")
        n, B, dtype = self.n_features, batch_size, self.W_p.dtype
        k_g, k_t, k_a = jax.random.split(key, 3)
        col, cand, count = _bench.active_slots(k_g, B, n, self.rate_bound, K)
        accept = _rng.uniform(k_t, (B, K), dtype) * self.rate_bound < self.rates[col]
        cols, valid = [col], [cand & accept]
        for _ in range(self.depth):
            par = self.parent_of[cols[-1]]
            valid.append(valid[-1] & (par >= 0))
            cols.append(jnp.maximum(par, 0))
        L = len(cols)
        col_all = jnp.concatenate(cols, axis=1)  # [B, L K]
        valid_all = jnp.concatenate(valid, axis=1)
        if L > 1 and self.sorted_parents and B * n >= SORTED_DEDUP_MIN_ENTRIES:  # the first slot of each (row, feature)
            valid_all = jnp.concatenate(_first_slots_sorted(cols, valid), axis=1)
        elif L > 1:
            slot = jnp.broadcast_to(jnp.arange(L * K, dtype=jnp.int32), col_all.shape)
            big = jnp.int32(L * K)
            rows = jnp.arange(B)[:, None]
            first = jnp.full((B, n), big, jnp.int32).at[rows, col_all].min(jnp.where(valid_all, slot, big))
            valid_all = valid_all & (first[rows, col_all] == slot)
        a = self._magnitudes(k_a, (B, L * K), dtype) * self.importance[col_all]
        bad = jnp.max(self.rates) > self.rate_bound
        vals = jnp.where(bad, jnp.nan, jnp.where(valid_all, a, jnp.zeros((), dtype)))
        blocks = [SparseCodes(vals=vals[:, l * K:(l + 1) * K], cols=col_all[:, l * K:(l + 1) * K], rows=None,
                              n_latents=n) for l in range(L)]
        return blocks, count

    def _densify(self, blocks):
        # One scatter-add for all blocks: the active (row, feature) pairs are distinct across blocks
        # and the inactive slots add 0. All NaN if the rates exceed the bound (see sample_active).
        x = densify(SparseCodes(vals=jnp.concatenate([b.vals for b in blocks], axis=1),
                                cols=jnp.concatenate([b.cols for b in blocks], axis=1), rows=None,
                                n_latents=blocks[0].n_latents))
        return jnp.where(jnp.max(self.rates) > self.rate_bound, jnp.nan, x)

    def _native_law(self) -> bool:
        return self.corr_chol is None and self.rate_bound is not None

    def _native(self, key: jax.Array, batch_size: int, rows: Optional[jax.Array]) -> jax.Array:
        """The native sampler's ``x W^T`` for ``rows = W^T [n, m]``, or with ``rows=None`` its
        dense features ``[B, n]``: the same samples for one key (:func:`jsdl.native.sparse_draw`:
        thinned candidates, ancestors, magnitudes; all NaN if the rates exceed ``rate_bound``)."""
        from jsdl import native

        W_rows = self.feature_rows("W_p") if rows is None else rows
        kw = dict(rate_bound=self.rate_bound, thin=True, c_min=self.c_min, beta=self.beta, magnitude=self.magnitude,
                  depth=self.depth, features=rows is None)
        args = (_bench.key_words(key), W_rows, self.rates, self.importance, self.parent_of)
        return _bench.native_batch(native.sparse_draw, args, batch_size, **kw)

    @jit_when_eager
    def sample_features(self, key: jax.Array, batch_size: int) -> jax.Array:
        """Coefficients ``x [B, n]`` (base masks, hierarchy, magnitudes; module docstring). With
        the native sampler (:meth:`jsdl.data.bench.SamplingMixin.uses_native`) its draw; with
        the sparse sampler (``sparse_capacity > 0``) the scatter of :meth:`sample_active`; else
        dense masks and magnitudes for all ``B n`` entries. Jit-able."""
        if self.uses_native():
            return self._native(key, batch_size, None)
        if self.sparse_capacity:
            return self._densify(self.sample_active(key, batch_size)[0])
        k_m, k_a = jax.random.split(key)
        mask = self._propagate(self._base_mask(k_m, batch_size))
        a = self._magnitudes(k_a, mask.shape, self.W_p.dtype)
        return jnp.where(mask, a * self.importance, jnp.zeros((), self.W_p.dtype))

    def observe(self, x: jax.Array, key: Optional[jax.Array] = None) -> Batch:
        """``Batch(x_p, x_r, features=x)`` with additive Gaussian noise (needs ``key`` when
        ``noise_std`` or ``target_noise_std`` is non-zero)."""
        return self._observe(x, lambda name: x @ getattr(self, name).T, key)

    @jit_when_eager
    def draw(self, key: jax.Array, batch_size: int) -> Batch:
        """Fresh samples: as :meth:`SamplingMixin.draw`, but with the sparse sampler the active
        sets are drawn once (``features`` = their scatter = ``sample_features(k_x, B)``) and
        ``x W^T`` is the sum of the active columns (:func:`jsdl.data.bench.decode_active`, all
        blocks in one loop) when :func:`jsdl.data.bench.use_sparse_decode` says so for one block's
        capacity K (equal up to float rounding). The rule is applied per block, not to the ``(depth + 1) K``
        slots together: the dense alternative also scatters the features, and the ancestor blocks
        are mostly empty. Measured at n = 512, B = 1024 (benchmarks/NOTES.md, "Speed round 6"):
        the sum was faster for K = 33-51 with 2 blocks and K = 32-45 with 3. With the native
        sampler, ``features`` and ``x W^T`` are two calls of its stream for ``k_x`` (XLA drops the
        features' call when they are unused)."""
        if self.uses_native():
            k_x, k_obs = jax.random.split(key)
            return self._observe(self._native(k_x, batch_size, None),
                                 lambda name: self._native(k_x, batch_size, self.feature_rows(name)), k_obs)
        if not self.sparse_capacity:
            return SamplingMixin.draw(self, key, batch_size)
        k_x, k_obs = jax.random.split(key)
        blocks, count = self.sample_active(k_x, batch_size)
        x = self._densify(blocks)
        if self.decodes_rows():
            def project(name):
                rows = self.feature_rows(name)
                return _bench.decode_active(blocks, count, rows)
        else:
            def project(name):
                return x @ getattr(self, name).T
        return self._observe(x, project, k_obs)

    def decodes_rows(self) -> bool:
        return self.uses_native() or (bool(self.sparse_capacity)
                                      and _bench.use_sparse_decode(self.sparse_capacity, self.n_features))

    def _observe(self, x, project, key):
        noisy = self.noise_std > 0 or (self.target_noise_std > 0 and self.method not in _SELF)
        if noisy and key is None:
            raise ValueError("this bench adds noise: observe(x, key) needs a key")
        k1, k2 = jax.random.split(key) if noisy else (None, None)
        x_p = project("W_p")  # project(name): x W^T for the feature matrix "W_p" or "W_r"
        if self.noise_std > 0:
            x_p = x_p + self.noise_std * jax.random.normal(k1, x_p.shape, x_p.dtype)
        if self.method in _SELF:
            x_r = x_p
        else:
            x_r = project("W_r")
            if self.W_skip is not None:
                x_r = x_r + x_p @ self.W_skip.T
            if self.target_noise_std > 0:
                x_r = x_r + self.target_noise_std * jax.random.normal(k2, x_r.shape, x_r.dtype)
        return Batch(x_p=x_p, x_r=x_r, features=x)

    def _m2_active(self) -> float:
        c, b = self.c_min, self.beta
        if self.magnitude == "uniform":
            return c * c + c * b + b * b / 3.0
        return c * c + 2 * c * b + 2 * b * b

    @property
    def is_independent(self) -> bool:
        return self.depth == 0 and self.corr_chol is None

    def feature_weights(self, key: Optional[jax.Array] = None, n_samples: int = 65536) -> jax.Array:
        """``M_d [n]`` of Thm 3.1: P(only feature d active) * E[x_d^2 | x_d > 0]. Exact for
        independent features; with hierarchy or correlation a Monte Carlo estimate from ``n_samples``
        draws (needs ``key``). With a hierarchy a child never fires alone, so its M_d is 0."""
        m2 = self._m2_active() * self.importance**2
        if self.is_independent:
            r = self.rates
            log_off = jnp.log1p(-jnp.minimum(r, 1 - 1e-12))
            alone = r * jnp.exp(jnp.sum(log_off) - log_off)
            return alone * m2
        if key is None:
            raise ValueError("feature_weights of a hierarchical or correlated bench is a Monte Carlo estimate: pass key")
        return self._alone_weights_mc(key, n_samples)

    def feature_norms(self) -> jax.Array:
        """``||W_p[:, d]||`` ``[n]`` (1 for PGD benches; for the toy model, ~1 means represented)."""
        return jnp.linalg.norm(self.W_p, axis=0)

    def config(self) -> dict:
        return dict(
            kind=self.kind, n_features=self.n_features, d_input=self.d_input, d_target=self.d_target,
            method=self.method, n_sources=self.n_sources, c_min=self.c_min, beta=self.beta,
            magnitude=self.magnitude, max_interference=self.max_interference,
            realized_interference=self.realized_interference,
            realized_interference_r=self.realized_interference_r, dataset_size=self.dataset_size,
            noise_std=self.noise_std, target_noise_std=self.target_noise_std, depth=self.depth,
            mean_rate=float(jnp.mean(self.rates)), correlated=self.corr_chol is not None,
            sampler="native" if self.uses_native() else "jax", **dict(self.generation),
        )


def _per_feature(name, value, n, default, lo, hi, lo_open=False):
    if value is None:
        return np.full(n, default, float)
    arr = np.asarray(value, float)
    if arr.ndim == 0:
        arr = np.full(n, float(arr))
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a number or an array of shape ({n},), got shape {arr.shape}")
    bad = (arr <= lo if lo_open else arr < lo) | (arr > hi) | ~np.isfinite(arr)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}[{i}]={arr[i]!r} is outside {'(' if lo_open else '['}{lo}, {hi}]")
    return arr


def make_structured_bench(
    key: jax.Array,
    n_features: int = 1000,
    d_input: int = 768,
    max_interference: float = 0.1,
    sparsity: float = 0.99,
    *,
    firing_rates: Any = None,
    importance: Any = None,
    importance_decay: Optional[float] = None,
    correlation: Any = None,
    correlation_kind: str = "mask",
    hierarchy: Any = None,
    noise_std: float = 0.0,
    target_noise_std: Optional[float] = None,
    magnitude: str = "exponential",
    method: str = "sae",
    d_target: Optional[int] = None,
    n_sources: int = 2,
    c_min: float = _bench.DEFAULT_C_MIN,
    beta: float = _bench.DEFAULT_BETA,
    dataset_size: Optional[int] = None,
    skip_scale: float = 1.0,
    step_size: float = 0.1,
    margin: Optional[float] = None,
    neg_weight: float = 1e-3,
    max_iters: int = 2000,
    dtype: Any = None,
    sampler: str = "auto",
    _kind: str = "structured",
) -> StructuredBench:
    """A Bench with structure. Arguments as :func:`jsdl.data.make_bench`, plus:

    Args:
      firing_rates: base firing probability per feature (number or ``[n]``), default ``1 - sparsity``.
        For a parent, the probability of firing without any child.
      importance: per-feature magnitude scale ``[n]`` (> 0); or ``importance_decay`` r in (0, 1]:
        importance_d = r^d (Elhage et al.). Not both.
      correlation: ``[n, n]`` correlation matrix of the base Bernoulli masks
        (``correlation_kind="mask"``) or of the copula's latent Gaussian (``"gaussian"``).
      hierarchy: ``parent_of [n]`` (-1 roots) or ``{parent: [children]}`` (Definition 3.2).
      noise_std: std of additive Gaussian noise on x_p; ``target_noise_std`` on x_r for transcoders
        (default ``noise_std``).
      magnitude: ``"exponential"`` (c_min + Exp(beta)) or ``"uniform"`` (U(c_min, c_min + beta)).
      sampler: ``"auto"`` (default), ``"jax"`` or ``"native"``
        (:meth:`jsdl.data.bench.SamplingMixin.uses_native`; not with a ``correlation``).
    """
    n, d, M, S, c_min, beta, N = _bench.check_bench_args(n_features, d_input, max_interference, sparsity, c_min, beta, dataset_size)
    if magnitude not in ("exponential", "uniform"):
        raise ValueError(f"magnitude must be 'exponential' or 'uniform', got {magnitude!r}")
    sampler = _bench.check_sampler(sampler)
    if sampler == "native" and correlation is not None:
        raise ValueError("sampler='native' draws independent base masks: not with a correlation")
    rates = _per_feature("firing_rates", firing_rates, n, 1.0 - S, 0.0, 1.0)
    if importance is not None and importance_decay is not None:
        raise ValueError("give importance or importance_decay, not both")
    if importance_decay is not None:
        r = _bench.check_float_in("importance_decay", importance_decay, 0.0, 1.0, lo_open=True, hi_open=False)
        imp = r ** np.arange(n, dtype=float)
    else:
        imp = _per_feature("importance", importance, n, 1.0, 0.0, math.inf, lo_open=True)
    noise_std = _bench.check_float_in("noise_std", noise_std, 0.0, math.inf, lo_open=False, hi_open=True)
    target_noise_std = noise_std if target_noise_std is None else _bench.check_float_in(
        "target_noise_std", target_noise_std, 0.0, math.inf, lo_open=False, hi_open=True)
    parent_of = np.full(n, -1, np.int64) if hierarchy is None else validate_hierarchy(hierarchy, n)
    depth = hierarchy_depth(parent_of)
    chol = None
    if correlation is not None:
        C = _check_correlation(correlation, n)
        if correlation_kind == "mask":
            R = mask_to_gaussian_correlation(C, rates)
        elif correlation_kind == "gaussian":
            R = C
            if np.linalg.eigvalsh(R).min() < -1e-8:
                raise ValueError("correlation (kind 'gaussian') must be positive semi-definite")
        else:
            raise ValueError(f"correlation_kind must be 'mask' or 'gaussian', got {correlation_kind!r}")
        chol = np.linalg.cholesky(R + 1e-9 * np.eye(n))
    skip_scale = _bench.check_float_in("skip_scale", skip_scale, 0.0, math.inf, lo_open=False, hi_open=True)
    k_w, k_data = jax.random.split(key)
    W_p, W_r, W_skip, realized, realized_r, L, record = _bench.build_targets(
        k_w, method, n, d, d_target, n_sources, M, skip_scale,
        dict(step_size=step_size, margin=margin, neg_weight=neg_weight, max_iters=max_iters), dtype,
    )
    dt = W_p.dtype
    edges = np.flatnonzero(parent_of >= 0)
    return StructuredBench(
        W_p=W_p, W_r=W_r, W_skip=W_skip, data_key=k_data if N else None,
        rates=jnp.asarray(rates, dt), importance=jnp.asarray(imp, dt),
        parent_of=jnp.asarray(parent_of, jnp.int32), child_idx=jnp.asarray(edges, jnp.int32),
        parent_idx=jnp.asarray(parent_of[edges], jnp.int32),
        corr_chol=None if chol is None else jnp.asarray(chol, dt),
        c_min=c_min, beta=beta, magnitude=magnitude, method=method, n_sources=L, max_interference=M,
        realized_interference=realized, realized_interference_r=realized_r, dataset_size=N,
        skip_scale=skip_scale if W_skip is not None else 0.0, noise_std=noise_std,
        target_noise_std=target_noise_std, depth=depth, kind=_kind, generation=record,
        rate_bound=float(rates.max()) if chol is None else None, sorted_parents=parents_are_sorted(parent_of),
        sampler=sampler,
    )


def make_hierarchical_bench(
    key: jax.Array,
    n_roots: int = 50,
    branching: int = 4,
    depth: int = 1,
    d_input: int = 256,
    max_interference: float = 0.1,
    *,
    child_rate: float = 0.01,
    parent_alone_rate: float = 0.0,
    **kwargs: Any,
) -> StructuredBench:
    """A hierarchical bench (Definition 3.2): ``n_roots`` trees with ``branching`` children per node
    and ``depth`` levels (:func:`build_hierarchy`). Leaves fire independently with ``child_rate``;
    internal nodes fire with ``parent_alone_rate`` on their own (default 0: a parent fires iff one of
    its children does) and whenever a child fires. Other options as :func:`make_structured_bench`."""
    parent_of = build_hierarchy(n_roots, branching, depth)
    n = parent_of.shape[0]
    child_rate = _bench.check_float_in("child_rate", child_rate, 0.0, 1.0, lo_open=False, hi_open=False)
    parent_alone_rate = _bench.check_float_in("parent_alone_rate", parent_alone_rate, 0.0, 1.0, lo_open=False, hi_open=False)
    is_parent = np.zeros(n, bool)
    is_parent[parent_of[parent_of >= 0]] = True
    rates = np.where(is_parent, parent_alone_rate, child_rate)
    if "firing_rates" in kwargs or "hierarchy" in kwargs:
        raise ValueError("make_hierarchical_bench sets firing_rates and hierarchy itself; use make_structured_bench")
    return make_structured_bench(key, n, d_input, max_interference, firing_rates=rates, hierarchy=parent_of,
                                 _kind="hierarchical", **kwargs)


# --------------------------------------------------------------------------------------------------
# Toy model of superposition (Elhage et al. 2022)
# --------------------------------------------------------------------------------------------------


def train_toy_model(
    key: jax.Array,
    n_features: int = 20,
    d_hidden: int = 5,
    sparsity: float = 0.9,
    importance_decay: float = 0.9,
    *,
    steps: int = 3000,
    batch_size: int = 1024,
    learning_rate: float = 1e-3,
) -> ToyModel:
    """Train the ReLU-output toy model of Elhage et al. (2022): features ``x_i = m_i u_i``,
    ``m_i ~ Bernoulli(1 - S)``, ``u_i ~ U[0, 1]``; ``h = W x`` (``W [m, n]``, init N(0, 2/(n+m))
    as their Xavier-normal), ``x' = ReLU(W^T h + b)``; loss ``E sum_i I_i (x_i - x'_i)^2`` with
    ``I_i = importance_decay^i``; Adam (optax) for ``steps`` steps in one ``lax.scan``."""
    n = _bench.check_positive_int("n_features", n_features)
    m = _bench.check_positive_int("d_hidden", d_hidden)
    S = _bench.check_float_in("sparsity", sparsity, 0.0, 1.0, lo_open=False, hi_open=True)
    r = _bench.check_float_in("importance_decay", importance_decay, 0.0, 1.0, lo_open=True, hi_open=False)
    steps = _bench.check_positive_int("steps", steps)
    batch_size = _bench.check_positive_int("batch_size", batch_size)
    lr = _bench.check_float_in("learning_rate", learning_rate, 0.0, math.inf, lo_open=True, hi_open=True)
    dtype = jnp.zeros(()).dtype
    imp = jnp.asarray(r ** np.arange(n), dtype)
    k_init, k_data = jax.random.split(key)
    params = {"W": jax.random.normal(k_init, (m, n), dtype) * math.sqrt(2.0 / (n + m)), "b": jnp.zeros((n,), dtype)}
    opt = optax.adam(lr)

    def loss_fn(p, x):
        out = jax.nn.relu(x @ p["W"].T @ p["W"] + p["b"])
        return jnp.mean(jnp.sum(imp * (x - out) ** 2, axis=-1))

    def step(carry, i):
        p, s = carry
        k1, k2 = jax.random.split(jax.random.fold_in(k_data, i))
        x = jnp.where(jax.random.uniform(k1, (batch_size, n), dtype) < 1 - S,
                      jax.random.uniform(k2, (batch_size, n), dtype), 0.0)
        loss, g = jax.value_and_grad(loss_fn)(p, x)
        upd, s = opt.update(g, s, p)
        return (optax.apply_updates(p, upd), s), loss

    @jax.jit
    def run(p):
        (p, _), losses = jax.lax.scan(step, (p, opt.init(p)), jnp.arange(steps))
        return p, losses

    p, losses = run(params)
    return ToyModel(W=p["W"], b=p["b"], importance=imp, losses=losses)


def make_toy_model_bench(
    key: jax.Array,
    n_features: int = 20,
    d_hidden: int = 5,
    sparsity: float = 0.9,
    importance_decay: float = 0.9,
    *,
    steps: int = 3000,
    batch_size: int = 1024,
    learning_rate: float = 1e-3,
    noise_std: float = 0.0,
    dataset_size: Optional[int] = None,
    represented_threshold: float = 0.5,
) -> StructuredBench:
    """SDL data from the hidden states of a trained toy model of superposition: ``x_p = h = W x``
    with ``x`` from the toy distribution (U[0, 1] magnitudes, rate 1 - S), so the ground-truth
    feature directions are the columns of ``W_p = W [m, n]`` (not unit norm: features the model
    does not represent have norm ~0; use ``feature_norms() > 0.5`` and metrics' ``exclude``).
    ``x_r = x_p`` (SAE). ``realized_interference`` is the largest cosine between represented
    features. The trained model is kept in ``bench.toy``."""
    k_train, k_data = jax.random.split(key)
    toy = train_toy_model(k_train, n_features, d_hidden, sparsity, importance_decay, steps=steps,
                          batch_size=batch_size, learning_rate=learning_rate)
    N = 0 if dataset_size is None else _bench.check_positive_int("dataset_size", dataset_size)
    noise_std = _bench.check_float_in("noise_std", noise_std, 0.0, math.inf, lo_open=False, hi_open=True)
    W = toy.W
    norms = np.linalg.norm(np.asarray(W), axis=0)
    rep = norms > represented_threshold
    realized = _bench.max_interference(np.asarray(W)[:, rep]) if rep.sum() > 1 else float("nan")
    n = W.shape[1]
    return StructuredBench(
        W_p=W, W_r=W, rates=jnp.full((n,), 1.0 - sparsity, W.dtype), importance=jnp.ones((n,), W.dtype),
        parent_of=jnp.full((n,), -1, jnp.int32), child_idx=jnp.zeros((0,), jnp.int32),
        parent_idx=jnp.zeros((0,), jnp.int32), data_key=k_data if N else None, toy=toy,
        c_min=0.0, beta=1.0, magnitude="uniform", method="sae", n_sources=1, max_interference=float("nan"),
        realized_interference=realized, realized_interference_r=realized, dataset_size=N, noise_std=noise_std,
        target_noise_std=noise_std, depth=0, kind="toy_model",
        generation=(("steps", steps), ("batch_size", batch_size), ("learning_rate", learning_rate),
                    ("importance_decay", importance_decay), ("n_represented", int(rep.sum())),
                    ("final_loss", float(toy.losses[-1]))),
    )
