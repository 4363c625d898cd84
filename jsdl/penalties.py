"""Sparsity penalties and auxiliary losses of the SDL objective, and their registry.

A penalty is a pure function ``penalty(codes, params, **hyper) -> scalar`` where ``codes`` is
``x_q = sigma(W_E x_p + b_E)`` of shape ``[B, n_q]`` and ``params`` the :class:`~jsdl.SDLParams`.
It returns the **batch mean of a per-sample sum over latents** (so coefficients are comparable
across batch sizes). The objective adds ``sum_j lambda_j * penalty_j``.

Define and register a new one in a few lines::

    @jsdl.penalties.register("sqrt")
    def sqrt_penalty(codes, params, *, eps=1e-6):
        return jnp.sum(jnp.sqrt(jnp.abs(codes) + eps), axis=-1).mean()

Optional keyword-only arguments are hyperparameters. Two names are *injected* by the objective when
the function declares them, rather than set by the user:

* ``pre_acts``: the pre-activations ``z = W_E x_p + b_E`` ``[B, n_q]`` (the L0 straight-through
  penalty needs them: a code just below its threshold is 0 but still carries gradient);
* ``n_sources``: the number of crosscoder sources (decoder-norm weights are then the *sum* of the
  per-source decoder-block norms, as in Lindsey et al. 2024).

Registration info: ``straight_through=True`` declares that the gradient is a pseudo-gradient (the
penalty lab and finite-difference tests treat it so); ``needs_threshold=True`` that it needs a
learned per-latent threshold (a JumpReLU activation).
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jsdl.activations import heaviside_ste

__all__ = ["register", "get", "names", "info", "Penalty", "decoder_norms", "auxk_loss", "anchor_loss"]

INJECTED = ("pre_acts", "n_sources")

_REGISTRY: dict[str, tuple[Callable, "PenaltyInfo"]] = {}


@dataclasses.dataclass(frozen=True)
class PenaltyInfo:
    straight_through: bool = False
    needs_threshold: bool = False
    doc: str = ""


def register(name: str, *, straight_through: bool = False, needs_threshold: bool = False):
    """Decorator registering ``fn(codes, params, **hyper) -> scalar`` under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"penalty name must be a non-empty string, got {name!r}")

    def deco(fn: Callable) -> Callable:
        params = list(inspect.signature(fn).parameters.values())
        if len(params) < 2 or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
            raise TypeError(
                f"penalty {name!r}: signature must be fn(codes, params, **hyper), got {inspect.signature(fn)}"
            )
        doc = (fn.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[name] = (fn, PenaltyInfo(straight_through, needs_threshold, doc))
        return fn

    return deco


def names() -> list[str]:
    return sorted(_REGISTRY)


def _lookup(name: str):
    if name not in _REGISTRY:
        raise ValueError(f"unknown penalty {name!r}; known penalties: {', '.join(names())}")
    return _REGISTRY[name]


def info(name: str) -> PenaltyInfo:
    return _lookup(name)[1]


def hyper_defaults(name: str) -> dict[str, Any]:
    fn, _ = _lookup(name)
    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in INJECTED
    }


def wants(name: str) -> set[str]:
    """Which injected arguments (``pre_acts``, ``n_sources``) the penalty declares."""
    fn, _ = _lookup(name)
    return {p for p in inspect.signature(fn).parameters if p in INJECTED}


@dataclasses.dataclass(frozen=True)
class Penalty:
    """A bound penalty: name and hyperparameters (hashable, so a spec holding it is jit-static)."""

    name: str
    hyper: tuple[tuple[str, Any], ...] = ()

    def __call__(self, codes, params, **injected):
        fn, _ = _REGISTRY[self.name]
        want = wants(self.name)
        extra = {k: v for k, v in injected.items() if k in want}
        return fn(codes, params, **dict(self.hyper), **extra)


def get(name: str, **hyper: Any) -> Penalty:
    """The penalty registered as ``name`` bound to ``hyper``; unknown names and hyperparameters
    raise ValueError listing what is allowed."""
    if not isinstance(name, str):
        raise TypeError(f"penalty must be a name (str), got {type(name).__name__}")
    defaults = hyper_defaults(name)
    unknown = set(hyper) - set(defaults)
    if unknown:
        raise ValueError(
            f"penalty {name!r} does not take {sorted(unknown)}; it accepts {sorted(defaults) or 'no hyperparameters'}"
        )
    full = {**defaults, **hyper}
    if name == "lp" and not (0 < float(full["p"]) <= 1):
        raise ValueError(f"penalty 'lp': p must be in (0, 1], got {full['p']!r}")
    for key in ("eps", "bandwidth", "scale"):
        if key in full and not float(full[key]) > 0:
            raise ValueError(f"penalty {name!r}: {key} must be > 0, got {full[key]!r}")
    return Penalty(name=name, hyper=tuple(sorted(full.items())))


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def decoder_norms(params, n_sources: int = 1) -> jax.Array:
    """Per-latent decoder norms ``[n_q]``: ||w_D^i||_2, or for a crosscoder with ``n_sources``
    stacked decoder blocks, sum_l ||w_D^{i,(l)}||_2. Tied models use the encoder rows."""
    W_D = params.W_D if params.W_D is not None else params.W_E.T
    if n_sources <= 1:
        return jnp.sqrt(jnp.sum(W_D * W_D, axis=0))
    blocks = W_D.reshape(n_sources, W_D.shape[0] // n_sources, W_D.shape[1])
    return jnp.sum(jnp.sqrt(jnp.sum(blocks * blocks, axis=1)), axis=0)


def _per_sample_mean(x):
    return jnp.mean(jnp.sum(x, axis=-1))


# ----------------------------------------------------------------------------------------------
# Built-in penalties
# ----------------------------------------------------------------------------------------------


@register("l1")
def l1(codes, params):
    """L1 (eq. 5): E sum_i |x_q,i|."""
    return _per_sample_mean(jnp.abs(codes))


@register("weighted_l1")
def weighted_l1(codes, params, *, n_sources=1):
    """Decoder-norm-weighted L1 (Anthropic April update; crosscoders): E sum_i |x_q,i| ||w_D^i||."""
    return _per_sample_mean(jnp.abs(codes) * decoder_norms(params, n_sources))


@register("l0", straight_through=True, needs_threshold=True)
def l0(codes, params, *, pre_acts=None, bandwidth=0.001):
    """L0 via the JumpReLU straight-through estimator: E sum_i H(z_i - theta_i); the threshold
    receives the rectangle-kernel pseudo-gradient -(1/bandwidth) K((z - theta)/bandwidth)."""
    th = getattr(params, "threshold", None)
    if th is None or pre_acts is None:
        return _per_sample_mean((codes != 0).astype(codes.dtype))
    return _per_sample_mean(heaviside_ste(pre_acts, th.astype(pre_acts.dtype), jnp.asarray(bandwidth, pre_acts.dtype)))


@register("tanh")
def tanh(codes, params, *, scale=1.0, n_sources=1):
    """tanh penalty (Anthropic 2024): E sum_i tanh(scale |x_q,i| ||w_D^i||)."""
    return _per_sample_mean(jnp.tanh(scale * jnp.abs(codes) * decoder_norms(params, n_sources)))


@register("lp")
def lp(codes, params, *, p=0.5, eps=1e-8):
    """L_p quasi-norm, 0 < p <= 1: E sum_i (|x_q,i| + eps)^p - eps^p (eps keeps the gradient finite
    at 0 for p < 1; the offset makes the penalty 0 at 0)."""
    a = jnp.abs(codes)
    return _per_sample_mean((a + eps) ** p - eps**p)


@register("log")
def log_penalty(codes, params, *, eps=1e-2):
    """Log penalty (reweighted-L1 surrogate): E sum_i log(1 + |x_q,i| / eps)."""
    return _per_sample_mean(jnp.log1p(jnp.abs(codes) / eps))


# ----------------------------------------------------------------------------------------------
# Auxiliary losses (not sparsity penalties: they read state the penalty signature does not carry)
# ----------------------------------------------------------------------------------------------


def auxk_loss(pre_acts, residual, W_D, dead_mask, k_aux: int):
    """AuxK loss of Gao et al. 2024: the top-``k_aux`` *dead* latents reconstruct the residual
    ``e = x_r - x_r_hat`` (stop-gradient), normalised by the residual's variance::

        L_aux = ||e - W_D z_aux||^2 / ||e - mean(e)||^2,
        z_aux = TopK_{k_aux}(ReLU(z) restricted to dead latents).

    (The paper's eq. 8 writes it as reconstructing x_p with another decoder; Gao's form is the one
    used in practice.) Returns 0 when no latent is dead. Shapes: pre_acts [B, n_q], residual
    [B, n_r], W_D [n_r, n_q], dead_mask [n_q] bool."""
    residual = jax.lax.stop_gradient(residual)
    k_aux = min(int(k_aux), pre_acts.shape[-1])
    masked = jnp.where(dead_mask[None, :], jax.nn.relu(pre_acts), 0.0)
    vals, idx = jax.lax.top_k(masked, k_aux)
    rows = jnp.arange(masked.shape[0])[:, None]
    z_aux = jnp.zeros_like(masked).at[rows, idx].set(vals)
    rec = z_aux @ W_D.T
    num = jnp.sum((residual - rec) ** 2)
    den = jnp.sum((residual - residual.mean(0)) ** 2) + 1e-12
    return jnp.where(jnp.any(dead_mask), num / den, 0.0)


def anchor_loss(params, anchors) -> jax.Array:
    """Feature-anchoring loss (paper eq. 26)::

        L_anchor = ||W_E[idx, :] - A_p^T||_F^2 + ||W_D[:, idx] - A_r||_F^2

    with ``anchors.w_p [n_p, k]`` and ``anchors.w_r [n_r, k]`` unit anchor directions and
    ``anchors.latents [k]`` the anchored latent indices (the paper uses the first k)."""
    idx = anchors.latents
    le = jnp.sum((params.W_E[idx, :] - anchors.w_p.T) ** 2)
    if params.W_D is None:
        return le
    ld = jnp.sum((params.W_D[:, idx] - anchors.w_r) ** 2)
    return le + ld
