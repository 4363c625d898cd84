"""Top-k selections that stay cheap when the latent axis is split over a ``"model"`` mesh axis.

XLA's SPMD partitioner lowers ``lax.top_k`` over a split axis by all-gathering the whole operand
(measured on jax 0.10.2: ``f32[B, n_q]`` gathered on every device), which defeats sharding the
dictionary. Here each shard takes its own top-k, the ``model x k`` candidates per row are
gathered, and a second top-k picks the winners: the same selection as one ``top_k`` (ties go to
the lower latent index in both, since candidates are laid out in shard order), moving ``B k M``
values instead of ``B n_q``.

It does the same with rows split over a ``"data"`` axis (a batch): each device selects in its own
rows, where the partitioner would all-gather ``z`` too (a data-parallel TopK step gathered it
twice per step before).

The mesh is read from the tracing context (``jax.set_mesh``, which :class:`jsdl.train.Stepper`
enters); without a mesh, or with "data" and "model" axes of size 1, these are one device's
selection (:func:`local_top_k`: jsdl's native kernel on CPU, else ``lax.top_k``). Only
*indices* come out of the ``shard_map`` (no gradient flows through its collectives, so none can
be double counted); callers read the values with a gather on ``z`` that the partitioner handles.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jsdl import native as _native

__all__ = ["model_axis_size", "data_axis_size", "top_k", "top_k_indices", "batch_top_k_indices", "local_top_k", "block_top_k"]

BLOCK = 32  # block size of block_top_k; local_top_k uses it on CPU for rows of >= BLOCK_MIN_N entries
BLOCK_MIN_N = 4096


def block_top_k(z: jax.Array, k: int, block: int = BLOCK) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k(z, k)`` along the last axis through a block-max prefilter; exact.

    The row is cut into blocks of ``block`` entries. Every one of the k largest entries lies in one
    of the k blocks with the largest maxima: an entry in any other block is preceded, in
    ``top_k``'s order (value descending, index ascending), by the maxima of k blocks that rank
    above its block. So: top-k of the ``n / block`` block maxima, a gather of those k blocks (in
    index order, so that ties break towards the lower index as in ``lax.top_k``), and a top-k of
    their ``k block`` entries. On CPU, where XLA's TopK is a serial per-row partial sort, this is
    ~1.8x faster at ``[1024, 16384]``, k = 32 (benchmarks/bench_topk.py). The values are read
    with a gather, so the gradient goes to the selected entries as ``lax.top_k``'s does."""
    *lead, n = z.shape
    if n % block or n // block < k:
        raise ValueError(f"block_top_k needs n divisible by block and n / block >= k; got n={n}, block={block}, k={k}")
    zb = z.reshape(*lead, n // block, block)
    _, blk = jax.lax.top_k(jax.lax.stop_gradient(jnp.max(zb, axis=-1)), k)
    blk = jnp.sort(blk, axis=-1)
    cand = jnp.take_along_axis(jax.lax.stop_gradient(zb), blk[..., None], axis=-2).reshape(*lead, k * block)
    _, j = jax.lax.top_k(cand, k)
    idx = jnp.take_along_axis(blk, j // block, axis=-1) * block + j % block
    return jnp.take_along_axis(z, idx, axis=-1), idx


def local_top_k(z: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``(values, indices)`` of ``lax.top_k(z, k)`` on one device. On CPU, for float32, jsdl's native
    kernel (:func:`jsdl.native.top_k_indices`, 2-4x faster than XLA's TopK at every benchmark shape)
    with the values read by a gather; without it, :func:`block_top_k` on CPU for
    long rows (``n >= BLOCK_MIN_N`` entries, at least ``2 k`` blocks; for a flat BatchTopK
    selection, a 1-D ``z``, at least ``4 k`` blocks), ``lax.top_k`` otherwise. The flat rule is
    measured (benchmarks/NOTES.md, "Speed round 5"): selecting ``K = k B`` of ``B n`` entries
    (B = 1024), blocks are as fast or faster from ``n / k = 128`` on (``n = 1024, k = 8``: equal;
    ``n = 4096, k = 32``: 36 vs 42 ms) and slower below (``n = 512, k = 8``: 5.6-6.5 vs 4.6-5.5 ms)."""
    if _native.supports_top_k(z, k):
        idx = _native.top_k_indices(z, k)
        return jnp.take_along_axis(z, idx, axis=-1), idx
    n = z.shape[-1]
    min_blocks = (4 if z.ndim == 1 else 2) * k
    if (jax.default_backend() == "cpu" and n >= BLOCK_MIN_N and n % BLOCK == 0 and n // BLOCK >= min_blocks
            and z.ndim >= 1):
        return block_top_k(z, k)
    return jax.lax.top_k(z, k)


def _mesh():
    try:
        m = jax.sharding.get_abstract_mesh()
    except Exception:  # no mesh context
        return None
    if m is None or getattr(m, "empty", True):
        return None
    return m


def model_axis_size() -> int:
    """Size of the ``"model"`` axis of the mesh in the tracing context (1 without one)."""
    m = _mesh()
    if m is None or "model" not in m.axis_names:
        return 1
    return int(m.shape["model"])


def data_axis_size() -> int:
    """Size of the ``"data"`` axis of the mesh in the tracing context (1 without one)."""
    m = _mesh()
    if m is None or "data" not in m.axis_names:
        return 1
    return int(m.shape["data"])


def top_k_indices(z: jax.Array, k: int) -> jax.Array:
    """Indices ``[..., k]`` of the ``k`` largest entries along the last axis of ``z`` (descending,
    as ``lax.top_k``). With a "model" mesh axis of size M dividing ``z.shape[-1]``: per-shard
    top-k, gather of the ``M k`` candidates, top-k of those. With a "data" axis of size D dividing
    ``z.shape[0]`` (rows, a batch) each device selects in its own rows: XLA's partitioner would
    otherwise all-gather the whole ``z`` for ``lax.top_k`` (and for jsdl's native kernel) on every
    device, measured on jax 0.10.2 with 8 CPU devices."""
    M, D = model_axis_size(), data_axis_size()
    n = z.shape[-1]
    split_model = M > 1 and n % M == 0 and z.ndim >= 1
    split_data = D > 1 and z.ndim >= 2 and z.shape[0] % D == 0
    if not (split_model or split_data):
        return local_top_k(z, k)[1]
    mesh = _mesh()
    lead = ("data" if split_data else None,) + (None,) * (z.ndim - 2) if z.ndim >= 2 else ()
    axes = ({"model"} if split_model else set()) | ({"data"} if split_data else set())
    n_loc = n // M if split_model else n
    k_loc = min(k, n_loc)

    def local(zl):
        if not split_model:
            return local_top_k(zl, k)[1]
        v, i = local_top_k(zl, k_loc)
        i = i + jax.lax.axis_index("model") * n_loc
        v = jax.lax.all_gather(v, "model", axis=zl.ndim - 1, tiled=True)
        i = jax.lax.all_gather(i, "model", axis=zl.ndim - 1, tiled=True)
        _, pos = jax.lax.top_k(v, k)
        return jnp.take_along_axis(i, pos, axis=-1)

    f = jax.shard_map(local, mesh=mesh, in_specs=P(*lead, "model" if split_model else None), out_specs=P(*lead),
                      axis_names=axes, check_vma=False)
    return f(jax.lax.stop_gradient(z))


def top_k(z: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``(values, indices)`` like ``jax.lax.top_k(z, k)`` (differentiable in the values), sharding-aware."""
    if model_axis_size() == 1 and data_axis_size() == 1:
        return local_top_k(z, k)
    idx = top_k_indices(z, k)
    return jnp.take_along_axis(z, idx, axis=-1), idx


def batch_top_k_indices(z: jax.Array, K: int) -> tuple[jax.Array, jax.Array]:
    """Rows and columns ``[K]`` of the ``K`` largest entries of the whole ``z [B, n]`` (BatchTopK),
    in descending order of value, as one ``top_k`` over ``z.reshape(-1)`` gives them. With a mesh,
    every device selects among its ``[B / data, n / model]`` block and the candidates of all
    devices are merged (nothing of size ``B n`` is gathered)."""
    B, n = z.shape
    mesh = _mesh()
    M = model_axis_size()
    D = int(mesh.shape["data"]) if mesh is not None and "data" in mesh.axis_names else 1
    if mesh is None or (M == 1 and D == 1) or n % M or B % D:
        _, i = local_top_k(z.reshape(-1), K)
        return (i // n).astype(jnp.int32), (i % n).astype(jnp.int32)
    B_loc, n_loc = B // D, n // M
    K_loc = min(K, B_loc * n_loc)
    axes = ("data", "model")

    def local(zl):
        v, i = local_top_k(zl.reshape(-1), K_loc)
        r = (i // n_loc + jax.lax.axis_index("data") * B_loc).astype(jnp.int32)
        c = (i % n_loc + jax.lax.axis_index("model") * n_loc).astype(jnp.int32)
        # Candidates in (data, model) device order; within a device in descending order. top_k
        # breaks ties by position, so equal values may be ordered differently from the single
        # top_k (which orders them by flat index): the selected *set* differs only among ties.
        v = jax.lax.all_gather(v, axes, tiled=True)
        r = jax.lax.all_gather(r, axes, tiled=True)
        c = jax.lax.all_gather(c, axes, tiled=True)
        _, pos = jax.lax.top_k(v, K)
        return r[pos], c[pos]

    f = jax.shard_map(local, mesh=mesh, in_specs=P("data", "model"), out_specs=(P(), P()),
                      axis_names=set(axes), check_vma=False)
    return f(jax.lax.stop_gradient(z))
