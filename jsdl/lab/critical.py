"""Ground truth as a critical point of the penalised objective (penalty lab, part 3).

At the generating dictionary of Theorem 3.3 (eq. 15), ``W_E* = W_p^T``, ``W_D* = W_r`` (biases 0,
``n_q = n``), the reconstruction term is nearly stationary: only interference ``M > 0`` moves it
(Thm 3.3's bound). A sparsity penalty adds ``lambda * grad penalty``; the question is whether ground
truth stays a critical point of

    L_lambda(W) = E ||x_r - W_D sigma(W_E x_p + b_E) - b_D||^2 + lambda * penalty(x_q, W)     (eq. 3)

The ground-truth *family* has one free scale, the gain ``g`` of the encoder-decoder product (a
penalty that shrinks codes prefers ``g < 1``). How it is parameterised follows the decoder-norm
handling used in training:

* ``decoder_norm="unit"`` (penalties not invariant under the rescaling symmetry, e.g. L1): the
  decoder columns live on unit spheres, ``W = (g W_p^T, W_r)``. The gradient is the Riemannian one
  (the component of each decoder-column gradient along the column is removed) and the Hessian the
  Riemannian Hessian on the product of spheres, ``P (grad^2 L) P - diag(<w_D^i, d L/d w_D^i>)``
  restricted to the tangent space, so the normal directions are deflated exactly.
* ``decoder_norm="none"`` (rescaling-invariant penalties, e.g. decoder-weighted L1): ``W = (W_p^T,
  g W_r)`` and the per-latent rescaling tangents (exact null directions at a critical point,
  :func:`jsdl.landscape.rescaling_tangents`) are projected out of the Hessian.

The best gain is found by a 1-D search (a log grid, then golden section) on a fixed sample. The
gradient norm is compared with the *interference floor*: the same quantity for the reconstruction
term alone (lambda = 0) at its own best gain. Verdicts: ``not stationary`` when ``||grad L_lambda||
> max(floor_factor * floor, 1e-6 * scale)`` (``scale``: the gradient norm of the reconstruction term
at gain 1/2). Otherwise, where W* is an exact critical point of the reconstruction term (floor <=
1e-6 scale, e.g. without interference), ``local minimum`` when the smallest Hessian eigenvalue
(Lanczos on HVPs, symmetries out) is >= ``-eig_tol * lambda_max``, else ``saddle``; with
interference, ``at the interference floor`` (with or without negative curvature).
The smallest eigenvalues are reported at every coefficient (curvature along the frontier).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jsdl import objective as _obj

__all__ = ["ground_truth_point", "best_gain", "critical_point_analysis", "retrain_from_ground_truth"]


def ground_truth_point(spec: _obj.SDLSpec, W_p, W_r, gain: float = 1.0, *, decoder_norm: str = "unit",
                       threshold: Optional[float] = None, dtype=None) -> _obj.SDLParams:
    """Theorem 3.3's W* (eq. 15) with ``n_q = n`` as :class:`jsdl.SDLParams` for ``spec`` (zero
    biases; a JumpReLU threshold set to ``threshold``, default the activation's), at ``gain`` applied
    to the encoder (``decoder_norm="unit"``) or the decoder (``"none"``)."""
    W_p = jnp.asarray(W_p, dtype)
    W_r = jnp.asarray(W_r, dtype)
    n = W_p.shape[1]
    if spec.n_latents != n:
        raise ValueError(f"the ground-truth point needs n_latents == n_features: got n_latents={spec.n_latents}, n={n}")
    W_E, W_D = W_p.T, W_r
    if decoder_norm == "unit":
        W_E = gain * W_E
    else:
        W_D = gain * W_D
    th = None
    info = spec.activation.info
    if info.needs_threshold or info.inference_threshold:
        t = spec.activation.hyper_dict().get("threshold", 0.0) if threshold is None else threshold
        th = jnp.full((n,), t, W_p.dtype)
    return _obj.SDLParams(
        W_E=W_E,
        W_D=None if spec.tied else W_D,
        b_E=jnp.zeros((n,), W_p.dtype) if spec.bias else None,
        b_D=jnp.zeros((W_r.shape[0],), W_p.dtype) if spec.bias else None,
        threshold=th,
    )


_CACHE: dict = {}


def _compiled_fns(spec, penalty, decoder_norm, iters, params, x_p, x_r):
    """Jitted gradient, loss, gain-search and Hessian functions, shared by every analysis with the
    same spec, penalty, decoder-norm handling and shapes (the bench and its twin compile once).
    The ground-truth family enters through ``W_p``/``W_r`` closed over by ``make``, so the gain
    functions take the family's matrices as arguments."""
    shapes = tuple((a.shape, str(a.dtype)) for a in (params.W_E, params.decoder, x_p, x_r))
    k = (spec, penalty, decoder_norm, iters, shapes)
    if k not in _CACHE:
        loss = _loss_fn(spec, penalty)

        def one(g, W_p, W_r, xp, xr, coef):
            p = ground_truth_point(spec, W_p, W_r, g, decoder_norm=decoder_norm, dtype=xp.dtype)
            return loss(p, xp, xr, coef)

        f1 = jax.jit(one)
        fv = jax.jit(jax.vmap(one, in_axes=(0, None, None, None, None, None)))
        _CACHE[k] = (jax.jit(jax.grad(loss)), jax.jit(loss), (f1, fv),
                     _HessianProbe(loss, params, x_p, x_r, decoder_norm, iters))
        if len(_CACHE) > 8:
            _CACHE.pop(next(iter(_CACHE)))
    grad_fn, loss_j, (f1, fv), probe = _CACHE[k]
    # bind this bench's ground-truth matrices (the decoder of the gain-1 point is W_r; its encoder W_p^T)
    W_p, W_r = params.W_E.T, params.decoder  # params is the gain-1 point: (W_p^T, W_r)
    gain_fns = (lambda g, xp, xr, c: f1(g, W_p, W_r, xp, xr, c),
                lambda gs, xp, xr, c: fv(gs, W_p, W_r, xp, xr, c))
    return grad_fn, loss_j, gain_fns, probe


def _loss_fn(spec, name):
    def loss(params, x_p, x_r, coef):
        return _obj.sdl_loss(params, _obj.Batch(x_p=x_p, x_r=x_r), spec, coefs={name: coef})[0]

    return loss


def best_gain(loss, make_point, x_p, x_r, coef, *, lo: float = 0.02, hi: float = 3.0, grid: int = 48,
              iters: int = 40, _compiled=None) -> float:
    """argmin_g loss(make_point(g)) by a log grid on [lo, hi] then golden section in the bracketing
    interval (the objective along the family is smooth and unimodal in practice; the grid guards
    against a second basin)."""
    if _compiled is None:
        _compiled = _gain_fns(loss, make_point)
    f1, fv = _compiled
    f = lambda g: float(f1(jnp.asarray(g, x_p.dtype), x_p, x_r, coef))  # noqa: E731
    gs = np.geomspace(lo, hi, grid)
    vals = np.asarray(fv(jnp.asarray(gs, x_p.dtype), x_p, x_r, coef))
    vals = np.where(np.isfinite(vals), vals, np.inf)
    i = int(np.argmin(vals))
    a, b = gs[max(i - 1, 0)], gs[min(i + 1, grid - 1)]
    phi = (math.sqrt(5) - 1) / 2
    c, d = b - phi * (b - a), a + phi * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - phi * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + phi * (b - a)
            fd = f(d)
    g = 0.5 * (a + b)
    return float(g) if f(g) <= vals[i] else float(gs[i])


def _gain_fns(loss, make_point):
    def one(g, x_p, x_r, coef):
        return loss(make_point(g), x_p, x_r, coef)

    return jax.jit(one), jax.jit(jax.vmap(one, in_axes=(0, None, None, None)))


def _riemannian(grads: _obj.SDLParams, params: _obj.SDLParams, decoder_norm: str) -> _obj.SDLParams:
    if decoder_norm != "unit" or params.W_D is None:
        return grads
    W, g = params.W_D, grads.W_D
    coef = jnp.sum(g * W, axis=0, keepdims=True) / jnp.maximum(jnp.sum(W * W, axis=0, keepdims=True), 1e-30)
    return grads.replace(W_D=g - coef * W)


def _block_norms(tree: _obj.SDLParams) -> dict:
    out = {}
    for nm in ("W_E", "W_D", "b_E", "b_D", "threshold"):
        v = getattr(tree, nm)
        if v is not None:
            out[nm] = float(jnp.linalg.norm(v))
    return out


def _normal_directions(params: _obj.SDLParams) -> jax.Array:
    """Orthonormal rows ``[n_q, P]``: for each decoder column its own (unit) direction, zero
    elsewhere: the normal space of the product of unit spheres."""
    x, unravel = ravel_pytree(params)
    W = params.W_D
    n_q = W.shape[1]
    zero = jax.tree.map(jnp.zeros_like, params)

    def one(e):
        t = zero.replace(W_D=W * e[None, :] / jnp.maximum(jnp.linalg.norm(W, axis=0, keepdims=True), 1e-30))
        return ravel_pytree(t)[0]

    return jax.vmap(one)(jnp.eye(n_q, dtype=x.dtype))


def _weingarten(params: _obj.SDLParams, grads: _obj.SDLParams) -> jax.Array:
    """Flat vector: ``<w_D^i, dL/dw_D^i>`` on every entry of decoder column i, 0 elsewhere (the
    curvature term of the Riemannian Hessian on unit spheres, for unit columns)."""
    c = jnp.sum(params.W_D * grads.W_D, axis=0, keepdims=True)
    t = jax.tree.map(jnp.zeros_like, params).replace(W_D=jnp.broadcast_to(c, params.W_D.shape))
    return ravel_pytree(t)[0]


class _HessianProbe:
    """Smallest (and largest) eigenvalues of the Hessian of ``loss`` with the symmetry (``none``:
    rescaling tangents) or constraint (``unit``: sphere normals, Riemannian Hessian) directions
    deflated, by Lanczos with full reorthogonalisation (:func:`jsdl.landscape.lanczos`) on HVPs.
    Forward-over-reverse HVPs; a central difference of gradients when the penalty has a custom VJP
    (straight-through estimators have no forward mode). Compiled once, reused at every point."""

    def __init__(self, loss, params, x_p, x_r, decoder_norm, iters):
        from jsdl.landscape import hessian as _hs

        x, unravel = ravel_pytree(params)
        self.unravel, self.dim, self.decoder_norm = unravel, int(x.size), decoder_norm
        self.unit = decoder_norm == "unit" and params.W_D is not None
        n_defl = params.W_E.shape[0] if (self.unit or params.W_D is not None) else 0
        self.m = m = max(2, min(int(iters), self.dim - n_defl))

        def fx(xv, xp, xr, c):
            return loss(unravel(xv), xp, xr, c)

        g = jax.grad(fx)

        def hv_jvp(xv, v, xp, xr, c):
            return jax.jvp(lambda y: g(y, xp, xr, c), (xv,), (v,))[1]

        def hv_fd(xv, v, xp, xr, c):
            eps = jnp.sqrt(jnp.finfo(xv.dtype).eps) * jnp.maximum(1.0, jnp.linalg.norm(xv)) / jnp.maximum(
                jnp.linalg.norm(v), 1e-30)
            return (g(xv + eps * v, xp, xr, c) - g(xv - eps * v, xp, xr, c)) / (2 * eps)

        self.method, hv = "forward-over-reverse HVP", hv_jvp
        try:
            jax.jit(hv_jvp).lower(x, x, x_p, x_r, jnp.zeros((), x.dtype))
        except Exception:  # custom_vjp (straight-through) has no JVP rule
            hv, self.method = hv_fd, "central-difference HVP (straight-through penalty)"

        def op(xv, v, xp, xr, c, Q, w):
            v = v - Q.T @ (Q @ v)
            h = hv(xv, v, xp, xr, c)
            h = h - Q.T @ (Q @ h)
            return h - w * v

        def run(xv, v0, key, xp, xr, c, Q, w):
            alpha, beta, V = _hs.lanczos(lambda u: op(xv, u, xp, xr, c, Q, w), v0, m, ortho=Q, key=key)
            T = jnp.diag(alpha) + jnp.diag(beta, 1) + jnp.diag(beta, -1)
            theta, U = jnp.linalg.eigh(T)
            last = op(xv, V[-1], xp, xr, c, Q, w)
            last = last - Q.T @ (Q @ last)
            last = last - V.T @ (V @ last)
            res = jnp.abs(jnp.linalg.norm(last) * U[-1, :])
            return theta, res

        self._run = jax.jit(run)

    def __call__(self, params, grads, x_p, x_r, coef, key, k_smallest=3):
        from jsdl.landscape import hessian as _hs

        x, _ = ravel_pytree(params)
        if self.unit:
            Q, w = _normal_directions(params), _weingarten(params, grads)
        else:
            Q, w = _hs.rescaling_tangents(params, tol=0.0), jnp.zeros_like(x)
            if Q.shape[0] != params.W_E.shape[0]:  # keep one compiled shape: pad with zero rows
                Q = jnp.concatenate([Q, jnp.zeros((params.W_E.shape[0] - Q.shape[0], x.size), x.dtype)])
        v0 = jax.random.normal(key, x.shape, x.dtype)
        theta, res = self._run(x, v0, jax.random.fold_in(key, 1), x_p, x_r, jnp.asarray(coef, x.dtype), Q, w)
        theta, res = np.asarray(theta), np.asarray(res)
        return {"min": float(theta[0]), "max": float(theta[-1]), "smallest": theta[:k_smallest].tolist(),
                "residual_min": float(res[0]), "deflated": int(Q.shape[0]), "dim": self.dim,
                "hvp": self.method, "lanczos_iters": self.m}


def critical_point_analysis(key, spec: _obj.SDLSpec, penalty: str, bench, coefs: Sequence[float], *,
                            decoder_norm: str = "unit", n_samples: int = 8192, lanczos_iters: int = 40,
                            floor_factor: float = 1.5, eig_tol: float = 1e-4, x64: bool = True) -> dict:
    """Ground truth (Thm 3.3's W* at its best gain) as a critical point of the objective with
    ``penalty`` at each coefficient in ``coefs`` (and lambda = 0, the reference).

    Returns ``{"floor": {...}, "points": [ {coef, gain, loss, grad_norm, grad_blocks,
    grad_ratio, hessian: {min, max, smallest, ...}, verdict}, ... ], "settings": {...}}``. Runs
    under float64 by default (``x64``) on one fixed sample of ``n_samples`` rows from ``bench``."""
    ctx = jax.enable_x64(True) if x64 else _null()
    with ctx:
        dtype = jnp.float64 if x64 else jnp.float32
        k_data, k_lz = jax.random.split(key)
        b = bench.sample(k_data, n_samples)
        x_p = jnp.asarray(b.x_p, dtype)
        x_r = x_p if b.x_r is None else jnp.asarray(b.x_r, dtype)
        W_p, W_r = jnp.asarray(bench.W_p, dtype), jnp.asarray(bench.W_r, dtype)
        if b.features is not None:
            # A linear bench (x_p = W_p x, x_r = W_r x): recompute in the analysis precision, so the
            # interference-free twin's W* is exact to float64 rounding rather than float32's.
            f = jnp.asarray(b.features, dtype)
            xp2, xr2 = f @ W_p.T, f @ W_r.T
            tol = 1e-4 * float(jnp.max(jnp.abs(x_p))) + 1e-6
            if float(jnp.max(jnp.abs(xp2 - x_p))) <= tol and float(jnp.max(jnp.abs(xr2 - x_r))) <= tol:
                x_p, x_r = xp2, xr2
        loss = _loss_fn(spec, penalty)

        def make(g):
            return ground_truth_point(spec, W_p, W_r, g, decoder_norm=decoder_norm, dtype=dtype)

        grad_fn, loss_j, gain_fns, probe = _compiled_fns(spec, penalty, decoder_norm, int(lanczos_iters),
                                                     make(1.0), x_p, x_r)

        def at(coef, with_hessian=True):
            g = best_gain(loss, make, x_p, x_r, jnp.asarray(coef, dtype), _compiled=gain_fns)
            p = make(g)
            c = jnp.asarray(coef, dtype)
            gr = _riemannian(grad_fn(p, x_p, x_r, c), p, decoder_norm)
            flat = ravel_pytree(gr)[0]
            out = {"coef": float(coef), "gain": g, "loss": float(loss_j(p, x_p, x_r, c)),
                   "grad_norm": float(jnp.linalg.norm(flat)), "grad_blocks": _block_norms(gr)}
            if with_hessian:
                try:
                    out["hessian"] = probe(p, gr, x_p, x_r, c, k_lz)
                except Exception as e:  # a report, not a crash
                    out["hessian"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            return out

        floor = at(0.0)
        # the gradient scale: how hard the reconstruction term pulls when the codes are halved
        half = make(0.5)
        scale = float(jnp.linalg.norm(ravel_pytree(_riemannian(
            grad_fn(half, x_p, x_r, jnp.zeros((), dtype)), half, decoder_norm))[0]))
        tol = max(floor_factor * floor["grad_norm"], 1e-6 * scale)
        pts = []
        for c in coefs:
            r = at(float(c))
            r["grad_ratio"] = r["grad_norm"] / max(floor["grad_norm"], 1e-30)
            h = r.get("hessian", {})
            exact = floor["grad_norm"] <= 1e-6 * scale  # W* is a critical point of the reconstruction term
            convex = "min" in h and h["min"] >= -eig_tol * max(abs(h["max"]), 1e-30)
            if r["grad_norm"] > tol:
                r["verdict"] = "not stationary"
            elif "min" not in h:
                r["verdict"] = "stationary (Hessian unavailable)" if exact else "at the interference floor"
            elif exact:
                r["verdict"] = "local minimum" if convex else "saddle"
            else:
                r["verdict"] = ("at the interference floor, no negative curvature" if convex else
                                "at the interference floor, negative curvature")
            pts.append(r)
    return {"floor": floor, "points": pts, "grad_scale": scale, "tolerance": tol,
            "settings": {"decoder_norm": decoder_norm, "n_samples": n_samples, "lanczos_iters": lanczos_iters,
                         "floor_factor": floor_factor, "eig_tol": eig_tol, "dtype": "float64" if x64 else "float32"}}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def retrain_from_ground_truth(key, spec: _obj.SDLSpec, penalty: str, bench, coefs: Sequence[float], gains,
                              config, *, decoder_norm: str = "unit") -> dict:
    """Train from the ground-truth point (each coefficient at its own best gain, all coefficients as
    one vmapped population on one data stream) for ``config.steps`` steps and measure how far
    training moves: distance of encoder and decoder from their start relative to ``||W_p||`` and
    ``||W_r||`` (the gain-1 norms), mean cosine between
    latent i and feature i (encoder rows vs ``w_p^i``, decoder columns vs ``w_r^i``), and the final
    loss terms. Returns ``{"points": [...]}`` in the order of ``coefs``."""
    from jsdl.train import Stepper, init_state
    from jsdl.train.loop import population_data_key

    coefs = [float(c) for c in coefs]
    P = len(coefs)
    W_p, W_r = jnp.asarray(bench.W_p), jnp.asarray(bench.W_r)
    d_in = W_p.shape[0]
    d_t = W_r.shape[0]
    dkey = population_data_key(key)

    def one(c):
        return init_state(key, spec, config, d_in, d_t, data_key=dkey, coefs={penalty: c})

    state = jax.vmap(one)(jnp.asarray(coefs))
    starts = [ground_truth_point(spec, W_p, W_r, g, decoder_norm=decoder_norm) for g in gains]
    start = jax.tree.map(lambda *a: jnp.stack(a), *starts)
    state = state.replace(params=start)
    stepper = Stepper(spec, config, data_mode="bench", n_members=P, devices=jax.devices()[:1], bench=bench)
    state = stepper.place_state(state)
    data_arg = stepper.place_data(bench)
    for _ in range(config.steps):
        state = stepper.step(state, data_arg, None)
    final = jax.device_get(state.params)
    metrics = jax.device_get(state.metrics)
    out = []
    for i, c in enumerate(coefs):
        p0 = starts[i]
        p = jax.tree.map(lambda x: x[i], final)

        def rel(a, b, ref):
            return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(ref), 1e-30))

        def diag_cos(L, T):
            Ln = L / jnp.maximum(jnp.linalg.norm(L, axis=0, keepdims=True), 1e-30)
            return float(jnp.mean(jnp.sum(Ln * T, axis=0)))

        cnt = max(int(np.atleast_1d(metrics["count"])[i]), 1)
        out.append({
            "coef": c,
            "rel_dist_W_E": rel(p.W_E, p0.W_E, W_p),
            "rel_dist_W_D": rel(p.decoder, p0.decoder, W_r),
            "cos_encoder": diag_cos(p.W_E.T, W_p),
            "cos_decoder": diag_cos(p.decoder, W_r),
            "fvu_mean": float(np.atleast_1d(metrics["fvu"])[i]) / cnt,
            "l0_mean": float(np.atleast_1d(metrics["l0"])[i]) / cnt,
            "params": p,
        })
    return {"points": out, "steps": config.steps}
