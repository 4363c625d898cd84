"""Activation functions sigma of the SDL objective, and their registry.

Every activation satisfies the key property of the paper (eq. 10)::

    sigma(z)_i in {0, z_i}   for every i,

so inside a fixed activation pattern sigma is a 0/1 diagonal mask and the encoder map is linear in
W_E (Theorem 3.2). The property is asserted for every registered activation in the tests.

An activation is an :class:`Activation`: a frozen (hashable, jit-static) object called as
``sigma(z, params=None, *, inference=False)`` with ``z`` of shape ``[..., n_q]`` (pre-activations
``W_E x_p + b_E``). Learned thresholds (JumpReLU) and inference thresholds (BatchTopK) are read from
``params.threshold`` (shape ``[n_q]``) when ``params`` is given.

Register a new one with::

    @jsdl.activations.register("my_act")
    def my_act(z, params=None, *, inference=False, alpha=1.0):
        return jnp.where(z > alpha, z, 0.0)

Hyperparameters are keyword arguments with defaults (their types come from the defaults; ranges
are declared with ``register(name, hyper={"alpha": "> 0"})``); ``jsdl.activations.get("my_act",
alpha=2.0)`` binds and validates them and rejects unknown names. Registering a taken name raises
unless ``overwrite=True`` (the registry is a :class:`jsdl.registry.Registry`). Names joined by ``"|"`` compose left to right:
``get("relu|topk", k=1)`` is Top-1 o ReLU (paper Example 3.5).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from jsdl.registry import Registry, bind_hyper

__all__ = [
    "Activation",
    "ActivationInfo",
    "VaryingKActivation",
    "select_topk",
    "select_batchtopk",
    "REGISTRY",
    "register",
    "get",
    "names",
    "info",
    "hyper_names",
    "heaviside_ste",
    "jumprelu_ste",
    "topk_mask_values",
]


@dataclasses.dataclass(frozen=True)
class ActivationInfo:
    """Static facts about an activation that downstream code may need.

    needs_threshold: params carry a per-latent threshold ``[n_q]`` that is *learned* by gradient.
    inference_threshold: params carry a threshold used only at inference (BatchTopK); it is not
        trained by gradient but estimated during training.
    homogeneous: sigma(a z) = a sigma(z) for a > 0 (ReLU, TopK). Theorem 3.1's per-feature loss and
        the rescaling symmetry need it; JumpReLU with a fixed threshold is not homogeneous.
    batch_coupled: the mask of one sample depends on the rest of the batch (BatchTopK).
    uses_k: takes a hyperparameter ``k`` (number of active latents).
    """

    needs_threshold: bool = False
    inference_threshold: bool = False
    homogeneous: bool = True
    batch_coupled: bool = False
    uses_k: bool = False


#: The activation registry (a :class:`jsdl.registry.Registry`).
REGISTRY: Registry[ActivationInfo] = Registry(
    "activation",
    positional=("z", "params"),
    required=("inference",),
    info_type=ActivationInfo,
    forbidden="|",
    hint=" (compose with '|', e.g. 'relu|topk')",
)


def register(name: str, *, overwrite: bool = False, hyper: Mapping[str, Any] | None = None,
             **info: Any) -> Callable[[Callable], Callable]:
    """Decorator registering ``fn(z, params=None, *, inference=False, **hyper)`` under ``name``.

    Hyperparameters are the keyword arguments with defaults; their types come from the defaults
    and ``hyper`` declares ranges, e.g. ``hyper={"k": ">= 1"}``. ``info`` fields (see
    :class:`ActivationInfo`) describe the activation. A taken name raises ValueError unless
    ``overwrite=True``; a wrong signature raises TypeError."""
    return REGISTRY.register(name, overwrite=overwrite, hyper=hyper, **info)


def names() -> list[str]:
    """Registered activation names, sorted."""
    return REGISTRY.names()


def _parts(name: str):
    if not isinstance(name, str):
        raise TypeError(f"activation must be a name (str), got {type(name).__name__}")
    return [REGISTRY.entry(p) for p in name.split("|")]


def info(name: str) -> ActivationInfo:
    """Combined :class:`ActivationInfo` of a (possibly composed) activation name."""
    parts = [e.info for e in _parts(name)]
    return ActivationInfo(
        needs_threshold=any(p.needs_threshold for p in parts),
        inference_threshold=any(p.inference_threshold for p in parts),
        homogeneous=all(p.homogeneous for p in parts),
        batch_coupled=any(p.batch_coupled for p in parts),
        uses_k=any(p.uses_k for p in parts),
    )


def hyper_names(name: str) -> set[str]:
    """Names of the hyperparameters accepted by a (possibly composed) activation."""
    return {h.name for e in _parts(name) for h in e.hyper}


@dataclasses.dataclass(frozen=True)
class Activation:
    """A bound activation: name plus hyperparameters (a sorted tuple, so it is hashable)."""

    name: str
    hyper: tuple[tuple[str, Any], ...] = ()

    @property
    def info(self) -> ActivationInfo:
        return info(self.name)

    def hyper_dict(self) -> dict[str, Any]:
        return dict(self.hyper)

    def __call__(self, z: jax.Array, params: Any = None, *, inference: bool = False) -> jax.Array:
        hyper = dict(self.hyper)
        out = z
        for e in _parts(self.name):
            own = {h.name: hyper[h.name] for h in e.hyper if h.name in hyper}
            out = e.fn(out, params, inference=inference, **own)
        return out

    @property
    def k_active(self):
        """The traced number of kept latents of a varying-k activation (:meth:`with_k`); None here."""
        return None

    def with_k(self, k) -> "Activation":
        """This TopK / BatchTopK activation keeping a traced ``k`` (``<= `` the bound hyperparameter
        ``k``, which stays the static bound of the selection): how a population varies k without
        recompiling. ``k=None`` returns ``self``."""
        if k is None:
            return self
        if self.name not in ("topk", "batchtopk"):
            raise ValueError(f"a varying k needs activation 'topk' or 'batchtopk', got {self.name!r}")
        return VaryingKActivation(name=self.name, hyper=self.hyper, k=k)


@dataclasses.dataclass(frozen=True, eq=False)
class VaryingKActivation(Activation):
    """TopK / BatchTopK keeping a traced ``k`` (made by :meth:`Activation.with_k`). Compared and
    hashed by identity (``k`` is a tracer inside a jitted step), so it never hits a cache keyed on a
    static spec."""

    k: Any = None

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    @property
    def k_active(self):
        return self.k

    def __call__(self, z: jax.Array, params: Any = None, *, inference: bool = False) -> jax.Array:
        hyper = dict(self.hyper)
        if inference and self.name == "batchtopk":  # the inference threshold does not depend on k
            return batchtopk(z, params, inference=True, **hyper)
        select = select_topk if self.name == "topk" else select_batchtopk
        return select(z, hyper["k"], relu=hyper.get("relu", True), k_active=self.k)


def get(name: str, **hyper: Any) -> Activation:
    """The activation registered as ``name`` (or a ``'|'``-composition) bound to ``hyper``.

    Raises ValueError for an unknown name (listing the known ones), an unknown hyperparameter
    (listing the accepted ones) or an out-of-range value, TypeError for a value of the wrong type."""
    full = bind_hyper(_parts(name), hyper, f"activation {name!r}")
    return Activation(name=name, hyper=tuple(sorted(full.items())))


# ----------------------------------------------------------------------------------------------
# Straight-through estimators (Rajamanoharan et al. 2024, "Jumping ahead"), rectangle kernel.
# K(u) = 1{|u| < 1/2}; the pseudo-derivative of H(z - theta) wrt theta is -(1/eps) K((z-theta)/eps),
# of z H(z - theta) wrt theta it is -(theta/eps) K((z-theta)/eps). Gradients wrt z are the plain
# ones (0 for the step, H(z - theta) for JumpReLU), so z only learns through the reconstruction.
# ----------------------------------------------------------------------------------------------


def _rect(u):
    return (jnp.abs(u) < 0.5).astype(u.dtype)


@jax.custom_vjp
def heaviside_ste(z, theta, bandwidth):
    """H(z - theta) with the rectangle-kernel straight-through gradient for theta."""
    return (z > theta).astype(z.dtype)


def _heaviside_fwd(z, theta, bandwidth):
    return heaviside_ste(z, theta, bandwidth), (z, theta, bandwidth)


def _heaviside_bwd(res, g):
    z, theta, bandwidth = res
    dtheta = -(1.0 / bandwidth) * _rect((z - theta) / bandwidth) * g
    dtheta = _sum_to_shape(dtheta, jnp.shape(theta))
    return jnp.zeros_like(z), dtheta, jnp.zeros_like(bandwidth)


heaviside_ste.defvjp(_heaviside_fwd, _heaviside_bwd)


@jax.custom_vjp
def jumprelu_ste(z, theta, bandwidth):
    """z * H(z - theta) with the straight-through gradient for theta (grad wrt z is H(z - theta))."""
    return z * (z > theta).astype(z.dtype)


def _jumprelu_fwd(z, theta, bandwidth):
    return jumprelu_ste(z, theta, bandwidth), (z, theta, bandwidth)


def _jumprelu_bwd(res, g):
    z, theta, bandwidth = res
    gate = (z > theta).astype(z.dtype)
    dtheta = -(theta / bandwidth) * _rect((z - theta) / bandwidth) * g
    dtheta = _sum_to_shape(dtheta, jnp.shape(theta))
    return gate * g, dtheta, jnp.zeros_like(bandwidth)


jumprelu_ste.defvjp(_jumprelu_fwd, _jumprelu_bwd)


def _sum_to_shape(x, shape):
    """Sum a broadcast gradient back to ``shape`` (threshold [n_q] broadcast over [B, n_q])."""
    if x.shape == tuple(shape):
        return x
    lead = x.ndim - len(shape)
    x = jnp.sum(x, axis=tuple(range(lead)))
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and x.shape[i] != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _threshold(params, default, dtype):
    th = getattr(params, "threshold", None) if params is not None else None
    if th is None:
        return jnp.asarray(default, dtype)
    return th.astype(dtype)


# ----------------------------------------------------------------------------------------------
# Built-in activations
# ----------------------------------------------------------------------------------------------


@register("identity", homogeneous=True)
def identity(z, params=None, *, inference=False):
    """sigma(z) = z (a linear autoencoder; satisfies eq. 10 trivially)."""
    return z


@register("relu")
def relu(z, params=None, *, inference=False):
    """sigma(z)_i = max(z_i, 0)."""
    return jax.nn.relu(z)


@register("jumprelu", needs_threshold=True, homogeneous=False, hyper={"threshold": ">= 0", "bandwidth": "> 0"})
def jumprelu(z, params=None, *, inference=False, threshold=0.001, bandwidth=0.001):
    """JumpReLU (eq. 6): sigma(z)_i = z_i H(z_i - theta_i), theta_i = params.threshold[i] (learned,
    initialised to ``threshold``). Straight-through gradient for theta with a rectangle kernel of
    width ``bandwidth``, so theta learns under an L0 penalty."""
    theta = _threshold(params, threshold, z.dtype)
    return jumprelu_ste(z, theta, jnp.asarray(bandwidth, z.dtype))


def topk_mask_values(z: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Top-k values and indices along the last axis (``jax.lax.top_k``; exact)."""
    return jax.lax.top_k(z, k)


def _scatter_topk(z, vals, idx):
    # Scatter of the k kept values: 3-7x faster on CPU than comparing with the k-th value.
    flat = z.reshape(-1, z.shape[-1])
    v = vals.reshape(-1, vals.shape[-1])
    i = idx.reshape(-1, idx.shape[-1])
    rows = jnp.arange(flat.shape[0])[:, None]
    out = jnp.zeros_like(flat).at[rows, i].set(v, unique_indices=True, indices_are_sorted=False)
    return out.reshape(z.shape)


def select_topk(z: jax.Array, k: int, *, relu: bool = True, k_active=None) -> jax.Array:
    """Keep the ``k`` largest entries of ``z [..., n_q]`` along the last axis, zero the rest (with
    ``relu``, negative survivors too). ``k_active`` (a traced int ``<= k``, or None) keeps only the
    ``k_active`` largest of them: a population whose members differ in k runs one ``top_k`` with the
    static bound ``k`` and masks per member, and the kept values equal ``top_k(z, k_active)``'s."""
    from jsdl import shardops  # mesh-aware top_k (per-shard selection when latents are split)

    vals, idx = shardops.top_k(z, k)
    if k_active is not None:  # values come sorted, so the first k_active are the k_active largest
        vals = jnp.where(jnp.arange(k) < k_active, vals, 0.0)
    if relu:
        vals = jax.nn.relu(vals)
    return _scatter_topk(z, vals, idx)


def select_batchtopk(z: jax.Array, k: int, *, relu: bool = True, k_active=None) -> jax.Array:
    """Keep the ``k * B`` largest entries of the whole batch ``z [B, n_q]`` (any leading shape is
    flattened to B rows); ``k_active`` (traced, ``<= k``) keeps only the ``k_active * B`` largest."""
    z2 = z[None] if z.ndim == 1 else z.reshape(-1, z.shape[-1])
    B = z2.shape[0]
    from jsdl import shardops  # mesh-aware selection (per-device candidates when z is sharded)

    rows, cols = shardops.batch_top_k_indices(z2, k * B)
    vals = z2[rows, cols]
    if k_active is not None:  # selections come sorted by value
        vals = jnp.where(jnp.arange(k * B) < k_active * B, vals, 0.0)
    if relu:
        vals = jax.nn.relu(vals)
    return jnp.zeros_like(z2).at[rows, cols].set(vals, unique_indices=True).reshape(z.shape)


@register("topk", uses_k=True, hyper={"k": ">= 1"})
def topk(z, params=None, *, inference=False, k=32, relu=True):
    """Top-k (eq. 7): keep the k largest z_i per sample, zero the rest; with ``relu`` (default, as
    SAELens/sparsify do) negative survivors are zeroed too. Both satisfy eq. 10. A varying k (a
    population) is :meth:`Activation.with_k`."""
    if k > z.shape[-1]:
        raise ValueError(f"topk: k={k} exceeds the number of latents n_q={z.shape[-1]}")
    return select_topk(z, k, relu=relu)


@register("batchtopk", uses_k=True, inference_threshold=True, batch_coupled=True, hyper={"k": ">= 1"})
def batchtopk(z, params=None, *, inference=False, k=32, relu=True):
    """BatchTopK (Bussmann et al. 2024): at training time keep the k*B largest entries of the whole
    batch ``z [B, n_q]`` (a sample may keep more or fewer than k). At inference time
    (``inference=True``) apply the threshold ``params.threshold`` (per-latent ``[n_q]`` or a global
    value broadcast to ``[n_q]``), estimated during training, so each sample is coded alone."""
    if inference:
        theta = _threshold(params, 0.0, z.dtype)
        return jnp.where(z > theta, z, 0.0)
    if k > z.shape[-1]:
        raise ValueError(f"batchtopk: k={k} exceeds the number of latents n_q={z.shape[-1]}")
    return select_batchtopk(z, k, relu=relu)


def batchtopk_threshold(codes: jax.Array) -> jax.Array:
    """Smallest positive code of a training batch: the global BatchTopK inference threshold that
    training tracks with a running average (as SAELens/dictionary_learning do)."""
    pos = jnp.where(codes > 0, codes, jnp.inf)
    m = jnp.min(pos)
    return jnp.where(jnp.isfinite(m), m, 0.0)
