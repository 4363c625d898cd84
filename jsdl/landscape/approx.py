"""Approximate per-feature loss (Theorem 3.1), activation patterns and regions (Theorem 3.2).

Notation (paper section 1): ground-truth features ``x in R^n_+``, input ``x_p = W_p x``
(``W_p [n_p, n]``, unit columns ``w_p^d``), target ``x_r = W_r x`` (``W_r [n_r, n]``), encoder
``W_E [n_q, n_p]``, decoder ``W_D [n_r, n_q]``, ``sigma(z)_i in {0, z_i}`` (eq. 10). Biases are
omitted, as in the theory.

* **Per-feature codes** ``Z = sigma(W_E W_p)`` ``[n_q, n]``: column ``z_d = sigma(W_E w_p^d)`` is
  the code of feature ``d`` appearing alone with unit magnitude.
* **Approximate loss** (eq. 11): ``L~ = sum_d M_d ||w_r^d - W_D z_d||^2`` with
  ``M_d = P(x = x_d e_d) E[x_d^2 | x_d > 0]``. For the independent Bernoulli(1-S) law with
  magnitudes ``c_min + Exp(beta)`` this is ``(1-S) S^(n-1) (c_min^2 + 2 c_min beta + 2 beta^2)``.
* **Activation pattern** ``P = Z > 0`` ``[n_q, n]`` (bool): ``P[i, d]`` says latent ``i`` fires for
  feature ``d`` alone (the paper's F_i is row ``i``; A(d) is column ``d``). A region
  ``Omega_P`` (eq. 13) is the set of encoders with the same pattern; for ReLU, JumpReLU and Top-k
  it is an intersection of linear (in)equalities in ``W_E``, hence convex.
* **Frozen-mask loss**: inside one region ``z_d`` is the *linear* map ``P[:, d] * (W_E w_p^d)``;
  :func:`approx_loss_frozen` uses this form with the mask under ``stop_gradient`` so that first
  and second derivatives are those of the smooth piece of ``L~`` on ``Omega_P`` (Theorem 3.2).

The Monte-Carlo loss :func:`mc_loss` evaluates eq. 3 with :func:`jsdl.sdl_loss` on samples of a
Bench (anything with ``.sample(key, B) -> jsdl.Batch``); :func:`multi_feature_gap` computes
``L - L~`` by stratifying on the number of active features, which is far more precise than plain
Monte Carlo when ``1-S`` is small.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jsdl import activations as _act
from jsdl.data.bench import SparseLaw
from jsdl.objective import Batch, SDLParams, SDLSpec, decode, encode, make_spec, sdl_loss

__all__ = [
    "FeatureProblem",
    "SparseLaw",
    "make_problem",
    "theory_params",
    "feature_weights",
    "codes_per_feature",
    "approx_loss",
    "activation_pattern",
    "pattern_summary",
    "in_region",
    "frozen_codes",
    "approx_loss_frozen",
    "spec_for",
    "mc_loss",
    "multi_feature_gap",
    "theorem_3_1_bound",
]


# ------------------------------------------------------------------------------------------------
# A feature problem: (W_p, W_r, M_d, sigma)
# ------------------------------------------------------------------------------------------------


@struct.dataclass
class FeatureProblem:
    """Everything the approximate loss needs: ``W_p [n_p, n]``, ``W_r [n_r, n]``, ``M [n]`` and the
    activation ``sigma`` (a bound :class:`jsdl.activations.Activation`, static)."""

    W_p: jax.Array
    W_r: jax.Array
    M: jax.Array
    activation: _act.Activation = struct.field(pytree_node=False, default=_act.Activation("relu"))

    @property
    def n_features(self) -> int:
        return self.W_p.shape[1]

    @classmethod
    def from_bench(cls, bench, activation: str | _act.Activation = "relu", **hyper) -> "FeatureProblem":
        """Problem of a :class:`jsdl.data.Bench`: its ``W_p``, ``W_r`` and ``feature_weights()``."""
        M = bench.feature_weights() if hasattr(bench, "feature_weights") else SparseLaw.from_bench(bench).weights(
            bench.W_p.shape[1]
        )
        return make_problem(bench.W_p, bench.W_r, M, activation, **hyper)


def make_problem(
    W_p,
    W_r=None,
    M: Any = 1.0,
    activation: str | _act.Activation = "relu",
    **hyper: Any,
) -> FeatureProblem:
    """Build and validate a :class:`FeatureProblem` from explicit matrices.

    ``W_r`` defaults to ``W_p`` (SAE). ``M`` is a scalar (same weight for every feature), an array
    ``[n]``, or a :class:`SparseLaw` (then ``M_d`` is computed from it). ``activation`` is a name
    (``'relu'``, ``'relu|topk'`` with ``k=1``, ``'jumprelu'``...) or a bound activation."""
    W_p = jnp.asarray(W_p)
    if W_p.ndim != 2:
        raise ValueError(f"W_p must be a matrix [n_p, n], got shape {tuple(W_p.shape)}")
    n = W_p.shape[1]
    W_r = W_p if W_r is None else jnp.asarray(W_r, W_p.dtype)
    if W_r.ndim != 2 or W_r.shape[1] != n:
        raise ValueError(f"W_r must be [n_r, n={n}] (one column per feature), got shape {tuple(W_r.shape)}")
    if isinstance(M, SparseLaw):
        M = M.weights(n)
    M = jnp.broadcast_to(jnp.asarray(M, W_p.dtype), (n,)) if np.ndim(M) == 0 else jnp.asarray(M, W_p.dtype)
    if M.shape != (n,):
        raise ValueError(f"M must be a scalar or have shape [n={n}], got shape {tuple(M.shape)}")
    if not bool(jnp.all(M >= 0)):
        raise ValueError("M (feature weights M_d) must be >= 0")
    if isinstance(activation, str):
        activation = _act.get(activation, **hyper)
    elif hyper:
        raise ValueError(f"activation hyperparameters {sorted(hyper)} given with an already bound activation")
    if activation.info.batch_coupled:
        raise ValueError(
            f"activation {activation.name!r} couples samples of a batch; the per-feature loss of Thm 3.1 "
            "treats each feature alone: use 'topk' instead"
        )
    return FeatureProblem(W_p=W_p, W_r=W_r, M=M, activation=activation)


def theory_params(W_E, W_D=None, threshold=None) -> SDLParams:
    """Bias-free :class:`jsdl.SDLParams` for the theory (``W_D=None`` means tied, ``W_D = W_E^T``)."""
    W_E = jnp.asarray(W_E)
    return SDLParams(
        W_E=W_E,
        W_D=None if W_D is None else jnp.asarray(W_D, W_E.dtype),
        threshold=None if threshold is None else jnp.asarray(threshold, W_E.dtype),
    )


def feature_weights(source, n: Optional[int] = None) -> jax.Array:
    """``M_d`` ``[n]`` of Thm 3.1 from a Bench (``feature_weights()``), a :class:`SparseLaw`
    (needs ``n``) or a :class:`FeatureProblem`."""
    if isinstance(source, FeatureProblem):
        return source.M
    if isinstance(source, SparseLaw):
        if n is None:
            raise ValueError("feature_weights(SparseLaw) needs n (the number of features)")
        return jnp.asarray(source.weights(n))
    if hasattr(source, "feature_weights"):
        return jnp.asarray(source.feature_weights())
    raise TypeError(f"cannot get feature weights from {type(source).__name__}")


def _check(params: SDLParams, problem: FeatureProblem):
    if not isinstance(params, SDLParams):
        raise TypeError(f"params must be jsdl.SDLParams, got {type(params).__name__} (see theory_params)")
    if params.b_E is not None or params.b_D is not None or params.W_S is not None:
        raise ValueError(
            "the approximate loss of Thm 3.1 has no biases or skip: build params with "
            "make_spec(..., bias=False) or landscape.theory_params(W_E, W_D)"
        )
    if params.W_E.shape[1] != problem.W_p.shape[0]:
        raise ValueError(f"W_E is {tuple(params.W_E.shape)} but W_p is {tuple(problem.W_p.shape)}: n_p differs")
    if params.decoder.shape[0] != problem.W_r.shape[0]:
        raise ValueError(
            f"decoder is {tuple(params.decoder.shape)} but W_r is {tuple(problem.W_r.shape)}: n_r differs"
        )


# ------------------------------------------------------------------------------------------------
# Codes, loss, patterns
# ------------------------------------------------------------------------------------------------


@jax.jit
def pre_activations_per_feature(params: SDLParams, problem: FeatureProblem) -> jax.Array:
    """``W_E W_p`` ``[n_q, n]``: pre-activation of latent ``i`` for feature ``d`` alone."""
    return params.W_E @ problem.W_p


@jax.jit
def codes_per_feature(params: SDLParams, problem: FeatureProblem) -> jax.Array:
    """``Z = sigma(W_E W_p)`` ``[n_q, n]``; column ``d`` is ``z_d``. (sigma acts on the latent axis of
    each feature, so Top-k selects among latents for every feature.)"""
    _check(params, problem)
    z = pre_activations_per_feature(params, problem).T  # [n, n_q]: one "sample" per feature
    return problem.activation(z, params).T


@jax.jit
def approx_loss(params: SDLParams, problem: FeatureProblem) -> jax.Array:
    """Eq. 11: ``L~ = sum_d M_d ||w_r^d - W_D sigma(W_E w_p^d)||^2`` (scalar)."""
    Z = codes_per_feature(params, problem)
    R = problem.W_r - params.decoder @ Z
    return jnp.sum(problem.M * jnp.sum(R * R, axis=0))


@jax.jit
def activation_pattern(params: SDLParams, problem: FeatureProblem) -> jax.Array:
    """``P = sigma(W_E W_p) > 0`` as a bool ``[n_q, n]`` (the region id). ``P[i, d]``: latent ``i``
    fires for feature ``d`` alone."""
    return codes_per_feature(params, problem) > 0


def pattern_summary(P) -> dict:
    """Summary of an activation pattern ``P [n_q, n]`` (bool), in plain Python/numpy.

    Keys: ``n_latents``, ``n_features``, ``dead`` (latents firing for no feature, ``F_i`` empty),
    ``monosemantic`` (``|F_i| = 1``), ``polysemantic`` (``|F_i| >= 2``), ``n_dead``, ``n_mono``,
    ``n_poly``, ``uncovered`` (features firing no latent), ``multi_covered`` (features firing
    several latents), ``is_partition`` (every feature fires exactly one latent, Thm 3.6's
    hypothesis), ``is_polysemantic`` (Definition 3.1), ``sets`` (the ``F_i`` as lists)."""
    P = np.asarray(P, dtype=bool)
    if P.ndim != 2:
        raise ValueError(f"pattern must be a bool matrix [n_q, n], got shape {P.shape}")
    per_latent = P.sum(1)
    per_feature = P.sum(0)
    dead = np.flatnonzero(per_latent == 0)
    mono = np.flatnonzero(per_latent == 1)
    poly = np.flatnonzero(per_latent >= 2)
    return {
        "n_latents": int(P.shape[0]),
        "n_features": int(P.shape[1]),
        "dead": dead.tolist(),
        "monosemantic": mono.tolist(),
        "polysemantic": poly.tolist(),
        "n_dead": int(dead.size),
        "n_mono": int(mono.size),
        "n_poly": int(poly.size),
        "uncovered": np.flatnonzero(per_feature == 0).tolist(),
        "multi_covered": np.flatnonzero(per_feature >= 2).tolist(),
        "is_partition": bool(np.all(per_feature == 1)),
        "is_polysemantic": bool(poly.size > 0),
        "sets": [np.flatnonzero(row).tolist() for row in P],
    }


@jax.jit
def in_region(params: SDLParams, delta, problem: FeatureProblem, *, pattern=None) -> jax.Array:
    """Whether ``params + delta`` (a pytree like ``params``) has the same activation pattern as
    ``params`` (or as ``pattern``). Regions of ReLU / JumpReLU / Top-k are convex (intersections of
    linear inequalities in ``W_E``), so this also certifies the whole segment. jit-able (returns a
    bool array)."""
    P0 = activation_pattern(params, problem) if pattern is None else jnp.asarray(pattern, bool)
    moved = jax.tree.map(lambda a, b: a + b, params, delta)
    return jnp.all(activation_pattern(moved, problem) == P0)


@jax.jit
def frozen_codes(params: SDLParams, problem: FeatureProblem, mask) -> jax.Array:
    """Codes with the activation mask held fixed: ``z_d = mask[:, d] * (W_E w_p^d)`` ``[n_q, n]``.
    Linear in ``W_E`` (eq. 37); equal to :func:`codes_per_feature` wherever the pattern is ``mask``
    (because ``sigma(z)_i in {0, z_i}``)."""
    _check(params, problem)
    pre = pre_activations_per_feature(params, problem)
    return jnp.where(jnp.asarray(mask, bool), pre, jnp.zeros_like(pre))


@jax.jit
def approx_loss_frozen(params: SDLParams, problem: FeatureProblem, mask=None) -> jax.Array:
    """``L~`` restricted to the region of ``mask`` (default: the pattern at ``params``, computed under
    ``stop_gradient``). It is the smooth quadratic-in-each-block piece of Theorem 3.2: derivatives
    of any order are taken inside one region, also at points on its boundary."""
    if mask is None:
        mask = jax.lax.stop_gradient(activation_pattern(params, problem))
    Z = frozen_codes(params, problem, mask)
    R = problem.W_r - params.decoder @ Z
    return jnp.sum(problem.M * jnp.sum(R * R, axis=0))


# ------------------------------------------------------------------------------------------------
# The true loss (eq. 3) by Monte Carlo, and the multi-feature gap L - L~
# ------------------------------------------------------------------------------------------------


def spec_for(problem: FeatureProblem, n_latents: int, *, tied: bool = False) -> SDLSpec:
    """A bias-free :class:`jsdl.SDLSpec` with the problem's activation: ``'sae'`` when
    ``W_r is W_p`` (same shape and values), ``'transcoder'`` otherwise. Always the dense objective
    (``sparse=False``), which forward-mode autodiff (Hessians) can differentiate."""
    same = problem.W_r.shape == problem.W_p.shape and bool(jnp.all(problem.W_r == problem.W_p))
    return make_spec(
        "sae" if same else "transcoder",
        problem.activation.name,
        n_latents,
        tied=tied,
        bias=False,
        sparse=False,  # Hessians/HVPs need forward-mode autodiff; the sparse kernels' custom VJP has none
        **problem.activation.hyper_dict(),
    )


@partial(jax.jit, static_argnames=("spec", "batch_size"))
def _mc_batch(k, params, data, spec, batch_size):
    # module-level and jitted with the data source as an operand, so repeated calls reuse one compile
    batch = data.sample(k, batch_size)
    x_p, x_r = batch.x_p, batch.x_r
    x_r = x_p if x_r is None else x_r
    _, aux = sdl_loss(params, Batch(x_p, x_r), spec)
    # per-sample squared errors, for the standard error
    x_hat = decode(params, encode(params, x_p, spec), spec, x_p)
    err = jnp.sum((x_r.reshape(x_hat.shape) - x_hat) ** 2, axis=-1)
    return aux["mse"], jnp.mean(err * err)


def mc_loss(
    key: jax.Array,
    params: SDLParams,
    spec: SDLSpec,
    data,
    *,
    n_samples: int = 65536,
    batch_size: int = 8192,
) -> tuple[float, float]:
    """Monte-Carlo estimate of ``L_SDL`` (eq. 3, the ``mse`` of :func:`jsdl.sdl_loss`) on
    ``n_samples`` draws of ``data.sample(key, batch_size)``; returns ``(mean, standard error)``."""
    if n_samples < batch_size:
        batch_size = n_samples
    n_batches = max(1, n_samples // batch_size)
    if all(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in jax.tree.leaves(data)):
        one = lambda k: _mc_batch(k, params, data, spec, batch_size)  # noqa: E731
    else:  # not a pytree of arrays (e.g. a plain object with .sample): close over it
        one = jax.jit(lambda k: _mc_batch.__wrapped__(k, params, data, spec, batch_size))

    keys = jax.random.split(key, n_batches)
    means, sq = [], []
    for k in keys:
        m, s = one(k)
        means.append(float(m))
        sq.append(float(s))
    mean = float(np.mean(means))
    var = max(float(np.mean(sq)) - mean * mean, 0.0)
    return mean, math.sqrt(var / (n_batches * batch_size))


def _binom_pmf(m: np.ndarray, n: int, p: float) -> np.ndarray:
    logc = np.array([math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) for k in m])
    with np.errstate(divide="ignore"):
        return np.exp(logc + m * np.log(p) + (n - m) * np.log1p(-p))


@partial(jax.jit, static_argnames=("n_per_m",))
def _gap_stats(k, m, params, problem, law, n_per_m):
    """Mean, standard error and max of the per-sample loss given exactly ``m`` active features."""
    n = problem.n_features
    k1, k2 = jax.random.split(k)
    # a uniform m-subset per row: the m smallest of n uniforms
    u = jax.random.uniform(k1, (n_per_m, n), problem.W_p.dtype)
    kth = jnp.sort(u, axis=1)[jnp.arange(n_per_m), m - 1][:, None]
    active = u <= kth
    x = jnp.where(active, law.sample_magnitudes(k2, (n_per_m, n), u.dtype), 0.0)
    xp = x @ problem.W_p.T
    xr = x @ problem.W_r.T
    codes = problem.activation(xp @ params.W_E.T, params)
    e = jnp.sum((xr - codes @ params.decoder.T) ** 2, axis=-1)
    return jnp.mean(e), jnp.std(e) / math.sqrt(n_per_m), jnp.max(e)


def multi_feature_gap(
    key: jax.Array,
    params: SDLParams,
    problem: FeatureProblem,
    law: SparseLaw,
    sparsities,
    *,
    n_per_m: int = 4096,
    m_max: Optional[int] = None,
) -> dict:
    """``L - L~`` for each sparsity in ``sparsities``, stratified by the number ``m`` of active
    features (proof of Thm 3.1).

    With independent features, ``L = sum_m P(m) e_m`` where ``P(m) = Binom(m; n, 1-S)`` and
    ``e_m = E[loss | exactly m active]`` does not depend on ``S``; the ``m = 1`` term is exactly
    ``L~`` (positive homogeneity), so ``L - L~ = sum_{m >= 2} P(m) e_m``. ``e_m`` is estimated once
    by Monte Carlo (``n_per_m`` draws of a uniform ``m``-subset with magnitudes from ``law``) for
    ``m = 2..m_max`` (default ``min(n, 12)``); the tail ``m > m_max`` is bounded by
    ``P(m > m_max) * max(e)`` and reported as ``tail_bound``.

    Returns a dict of numpy arrays: ``sparsity``, ``gap``, ``gap_se`` (Monte-Carlo standard error),
    ``tail_bound``, ``p_multi`` (``P(m >= 2)``), ``e_m``, ``C_hat`` (largest loss seen in the
    ``m >= 2`` draws: an empirical stand-in for the sup ``C`` of Thm 3.1, which is infinite for
    unbounded magnitudes), ``approx`` (``L~`` with ``M_d`` of ``law`` at each sparsity; ``M`` of
    ``problem`` is not used) and ``mean_loss`` (``L = L~ + gap``)."""
    n = problem.n_features
    m_max = min(n, 12) if m_max is None else min(int(m_max), n)
    if m_max < 2:
        raise ValueError(f"m_max must be >= 2, got {m_max}")
    Z = codes_per_feature(params, problem)
    per_feature = np.asarray(jnp.sum((problem.W_r - params.decoder @ Z) ** 2, axis=0), dtype=np.float64)

    def stats(k, m):
        return _gap_stats(k, m, params, problem, law, n_per_m)

    ms = np.arange(2, m_max + 1)
    e_m, se_m, mx = [], [], []
    for m in ms:
        a, b, c = stats(jax.random.fold_in(key, int(m)), jnp.asarray(m))
        e_m.append(float(a))
        se_m.append(float(b))
        mx.append(float(c))
    e_m, se_m = np.array(e_m), np.array(se_m)
    S = np.asarray(sparsities, dtype=np.float64)
    gaps, ses, tails, pmulti = [], [], [], []
    for s in S:
        p = _binom_pmf(ms, n, 1 - s)
        gaps.append(float(p @ e_m))
        ses.append(float(np.sqrt((p * p) @ (se_m * se_m))))
        p_tail = max(0.0, 1.0 - _binom_pmf(np.arange(0, m_max + 1), n, 1 - s).sum())
        tails.append(p_tail * float(np.max(e_m)))
        pmulti.append(1.0 - float(_binom_pmf(np.array([0, 1]), n, 1 - s).sum()))
    gaps = np.array(gaps)
    approx = np.array([float(SparseLaw(float(s), law.c_min, law.beta).weights(n) @ per_feature) for s in S])
    return {
        "sparsity": S,
        "gap": gaps,
        "gap_se": np.array(ses),
        "tail_bound": np.array(tails),
        "p_multi": np.array(pmulti),
        "e_m": e_m,
        "C_hat": float(np.max(mx)),
        "approx": approx,
        "mean_loss": approx + gaps,
    }


def theorem_3_1_bound(n: int, C: float, sparsity) -> np.ndarray:
    """The bound of eq. 12, ``n^2 C (1-S)^2``."""
    s = np.asarray(sparsity, dtype=np.float64)
    return n * n * C * (1 - s) ** 2
