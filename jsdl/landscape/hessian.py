"""Hessians of SDL losses: dense (small problems), blocks, Hessian-vector products, Lanczos and
stochastic Lanczos quadrature (large problems), and projection of the rescaling symmetry.

Every function takes a loss ``f(params, *args) -> scalar`` over a parameter pytree (usually
:class:`jsdl.SDLParams`; ``args`` are passed through unchanged, so a data batch is an argument of
the compiled program rather than a constant baked into it). Parameters are flattened with
``jax.flatten_util.ravel_pytree``: leaves in tree order, each leaf row-major. :func:`flatten`
returns the map from block names (``'W_E'``, ``'W_D'``...) to slices of the flat vector.

Row-major convention: ``W_D [n_r, n_q]`` flattens with index ``r * n_q + i``, so the paper's
decoder block ``2 sum_d M_d (z_d z_d^T) (x) I`` (column-major vec) reads ``2 I_{n_r} (x) A`` here,
``A = sum_d M_d z_d z_d^T`` (see :func:`decoder_block_closed_form`).

Why HVPs: ``jax.hessian`` of a 2k-parameter loss took 15 s where mapping forward-over-reverse
HVPs over basis vectors took 6.5 s on this stack, and a dense Hessian at 66k parameters would
need ~17 GB; Lanczos needs only HVPs.

**Rescaling symmetry.** For a homogeneous activation (ReLU, Top-k) the loss is invariant under
``w_E^i -> a w_E^i, w_D^i -> w_D^i / a`` (and ``b_E[i] -> a b_E[i]``, a JumpReLU threshold
``theta_i -> a theta_i``). Differentiating the invariance at ``a = 1`` gives ``H xi_i = -A_i^T g``
for the tangent ``xi_i = (w_E^i, -w_D^i)``: at a stationary point (``g = 0``) every ``xi_i`` is an
exact null vector. :func:`rescaling_tangents` builds the ``xi_i``; :func:`project_out` removes
their span so the remaining spectrum shows flatness that is not a symmetry.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jsdl.objective import SDLParams

__all__ = [
    "flatten",
    "flat_fn",
    "Hessian",
    "full_hessian",
    "hvp",
    "make_hvp",
    "finite_difference_hvp",
    "lanczos",
    "lanczos_extremes",
    "spectral_density",
    "rescaling_tangents",
    "project_out",
    "complement_eigvalsh",
    "decoder_block_closed_form",
    "encoder_block_closed_form",
]


def flatten(params):
    """``(x [P], unravel, blocks)``: the flat vector, its inverse and ``{name: slice}`` for every
    leaf (``name`` is the leaf's path, e.g. ``'W_E'``; ``None`` leaves are absent)."""
    x, unravel = ravel_pytree(params)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    blocks, off = {}, 0
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path).lstrip(".").strip("[]'\"") or "x"
        size = int(np.prod(np.shape(leaf)))
        blocks[name] = slice(off, off + size)
        off += size
    return x, unravel, blocks


def flat_fn(f, params, args):
    """``(fx, x, unravel, blocks)``: ``f(params, *args)`` as a function ``fx(x, *args)`` of the flat
    parameter vector ``x`` (:func:`flatten`)."""
    x, unravel, blocks = flatten(params)

    def fx(xv, *a):
        return f(unravel(xv), *a)

    return fx, x, unravel, blocks


@dataclasses.dataclass
class Hessian:
    """A dense Hessian ``matrix [P, P]`` over the flat parameter vector, with ``blocks`` mapping a
    parameter name to its slice. ``block('W_D')`` is a diagonal block, ``block('W_D', 'W_E')`` an
    off-diagonal one; ``sub(['W_D', 'W_E'])`` the joint Hessian of several blocks."""

    matrix: jax.Array
    blocks: dict
    unravel: Callable

    def block(self, a: str, b: Optional[str] = None) -> jax.Array:
        for nm in (a, b or a):
            if nm not in self.blocks:
                raise ValueError(f"unknown block {nm!r}; blocks are {list(self.blocks)}")
        return self.matrix[self.blocks[a], self.blocks[b or a]]

    def sub(self, names) -> jax.Array:
        idx = np.concatenate([np.arange(self.blocks[n].start, self.blocks[n].stop) for n in names])
        return self.matrix[np.ix_(idx, idx)]

    def eigvalsh(self, names=None) -> np.ndarray:
        m = self.matrix if names is None else self.sub(names)
        return np.linalg.eigvalsh(np.asarray(m))


def full_hessian(f: Callable, params, *args, batch_size: int = 64) -> Hessian:
    """Dense Hessian of ``f(params, *args)`` by mapping forward-over-reverse HVPs over the basis
    vectors (``jax.lax.map`` in chunks of ``batch_size``), symmetrised. Cost: ``P`` HVPs and
    ``P^2`` memory; use it below a few thousand parameters."""
    fx, x, unravel, blocks = flat_fn(f, params, args)
    g = jax.grad(fx)
    P = x.size

    @jax.jit
    def build(xv, *a):
        def col(e):
            return jax.jvp(lambda y: g(y, *a), (xv,), (e,))[1]

        eye = jnp.eye(P, dtype=xv.dtype)
        H = jax.lax.map(col, eye, batch_size=min(batch_size, P))
        return 0.5 * (H + H.T)

    return Hessian(build(x, *args), blocks, unravel)


def hvp(f: Callable, params, v, *args):
    """Hessian-vector product ``H v`` of ``f(params, *args)`` (forward-over-reverse); ``v`` and the
    result are pytrees like ``params``."""
    return jax.jvp(lambda p: jax.grad(f)(p, *args), (params,), (v,))[1]


def make_hvp(f: Callable, params, *args) -> tuple[Callable, int]:
    """``(matvec, P)``: a jitted flat HVP ``v [P] -> H v [P]`` at ``params`` (forward-over-reverse),
    for Lanczos. ``params`` and ``args`` are arguments of the compiled function, not constants."""
    fx, x, _, _ = flat_fn(f, params, args)
    g = jax.grad(fx)

    @jax.jit
    def _hv(xv, v, *a):
        return jax.jvp(lambda y: g(y, *a), (xv,), (v,))[1]

    def matvec(v):
        return _hv(x, v, *args)

    matvec.raw = _hv  # (x, v, *args) -> Hv, traceable inside other jitted code
    matvec.x = x
    matvec.args = args
    return matvec, int(x.size)


def finite_difference_hvp(f: Callable, params, v, *args, eps: float = 1e-5):
    """Central difference of the gradient, ``(g(x + eps v) - g(x - eps v)) / (2 eps)``, flat ``[P]``
    (``v`` flat). A check of :func:`hvp` and :func:`full_hessian`, valid inside one region."""
    fx, x, _, _ = flat_fn(f, params, args)
    g = jax.jit(jax.grad(fx))
    return (g(x + eps * v, *args) - g(x - eps * v, *args)) / (2 * eps)


# ------------------------------------------------------------------------------------------------
# Lanczos with full reorthogonalisation, and stochastic Lanczos quadrature
# ------------------------------------------------------------------------------------------------


def _orth(w, V, Q):
    # Classical Gram-Schmidt twice ("twice is enough") against the Lanczos basis V [m, P] (unused
    # rows are 0) and the deflated directions Q [k, P].
    for _ in range(2):
        w = w - V.T @ (V @ w)
        if Q is not None:
            w = w - Q.T @ (Q @ w)
    return w


def lanczos(matvec: Callable, v0: jax.Array, num_iters: int, *, ortho: Optional[jax.Array] = None, key=None):
    """Lanczos tridiagonalisation with full reorthogonalisation (jit-able; ``matvec`` must be
    traceable).

    ``v0 [P]`` is the start vector, ``ortho [k, P]`` (orthonormal rows) directions to deflate: the
    iteration then runs on ``(I - Q^T Q) H (I - Q^T Q)`` restricted to the complement of ``Q``. On
    breakdown (an invariant subspace is found) the iteration restarts from a random vector
    orthogonal to everything so far (``key``), with ``beta = 0``, so Ritz values stay exact.

    Returns ``(alpha [m], beta [m-1], V [m, P])``: ``T = tridiag(beta, alpha, beta)`` and the
    orthonormal Lanczos vectors (rows)."""
    m = int(num_iters)
    P = v0.shape[0]
    if m < 1 or m > P:
        raise ValueError(f"num_iters must be in [1, P={P}], got {num_iters}")
    Q = None if ortho is None or ortho.shape[0] == 0 else ortho
    key = jax.random.PRNGKey(0) if key is None else key
    dtype = v0.dtype
    tiny = jnp.sqrt(jnp.finfo(dtype).eps)

    v = _orth(v0, jnp.zeros((1, P), dtype), Q)
    v = v / jnp.linalg.norm(v)
    V = jnp.zeros((m, P), dtype).at[0].set(v)

    def body(j, carry):
        V, alpha, beta = carry
        vj = V[j]
        w = matvec(vj)
        if Q is not None:
            w = w - Q.T @ (Q @ w)
        a = jnp.vdot(vj, w)
        w = _orth(w, V, Q)
        b = jnp.linalg.norm(w)
        hnorm = jnp.maximum(jnp.abs(a), jnp.max(jnp.abs(alpha)))
        broke = b <= tiny * jnp.maximum(hnorm, 1.0)
        r = _orth(jax.random.normal(jax.random.fold_in(key, j), (P,), dtype), V, Q)
        nxt = jnp.where(broke, r / jnp.linalg.norm(r), w / jnp.where(broke, 1.0, b))
        b = jnp.where(broke, 0.0, b)
        V = jnp.where(j + 1 < m, V.at[jnp.minimum(j + 1, m - 1)].set(nxt), V)
        return V, alpha.at[j].set(a), beta.at[j].set(b)

    V, alpha, beta = jax.lax.fori_loop(0, m, body, (V, jnp.zeros((m,), dtype), jnp.zeros((m,), dtype)))
    return alpha, beta[: m - 1], V


def _compiled_lanczos(matvec, m, ortho):
    """jit of :func:`lanczos` for ``matvec``; a matvec from :func:`make_hvp` gets its parameters and
    data as operands (not baked-in constants), so large batches compile quickly."""
    if hasattr(matvec, "raw"):
        raw = matvec.raw

        @jax.jit
        def run(v, key, x, args, Q):
            return lanczos(lambda u: raw(x, u, *args), v, m, ortho=Q, key=key)

        return lambda v, key: run(v, key, matvec.x, matvec.args, ortho)

    @jax.jit
    def run2(v, key, Q):
        return lanczos(matvec, v, m, ortho=Q, key=key)

    return lambda v, key: run2(v, key, ortho)


def _tridiag(alpha, beta):
    return jnp.diag(alpha) + jnp.diag(beta, 1) + jnp.diag(beta, -1)


def lanczos_extremes(
    matvec: Callable,
    dim: int,
    key: jax.Array,
    *,
    num_iters: int = 80,
    ortho: Optional[jax.Array] = None,
    dtype=None,
) -> dict:
    """Extreme eigenvalues of the symmetric operator ``matvec`` (``[P] -> [P]``) from Ritz values of
    ``num_iters`` Lanczos steps (random Gaussian start). Returns ``min``, ``max``, ``ritz`` (all
    Ritz values, ascending) and ``residual_min``/``residual_max`` (Ritz residual bounds
    ``|beta_m u_m|``, a posteriori error bounds on the extremes)."""
    dtype = dtype or jnp.zeros(()).dtype
    k0, k1 = jax.random.split(key)
    v0 = jax.random.normal(k0, (dim,), dtype)
    m = min(int(num_iters), dim - (0 if ortho is None else int(ortho.shape[0])))
    alpha, beta, V = _compiled_lanczos(matvec, m, ortho)(v0, k1)
    T = _tridiag(alpha, beta)
    theta, U = jnp.linalg.eigh(T)
    # residual of the Ritz pair: ||H y - theta y|| = |beta_m| |U[m-1, j]|; one more HVP gives beta_m
    last = V[-1]
    w = matvec(last)
    if ortho is not None and ortho.shape[0]:
        w = w - ortho.T @ (ortho @ w)
    w = w - V.T @ (V @ w)
    bm = jnp.linalg.norm(w)
    res = jnp.abs(bm * U[-1, :])
    return {
        "min": float(theta[0]),
        "max": float(theta[-1]),
        "ritz": np.asarray(theta),
        "residual_min": float(res[0]),
        "residual_max": float(res[-1]),
    }


def spectral_density(
    matvec: Callable,
    dim: int,
    key: jax.Array,
    *,
    num_iters: int = 64,
    num_probes: int = 8,
    grid: Optional[np.ndarray] = None,
    sigma: Optional[float] = None,
    ortho: Optional[jax.Array] = None,
    dtype=None,
) -> dict:
    """Spectral density by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017; Ghorbani et al.
    2019): for each Rademacher probe, the Ritz values ``theta_j`` and weights ``tau_j = U[0, j]^2``
    of ``num_iters`` Lanczos steps form a quadrature for ``v^T g(H) v / ||v||^2``; the density is
    their Gaussian-smoothed average (it integrates to 1 over the operator's spectrum; with
    ``ortho`` of ``k`` rows, the spectrum of the ``dim - k``-dimensional complement).

    Returns ``grid``, ``density``, ``nodes [probes, m]``, ``weights [probes, m]``."""
    dtype = dtype or jnp.zeros(()).dtype
    k_eff = 0 if ortho is None else int(ortho.shape[0])
    m = min(int(num_iters), dim - k_eff)
    nodes, weights = [], []
    run = _compiled_lanczos(matvec, m, ortho)
    for p in range(num_probes):
        kp = jax.random.fold_in(key, p)
        v = jax.random.rademacher(kp, (dim,), dtype)
        alpha, beta, _ = run(v, jax.random.fold_in(kp, 1))
        theta, U = jnp.linalg.eigh(_tridiag(alpha, beta))
        nodes.append(np.asarray(theta))
        weights.append(np.asarray(U[0, :] ** 2))
    nodes, weights = np.stack(nodes), np.stack(weights)
    lo, hi = nodes.min(), nodes.max()
    span = max(hi - lo, 1e-12)
    if grid is None:
        grid = np.linspace(lo - 0.05 * span, hi + 0.05 * span, 400)
    sigma = sigma or span / 100
    diff = (np.asarray(grid)[:, None, None] - nodes[None]) / sigma
    dens = (weights[None] * np.exp(-0.5 * diff**2)).sum(-1).mean(-1) / (sigma * np.sqrt(2 * np.pi))
    return {"grid": np.asarray(grid), "density": dens, "nodes": nodes, "weights": weights}


# ------------------------------------------------------------------------------------------------
# Symmetry directions
# ------------------------------------------------------------------------------------------------


def rescaling_tangents(params: SDLParams, *, tol: float = 0.0) -> jax.Array:
    """Orthonormal tangents ``[k, P]`` of the per-latent rescaling symmetry at ``params``.

    Latent ``i``: ``d/da (a w_E^i, w_D^i / a, a b_E[i], a theta_i)`` at ``a = 1`` = ``(w_E^i, -w_D^i,
    b_E[i], theta_i)``, zero elsewhere. Tangents of different latents have disjoint supports, so
    they are orthogonal; latents whose tangent has norm ``<= tol`` (all-zero weights) are dropped.
    Tied models (``W_D is None``) have no continuous rescaling symmetry: ``k = 0``. ``b_D`` and the
    skip ``W_S`` are not rescaled."""
    if not isinstance(params, SDLParams):
        raise TypeError(f"rescaling_tangents needs jsdl.SDLParams, got {type(params).__name__}")
    x, _ = ravel_pytree(params)
    if params.W_D is None:
        return jnp.zeros((0, x.size), x.dtype)
    n_q = params.W_E.shape[0]

    def tangent(e):
        t = SDLParams(
            W_E=params.W_E * e[:, None],
            W_D=-params.W_D * e[None, :],
            b_E=None if params.b_E is None else params.b_E * e,
            b_D=None if params.b_D is None else jnp.zeros_like(params.b_D),
            threshold=None if params.threshold is None else params.threshold * e,
            W_S=None if params.W_S is None else jnp.zeros_like(params.W_S),
        )
        return ravel_pytree(t)[0]

    T = jax.vmap(tangent)(jnp.eye(n_q, dtype=x.dtype))
    norms = jnp.linalg.norm(T, axis=1)
    keep = np.asarray(norms > tol)
    return T[keep] / norms[keep][:, None]


def project_out(matvec: Callable, Q: jax.Array) -> Callable:
    """The operator ``v -> (I - Q^T Q) H (I - Q^T Q) v`` for orthonormal rows ``Q [k, P]``."""
    if Q is None or Q.shape[0] == 0:
        return matvec

    def pm(v):
        v = v - Q.T @ (Q @ v)
        w = matvec(v)
        return w - Q.T @ (Q @ w)

    return pm


def complement_eigvalsh(H, Q) -> np.ndarray:
    """Eigenvalues of the dense symmetric ``H [P, P]`` restricted to the orthogonal complement of the
    rows of ``Q [k, P]`` (``P - k`` values, ascending): the spectrum with the symmetry removed."""
    H = np.asarray(H, dtype=np.float64)
    if Q is None or np.shape(Q)[0] == 0:
        return np.linalg.eigvalsh(H)
    Q = np.asarray(Q, dtype=np.float64)
    full, _ = np.linalg.qr(np.concatenate([Q.T, np.eye(H.shape[0])], axis=1)[:, : H.shape[0]], mode="complete")
    # the first k columns of `full` span Q's rows; the rest span the complement
    B = full[:, Q.shape[0]:]
    return np.linalg.eigvalsh(B.T @ H @ B)


# ------------------------------------------------------------------------------------------------
# Closed forms of the blocks of the approximate loss (Theorem 3.2 and the reference notes)
# ------------------------------------------------------------------------------------------------


def decoder_block_closed_form(Z, M) -> jax.Array:
    """``d^2 L~ / dW_D^2`` at codes ``Z [n_q, n]``: ``2 I_{n_r} (x) (Z diag(M) Z^T)`` in the
    row-major order of ``W_D [n_r, n_q]`` (the paper's ``2 sum_d M_d (z_d z_d^T) (x) I``). Returns
    the ``[n_q, n_q]`` factor ``A``; the block is ``2 kron(I_{n_r}, A)``. It does not depend on
    ``W_D``: ``L~`` is an exact quadratic in ``W_D`` for fixed ``W_E``."""
    return (Z * M[None, :]) @ Z.T


def encoder_block_closed_form(W_D, W_p, M, mask) -> jax.Array:
    """``d^2 L~ / dW_E^2`` inside the region of ``mask [n_q, n]`` in the row-major order of ``W_E
    [n_q, n_p]``: ``2 sum_d M_d ((W_D^T W_D) o m_d m_d^T) (x) w_p^d w_p^d^T`` ``[n_q n_p, n_q n_p]``
    (the reference notes' ``2 (W_{D,A(d)}^T W_{D,A(d)}) (x) w_p^d w_p^{dT}``, PSD)."""
    G = W_D.T @ W_D
    mask = jnp.asarray(mask, W_D.dtype)

    def term(md, m, w):
        return md * jnp.kron(G * jnp.outer(m, m), jnp.outer(w, w))

    return 2 * jnp.sum(jax.vmap(term, in_axes=(0, 1, 1))(M, mask, W_p), axis=0)
