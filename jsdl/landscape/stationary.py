"""Stationary points of the approximate loss: alternating convex search (paper App. F), Newton /
Levenberg-Marquardt on the gradient (which converges to saddles as well as minima), and
classification of a point by its gradient and Hessian spectrum.

All functions work on bias-free :class:`jsdl.SDLParams` and a
:class:`~jsdl.landscape.approx.FeatureProblem`; they are meant for small problems (dense linear
algebra over ``n_q * n_p`` encoder entries) and run best under ``jax_enable_x64``.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jsdl.landscape import approx as _ax
from jsdl.landscape import hessian as _hs
from jsdl.objective import SDLParams

__all__ = [
    "least_squares_decoder",
    "encoder_step",
    "alternating_convex_search",
    "newton_stationary",
    "classify",
]


def _untied(params: SDLParams):
    if params.W_D is None:
        raise ValueError("alternating convex search needs an untied decoder (params.W_D is None)")


def least_squares_decoder(params: SDLParams, problem, mask=None) -> SDLParams:
    """Exact decoder step: the minimiser of ``L~`` over ``W_D`` for fixed ``W_E`` (Theorem 3.2,
    block 1), from the normal equations ``W_D (sum_d M_d z_d z_d^T) = sum_d M_d w_r^d z_d^T``.
    Solved as the weighted least-squares problem ``sqrt(M) Z^T W_D^T = sqrt(M) W_r^T`` with the
    minimum-norm solution, so dead latents (``z_d[i] = 0`` for all ``d``) get a zero column. With
    ``mask`` the codes are those of that region (:func:`~jsdl.landscape.approx.frozen_codes`)."""
    _untied(params)
    Z = _ax.codes_per_feature(params, problem) if mask is None else _ax.frozen_codes(params, problem, mask)
    w = jnp.sqrt(problem.M)[:, None]
    sol, *_ = jnp.linalg.lstsq(w * Z.T, w * problem.W_r.T)
    return params.replace(W_D=sol.T)


def _encoder_residual(params: SDLParams, problem, mask):
    def r(W_E):
        Z = _ax.frozen_codes(params.replace(W_E=W_E), problem, mask)
        return (jnp.sqrt(problem.M)[None, :] * (problem.W_r - params.decoder @ Z)).reshape(-1)

    return r


def encoder_step(params: SDLParams, problem, mask=None, *, stay_in_region: bool = True, bisections: int = 50):
    """Convex encoder step inside the region of ``mask`` (default: the current pattern).

    Inside a region the codes are linear in ``W_E``, so ``L~`` is a convex quadratic in ``W_E``
    (Theorem 3.2, block 2). The minimum-norm Gauss-Newton (here exact) step ``delta`` solves that
    least-squares problem without the region constraints; by convexity the loss decreases
    monotonically along ``W_E + t delta`` for ``t in [0, 1]``. With ``stay_in_region`` the step is
    cut at the largest ``t`` (bisection) that keeps the pattern (regions are convex, so the segment
    stays inside). Returns ``(params, t)``; ``t < 1`` means the unconstrained optimum lies outside
    the region (the constrained optimum is on its boundary)."""
    if mask is None:
        mask = _ax.activation_pattern(params, problem)
    mask = jnp.asarray(mask, bool)
    r = _encoder_residual(params, problem, mask)
    W0 = params.W_E
    r0 = r(W0)
    J = jax.jacfwd(r)(W0).reshape(r0.size, -1)
    delta, *_ = jnp.linalg.lstsq(J, -r0)
    delta = delta.reshape(W0.shape)
    if not stay_in_region:
        return params.replace(W_E=W0 + delta), 1.0

    def inside(t):
        return bool(jnp.all(_ax.activation_pattern(params.replace(W_E=W0 + t * delta), problem) == mask))

    if inside(1.0):
        return params.replace(W_E=W0 + delta), 1.0
    lo, hi = 0.0, 1.0
    for _ in range(bisections):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if inside(mid) else (lo, mid)
    return params.replace(W_E=W0 + lo * delta), lo


def alternating_convex_search(
    params: SDLParams,
    problem,
    *,
    iters: int = 200,
    tol: float = 1e-13,
    stay_in_region: bool = True,
) -> tuple[SDLParams, dict]:
    """Alternating convex search (Gorski et al. 2007; paper App. F): exact least-squares decoder,
    then a convex encoder step (:func:`encoder_step`), repeated until the loss decreases by less than
    ``tol`` (relative) or ``iters`` rounds. With ``stay_in_region`` (default) the iterate never
    leaves the starting region, so the limit is a partial optimum of ``L~`` on ``Omega_P`` or a
    point that approaches its boundary (reported by ``t < 1``). Otherwise every encoder step is
    a full step of the current region's quadratic, and the pattern may change.

    Returns ``(params, history)`` with ``loss`` (after each round), ``t`` (encoder step fraction),
    ``pattern_changes`` and ``hit_boundary`` (the last steps were cut by the region)."""
    _untied(params)
    losses, ts, changes = [], [], 0
    P0 = _ax.activation_pattern(params, problem)
    prev = float(_ax.approx_loss(params, problem))
    for _ in range(iters):
        params = least_squares_decoder(params, problem)
        params, t = encoder_step(params, problem, stay_in_region=stay_in_region)
        P = _ax.activation_pattern(params, problem)
        if not bool(jnp.all(P == P0)):
            changes += 1
            P0 = P
        cur = float(_ax.approx_loss(params, problem))
        losses.append(cur)
        ts.append(t)
        if abs(prev - cur) <= tol * max(1.0, abs(prev)) and t == 1.0:
            break
        prev = cur
    params = least_squares_decoder(params, problem)
    return params, {
        "loss": np.array(losses),
        "t": np.array(ts),
        "pattern_changes": changes,
        "hit_boundary": bool(len(ts) > 0 and ts[-1] < 1.0),
        "final_loss": float(_ax.approx_loss(params, problem)),
    }


def newton_stationary(
    f: Callable,
    params,
    *args,
    iters: int = 100,
    grad_tol: float = 1e-12,
    mu0: float = 1e-6,
) -> tuple[object, dict]:
    """Converge to a nearby stationary point of ``f(params, *args)`` (minimum *or saddle*) by
    Levenberg-Marquardt on the gradient: minimise ``||grad f||^2`` with steps
    ``delta = -(H^2 + mu I)^{-1} H g``, ``mu`` adapted (x0.3 on success, x10 on failure). As
    ``mu -> 0`` this is Newton's method ``delta = -H^+ g``, which is attracted by saddles as much as
    by minima, hence its use here. Dense Hessians: small problems only. For a piecewise loss pass a
    region's smooth piece (e.g. :func:`~jsdl.landscape.approx.approx_loss_frozen` with a fixed
    ``mask``).

    Returns ``(params, info)`` with ``grad_norm`` (history), ``converged`` and ``iters``."""
    fx, x, unravel, _ = _hs.flat_fn(f, params, args)
    g_fn = jax.jit(jax.grad(fx))
    h_fn = jax.jit(jax.hessian(fx))
    mu = mu0
    g = g_fn(x, *args)
    gn = float(jnp.linalg.norm(g))
    hist = [gn]
    it = 0
    for it in range(iters):
        if gn <= grad_tol:
            break
        H = h_fn(x, *args)
        H = 0.5 * (H + H.T)
        for _ in range(30):
            A = H @ H + mu * jnp.eye(x.size, dtype=x.dtype)
            step = -jnp.linalg.solve(A, H @ g)
            xn = x + step
            gnew = g_fn(xn, *args)
            gnn = float(jnp.linalg.norm(gnew))
            if gnn < gn:
                x, g, gn = xn, gnew, gnn
                mu = max(mu * 0.3, 1e-15)
                break
            mu *= 10.0
        else:
            break
        hist.append(gn)
    return unravel(x), {"grad_norm": np.array(hist), "converged": gn <= grad_tol, "iters": it}


def classify(
    f: Callable,
    params,
    *args,
    grad_tol: float = 1e-6,
    eig_tol: float = 1e-6,
    symmetry: bool = True,
    probe: bool = True,
    probe_steps=(1e-3, 1e-2),
) -> dict:
    """Classify ``params`` for the smooth loss ``f(params, *args)`` from its gradient and dense
    Hessian.

    Tolerances (stated in the result): stationary iff ``||g|| <= grad_tol``; an eigenvalue is
    zero iff ``|lambda| <= eig_tol * max(1, max |lambda|)``. With ``symmetry`` (untied
    :class:`jsdl.SDLParams`) the rescaling tangents are projected out first
    (:func:`~jsdl.landscape.hessian.complement_eigvalsh`), so the zero count is flatness beyond that
    symmetry.

    ``kind``:
      * ``'not_stationary'``: ``||g|| > grad_tol``;
      * ``'strict_saddle'``: a negative eigenvalue; ``index`` = number of negative eigenvalues;
      * ``'strict_minimum'``: all (projected) eigenvalues positive;
      * ``'degenerate_minimum'``: PSD with zero eigenvalues, and no decrease of ``f`` found along
        the zero-eigenvalue eigenvectors at ``probe_steps`` (both signs): second-order necessary
        conditions hold, higher orders are only probed, not certified;
      * ``'degenerate_saddle'``: PSD with zero eigenvalues but ``f`` decreases along one of them.
    """
    H = _hs.full_hessian(f, params, *args)
    fx, x, unravel, _ = _hs.flat_fn(f, params, args)
    g = jax.grad(fx)(x, *args)
    gn = float(jnp.linalg.norm(g))
    Hm = np.asarray(H.matrix, dtype=np.float64)
    Q = None
    if symmetry and isinstance(params, SDLParams) and params.W_D is not None:
        Q = np.asarray(_hs.rescaling_tangents(params, tol=1e-12))
    eigs = _hs.complement_eigvalsh(Hm, Q)
    scale = max(1.0, float(np.max(np.abs(eigs)))) if eigs.size else 1.0
    ztol = eig_tol * scale
    n_neg = int(np.sum(eigs < -ztol))
    n_zero = int(np.sum(np.abs(eigs) <= ztol))
    n_pos = int(np.sum(eigs > ztol))
    out = {
        "grad_norm": gn,
        "eigenvalues": eigs,
        "lambda_min": float(eigs[0]) if eigs.size else float("nan"),
        "lambda_max": float(eigs[-1]) if eigs.size else float("nan"),
        "n_neg": n_neg,
        "n_zero": n_zero,
        "n_pos": n_pos,
        "index": n_neg,
        "n_symmetry_removed": 0 if Q is None else int(Q.shape[0]),
        "grad_tol": grad_tol,
        "eig_tol": ztol,
        "loss": float(fx(x, *args)),
    }
    if gn > grad_tol:
        out["kind"] = "not_stationary"
    elif n_neg > 0:
        out["kind"] = "strict_saddle"
    elif n_zero == 0:
        out["kind"] = "strict_minimum"
    else:
        kind = "degenerate_minimum"
        descent = 0.0
        if probe:
            # eigenvectors of the zero eigenvalues, in the full (unprojected) space
            w, V = np.linalg.eigh(Hm)
            flat = V[:, np.abs(w) <= ztol]
            if Q is not None and Q.shape[0]:
                flat = flat - Q.T @ (Q @ flat)
            f0 = out["loss"]
            fj = jax.jit(fx)
            for j in range(flat.shape[1]):
                v = flat[:, j]
                nv = np.linalg.norm(v)
                if nv < 1e-8:
                    continue
                v = jnp.asarray(v / nv, x.dtype)
                for s in probe_steps:
                    for sign in (1.0, -1.0):
                        d = float(fj(x + sign * s * v, *args)) - f0
                        descent = min(descent, d)
            if descent < -max(1e-12, 1e-9 * abs(f0)):
                kind = "degenerate_saddle"
        out["kind"] = kind
        out["probe_min_change"] = descent
    return out
