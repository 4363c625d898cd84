"""The paper's constructions (section 3 of arXiv 2512.05534), as functions of a ground truth.

* :func:`theorem_3_3_solution`: W* (eq. 15), :func:`theorem_3_3_bounds` its loss bounds;
* :func:`zero_loss_solution`: ``W_D = W_r Z^+`` for a random encoder (non-identifiability);
* :func:`example_3_5`; :func:`theorem_3_6_literal` (eq. 55) and :func:`eigen_partial_optimum` (the
  corrected characterisation of partial minimisers);
* :func:`theorem_3_8_absorption`: the proof construction of absorption;
* :func:`random_params`, :func:`point_with_margin`: random points of the approximate loss (the
  second away from activation-region boundaries).
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jsdl.data import max_interference
from jsdl.landscape import approx as _ax
from jsdl.objective import SDLParams

__all__ = [
    "theorem_3_3_solution",
    "theorem_3_3_bounds",
    "zero_loss_solution",
    "example_3_5",
    "theorem_3_6_literal",
    "eigen_partial_optimum",
    "theorem_3_8_absorption",
    "random_params",
    "point_with_margin",
    "realizing_row",
]


def theorem_3_3_solution(W_p, W_r, n_q: Optional[int] = None) -> SDLParams:
    """Eq. 15: ``W_E* = [W_p^T; 0]``, ``W_D* = [W_r, 0]`` zero-padded to ``n_q >= n`` latents."""
    W_p, W_r = jnp.asarray(W_p), jnp.asarray(W_r)
    n = W_p.shape[1]
    n_q = n if n_q is None else n_q
    if n_q < n:
        raise ValueError(f"Theorem 3.3 needs n_q >= n: n_q={n_q}, n={n}")
    W_E = jnp.zeros((n_q, W_p.shape[0]), W_p.dtype).at[:n].set(W_p.T)
    W_D = jnp.zeros((W_r.shape[0], n_q), W_p.dtype).at[:, :n].set(W_r)
    return _ax.theory_params(W_E, W_D)


def theorem_3_3_bounds(problem) -> dict:
    """Bounds on ``L~(W*)``: the paper's ``n^2 M^2 sum_d M_d`` (eq. 16) and the tighter
    ``M^2 sum_d M_d (K_d - 1)^2`` with ``K_d = |{k : <w_p^k, w_p^d> > 0}|`` (reference notes;
    assumes unit ``w_r`` columns). ``M`` is the signed maximum interference."""
    W = np.asarray(problem.W_p, dtype=np.float64)
    G = W.T @ W
    n = G.shape[0]
    off = G - np.diag(np.diag(G))
    Mi = float(np.max(off + np.diag(np.full(n, -np.inf)))) if n > 1 else 0.0
    K = (G > 1e-12).sum(0)
    Md = np.asarray(problem.M, dtype=np.float64)
    return {
        "max_interference": Mi,
        "K": K,
        "tight": max(Mi, 0.0) ** 2 * float(np.sum(Md * (K - 1) ** 2)),
        "paper": n * n * max(Mi, 0.0) ** 2 * float(np.sum(Md)),
    }


def zero_loss_solution(key, problem, n_q: int, *, max_tries: int = 50) -> SDLParams:
    """A non-identifiable zero-loss solution (Thm 3.4, [derived] construction): a random Gaussian
    encoder whose per-feature codes ``Z [n_q, n]`` have rank ``n``, and ``W_D = W_r Z^+``; then
    ``W_D z_d = w_r^d`` for every ``d`` and ``L~ = 0``."""
    n = problem.n_features
    if n_q < n:
        raise ValueError(f"a rank-n code matrix needs n_q >= n: n_q={n_q}, n={n}")
    dtype = problem.W_p.dtype
    for t in range(max_tries):
        W_E = jax.random.normal(jax.random.fold_in(key, t), (n_q, problem.W_p.shape[0]), dtype)
        Z = _ax.codes_per_feature(_ax.theory_params(W_E, jnp.zeros((problem.W_r.shape[0], n_q), dtype)), problem)
        s = jnp.linalg.svd(Z, compute_uv=False)
        if float(s[-1] if n <= n_q else 0.0) > 1e-3 * float(s[0]):
            return _ax.theory_params(W_E, problem.W_r @ jnp.linalg.pinv(Z))
    raise ValueError(f"no random encoder with a rank-{n} code matrix in {max_tries} tries; raise n_q")


def example_3_5():
    """Example 3.5: ``n = n_p = n_q = n_r = 2``, Top-1 o ReLU, ``M_1 = M_2 = 1``, ``W_p = W_r = I``,
    ``W_E* = [[1, 1], [0, 0]]``, ``W_D* = [[1/2, 0], [1/2, 0]]``. Returns ``(params, problem)``."""
    dtype = jnp.zeros(()).dtype
    problem = _ax.make_problem(jnp.eye(2, dtype=dtype), None, 1.0, "relu|topk", k=1)
    params = _ax.theory_params(jnp.array([[1.0, 1.0], [0.0, 0.0]], dtype), jnp.array([[0.5, 0.0], [0.5, 0.0]], dtype))
    return params, problem


def realizing_row(W_p, values):
    """An encoder row ``w`` with ``<w, w_p^d> = values[d]`` (least squares; exact when the columns
    of ``W_p`` are linearly independent)."""
    sol, *_ = jnp.linalg.lstsq(jnp.asarray(W_p).T, jnp.asarray(values, W_p.dtype))
    return sol


def theorem_3_6_literal(problem, sets, values=None, n_q: Optional[int] = None) -> SDLParams:
    """The proof construction of Theorem 3.6: for a partition ``sets = [F_1, ..., F_m]`` of the
    features (the remaining ``n_q - m`` latents dead), a realising encoder (row ``i`` has value
    ``values[d]`` (default 1) on ``w_p^d`` for ``d in F_i`` and -1 elsewhere) and the per-neuron
    weighted least-squares decoder of eq. 55, dead columns 0."""
    W_p, W_r, M = problem.W_p, problem.W_r, problem.M
    n = problem.n_features
    n_q = len(sets) if n_q is None else n_q
    vals = np.ones(n) if values is None else np.asarray(values, dtype=np.float64)
    rows, cols = [], []
    for F in sets:
        target = -np.ones(n)
        target[list(F)] = vals[list(F)]
        w = realizing_row(W_p, target)
        z = np.asarray(w @ W_p)
        num = sum(float(M[d]) * z[d] * W_r[:, d] for d in F)
        den = sum(float(M[d]) * z[d] ** 2 for d in F)
        rows.append(w)
        cols.append(num / den)
    dtype = W_p.dtype
    W_E = jnp.zeros((n_q, W_p.shape[0]), dtype).at[: len(sets)].set(jnp.stack(rows))
    W_D = jnp.zeros((W_r.shape[0], n_q), dtype).at[:, : len(sets)].set(jnp.stack(cols, axis=1))
    return _ax.theory_params(W_E, W_D)


def eigen_partial_optimum(problem, sets, which: str = "top", n_q: Optional[int] = None):
    """The corrected characterisation of interior partial optima for a partition pattern (reference
    notes, section 3.4 [derived]): for each set ``F_i`` the decoder column ``u`` is an eigenvector
    of ``G_i = sum_{d in F_i} M_d w_r^d w_r^dT`` (``which='top'`` or ``'second'``), normalised to
    unit norm, and the codes are ``z_d = <u, w_r^d> / ||u||^2``, realised by a least-squares encoder
    row (value -1 on features outside ``F_i``). Returns ``(params, info)`` with per-set
    ``eigenvalue``, ``z`` (the required codes: all must be > 0 to lie inside the region) and the
    predicted loss ``sum_i (sum_{d in F_i} M_d ||w_r^d||^2 - lambda_i)``."""
    W_p, W_r, M = problem.W_p, problem.W_r, np.asarray(problem.M)
    n = problem.n_features
    n_q = len(sets) if n_q is None else n_q
    rows, cols, info = [], [], []
    predicted = 0.0
    for F in sets:
        F = list(F)
        Wr = np.asarray(W_r)[:, F]
        G = (Wr * M[F]) @ Wr.T
        lam, U = np.linalg.eigh(G)
        j = -1 if which == "top" else -2
        u = U[:, j]
        # a repeated eigenvalue (e.g. orthonormal w_r with equal M_d): take the member of the eigenspace
        # closest to sum_d w_r^d, which has positive overlap with every w_r^d when one exists
        space = U[:, np.abs(lam - lam[j]) <= 1e-9 * max(1.0, float(np.abs(lam).max()))]
        if space.shape[1] > 1:
            cand = space @ (space.T @ Wr.sum(1))
            if np.linalg.norm(cand) > 1e-9:
                u = cand / np.linalg.norm(cand)
        if (Wr.T @ u).sum() < 0:
            u = -u
        z = Wr.T @ u / (u @ u)
        target = -np.ones(n)
        target[F] = z
        rows.append(realizing_row(W_p, target))
        cols.append(jnp.asarray(u, W_p.dtype))
        predicted += float(np.sum(M[F] * (Wr * Wr).sum(0)) - lam[j])
        info.append({"set": F, "eigenvalue": float(lam[j]), "z": z})
    dtype = W_p.dtype
    W_E = jnp.zeros((n_q, W_p.shape[0]), dtype).at[: len(sets)].set(jnp.stack(rows))
    W_D = jnp.zeros((W_r.shape[0], n_q), dtype).at[:, : len(sets)].set(jnp.stack(cols, axis=1))
    return _ax.theory_params(W_E, W_D), {"sets": info, "predicted_loss": predicted}


def theorem_3_8_absorption(W_E, thresholds, W_p, parent: int, spare: int, *, eps: float = 1e-3, per_neuron: bool = True):
    """The proof construction of Theorem 3.8 (threshold realisability: latent ``i`` fires for ``d``
    iff ``<w_E^i, w_p^d> > theta_i``). With ``a_j`` the parent's activations on its children and
    ``a_min`` the smallest (child ``j*``): scale the parent row by ``lambda = (c + a_min) /
    (2 a_min)``, raise the threshold to ``c'' = (c + a_min)/2 + eps`` and put ``alpha w_p^{j*}``,
    ``alpha = 2 c'' / (1 + M)``, in the spare latent. ``per_neuron=True`` raises only the parent's
    and the new latent's thresholds (JumpReLU's per-latent theta); ``False`` raises all of them, as
    the paper's proof does. Returns ``(W_E', thresholds', j*)``."""
    W_E = jnp.asarray(W_E)
    th = jnp.asarray(thresholds, W_E.dtype)
    c = float(th[parent])
    a = np.asarray(W_E[parent] @ W_p)
    children = np.flatnonzero(a > c)
    if children.size < 2:
        raise ValueError(f"latent {parent} fires for {children.size} features; Thm 3.8 needs >= 2")
    j_star = int(children[np.argmin(a[children])])
    a_min = float(a[j_star])
    lam = (c + a_min) / (2 * a_min)
    c2 = (c + a_min) / 2 + eps
    Mi = max_interference(W_p)
    if not Mi < 1:
        raise ValueError(f"Thm 3.8 needs max interference M < 1, got {Mi}")
    alpha = 2 * c2 / (1 + Mi)
    W_E2 = W_E.at[parent].multiply(lam).at[spare].set(alpha * jnp.asarray(W_p)[:, j_star])
    if per_neuron:
        th2 = th.at[parent].set(c2).at[spare].set(c2)
    else:
        th2 = jnp.full_like(th, c2)
    return W_E2, th2, j_star


def random_params(key, n_q, n_p, n_r, scale=1.0) -> SDLParams:
    """Biasless ``(W_E [n_q, n_p], W_D [n_r, n_q])`` with i.i.d. N(0, scale^2/fan_in) entries."""
    k1, k2 = jax.random.split(key)
    dtype = jnp.zeros(()).dtype
    return _ax.theory_params(
        scale * jax.random.normal(k1, (n_q, n_p), dtype) / math.sqrt(n_p),
        scale * jax.random.normal(k2, (n_r, n_q), dtype) / math.sqrt(n_q),
    )


def point_with_margin(key, problem, n_q, n_p, n_r, min_margin=0.05, tries=50) -> SDLParams:
    """A :func:`random_params` point whose per-feature pre-activations are all at least
    ``min_margin`` away from 0 (inside an activation region); the last try if none is."""
    for t in range(tries):
        p = random_params(jax.random.fold_in(key, t), n_q, n_p, n_r)
        pre = np.asarray(_ax.pre_activations_per_feature(p, problem))
        if np.min(np.abs(pre)) > min_margin:
            return p
    return p
