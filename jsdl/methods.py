"""SDL methods: what ``x_p`` and ``x_r`` are, whether weights are tied, and how the reconstruction
term is formed. Nothing downstream special-cases a method: :func:`jsdl.sdl_loss` asks the method
for its inputs/targets (:func:`prepare`) and its reconstruction loss (:func:`recon_loss`).

=================  =============================================  ==================================
method             x_p -> x_r                                      parameters
=================  =============================================  ==================================
sae                x -> x (self-reconstruction)                    W_E, W_D
tied_sae           x -> x, W_D = W_E^T                              W_E only
transcoder         MLP input -> MLP output                          W_E, W_D
skip_transcoder    MLP input -> MLP output, + W_S x_p               W_E, W_D, W_S
crosscoder         L sources [x^(1);...;x^(L)] -> same, shared z    W_E [n_q, L d], W_D [L d', n_q]
matryoshka         x -> x, nested prefixes m_1 < ... < m_K = n_q,   W_E, W_D
                   each prefix reconstructs x, losses weighted
=================  =============================================  ==================================
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

__all__ = ["MethodInfo", "METHODS", "names", "get", "prepare", "recon_loss"]


@dataclasses.dataclass(frozen=True)
class MethodInfo:
    name: str
    tied: bool = False          # W_D = W_E^T (one weight matrix)
    skip: bool = False          # learned linear skip W_S x_p in the reconstruction
    multi_source: bool = False  # crosscoder: inputs/targets made of L stacked sources
    nested: bool = False        # matryoshka: sum of prefix reconstruction losses
    self_target: bool = True    # x_r defaults to x_p
    doc: str = ""


METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in [
        MethodInfo("sae", doc="sparse autoencoder, x_r = x_p"),
        MethodInfo("tied_sae", tied=True, doc="SAE with W_D = W_E^T"),
        MethodInfo("transcoder", self_target=False, doc="x_p = MLP input, x_r = MLP output"),
        MethodInfo("skip_transcoder", skip=True, self_target=False, doc="transcoder + linear skip W_S x_p"),
        MethodInfo("crosscoder", multi_source=True, doc="L sources concatenated, one shared latent"),
        MethodInfo("matryoshka", nested=True, doc="nested latent prefixes, each reconstructs x_r"),
    ]
}


def names() -> list[str]:
    return sorted(METHODS)


def get(name: str) -> MethodInfo:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(names())}")
    return METHODS[name]


def _flatten_sources(x, n_sources: int, what: str, method: str):
    """[B, L, d] -> [B, L*d]; [B, L*d] is passed through. Checks L against the spec."""
    if x.ndim == 3:
        if x.shape[1] != n_sources:
            raise ValueError(
                f"{method}: {what} has {x.shape[1]} sources (shape {tuple(x.shape)}) but the spec has "
                f"n_sources={n_sources}"
            )
        return x.reshape(x.shape[0], -1)
    if x.ndim == 2:
        if x.shape[1] % n_sources:
            raise ValueError(
                f"{method}: {what} of shape {tuple(x.shape)} cannot be split into n_sources={n_sources} "
                "equal source blocks; pass [B, n_sources, d] or [B, n_sources*d]"
            )
        return x
    raise ValueError(f"{method}: {what} must have shape [B, n_sources, d] or [B, n_sources*d], got {tuple(x.shape)}")


def prepare_input(x_p, spec):
    """Inputs as a 2-D array ``[B, n_p]`` (crosscoder sources flattened)."""
    if get(spec.method).multi_source:
        return _flatten_sources(x_p, spec.n_sources, "x_p", spec.method)
    if x_p.ndim != 2:
        raise ValueError(f"{spec.method}: x_p must have shape [B, d_input], got {tuple(x_p.shape)}")
    return x_p


def prepare(x_p, x_r, spec):
    """Inputs and targets as 2-D arrays ``[B, n_p]``, ``[B, n_r]`` for ``spec.method``.

    ``x_r=None`` means self-reconstruction (allowed for methods whose target is the input)."""
    info = get(spec.method)
    if x_r is None:
        if not info.self_target:
            raise ValueError(f"method {spec.method!r} needs a target x_r (Batch.x_r is None)")
        x_r = x_p
    if info.multi_source:
        x_p = _flatten_sources(x_p, spec.n_sources, "x_p", spec.method)
        x_r = _flatten_sources(x_r, spec.n_sources, "x_r", spec.method)
    else:
        if x_p.ndim != 2:
            raise ValueError(f"{spec.method}: x_p must have shape [B, d_input], got {tuple(x_p.shape)}")
        if x_r.ndim != 2:
            raise ValueError(f"{spec.method}: x_r must have shape [B, d_target], got {tuple(x_r.shape)}")
    if x_p.shape[0] != x_r.shape[0]:
        raise ValueError(
            f"batch size mismatch: x_p has shape {tuple(x_p.shape)} and x_r has shape {tuple(x_r.shape)}"
        )
    return x_p, x_r


def _sq_err(x_r, x_hat):
    return jnp.mean(jnp.sum((x_r - x_hat) ** 2, axis=-1))


def recon_loss(x_r, codes, decode_prefix, spec):
    """Reconstruction term of the loss.

    Plain methods: E ||x_r - x_r_hat||^2 (eq. 3). Matryoshka: sum_m w_m E ||x_r - x_r_hat^(m)||^2
    where x_r_hat^(m) decodes only the first m_m latents. ``decode_prefix(codes, m)`` decodes the
    first ``m`` latents (``m = None``: all)."""
    if not get(spec.method).nested:
        return _sq_err(x_r, decode_prefix(codes, None))
    total = 0.0
    for m, w in zip(spec.prefixes, spec.prefix_weights):
        total = total + w * _sq_err(x_r, decode_prefix(codes, m))
    return total
