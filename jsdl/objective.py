"""The unified SDL objective (paper eqs. 1-3) as pure functions over pytrees.

    x_q   = sigma(W_E x_p + b_E)                    codes, sigma(z)_i in {0, z_i}      (1)
    x_r^  = W_D x_q + b_D  (+ W_S x_p, skip)        reconstruction of the target       (2)
    L     = E ||x_r - x_r^||^2 + sum_j lambda_j penalty_j(x_q, params)  (+ AuxK, anchors) (3)

Shapes (row-vector convention for batches): ``x_p [B, n_p]``, ``x_r [B, n_r]``, ``W_E [n_q, n_p]``,
``W_D [n_r, n_q]``, ``b_E [n_q]``, ``b_D [n_r]``, ``threshold [n_q]``, ``W_S [n_r, n_p]``.

A *spec* (:class:`SDLSpec`, built by :func:`make_spec`) is static and hashable, so it can be
closed over by ``jax.jit`` or passed as a static argument. Parameters (:class:`SDLParams`) are a
pytree, so ``jax.vmap`` over a stack of params trains a population.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import struct

from jsdl import activations as _act
from jsdl import kernels as _kernels
from jsdl import methods as _methods
from jsdl import penalties as _pen

__all__ = [
    "Batch",
    "SDLParams",
    "SDLSpec",
    "Anchors",
    "make_spec",
    "init_params",
    "encode",
    "encoder_input",
    "pre_activations",
    "decode",
    "sdl_loss",
    "param_count",
    "spec_to_dict",
    "spec_from_dict",
]


@struct.dataclass
class Batch:
    """One batch of SDL data. ``x_p [B, n_p]`` inputs, ``x_r [B, n_r]`` targets (``None`` means
    ``x_r = x_p``), ``features [B, n]`` ground-truth feature activations when known.
    Crosscoder batches may be ``[B, L, d]``."""

    x_p: jax.Array
    x_r: Optional[jax.Array] = None
    features: Optional[jax.Array] = None


@struct.dataclass
class SDLParams:
    """SDL parameters. ``W_D`` is ``None`` for tied models (W_D = W_E^T); ``b_E``, ``b_D`` are
    ``None`` without biases; ``threshold`` is the per-latent JumpReLU threshold (learned) or the
    BatchTopK inference threshold; ``W_S`` the skip-transcoder's linear skip."""

    W_E: jax.Array
    W_D: Optional[jax.Array] = None
    b_E: Optional[jax.Array] = None
    b_D: Optional[jax.Array] = None
    threshold: Optional[jax.Array] = None
    W_S: Optional[jax.Array] = None

    @property
    def decoder(self) -> jax.Array:
        """The decoder matrix ``[n_r, n_q]`` (``W_E^T`` when tied)."""
        return self.W_E.T if self.W_D is None else self.W_D

    @property
    def n_latents(self) -> int:
        return self.W_E.shape[-2]


@struct.dataclass
class Anchors:
    """Feature anchors (paper eqs. 22-26): unit directions ``w_p [n_p, k]``, ``w_r [n_r, k]`` pinned
    to the latents ``latents [k]`` (int), with loss weight ``coef`` (paper's lambda_anchor)."""

    w_p: jax.Array
    w_r: jax.Array
    latents: jax.Array
    coef: jax.Array = 0.1


@struct.dataclass
class SDLSpec:
    """Static description of an SDL model and objective (hashable; safe to close over in jit).

    Build it with :func:`make_spec`, which validates everything. Fields:

    method: one of :func:`jsdl.methods.names`.
    activation: bound :class:`jsdl.activations.Activation`.
    penalties: tuple of ``(Penalty, coef)``.
    n_latents: n_q.
    tied: W_D = W_E^T. bias: learn b_E and b_D.
    pre_bias: encode ``x_p - b_D`` instead of ``x_p``: ``z = W_E (x_p - b_D) + b_E`` (the
        "pre-encoder bias" of Bricken et al. 2023; SAELens's ``apply_b_dec_to_input``). The same
        functions as without it (``b_E`` absorbs ``-W_E b_D``), trained along another path:
        ``b_D`` also gets a gradient through the encoder. Self-reconstructing methods only.
    n_sources: crosscoder source count (1 otherwise).
    prefixes / prefix_weights: matryoshka nested prefix sizes (ending at n_q) and loss weights.
    aux_k / aux_coef: AuxK (Gao et al.) number of dead latents used and loss weight (0 = off).
    sparse: ``"auto"``, True or False: compute TopK/BatchTopK losses with the sparse kernels of
        :mod:`jsdl.kernels` (same loss and gradients; the dense path is the reference).
    """

    method: str = struct.field(pytree_node=False, default="sae")
    activation: _act.Activation = struct.field(pytree_node=False, default=_act.Activation("relu"))
    penalties: tuple = struct.field(pytree_node=False, default=())
    n_latents: int = struct.field(pytree_node=False, default=512)
    tied: bool = struct.field(pytree_node=False, default=False)
    bias: bool = struct.field(pytree_node=False, default=True)
    n_sources: int = struct.field(pytree_node=False, default=1)
    prefixes: tuple = struct.field(pytree_node=False, default=())
    prefix_weights: tuple = struct.field(pytree_node=False, default=())
    aux_k: int = struct.field(pytree_node=False, default=0)
    aux_coef: float = struct.field(pytree_node=False, default=0.0)
    sparse: Any = struct.field(pytree_node=False, default="auto")
    pre_bias: bool = struct.field(pytree_node=False, default=False)

    @property
    def method_info(self) -> _methods.MethodInfo:
        return _methods.get(self.method)

    @property
    def penalty_coefs(self) -> dict[str, float]:
        return {p.name: c for p, c in self.penalties}

    def describe(self) -> str:
        act = self.activation.name + (
            "(" + ", ".join(f"{k}={v}" for k, v in self.activation.hyper) + ")" if self.activation.hyper else ""
        )
        pens = ", ".join(f"{c:g}*{p.name}" for p, c in self.penalties) or "none"
        return (f"{self.method} n_q={self.n_latents} sigma={act} penalties=[{pens}]" + (" tied" if self.tied else "")
                + (" pre_bias" if self.pre_bias else ""))


def _coef(value, where: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{where} must be a number, got {value!r}") from None
    if not v >= 0 or v != v:
        raise ValueError(f"{where} must be >= 0, got {value!r}")
    return v


def make_spec(
    method: str = "sae",
    activation: str = "relu",
    n_latents: int = 512,
    penalties: Mapping[str, Any] | None = None,
    tied: bool = False,
    bias: bool = True,
    *,
    n_sources: int | None = None,
    prefixes: tuple[int, ...] | None = None,
    prefix_weights: tuple[float, ...] | None = None,
    aux_k: int = 0,
    aux_coef: float = 0.0,
    sparse: Any = "auto",
    pre_bias: bool = False,
    **activation_hyper: Any,
) -> SDLSpec:
    """Build and validate an :class:`SDLSpec` from names and hyperparameters.

    ``penalties`` maps a penalty name to a coefficient, or to ``(coef, {hyper})`` or
    ``{"coef": c, **hyper}``. ``activation_hyper`` go to the activation (e.g. ``k=32`` for
    topk/batchtopk, ``threshold``/``bandwidth`` for jumprelu). A straight-through penalty with a
    ``bandwidth`` (``l0``) takes the activation's ``bandwidth`` unless given its own, so a JumpReLU
    threshold learns from one kernel width. Method options: ``n_sources``
    (crosscoder, >= 2), ``prefixes`` and ``prefix_weights`` (matryoshka; default 4 doubling prefixes
    with equal weights), ``aux_k``/``aux_coef`` (AuxK), ``pre_bias`` (encode ``x_p - b_D``; see
    :class:`SDLSpec`). Everything is checked here, before any
    compilation; errors name the argument, the value and what is allowed."""
    info = _methods.get(method)
    if not isinstance(n_latents, int) or isinstance(n_latents, bool) or n_latents < 1:
        raise ValueError(f"n_latents must be a positive int, got {n_latents!r}")
    act = _act.get(activation, **activation_hyper)
    k = act.hyper_dict().get("k")
    if k is not None and k > n_latents:
        raise ValueError(f"k={k} exceeds n_latents={n_latents} (activation {activation!r})")
    tied = bool(tied) or info.tied
    if tied and info.skip:
        raise ValueError(f"method {method!r} cannot be tied")

    if info.multi_source:
        if n_sources is None or not isinstance(n_sources, int) or n_sources < 2:
            raise ValueError(f"crosscoder needs n_sources >= 2 (an int), got n_sources={n_sources!r}")
    elif n_sources not in (None, 1):
        raise ValueError(f"n_sources={n_sources!r} only applies to method 'crosscoder', not {method!r}")
    n_src = n_sources if info.multi_source else 1

    bound = []
    for name, val in (penalties or {}).items():
        hyper: dict[str, Any] = {}
        if isinstance(val, Mapping):
            val = dict(val)
            if "coef" not in val:
                raise ValueError(f"penalty {name!r}: a dict value needs a 'coef' key, got {sorted(val)}")
            coef = val.pop("coef")
            hyper = val
        elif isinstance(val, (tuple, list)):
            if len(val) != 2 or not isinstance(val[1], Mapping):
                raise ValueError(f"penalty {name!r}: expected coef or (coef, {{hyper}}), got {val!r}")
            coef, hyper = val[0], dict(val[1])
        else:
            coef = val
        coef = _coef(coef, f"coefficient of penalty {name!r}")
        pinfo = _pen.info(name)
        act_hyper = act.hyper_dict()
        if pinfo.straight_through and "bandwidth" not in hyper and "bandwidth" in act_hyper \
                and "bandwidth" in _pen.hyper_defaults(name):
            # One kernel width for the threshold's two straight-through gradients (the JumpReLU's
            # and the L0's), as in Rajamanoharan et al. (2024) and SAELens; a penalty bandwidth
            # given explicitly wins.
            hyper["bandwidth"] = act_hyper["bandwidth"]
        pen = _pen.get(name, **hyper)
        if pinfo.needs_threshold and not act.info.needs_threshold:
            raise ValueError(
                f"penalty {name!r} needs a learned per-latent threshold (activation 'jumprelu'); "
                f"activation {activation!r} has none"
            )
        bound.append((pen, coef))

    if info.nested:
        if prefixes is None:
            prefixes = tuple(sorted({max(1, n_latents // 8), max(1, n_latents // 4), max(1, n_latents // 2), n_latents}))
        prefixes = tuple(int(p) for p in prefixes)
        if not prefixes or list(prefixes) != sorted(set(prefixes)) or prefixes[0] < 1 or prefixes[-1] != n_latents:
            raise ValueError(
                f"matryoshka prefixes must be strictly increasing positive ints ending at n_latents={n_latents}, "
                f"got {prefixes!r}"
            )
        if prefix_weights is None:
            prefix_weights = tuple(1.0 / len(prefixes) for _ in prefixes)
        prefix_weights = tuple(_coef(w, "prefix weight") for w in prefix_weights)
        if len(prefix_weights) != len(prefixes):
            raise ValueError(
                f"matryoshka: {len(prefix_weights)} prefix_weights for {len(prefixes)} prefixes"
            )
    elif prefixes is not None or prefix_weights is not None:
        raise ValueError(f"prefixes/prefix_weights only apply to method 'matryoshka', not {method!r}")
    else:
        prefixes, prefix_weights = (), ()

    if not isinstance(pre_bias, bool):
        raise TypeError(f"pre_bias must be a bool, got {pre_bias!r}")
    if pre_bias and not bias:
        raise ValueError("pre_bias=True subtracts the decoder bias b_D from the input: it needs bias=True")
    if pre_bias and not info.self_target:
        raise ValueError(f"pre_bias=True needs a method that reconstructs its input (b_D lives in the target "
                         f"space); {method!r} does not")
    aux_coef = _coef(aux_coef, "aux_coef")
    if not isinstance(aux_k, int) or aux_k < 0:
        raise ValueError(f"aux_k must be a non-negative int, got {aux_k!r}")
    if aux_coef > 0 and aux_k == 0:
        aux_k = min(n_latents, 2 * (k or 32))
    if aux_k > n_latents:
        raise ValueError(f"aux_k={aux_k} exceeds n_latents={n_latents}")

    return SDLSpec(
        method=method,
        activation=act,
        penalties=tuple(bound),
        n_latents=n_latents,
        tied=tied,
        bias=bool(bias),
        n_sources=n_src,
        prefixes=prefixes,
        prefix_weights=prefix_weights,
        aux_k=aux_k,
        aux_coef=aux_coef,
        sparse=_sparse_mode(sparse),
        pre_bias=pre_bias,
    )


def _sparse_mode(sparse):
    if sparse == "auto" or sparse is True or sparse is False:
        return sparse
    raise ValueError(f"sparse must be 'auto', True or False, got {sparse!r}")


def _unit_columns(key, rows, cols, dtype):
    w = jax.random.normal(key, (rows, cols), dtype)
    return w / jnp.linalg.norm(w, axis=0, keepdims=True)


ENCODER_INITS = ("unit", "transpose")


def init_params(
    key: jax.Array,
    spec: SDLSpec,
    d_input: int,
    d_target: int | None = None,
    *,
    decoder_norm: float = 1.0,
    encoder: str = "unit",
    dtype: Any = None,
) -> SDLParams:
    """Initialise parameters for ``spec``.

    * ``W_D [n_r, n_q]``: i.i.d. Gaussian columns scaled to norm ``decoder_norm`` (default 1, as
      peers do before any decoder-norm handling).
    * ``W_E``: the decoder's transpose when ``n_p = n_r`` (SAE, crosscoder, square transcoder), as
      SAELens, sparsify and dictionary_learning do; otherwise Gaussian rows drawn independently.
      ``encoder="unit"`` (default) gives the rows unit norm (``W_E = W_D^T / decoder_norm``);
      ``encoder="transpose"`` gives them the decoder's norm (``W_E = W_D^T`` exactly: SAELens's
      init with ``decoder_norm=0.1``).
    * biases 0; JumpReLU threshold = the activation's ``threshold`` hyperparameter; skip W_S = 0.

    ``d_input``/``d_target`` are per-source widths for a crosscoder (``W_E`` is then
    ``[n_q, L d_input]``). ``d_target`` defaults to ``d_input``. ``dtype`` defaults to float32
    (float64 when ``jax_enable_x64`` is on)."""
    for nm, v in (("d_input", d_input), ("d_target", d_target)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{nm} must be a positive int, got {v!r}")
    if decoder_norm <= 0:
        raise ValueError(f"decoder_norm must be > 0, got {decoder_norm!r}")
    if encoder not in ENCODER_INITS:
        raise ValueError(f"encoder must be one of {ENCODER_INITS}, got {encoder!r}")
    if d_target is None:
        d_target = d_input
    if spec.tied and d_target != d_input:
        raise ValueError(f"a tied model needs d_target == d_input, got {d_target} and {d_input}")
    dtype = dtype or jnp.zeros(()).dtype
    n_q, L = spec.n_latents, spec.n_sources
    n_p, n_r = L * d_input, L * d_target
    k_d, k_e = jax.random.split(key)
    W_D = _unit_columns(k_d, n_r, n_q, dtype)
    W_D = W_D * decoder_norm
    enc_norm = 1.0 if encoder == "unit" else decoder_norm
    if n_p == n_r:
        W_E = W_D.T * (enc_norm / decoder_norm)
    else:
        W_E = _unit_columns(k_e, n_p, n_q, dtype).T * enc_norm
    th = None
    info = spec.activation.info
    if info.needs_threshold:
        th = jnp.full((n_q,), spec.activation.hyper_dict().get("threshold", 0.0), dtype)
    elif info.inference_threshold:
        th = jnp.zeros((n_q,), dtype)
    return SDLParams(
        W_E=W_E,
        W_D=None if spec.tied else W_D,
        b_E=jnp.zeros((n_q,), dtype) if spec.bias else None,
        b_D=jnp.zeros((n_r,), dtype) if spec.bias else None,
        threshold=th,
        W_S=jnp.zeros((n_r, n_p), dtype) if spec.method_info.skip else None,
    )


def param_count(params: SDLParams) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def _check_params(params: SDLParams, spec: SDLSpec, x_p, x_r):
    W_E = params.W_E
    if W_E.shape[0] != spec.n_latents:
        raise ValueError(f"params.W_E has shape {tuple(W_E.shape)} but the spec has n_latents={spec.n_latents}")
    if x_p.shape[-1] != W_E.shape[1]:
        raise ValueError(
            f"x_p has shape {tuple(x_p.shape)} but W_E has shape {tuple(W_E.shape)}: "
            f"input width {x_p.shape[-1]} != {W_E.shape[1]}"
        )
    if spec.tied and params.W_D is not None:
        raise ValueError("spec is tied but params.W_D is set; tied models keep only W_E")
    if not spec.tied and params.W_D is None:
        raise ValueError("params.W_D is None but the spec is not tied")
    if x_r is not None:
        n_r = params.decoder.shape[0]
        if x_r.shape[-1] != n_r:
            raise ValueError(
                f"x_r has shape {tuple(x_r.shape)} but the decoder has shape {tuple(params.decoder.shape)}: "
                f"target width {x_r.shape[-1]} != {n_r}"
            )


def encoder_input(params: SDLParams, x_p: jax.Array, spec: SDLSpec) -> jax.Array:
    """What the encoder multiplies: ``x_p - b_D`` for a ``pre_bias`` spec, else ``x_p`` (2-D)."""
    if spec.pre_bias and params.b_D is not None:
        return x_p - params.b_D
    return x_p


def pre_activations(params: SDLParams, x_p: jax.Array, spec: SDLSpec) -> jax.Array:
    """z = W_E x_p + b_E (``W_E (x_p - b_D) + b_E`` for a ``pre_bias`` spec), shape ``[B, n_q]``
    (x_p already 2-D)."""
    z = encoder_input(params, x_p, spec) @ params.W_E.T
    if params.b_E is not None:
        z = z + params.b_E
    return z


def encode(params: SDLParams, x_p: jax.Array, spec: SDLSpec, *, inference: bool = False) -> jax.Array:
    """Codes x_q = sigma(W_E x_p + b_E) (eq. 1), shape ``[B, n_q]``. ``inference=True`` uses the
    BatchTopK inference threshold instead of the batch-coupled selection."""
    x_p = _methods.prepare_input(x_p, spec)
    _check_params(params, spec, x_p, None)
    return spec.activation(pre_activations(params, x_p, spec), params, inference=inference)


# XLA's CPU dot computes the decoder gradient ``dW_D = g^T x_q`` (``[n_r, n_q]``, contracting the
# batch) 1.25-1.5x slower than ``(x_q^T g)^T`` from n_r >= 256 and n_q >= 4096 on, and up to 7x
# faster below (measured on an AMD EPYC, jax 0.10.2: benchmarks/NOTES.md, "Speed round 12"). The
# dense ReLU/JumpReLU step at (768, 16384, B 4096) was 12% faster with the second form.
ROWS_PRODUCT_MIN_NR = 256
ROWS_PRODUCT_MIN_NQ = 4096


def decoder_product(codes: jax.Array, W_D: jax.Array) -> jax.Array:
    """``codes @ W_D^T`` (``codes [..., n_q]``, ``W_D [n_r, n_q]``), the same value and derivatives
    in every mode. On the CPU backend, for ``n_r >= ROWS_PRODUCT_MIN_NR`` and ``n_q >=
    ROWS_PRODUCT_MIN_NQ``, ``W_D^T`` goes through an optimisation barrier, so that the gradient is
    computed as ``(codes^T g)^T`` and XLA cannot fold the transpose back into the slower form."""
    n_r, n_q = W_D.shape[-2:]
    if n_r >= ROWS_PRODUCT_MIN_NR and n_q >= ROWS_PRODUCT_MIN_NQ and jax.default_backend() == "cpu":
        return codes @ jax.lax.optimization_barrier(W_D.T)
    return codes @ W_D.T


def decode(
    params: SDLParams,
    codes: jax.Array,
    spec: SDLSpec,
    x_p: jax.Array | None = None,
    *,
    n_prefix: int | None = None,
) -> jax.Array:
    """Reconstruction x_r^ = W_D x_q + b_D (eq. 2), shape ``[B, n_r]``; the skip transcoder adds
    ``W_S x_p`` (so it needs ``x_p``). ``n_prefix`` decodes only the first latents (matryoshka)."""
    W_D = params.decoder
    if n_prefix is not None:
        out = codes[..., :n_prefix] @ W_D[:, :n_prefix].T
    elif params.W_D is not None:
        out = decoder_product(codes, W_D)
    else:
        out = codes @ W_D.T
    if params.b_D is not None:
        out = out + params.b_D
    if params.W_S is not None:
        if x_p is None:
            raise ValueError(f"method {spec.method!r} has a linear skip W_S x_p: decode needs x_p")
        if x_p.ndim == 3:
            x_p = x_p.reshape(x_p.shape[0], -1)
        out = out + x_p @ params.W_S.T
    return out


def sdl_loss(
    params: SDLParams,
    batch: Batch,
    spec: SDLSpec,
    *,
    coefs: Mapping[str, Any] | None = None,
    dead_mask: jax.Array | None = None,
    anchors: Anchors | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The SDL objective (eq. 3 plus penalties, AuxK and anchoring) on one batch.

    Returns ``(loss, aux)`` with ``aux`` holding ``mse`` (E||x_r - x_r^||^2 of the full dictionary),
    ``recon`` (the reconstruction term used in the loss; differs from mse for matryoshka), ``fvu``
    (sum of squared errors over the total variance of x_r about its batch mean), ``l0`` (mean number
    of non-zero codes per sample), ``penalty/<name>`` (unweighted value), ``auxk``, ``anchor`` and
    ``loss``.

    ``coefs`` overrides penalty coefficients by name with (possibly traced) scalars: populations
    vmap over them and coefficient warm-up scales them. ``dead_mask [n_q]`` enables AuxK.
    """
    x_p, x_r = _methods.prepare(batch.x_p, batch.x_r, spec)
    _check_params(params, spec, x_p, x_r)
    sparse = _kernels.use_sparse(spec, params.W_E.dtype)
    if sparse:
        # TopK/BatchTopK through gathers and scatter-adds of k rows per sample (jsdl.kernels);
        # z is gradient-free there (it only selects). Dense codes are built only for penalties.
        if spec.method_info.nested:  # every prefix's reconstruction from one sparse decode
            z, sparse_codes, x_hats = _kernels.sparse_forward_nested(params, x_p, spec)
            x_hat = x_hats[-1]
        else:
            z, sparse_codes, x_hat = _kernels.sparse_forward(params, x_p, spec)
        codes = _kernels.densify(sparse_codes) if spec.penalties else None
        l0 = _kernels.sparse_l0(sparse_codes)
    else:
        z = pre_activations(params, x_p, spec)
        codes = spec.activation(z, params)

    def decode_prefix(c, m):
        if not sparse:
            return decode(params, c, spec, x_p, n_prefix=m)
        return x_hat if m is None else x_hats[spec.prefixes.index(m)]

    if not sparse:
        x_hat = decode_prefix(codes, None)
        l0 = _kernels.dense_l0(codes).astype(x_hat.dtype)
    sq = jnp.sum((x_r - x_hat) ** 2, axis=-1)
    mse = jnp.mean(sq)
    recon = _methods.recon_loss(x_r, codes, decode_prefix, spec) if spec.method_info.nested else mse
    var = jnp.sum((x_r - jnp.mean(x_r, axis=0)) ** 2)
    fvu = jnp.sum(sq) / jnp.maximum(var, jnp.finfo(var.dtype).tiny)

    aux: dict[str, jax.Array] = {"mse": mse, "recon": recon, "fvu": fvu, "l0": l0}
    total = recon
    coefs = dict(coefs or {})
    unknown = set(coefs) - {p.name for p, _ in spec.penalties}
    if unknown:
        raise ValueError(
            f"coefs names {sorted(unknown)} are not penalties of this spec "
            f"({sorted(p.name for p, _ in spec.penalties) or 'none'})"
        )
    for pen, coef in spec.penalties:
        val = pen(codes, params, pre_acts=z, n_sources=spec.n_sources)
        aux[f"penalty/{pen.name}"] = val
        total = total + coefs.get(pen.name, coef) * val
    if spec.aux_coef > 0 and dead_mask is not None:
        if sparse:
            a = _kernels.sparse_auxk_loss(encoder_input(params, x_p, spec), params, z, x_r - x_hat, dead_mask,
                                          spec.aux_k)
        else:
            a = _pen.auxk_loss(z, x_r - x_hat, params.decoder, dead_mask, spec.aux_k)
        aux["auxk"] = a
        total = total + spec.aux_coef * a
    if anchors is not None:
        a = _pen.anchor_loss(params, anchors)
        aux["anchor"] = a
        total = total + anchors.coef * a
    aux["loss"] = total
    return total, aux


def _plain(v):
    """JSON-able Python value (numpy scalars -> Python, tuples -> lists)."""
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return v.item()
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return v


def spec_to_dict(spec: SDLSpec) -> dict:
    """A JSON-able record of ``spec`` (the arguments of :func:`make_spec`); checkpoints and exported
    files store it so a model loads without the code that made it. :func:`spec_from_dict` inverts it."""
    return {
        "method": spec.method,
        "activation": spec.activation.name,
        "activation_hyper": {k: _plain(v) for k, v in spec.activation.hyper},
        "n_latents": spec.n_latents,
        "penalties": {p.name: {"coef": c, **{k: _plain(v) for k, v in p.hyper}} for p, c in spec.penalties},
        "tied": spec.tied,
        "bias": spec.bias,
        "n_sources": spec.n_sources,
        "prefixes": list(spec.prefixes),
        "prefix_weights": list(spec.prefix_weights),
        "aux_k": spec.aux_k,
        "aux_coef": spec.aux_coef,
        "sparse": spec.sparse,
        "pre_bias": spec.pre_bias,
    }


def spec_from_dict(d: Mapping[str, Any]) -> SDLSpec:
    """Inverse of :func:`spec_to_dict`, validated by :func:`make_spec` (records without the newer
    keys get their defaults)."""
    d = dict(d)
    info = _methods.get(d["method"])
    kw: dict[str, Any] = dict(
        method=d["method"],
        activation=d["activation"],
        n_latents=int(d["n_latents"]),
        penalties={k: dict(v) if isinstance(v, Mapping) else v for k, v in (d.get("penalties") or {}).items()},
        tied=bool(d.get("tied", False)),
        bias=bool(d.get("bias", True)),
        aux_k=int(d.get("aux_k", 0)),
        aux_coef=float(d.get("aux_coef", 0.0)),
        sparse=d.get("sparse", "auto"),
        pre_bias=bool(d.get("pre_bias", False)),
        **{k: (tuple(v) if isinstance(v, list) else v) for k, v in (d.get("activation_hyper") or {}).items()},
    )
    if info.multi_source:
        kw["n_sources"] = int(d["n_sources"])
    if info.nested:
        kw["prefixes"] = tuple(int(x) for x in d["prefixes"])
        kw["prefix_weights"] = tuple(float(w) for w in d["prefix_weights"])
    return make_spec(**kw)
