"""The 2-D device mesh ``("data", "model")`` and where every leaf of the training state lives on it.

* ``"data"``: the global batch is split over it (and, in a population whose size it divides, the
  member axis instead of the batch).
* ``"model"``: everything indexed by latent is split over it: encoder rows ``W_E [n_q, n_p]``,
  decoder columns ``W_D [n_r, n_q]``, ``b_E [n_q]``, thresholds ``[n_q]``, the Adam moments of
  those, and the dead-latent statistics ``[n_q]``. A dictionary together with its optimiser state
  then needs ``1 / model`` of the memory per device.

The step is plain ``jax.jit`` over global arrays with these ``NamedSharding`` placements (the
mesh's axes are ``Auto``): XLA's SPMD partitioner splits the matmuls, inserts the all-reduces of
the gradient over "data" and of the reconstruction over "model", and lowers ``lax.top_k`` over a
split latent axis to a per-shard top-k followed by a top-k of the gathered candidates
(``B x k x model`` values, not ``B x n_q``; see ``tests/test_train_multidevice.py``). No
``shard_map`` is needed, so no gradient can be double counted.

A mesh is described by a mapping ``{"data": D, "model": M}`` (``TrainConfig.mesh``); a missing
axis takes what is left of the device count. Bad shapes fail here, before anything compiles.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

__all__ = ["AXES", "mesh_shape", "make_mesh", "state_partition_specs", "state_shardings", "constrain_state",
           "batch_sharding", "latent_axis", "to_host",
           "process_batch_rows"]

AXES = ("data", "model")

# Leaf name (the last attribute on its path) -> the axis indexed by latent, counted from the end
# (a population adds a leading member axis, so counting from the end is stable).
_LATENT_AXIS = {
    "W_E": -2,          # [n_q, n_p]
    "W_D": -1,          # [n_r, n_q]
    "W_Dt": -2,         # [n_q, n_r] (the training state's RowParams: the decoder as rows)
    "b_E": -1,          # [n_q]
    "threshold": -1,    # [n_q]
    "since_fired": -1,  # DeadStats [n_q]
    "window_count": -1,
    "freq": -1,
}


def mesh_shape(mesh: Optional[Mapping[str, int]], n_devices: int, n_latents: Optional[int] = None) -> tuple[int, int]:
    """``(data, model)`` sizes of ``mesh`` over ``n_devices`` devices.

    ``None`` puts every device on "data". A missing axis takes ``n_devices // other``. Raises
    ValueError (naming both numbers) when the axes do not multiply to the device count or when the
    "model" axis does not divide ``n_latents``."""
    if mesh is None:
        mesh = {}
    if not isinstance(mesh, Mapping):
        raise TypeError(f"train.mesh must be a mapping like {{data: 4, model: 2}}, got {mesh!r}")
    unknown = sorted(set(mesh) - set(AXES))
    if unknown:
        raise ValueError(f"train.mesh has unknown axis name(s) {unknown}; the axes are {list(AXES)}")
    for name, v in mesh.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"train.mesh.{name} must be a positive int, got {v!r}")
    d, m = mesh.get("data"), mesh.get("model")
    if d is None and m is None:
        d, m = n_devices, 1
    elif d is None:
        if n_devices % m:
            raise ValueError(f"train.mesh.model={m} does not divide the device count {n_devices}")
        d = n_devices // m
    elif m is None:
        if n_devices % d:
            raise ValueError(f"train.mesh.data={d} does not divide the device count {n_devices}")
        m = n_devices // d
    d, m = int(d), int(m)
    if d * m != n_devices:
        raise ValueError(f"train.mesh data x model = {d} x {m} = {d * m} does not equal the device count {n_devices}")
    if n_latents is not None and n_latents % m:
        raise ValueError(f"train.mesh.model={m} does not divide n_latents={n_latents}; "
                         f"use a model axis that divides {n_latents}")
    return d, m


def make_mesh(mesh: Optional[Mapping[str, int]] = None, devices: Optional[Sequence] = None,
              n_latents: Optional[int] = None) -> jax.sharding.Mesh:
    """A ``("data", "model")`` mesh with Auto axes over ``devices`` (default: all devices of all
    processes). Neighbouring devices share a "model" group, so a model-sharded matmul's
    collectives stay within a host when the group fits on one."""
    devices = list(jax.devices() if devices is None else devices)
    d, m = mesh_shape(mesh, len(devices), n_latents)
    grid = np.asarray(devices, dtype=object).reshape(d, m)
    return jax.sharding.Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _leaf_name(path) -> Optional[str]:
    for k in reversed(path):
        name = getattr(k, "name", None)
        if name is not None:
            return name
    return None


def latent_axis(path, leaf, n_latents: int) -> Optional[int]:
    """The (negative) axis of ``leaf`` indexed by latent, or None (a leaf not indexed by latent).
    ``path`` is a ``jax.tree_util`` key path; a leaf counts when its name is one of W_E, W_D, b_E,
    threshold or the dead statistics (also inside the optimiser state, whose moments mirror the
    parameters) and its size on that axis is ``n_latents``."""
    name = _leaf_name(path)
    ax = _LATENT_AXIS.get(name)
    shape = np.shape(leaf)
    if ax is None or len(shape) < -ax or shape[ax] != n_latents:
        return None
    return ax


def state_partition_specs(state, n_latents: int, *, member_axis: bool = False, shard_members: bool = False):
    """A pytree of PartitionSpec for a TrainState (or any pytree of its parts): the latent axis of
    latent-indexed leaves on "model"; with ``member_axis`` (a population) the leading axis on "data"
    when ``shard_members``; everything else replicated."""

    def spec(path, leaf):
        nd = np.ndim(leaf)
        parts: list[Any] = [None] * nd
        if member_axis and shard_members and nd >= 1:
            parts[0] = "data"
        ax = latent_axis(path, leaf, n_latents)
        if ax is not None and parts[nd + ax] is None:
            parts[nd + ax] = "model"
        while parts and parts[-1] is None:
            parts.pop()
        return P(*parts)

    return jax.tree_util.tree_map_with_path(spec, state)


def _drop_trivial(spec: P, mesh) -> P:
    # An axis of size 1 shards nothing; naming it would make the inputs' shardings differ from the
    # (normalised) outputs' and cost a second compile of the step.
    parts = [None if (a is not None and mesh.shape[a] == 1) else a for a in spec]
    while parts and parts[-1] is None:
        parts.pop()
    return P(*parts)


def state_shardings(mesh, state, n_latents: int, **kw):
    """``state_partition_specs`` as ``NamedSharding`` on ``mesh`` (axes of size 1 left out)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, _drop_trivial(s, mesh)),
                        state_partition_specs(state, n_latents, **kw), is_leaf=lambda x: isinstance(x, P))


def constrain_state(mesh, state, n_latents: int, **kw):
    """``with_sharding_constraint`` of every leaf to its place (inside jit): the step's outputs keep
    the inputs' shardings, so it compiles once and donation reuses the buffers."""
    return jax.lax.with_sharding_constraint(state, state_shardings(mesh, state, n_latents, **kw))


def to_host(tree):
    """Host numpy copies of ``tree``'s arrays. An array split over devices of several processes is
    all-gathered first (a collective: every process must call this)."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.device_get(x)

    return jax.tree.map(one, tree)


def process_batch_rows(batch_size: int, mesh: Optional[Mapping[str, int]] = None, devices=None) -> tuple[int, int]:
    """Rows ``[start, stop)`` of every global batch that this process's devices hold when the batch
    is split over "data" of the mesh ``mesh`` (what the process must read; several processes may
    share rows when they sit on the same "data" index). ``(0, batch_size)`` with one process."""
    if jax.process_count() == 1:
        return 0, int(batch_size)
    m = make_mesh(mesh, devices)
    if batch_size % m.shape["data"]:
        raise ValueError(f"batch_size={batch_size} is not divisible by the {m.shape['data']} devices of the "
                         "'data' mesh axis")
    idx = batch_sharding(m, True).addressable_devices_indices_map((int(batch_size),))
    spans = sorted({(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop) for s in idx.values()})
    start, stop = spans[0][0], spans[-1][1]
    covered = sum(b - a for a, b in spans)
    if covered != stop - start:
        raise ValueError(f"this process's devices hold non-contiguous batch rows {spans}; order the devices so "
                         "that each process's devices are neighbours on the 'data' axis")
    return int(start), int(stop)


def batch_sharding(mesh, shard_batch: bool) -> NamedSharding:
    """Rows of a batch over "data" (or replicated)."""
    return NamedSharding(mesh, P("data") if shard_batch and mesh.shape["data"] > 1 else P())
