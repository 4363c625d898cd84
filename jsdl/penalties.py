"""Sparsity penalties and auxiliary losses of the SDL objective, and their registry.

A penalty is a pure function ``penalty(codes, params, **hyper) -> scalar`` where ``codes`` is
``x_q = sigma(W_E x_p + b_E)`` of shape ``[B, n_q]`` and ``params`` the :class:`~jsdl.SDLParams`.
It returns the **batch mean of a per-sample sum over latents** (so coefficients are comparable
across batch sizes). The objective adds ``sum_j lambda_j * penalty_j``.

Define and register a new one in a few lines::

    @jsdl.penalties.register("sqrt")
    def sqrt_penalty(codes, params, *, eps=1e-6):
        return jnp.sum(jnp.sqrt(jnp.abs(codes) + eps), axis=-1).mean()

Keyword arguments with defaults are hyperparameters: their types come from the defaults and their
ranges are declared at registration (``register("sqrt", hyper={"eps": "> 0"})``), so
``penalties.get(name, **hyper)`` validates them before anything compiles. A taken name raises
unless ``overwrite=True``. Two names are *injected* by the objective when the function declares
them, rather than set by the user:

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
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from jsdl.activations import heaviside_ste
from jsdl.registry import Registry

__all__ = ["register", "get", "names", "info", "hyper_defaults", "wants", "Penalty", "PenaltyInfo", "REGISTRY",
           "decoder_norms", "auxk_loss", "anchor_loss"]

INJECTED = ("pre_acts", "n_sources")


@dataclasses.dataclass(frozen=True)
class PenaltyInfo:
    """Registration facts: ``straight_through`` (the gradient is a pseudo-gradient),
    ``needs_threshold`` (needs a learned per-latent threshold), ``doc`` (first docstring line)."""

    straight_through: bool = False
    needs_threshold: bool = False
    doc: str = ""


#: The penalty registry (a :class:`jsdl.registry.Registry`).
REGISTRY: Registry[PenaltyInfo] = Registry(
    "penalty", positional=("codes", "params"), injected=INJECTED, info_type=PenaltyInfo, plural="penalties"
)


def register(name: str, *, overwrite: bool = False, hyper: Mapping[str, Any] | None = None,
             straight_through: bool = False, needs_threshold: bool = False) -> Callable[[Callable], Callable]:
    """Decorator registering ``fn(codes, params, **hyper) -> scalar`` under ``name``.

    Hyperparameters are the keyword arguments with defaults (types from the defaults); ``hyper``
    declares their ranges, e.g. ``hyper={"p": "(0, 1]", "eps": "> 0"}``. A taken name raises
    ValueError unless ``overwrite=True``; a wrong signature raises TypeError."""
    return REGISTRY.register(name, overwrite=overwrite, hyper=hyper, straight_through=straight_through,
                             needs_threshold=needs_threshold)


def names() -> list[str]:
    """Registered penalty names, sorted."""
    return REGISTRY.names()


def info(name: str) -> PenaltyInfo:
    """The :class:`PenaltyInfo` of ``name``."""
    return REGISTRY.entry(name).info


def hyper_defaults(name: str) -> dict[str, Any]:
    """The hyperparameters of ``name`` and their defaults (injected arguments excluded)."""
    return REGISTRY.entry(name).defaults()


def wants(name: str) -> set[str]:
    """Which injected arguments (``pre_acts``, ``n_sources``) the penalty declares."""
    return set(REGISTRY.entry(name).injected)


@dataclasses.dataclass(frozen=True)
class Penalty:
    """A bound penalty: name and hyperparameters (hashable, so a spec holding it is jit-static)."""

    name: str
    hyper: tuple[tuple[str, Any], ...] = ()

    def __call__(self, codes, params, **injected):
        e = REGISTRY.entry(self.name)
        extra = {k: v for k, v in injected.items() if k in e.injected}
        return e.fn(codes, params, **dict(self.hyper), **extra)


def get(name: str, **hyper: Any) -> Penalty:
    """The penalty registered as ``name`` bound to ``hyper``, validated against its signature and
    declared ranges: an unknown name or hyperparameter, or an out-of-range value, raises ValueError
    listing what is allowed; a value of the wrong type raises TypeError."""
    full = REGISTRY.bind(name, hyper)
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


@register("l0", straight_through=True, needs_threshold=True, hyper={"bandwidth": "> 0"})
def l0(codes, params, *, pre_acts=None, bandwidth=0.001):
    """L0 via the JumpReLU straight-through estimator: E sum_i H(z_i - theta_i); the threshold
    receives the rectangle-kernel pseudo-gradient -(1/bandwidth) K((z - theta)/bandwidth).
    :func:`jsdl.make_spec` sets ``bandwidth`` to the JumpReLU activation's unless it is given here
    (0.001 is the default of both)."""
    th = getattr(params, "threshold", None)
    if th is None or pre_acts is None:
        return _per_sample_mean((codes != 0).astype(codes.dtype))
    return _per_sample_mean(heaviside_ste(pre_acts, th.astype(pre_acts.dtype), jnp.asarray(bandwidth, pre_acts.dtype)))


@register("tanh", hyper={"scale": "> 0"})
def tanh(codes, params, *, scale=1.0, n_sources=1):
    """tanh penalty (Anthropic 2024): E sum_i tanh(scale |x_q,i| ||w_D^i||)."""
    return _per_sample_mean(jnp.tanh(scale * jnp.abs(codes) * decoder_norms(params, n_sources)))


@register("lp", hyper={"p": "(0, 1]", "eps": "> 0"})
def lp(codes, params, *, p=0.5, eps=1e-8):
    """L_p quasi-norm, 0 < p <= 1: E sum_i (|x_q,i| + eps)^p - eps^p (eps keeps the gradient finite
    at 0 for p < 1; the offset makes the penalty 0 at 0)."""
    a = jnp.abs(codes)
    return _per_sample_mean((a + eps) ** p - eps**p)


@register("log", hyper={"eps": "> 0"})
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
    from jsdl import shardops  # mesh-aware top_k

    def loss(pre_acts, residual, W_D):
        masked = jnp.where(dead_mask[None, :], jax.nn.relu(pre_acts), 0.0)
        vals, idx = shardops.top_k(masked, k_aux)
        rows = jnp.arange(masked.shape[0])[:, None]
        z_aux = jnp.zeros_like(masked).at[rows, idx].set(vals)
        rec = z_aux @ W_D.T
        num = jnp.sum((residual - rec) ** 2)
        den = jnp.sum((residual - residual.mean(0)) ** 2) + 1e-12
        return num / den

    return when_any_dead(dead_mask, loss, pre_acts, residual, W_D)


def when_any_dead(dead_mask, fn, *args):
    """``fn(*args)`` if some latent is dead, else 0, without running ``fn`` when none is (a
    ``lax.cond``: the AuxK top-k over ``[B, n_q]`` is skipped while every latent is alive, e.g. for
    the first ``dead_window`` steps; under ``vmap`` both branches run, as ``jnp.where`` would)."""
    zero = lambda *a: jnp.zeros((), args[0].dtype)  # noqa: E731
    return jax.lax.cond(jnp.any(dead_mask), fn, zero, *args)


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
