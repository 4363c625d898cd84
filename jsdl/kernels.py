"""Sparse kernels for TopK / BatchTopK dictionaries.

After a TopK (paper eq. 7) or BatchTopK selection only ``k`` of the ``n_q`` codes of a sample are
non-zero, so the three dense products of the objective that touch the codes,

    x_r^ = W_D x_q + b_D                  decoder forward           (eq. 2)   2 B n_q n_r flops
    dL/dW_D = g^T x_q,  dL/dx_q = g W_D   decoder backward                    4 B n_q n_r flops
    dL/dW_E = (dL/dz)^T x_p               encoder backward (dz has k non-zeros per row)

are gathers and scatter-adds of ``k`` rows per sample (``B k n`` flops each). Only the encoder
forward ``z = W_E x_p + b_E`` stays dense: the exact selection needs every pre-activation.
Autodiff of "gather the selected z" would transpose into a dense ``dz [B, n_q]`` and a dense
``dz^T x_p`` matmul, so the encoder side is a :func:`jax.custom_vjp` whose backward is a
scatter-add; the decoder is one too.

Codes are kept as :class:`SparseCodes`: ``vals [B, k]``, latent indices ``cols [B, k]`` and, for
BatchTopK (whose entries are not row-aligned: a sample may keep more or fewer than k), the sample
index ``rows [B, k]`` of each entry (the ``k B`` selected entries laid out as ``k`` "slots" of
``B`` entries). ``rows=None`` means entry ``[b, j]`` belongs to sample ``b`` (TopK).

Matryoshka's nested reconstructions (one per prefix of latents) take one decode too: every entry
is added to its sample's row of its prefix band, and the bands are summed cumulatively
(:func:`sparse_decode_prefixes`).

CPU implementation note (measured, jax 0.10.2, 2 cores, B=1024, n_q=16384, d=768): one XLA gather
of ``B k`` rows of ``W`` (a ``[B, k, d]`` operand) costs ~0.17-0.2 s, 10-20x more than the same
rows fetched ``B`` at a time in a ``fori_loop`` over the ``k`` slots (decode 0.01-0.02 s;
decoder backward 0.06 + 0.09 s), and about a third of the dense ``[B, n_q] x [n_q, d]`` matmul
(0.7 s). So on CPU the kernels loop over slots (``impl="slots"``); elsewhere (GPU/TPU, where a
large gather is bandwidth-bound and fast) they use one vectorised gather / segment-sum
(``impl="gather"``). Both are exact and tested against each other and against the dense path.
On CPU, for float32, the slot loops' scatter-adds, decode and row dots are jsdl's native kernels
(:mod:`jsdl.native`; the scatters and the decode equal to the loops to the bit), 2x faster than the
loops at (512, 4096, k 32, B 4096).
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from jsdl import native as _native
from jsdl import shardops as _shardops

__all__ = [
    "SparseCodes",
    "select_topk",
    "select_batchtopk",
    "topk_codes",
    "batchtopk_codes",
    "gather_preact",
    "sparse_decode",
    "densify",
    "sparse_l0",
    "sparse_encode",
    "fired_counts",
    "min_positive",
    "resolve_impl",
    "SELECT_METHODS",
]

SELECT_METHODS = ("lax", "approx")
IMPLS = ("auto", "slots", "gather")


@struct.dataclass
class SparseCodes:
    """Codes with ``k`` stored entries per slot row.

    vals [B, k]: code values (a stored entry may be 0, e.g. a negative survivor after ReLU).
    cols [B, k] int32: latent index of each entry.
    rows [B, k] int32 or None: sample index of each entry; ``None`` = entry ``[b, j]`` is in row b.
    n_latents: n_q (static)."""

    vals: jax.Array
    cols: jax.Array
    rows: Optional[jax.Array] = None
    n_latents: int = struct.field(pytree_node=False, default=0)


def resolve_impl(impl: str = "auto") -> str:
    """``"slots"`` on CPU, ``"gather"`` on accelerators, for ``impl="auto"`` (see module doc)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "slots" if jax.default_backend() == "cpu" else "gather"
    return impl


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------


def select_topk(z: jax.Array, k: int, *, method: str = "lax", recall_target: float = 0.95):
    """The ``k`` largest entries of each row of ``z [B, n]``: ``(vals [B, k], idx [B, k])``.

    ``method="lax"`` is exact: ``jax.lax.top_k``, or on CPU for rows of >= 4096 entries the
    block-max prefilter :func:`jsdl.shardops.block_top_k` (same values and indices, ~1.8x faster;
    see benchmarks/RESULTS.md "Top-k selection": a two-stage chunked top-k, a full sort and a
    per-row bisection on the threshold were 2-60x slower). ``method="approx"`` uses ``jax.lax.approx_max_k`` with
    ``recall_target``: approximate on TPU (an opt-in, changes the objective), exact elsewhere."""
    if method == "lax":
        return _shardops.top_k(z, k)
    if method == "approx":
        return jax.lax.approx_max_k(z, k, recall_target=recall_target)
    raise ValueError(f"select method must be one of {SELECT_METHODS}, got {method!r}")


def select_batchtopk(z: jax.Array, k: int, *, cap: Optional[int] = None, method: str = "lax"):
    """The ``k B`` largest entries of the whole batch ``z [B, n]`` (BatchTopK, Bussmann et al.).

    Returns ``(vals [B, k], rows [B, k], cols [B, k])``: the selected entries, in descending order
    of value, laid out row-major in ``[B, k]`` (so an entry's slot position is unrelated to its
    sample; ``rows`` says which sample it is in).

    Default (``cap=None``): one ``top_k`` over the flat ``B n`` array, as the dense activation does.
    ``cap=c`` selects in two stages, exactly: every row first keeps its ``c`` largest entries, then
    the ``k B`` largest candidates are taken; if some row has all ``c`` candidates at or above the
    resulting threshold (it might hold more), the one-stage selection is used instead
    (``lax.cond``). Measured on CPU (B=4096, n=16384, k=32): one-stage 4.5 s; two-stage with
    c=4k 2.4 s (row top-128) + 0.5 s, but the fallback fired on N(0, 1) data at d=64 (row norms
    spread), costing both. XLA's CPU ``top_k`` cost grows with k, so the selection, not the
    matmuls, dominates a BatchTopK step on CPU (see benchmarks/RESULTS.md)."""
    B, n = z.shape
    K = k * B
    flat_idx_dtype = jnp.int32

    def full(_):
        if method == "lax":
            r, c = _shardops.batch_top_k_indices(z, K)
            return z[r, c], r, c
        v, i = select_topk(z.reshape(-1), K, method=method)
        return v, (i // n).astype(flat_idx_dtype), (i % n).astype(flat_idx_dtype)

    cap = n if cap is None else min(int(cap), n)
    if cap >= n:
        v, r, c = full(None)
        return v.reshape(B, k), r.reshape(B, k), c.reshape(B, k)
    cv, ci = select_topk(z, cap, method=method)  # [B, cap], descending per row
    v, j = select_topk(cv.reshape(-1), K, method=method)
    r = (j // cap).astype(flat_idx_dtype)
    c = jnp.take(ci.reshape(-1), j).astype(flat_idx_dtype)
    tau = v[-1]
    # A row whose smallest candidate reaches tau may hold more entries >= tau than it kept.
    unsafe = jnp.any(cv[:, -1] >= tau)
    v, r, c = jax.lax.cond(unsafe, full, lambda _: (v, r, c), None)
    return v.reshape(B, k), r.reshape(B, k), c.reshape(B, k)


# ----------------------------------------------------------------------------------------------
# Slot loops (CPU) and vectorised gathers (accelerators)
# ----------------------------------------------------------------------------------------------


def _slot(a, j):
    return jax.lax.dynamic_index_in_dim(a, j, axis=1, keepdims=False)


def _use_native(a, b) -> bool:
    """jsdl's native CPU kernels for these operands (float32, CPU, built), on one device only: XLA's
    partitioner would all-gather a custom call's batch onto every device of a mesh (measured: the
    data-parallel TopK step gathered x and the codes), where it splits its own scatter-adds."""
    return (_native.supports_scatter_rows(a, b) and _shardops.model_axis_size() == 1
            and _shardops.data_axis_size() == 1)


def _gather_dot(u, W, cols, rows, impl):
    """out[b, j] = <u[rows[b, j]], W[cols[b, j]]>; u [B, m], W [n, m] -> [B, k]."""
    if impl == "gather":
        ur = u[:, None, :] if rows is None else u[rows]
        return jnp.sum(ur * W[cols], axis=-1)
    if _use_native(u, W):  # equal to rounding (the dot's summation order differs)
        return _native.gather_dot(u, W, cols, rows)

    def body(j, out):
        uj = u if rows is None else jnp.take(u, _slot(rows, j), axis=0)
        val = jnp.sum(uj * jnp.take(W, _slot(cols, j), axis=0), axis=-1)
        return jax.lax.dynamic_update_index_in_dim(out, val, j, axis=1)

    return jax.lax.fori_loop(0, cols.shape[1], body, jnp.zeros(cols.shape, u.dtype))


def _scatter_rows(vals, src, cols, rows, n, impl):
    """out[c] = sum_{b, j: cols[b,j] = c} vals[b, j] src[rows[b, j]]; src [B, m] -> [n, m]."""
    m = src.shape[-1]
    if impl == "gather":
        s = src[:, None, :] if rows is None else src[rows]
        upd = (vals[..., None] * s).reshape(-1, m)
        return jax.ops.segment_sum(upd, cols.reshape(-1), num_segments=n)
    if _use_native(vals, src):  # the same sums, to the bit, without k passes over [n, m]
        return _native.scatter_rows(vals, src, cols, rows, n)

    def body(j, acc):
        sj = src if rows is None else jnp.take(src, _slot(rows, j), axis=0)
        return acc.at[_slot(cols, j)].add(_slot(vals, j)[:, None] * sj)

    return jax.lax.fori_loop(0, cols.shape[1], body, jnp.zeros((n, m), src.dtype))


def _decode_rows(vals, Wr, cols, rows, B, impl):
    """out[b] = sum_{j: entry in row b} vals[., j] Wr[cols[., j]]; Wr [n, m] -> [B, m]."""
    m = Wr.shape[-1]
    if impl == "gather":
        upd = vals[..., None] * Wr[cols]  # [B, k, m]
        if rows is None:
            return jnp.sum(upd, axis=1)
        return jax.ops.segment_sum(upd.reshape(-1, m), rows.reshape(-1), num_segments=B)
    if _use_native(vals, Wr):
        # The same sums to the bit: entries scattered to their samples, source rows Wr[cols].
        target = rows if rows is not None else jax.lax.broadcasted_iota(jnp.int32, cols.shape, 0)
        # XLA fuses the TopK loop's product and sum (acc + upd) into one multiply-add.
        return _native.scatter_rows(vals, Wr, target, cols, B, fused=rows is None)

    def body(j, acc):
        upd = _slot(vals, j)[:, None] * jnp.take(Wr, _slot(cols, j), axis=0)
        return acc + upd if rows is None else acc.at[_slot(rows, j)].add(upd)

    return jax.lax.fori_loop(0, cols.shape[1], body, jnp.zeros((B, m), Wr.dtype))


# ----------------------------------------------------------------------------------------------
# Encoder side: the selected pre-activations with a sparse backward
# ----------------------------------------------------------------------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(6,))
def _gather_preact(x, W, b, cols, rows, zsel, impl):
    # zsel: the same values already read off the gradient-free z (saves k row dots per sample).
    if zsel is not None:
        return zsel
    return _gather_dot(x, W, cols, rows, impl) + (0.0 if b is None else b[cols])


def _gather_preact_fwd(x, W, b, cols, rows, zsel, impl):
    return _gather_preact(x, W, b, cols, rows, zsel, impl), (x, W, b, cols, rows, zsel)


def _gather_preact_bwd(impl, res, g):
    x, W, b, cols, rows, zsel = res
    B = x.shape[0]
    dW = _scatter_rows(g, x, cols, rows, W.shape[0], impl)
    # dx is dead code when x is data (removed under jit); kept for correctness of the VJP.
    dx = _decode_rows(g, W, cols, rows, B, impl)
    db = None if b is None else jnp.zeros_like(b).at[cols.reshape(-1)].add(g.reshape(-1))
    dz = None if zsel is None else jnp.zeros_like(zsel)
    return dx, dW, db, _int_zero(cols), _int_zero(rows), dz


def _int_zero(a):
    if a is None:
        return None
    import numpy as np

    return np.zeros(a.shape, dtype=jax.dtypes.float0)


_gather_preact.defvjp(_gather_preact_fwd, _gather_preact_bwd)


def gather_preact(x, W, b, cols, rows=None, *, z=None, impl: str = "auto"):
    """Selected pre-activations ``z[rows, cols]`` of ``z = x W^T + b`` (``x [B, n_p]``,
    ``W [n_q, n_p]``, ``b [n_q]`` or None), computed as ``k`` row dot products per sample, or read
    off ``z`` when the caller already has it (``z [B, n_q]``, treated as gradient-free: it must
    equal ``x W^T + b``).

    Its VJP is sparse: ``dW[c] += g x[r]``, ``db[c] += g``, ``dx[r] += g W[c]`` (scatter-adds of
    ``B k`` rows) instead of the dense ``dz^T x`` that autodiff of ``z[rows, cols]`` produces."""
    zsel = None
    if z is not None:
        z = jax.lax.stop_gradient(z)
        zsel = jnp.take_along_axis(z, cols, axis=1) if rows is None else z[rows, cols]
    return _gather_preact(x, W, b, cols, rows, zsel, resolve_impl(impl))


# ----------------------------------------------------------------------------------------------
# Decoder: x_r^ = W_D x_q + b_D with x_q sparse
# ----------------------------------------------------------------------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _sparse_decode(vals, Wr, cols, rows, B, impl):
    return _decode_rows(vals, Wr, cols, rows, B, impl)


def _sparse_decode_fwd(vals, Wr, cols, rows, B, impl):
    return _sparse_decode(vals, Wr, cols, rows, B, impl), (vals, Wr, cols, rows)


def _sparse_decode_bwd(B, impl, res, g):
    vals, Wr, cols, rows = res
    dvals = _gather_dot(g, Wr, cols, rows, impl)
    dWr = _scatter_rows(vals, g, cols, rows, Wr.shape[0], impl)
    return dvals, dWr, _int_zero(cols), _int_zero(rows)


_sparse_decode.defvjp(_sparse_decode_fwd, _sparse_decode_bwd)


def sparse_decode(codes: SparseCodes, W_rows: jax.Array, b_D=None, *, batch_size: Optional[int] = None,
                  impl: str = "auto") -> jax.Array:
    """``x_r^ = W_D x_q + b_D`` (eq. 2) for sparse codes; ``W_rows = W_D^T [n_q, n_r]`` (the
    decoder columns as rows: ``W_E`` itself for a tied model). Returns ``[B, n_r]``.

    Forward: ``k`` gathered rows per sample; backward: ``dvals = <g, W_rows[cols]>`` and a
    scatter-add ``dW_rows[cols] += vals g`` (custom VJP: autodiff would densify)."""
    B = codes.vals.shape[0] if batch_size is None else batch_size
    out = _sparse_decode(codes.vals, W_rows, codes.cols, codes.rows, B, resolve_impl(impl))
    return out if b_D is None else out + b_D


def sparse_decode_prefixes(codes: SparseCodes, W_rows: jax.Array, b_D, prefixes, *, impl: str = "auto") -> jax.Array:
    """Matryoshka's nested reconstructions ``[P, B, n_r]``: entry ``i`` decodes the latents below
    ``prefixes[i]`` only (``codes[:, :m] @ W_D[:, :m].T + b_D`` on the dense path); the last is the
    full ``x_r^``. One sparse decode: every stored entry is added to the row of its sample in its
    band ``[m_{i-1}, m_i)`` (a ``[P B, n_r]`` output), then the bands are summed cumulatively. So the
    cost is one decode's ``B k`` gathered rows whatever the number of prefixes."""
    B = codes.vals.shape[0]
    P = len(prefixes)
    band = jnp.searchsorted(jnp.asarray(prefixes[:-1], jnp.int32), codes.cols, side="right")
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], codes.cols.shape) if codes.rows is None else codes.rows
    bands = _sparse_decode(codes.vals, W_rows, codes.cols, (band * B + rows).astype(jnp.int32), P * B,
                           resolve_impl(impl))
    out = jnp.cumsum(bands.reshape(P, B, -1), axis=0)
    return out if b_D is None else out + b_D


def densify(codes: SparseCodes, n_latents: Optional[int] = None) -> jax.Array:
    """Dense codes ``[B, n_q]`` (a scatter; differentiable wrt ``vals``)."""
    n = n_latents or codes.n_latents
    B = codes.vals.shape[0]
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], codes.cols.shape) if codes.rows is None else codes.rows
    out = jnp.zeros((B, n), codes.vals.dtype)
    return out.at[rows, codes.cols].add(codes.vals)


def sparse_l0(codes: SparseCodes, batch_size: Optional[int] = None) -> jax.Array:
    """Mean number of non-zero codes per sample (the objective's ``l0`` metric)."""
    B = codes.vals.shape[0] if batch_size is None else batch_size
    return jnp.sum((codes.vals != 0).astype(codes.vals.dtype)) / B


# ----------------------------------------------------------------------------------------------
# Sparse encoders
# ----------------------------------------------------------------------------------------------


# The sparse path's selection product folds the encoder bias in on CPU from this input width on
# (``preacts``). Measured A/B of the TopK/BatchTopK step (benchmarks/NOTES.md, "Speed round 6"): 3-9%
# faster at d = 256-768, neutral at d = 64-128. The dense path (``objective.pre_activations``, the
# reference) keeps ``x W_E^T + b_E``: folded, its step measured from 3.7% slower to 4.5% faster.
FOLD_BIAS_MIN_D = 256
_FOLD_PAD = 8  # the folded width d + 8 keeps the product's inner dimension a multiple of 8


def preacts(x, W_E, b_E):
    """``x W_E^T + b_E`` (``b_E`` may be None): the sparse path's pre-activations. On CPU, from
    ``d = FOLD_BIAS_MIN_D`` on, ``b_E`` is folded into the product as an input column of ones
    (``[x, 1, 0..] [W_E, b_E, 0..]^T``, equal up to float rounding): XLA CPU does not fuse the
    bias add into the GEMM, so it would otherwise be one more pass over ``[B, n_q]``."""
    if b_E is None:
        return x @ W_E.T
    d = x.shape[-1]
    if d >= FOLD_BIAS_MIN_D and jax.default_backend() == "cpu":
        one = jnp.zeros((_FOLD_PAD,), x.dtype).at[0].set(1)
        xa = jnp.concatenate([x, jnp.broadcast_to(one, x.shape[:-1] + (_FOLD_PAD,))], axis=-1)
        Wa = jnp.concatenate([W_E, b_E[:, None], jnp.zeros((W_E.shape[0], _FOLD_PAD - 1), W_E.dtype)], axis=-1)
        return xa @ Wa.T
    return x @ W_E.T + b_E


def topk_codes(x, W_E, b_E, k: int, *, relu: bool = True, select: str = "lax", impl: str = "auto",
               k_active=None, z: Optional[jax.Array] = None):
    """TopK codes (eq. 7) as :class:`SparseCodes`, plus the (gradient-free) pre-activations.

    ``z = x W_E^T + b_E`` is computed without gradient only to select; the kept values are
    re-expressed through :func:`gather_preact` so the encoder gradient is a scatter-add of ``k``
    rows per sample. ``relu`` zeroes negative survivors (as the ``topk`` activation does).
    ``k_active`` (traced int <= k) keeps only the first ``k_active`` selected values.
    Returns ``(codes, z)``; ``z [B, n_q]`` is ``stop_gradient``-ed."""
    if z is None:
        z = jax.lax.stop_gradient(preacts(x, W_E, b_E))
    _, cols = select_topk(z, k, method=select)
    cols = cols.astype(jnp.int32)
    vals = gather_preact(x, W_E, b_E, cols, None, z=z, impl=impl)
    if relu:
        vals = jax.nn.relu(vals)
    if k_active is not None:
        vals = jnp.where(jnp.arange(k) < k_active, vals, 0.0)
    return SparseCodes(vals=vals, cols=cols, rows=None, n_latents=W_E.shape[0]), z


def batchtopk_codes(x, W_E, b_E, k: int, *, relu: bool = True, select: str = "lax", impl: str = "auto",
                    k_active=None, z: Optional[jax.Array] = None):
    """BatchTopK codes (training-time selection of the ``k B`` largest entries of the batch) as
    :class:`SparseCodes` with ``rows``; see :func:`topk_codes` for the gradient and ``z``."""
    if z is None:
        z = jax.lax.stop_gradient(preacts(x, W_E, b_E))
    _, rows, cols = select_batchtopk(z, k, method=select)
    vals = gather_preact(x, W_E, b_E, cols, rows, z=z, impl=impl)
    if relu:
        vals = jax.nn.relu(vals)
    if k_active is not None:
        B = x.shape[0]
        vals = jnp.where(jnp.arange(B * k).reshape(B, k) < k_active * B, vals, 0.0)
    return SparseCodes(vals=vals, cols=cols, rows=rows, n_latents=W_E.shape[0]), z


# ----------------------------------------------------------------------------------------------
# Integration with the objective (jsdl.objective.sdl_loss calls these when the spec allows)
# ----------------------------------------------------------------------------------------------

SPARSE_ACTIVATIONS = ("topk", "batchtopk")


def sparse_supported(spec) -> tuple[bool, str]:
    """Whether ``sdl_loss`` can use the sparse path for ``spec`` and, if not, why."""
    from jsdl import penalties as _pen

    from jsdl.activations import Activation, VaryingKActivation

    act = spec.activation
    if type(act) not in (Activation, VaryingKActivation):
        return False, f"activation {type(act).__name__} is a subclass the sparse path does not know"
    if act.name not in SPARSE_ACTIVATIONS:
        return False, f"activation {act.name!r} is not one of {SPARSE_ACTIVATIONS}"
    for pen, _ in spec.penalties:
        if "pre_acts" in _pen.wants(pen.name):
            return False, f"penalty {pen.name!r} differentiates through the pre-activations"
    return True, ""


def use_sparse(spec, dtype=None) -> bool:
    """Resolve ``spec.sparse`` (``"auto"``, True, False). ``"auto"`` picks the sparse path when it is
    supported, ``k <= n_q / 8`` (below that the dense products are cheap and the sparse
    bookkeeping does not pay; see benchmarks/RESULTS.md) and ``dtype`` (of the parameters) is not
    float64. float64 is the theory/landscape mode, which needs forward-mode autodiff (HVPs,
    ``jax.hessian``) and a custom VJP cannot be differentiated forward; pass ``sparse=False`` to
    take Hessians of a float32 TopK loss. ``True`` on an unsupported spec raises."""
    mode = getattr(spec, "sparse", "auto")
    if mode is False:
        return False
    ok, why = sparse_supported(spec)
    if mode is True:
        if not ok:
            raise ValueError(f"sparse=True is not available for this spec: {why}; use sparse='auto' or False")
        return True
    k = spec.activation.hyper_dict().get("k", spec.n_latents)
    if dtype is not None and jnp.dtype(dtype) == jnp.float64:
        return False
    return ok and 8 * k <= spec.n_latents


def sparse_encode(params, x_p, spec, *, impl: str = "auto", select: str = "lax"):
    """The encoder half of :func:`sparse_forward`: ``(codes, z)`` of a TopK/BatchTopK spec, with
    ``codes`` :class:`SparseCodes` and ``z [B, n_q]`` gradient-free. A ``pre_bias`` spec encodes
    ``x_p - b_D`` (:func:`jsdl.objective.encoder_input`)."""
    from jsdl.objective import encoder_input  # (objective imports this module)

    x_p = encoder_input(params, x_p, spec)
    hyper = spec.activation.hyper_dict()
    fn = topk_codes if spec.activation.name == "topk" else batchtopk_codes
    # A population with a varying k (Activation.with_k) selects k_max = hyper k and keeps each
    # member's first k_active (the selections come sorted by value).
    return fn(x_p, params.W_E, params.b_E, hyper["k"], relu=hyper.get("relu", True), select=select, impl=impl,
              k_active=spec.activation.k_active)


def dense_fired_counts(codes: jax.Array) -> jax.Array:
    """``sum(codes != 0, axis=0)`` of dense codes ``[B, n_q]`` as int32: on how many samples each
    latent fired (the dense step's dead-latent statistics and, summed, the objective's ``l0``). On
    one CPU device jsdl's native kernel reads the codes once (:func:`jsdl.native.column_nonzero`;
    benchmarks/NOTES.md, "Speed round 14"); without it, a float32 product with a vector of ones
    (exact below 2^24 samples), which XLA's CPU dot streams, where the integer reduction wrote the
    ``[B, n_q]`` mask out first (5% of the dense step at (256, 2048, B 2048), neutral at the
    benchmark shapes: "Speed round 12"). Not differentiable (counts); the caller stops gradients."""
    B = codes.shape[0]
    if codes.ndim != 2 or jax.default_backend() != "cpu":
        return jnp.sum(codes != 0, axis=0).astype(jnp.int32)
    if _native_count(codes):
        return _native.column_nonzero(codes)
    if B >= 2**24:
        return jnp.sum(codes != 0, axis=0).astype(jnp.int32)
    return (jnp.ones((B,), jnp.float32) @ (codes != 0).astype(jnp.float32)).astype(jnp.int32)


def _native_count(codes) -> bool:
    """Whether the fired counts of ``codes`` come from the native kernel: one device (an FFI call on
    a split operand would be gathered whole), float32 on CPU, kernels available."""
    return (_shardops.data_axis_size() == 1 and _shardops.model_axis_size() == 1
            and _native.supports_column_nonzero(codes))


def dense_l0(codes: jax.Array) -> jax.Array:
    """Mean number of non-zero codes per code vector of dense codes ``[..., n_q]`` (the objective's
    ``l0`` metric), from :func:`dense_fired_counts`: in a training step the count is the one the
    dead-latent statistics take (one pass over the codes, shared), where ``mean(sum(codes != 0,
    -1))`` wrote a float mask of the codes and reduced it (2.8% of the large dense ReLU step's op
    time in a profile, neutral in its wall time, 1-4% faster at small shapes: benchmarks/NOTES.md,
    "Speed round 15"). Exact counts; no gradient."""
    counts = dense_fired_counts(jax.lax.stop_gradient(codes))
    vectors = codes.size // max(codes.shape[-1], 1)
    return jnp.sum(counts.astype(jnp.float32)).astype(codes.dtype) / vectors


def fired_counts(codes: SparseCodes) -> jax.Array:
    """``[n_q]`` int32: on how many samples each latent is non-zero (a scatter-add of the ``B k``
    stored entries; a latent is stored at most once per sample, for TopK and BatchTopK alike).
    Equals ``sum(densify(codes) != 0, axis=0)`` without the dense ``[B, n_q]`` array."""
    ones = (codes.vals != 0).astype(jnp.int32).reshape(-1)
    return jnp.zeros((codes.n_latents,), jnp.int32).at[codes.cols.reshape(-1)].add(ones)


def min_positive(codes: SparseCodes) -> jax.Array:
    """The smallest positive stored code (0 when there is none): the BatchTopK inference threshold
    of a batch, :func:`jsdl.activations.batchtopk_threshold` without the dense codes."""
    from jsdl.activations import batchtopk_threshold  # the same rule, applied to the stored values

    return batchtopk_threshold(codes.vals)


def sparse_forward(params, x_p, spec, *, impl: str = "auto", select: str = "lax"):
    """Sparse counterpart of ``z = W_E x_p + b_E; x_q = sigma(z); x_r^ = decode(x_q)`` for a
    TopK/BatchTopK spec. Returns ``(z, codes, x_hat)`` with ``z [B, n_q]`` gradient-free (it only
    selects), ``codes`` :class:`SparseCodes` and ``x_hat [B, n_r]`` (plus the skip ``W_S x_p``)."""
    codes, z = sparse_encode(params, x_p, spec, impl=impl, select=select)
    x_hat = sparse_decode(codes, decoder_rows(params), params.b_D, impl=impl)
    return z, codes, _skip(x_hat, params, x_p)


def _skip(x_hat, params, x_p):
    return x_hat if params.W_S is None else x_hat + x_p @ params.W_S.T


def sparse_forward_nested(params, x_p, spec, *, impl: str = "auto", select: str = "lax"):
    """:func:`sparse_forward` for matryoshka: ``(z, codes, x_hats)`` with ``x_hats [P, B, n_r]`` the
    reconstruction of each prefix of ``spec.prefixes`` (:func:`sparse_decode_prefixes`); the last
    is the full ``x_r^``."""
    codes, z = sparse_encode(params, x_p, spec, impl=impl, select=select)
    x_hats = sparse_decode_prefixes(codes, decoder_rows(params), params.b_D, spec.prefixes, impl=impl)
    return z, codes, _skip(x_hats, params, x_p)


def decoder_rows(params) -> jax.Array:
    """``W_D^T [n_q, n_r]``: the decoder columns as rows (``W_E`` itself when tied, no copy)."""
    return params.W_E if params.W_D is None else params.W_D.T


def sparse_auxk_loss(x_p, params, z, residual, dead_mask, k_aux: int, *, impl: str = "auto"):
    """AuxK loss (Gao et al. 2024; see :func:`jsdl.penalties.auxk_loss`) with sparse kernels: the
    top-``k_aux`` dead latents of ``relu(z)`` are selected on the gradient-free ``z`` and their
    values re-expressed through :func:`gather_preact`, so the gradient equals the dense one."""
    from jsdl.penalties import when_any_dead

    residual = jax.lax.stop_gradient(residual)
    k_aux = min(int(k_aux), z.shape[-1])

    def loss(x_p, W_E, b_E, W_rows, z, residual):
        masked = jnp.where(dead_mask[None, :], jax.nn.relu(z), 0.0)
        _, cols = select_topk(masked, k_aux)
        cols = cols.astype(jnp.int32)
        vals = jax.nn.relu(gather_preact(x_p, W_E, b_E, cols, None, z=z, impl=impl))
        vals = vals * dead_mask[cols].astype(vals.dtype)
        rec = sparse_decode(SparseCodes(vals, cols, None, z.shape[-1]), W_rows, None, impl=impl)
        num = jnp.sum((residual - rec) ** 2)
        den = jnp.sum((residual - residual.mean(0)) ** 2) + 1e-12
        return num / den

    # The decoder enters the lax.cond as rows: a training state storing the rows (RowParams) then
    # passes them through untransposed (a transpose cannot cancel across the cond's boundary).
    return when_any_dead(dead_mask, loss, x_p, params.W_E, params.b_E, decoder_rows(params), z, residual)
