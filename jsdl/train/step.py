"""The training step: one pure function, jitted once, data-parallel over a device mesh, vmapped
over a population.

Design (see DESIGN.md "One code path for every scale"):

* The step is ``jax.jit`` of a pure ``(state, data, anchors) -> state`` over *global* arrays on
  the ``("data", "model")`` mesh of ``config.mesh`` (:mod:`jsdl.train.mesh`, Auto axes). The batch
  is placed (or, for a synthetic bench, generated inside the step and constrained) with
  ``NamedSharding(mesh, P("data"))``; latent-indexed state (W_E rows, W_D columns, b_E,
  thresholds, their Adam moments, dead statistics) lives on "model", the rest is replicated.
  XLA's SPMD partitioner inserts the collectives. We do not ``shard_map`` the step: the loss is a
  mean over the *global* batch, so the gradient is exactly the single-device one (no ``pmean``
  that could double count replicated parameters, cf. the pitfall in DESIGN.md), and
  batch-coupled activations (BatchTopK) keep their global-batch semantics. The only explicit
  collectives are in the top-k selections (:mod:`jsdl.shardops`), which return indices only.
* Outputs are constrained to the inputs' shardings, so the step compiles once and donation works.
* A population is a leading member axis on every leaf of the state; the per-model step is
  ``jax.vmap``-ed with the batch broadcast (every member sees the same data). The member axis is
  sharded over "data" when it divides evenly, otherwise the batch is.
* ``config.compute_dtype="bfloat16"`` runs the loss on bf16 casts of the float32 parameters and
  batch (:func:`to_compute`); gradients, Adam and the parameters stay float32.
* Learning rate, penalty coefficients and TopK ``k`` are read from the traced ``state.hyper``, so a
  population varies them without recompiling. A varying ``k`` runs ``top_k`` with ``k_max`` (the
  largest k of the population) and masks the values beyond each member's own k
  (:meth:`jsdl.activations.Activation.with_k`); the kept values equal ``top_k(z, k)``'s, so a member equals the
  separate run with that k.
* Metrics are summed on device into ``state.metrics`` and fetched by the host only at log
  intervals: no host sync per step. A non-finite loss leaves params and optimiser state untouched
  and records the step in ``metrics["bad_step"]``, which the loop turns into an error.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jsdl import activations as _act
from jsdl import kernels as _kernels
from jsdl import methods as _methods
from jsdl.objective import SDLParams, SDLSpec, pre_activations, sdl_loss
from jsdl.train import mesh as _mesh
from jsdl.train.config import TrainConfig
from jsdl.train.dead import dead_mask, ghost_grads_loss, resample_dead, update_dead
from jsdl.train.state import (METRIC_NAMES, RowParams, TrainState, adam_update, as_params, coef_multiplier,
                              fuses_adam, lr_multiplier, make_optimizer)

__all__ = ["with_dynamic_k", "model_step", "make_mesh", "Stepper", "get_stepper"]


def with_dynamic_k(spec: SDLSpec, k) -> SDLSpec:
    """``spec`` with its TopK/BatchTopK activation keeping a traced ``k`` (:meth:`Activation.with_k`)."""
    if k is None:
        return spec
    return dataclasses.replace(spec, activation=spec.activation.with_k(k))


def to_compute(tree, config: TrainConfig):
    """``tree`` with floating leaves cast to ``config.compute_dtype`` (a no-op for float32, so
    float64 runs under ``jax_enable_x64`` keep float64)."""
    if tree is None or config.compute_dtype == "float32":
        return tree
    cd = jnp.dtype(config.compute_dtype)
    return jax.tree.map(lambda x: x.astype(cd) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


# ----------------------------------------------------------------------------------------------
# decoder-norm handling
# ----------------------------------------------------------------------------------------------


def _decoder_field(params) -> tuple[str, int]:
    """(field, axis over a decoder column's entries) of the decoder in stored ``params``: the rows
    ``W_Dt`` of :class:`RowParams`, the columns of ``W_D``, or the rows of ``W_E`` when tied."""
    if isinstance(params, RowParams):
        return "W_Dt", 1
    if params.W_D is not None:
        return "W_D", 0
    return "W_E", 1


def _remove_parallel_grad(grads, params):
    """g_D,i <- g_D,i - (g_D,i . w_D,i / ||w_D,i||^2) w_D,i for every decoder column (rows of W_E
    when tied), so the step does not (to first order) change the column norms. ``grads`` and
    ``params`` in the state's storage (:class:`jsdl.SDLParams` or :class:`RowParams`)."""
    name, ax = _decoder_field(params)
    W, g = getattr(params, name), getattr(grads, name)
    coef = jnp.sum(g * W, axis=ax, keepdims=True) / jnp.maximum(jnp.sum(W * W, axis=ax, keepdims=True), 1e-12)
    return grads.replace(**{name: g - coef * W})


def _unit_decoder(params):
    name, ax = _decoder_field(params)
    W = getattr(params, name)
    n = jnp.linalg.norm(W, axis=ax, keepdims=True)
    return params.replace(**{name: W / jnp.maximum(n, 1e-12)})


# ----------------------------------------------------------------------------------------------
# the per-model step
# ----------------------------------------------------------------------------------------------


def _code_statistics(cparams: SDLParams, cbatch, spec: SDLSpec):
    """``(fired [n_q], batch threshold, B)`` of the codes of this step's batch: on how many samples
    each latent fired (dead-latent statistics) and the smallest positive code (the BatchTopK
    inference threshold). XLA's CSE shares the encoder matmul (and, on the sparse path, the top-k)
    with the loss's forward pass; the sparse path never builds the dense ``[B, n_q]`` codes."""
    x_p = jax.lax.stop_gradient(_methods.prepare_input(cbatch.x_p, spec))
    cparams = jax.lax.stop_gradient(cparams)
    if _kernels.use_sparse(spec, cparams.W_E.dtype):
        codes, _ = _kernels.sparse_encode(cparams, x_p, spec)
        return _kernels.fired_counts(codes), _kernels.min_positive(codes), x_p.shape[0]
    codes = spec.activation(pre_activations(cparams, x_p, spec), cparams)
    return _fired_dense(codes), _act.batchtopk_threshold(codes), codes.shape[0]


def _fired_dense(codes: jax.Array) -> jax.Array:
    """``sum(codes != 0, axis=0)`` as int32 (:func:`jsdl.kernels.dense_fired_counts`)."""
    return _kernels.dense_fired_counts(codes)


def model_step(state: TrainState, batch, anchors, *, spec: SDLSpec, config: TrainConfig, tx=None) -> TrainState:
    """One optimiser step of one model on ``batch`` (global arrays). Pure; jit/vmap-able."""
    step = state.step
    # The optimiser works on the parameters as stored (RowParams: the decoder as rows, which the
    # sparse kernels use without a transpose); the loss sees SDLParams (as_params).
    stored = state.stored
    params = as_params(stored)
    cm = coef_multiplier(step, config)
    coefs = {n: c * cm.astype(c.dtype) for n, c in state.hyper["coefs"].items()}
    run_spec = with_dynamic_k(spec, state.hyper.get("k"))
    dead = dead_mask(state.dead, config)
    info = spec.activation.info

    # Mixed precision: the forward/backward runs on compute-dtype copies of the (float32) weights
    # and batch; the cast's transpose returns float32 gradients to the float32 optimiser state.
    cbatch, canchors = to_compute(batch, config), to_compute(anchors, config)

    def loss_fn(s):
        pc = to_compute(as_params(s), config)
        loss, aux = sdl_loss(pc, cbatch, run_spec, coefs=coefs, dead_mask=dead if spec.aux_coef > 0 else None,
                             anchors=canchors)
        if config.ghost_grads:
            g = ghost_grads_loss(pc, cbatch, run_spec, dead, aux["mse"])
            loss = loss + g
            aux = {**aux, "ghost": g, "loss": loss}
        out_dtype = s.W_E.dtype
        return loss.astype(out_dtype), {k: v.astype(out_dtype) for k, v in aux.items()}

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(stored)
    fired, batch_threshold, B = _code_statistics(to_compute(params, config), cbatch, run_spec)

    if info.inference_threshold and grads.threshold is not None:
        # The BatchTopK inference threshold is estimated, never trained: keep it out of the optimiser.
        grads = grads.replace(threshold=jnp.zeros_like(grads.threshold))
    if config.decoder_norm == "unit":
        grads = _remove_parallel_grad(grads, stored)
    g_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(g_norm)
    keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(finite, x, y), a, b)  # noqa: E731
    lr = state.hyper["lr"] * lr_multiplier(step, config).astype(state.hyper["lr"].dtype)
    if fuses_adam(config):
        new, opt_state = adam_update(grads, state.opt_state, stored, lr, g_norm, finite, config)
    else:
        updates, opt_state = (tx or make_optimizer(config)).update(grads, state.opt_state, stored)
        updates = jax.tree.map(lambda u: -lr.astype(u.dtype) * u, updates)
        new = optax.apply_updates(stored, updates)
        opt_state = keep(opt_state, state.opt_state)
    if config.decoder_norm == "unit":
        new = _unit_decoder(new)
    if info.needs_threshold and new.threshold is not None:
        new = new.replace(threshold=jnp.maximum(new.threshold, config.min_threshold))
    if info.inference_threshold and params.threshold is not None:
        th = batch_threshold.astype(params.threshold.dtype)
        r = config.threshold_rate
        ema = jnp.where(step == 0, th, (1.0 - r) * params.threshold + r * th)
        new = new.replace(threshold=jnp.broadcast_to(ema, params.threshold.shape))

    new = keep(new, stored)

    stats = update_dead(state.dead, fired, B, config)
    stats = keep(stats, state.dead)
    dead_frac = jnp.mean(dead_mask(stats, config).astype(loss.dtype))

    m = dict(state.metrics)
    vals = {**{k: aux.get(k, jnp.zeros((), loss.dtype)) for k in METRIC_NAMES}, "dead_frac": dead_frac}
    for k in METRIC_NAMES:
        m[k] = m[k] + jnp.where(finite, vals[k].astype(m[k].dtype), 0.0)
    m["count"] = m["count"] + finite.astype(jnp.int32)
    m["bad_step"] = jnp.where((m["bad_step"] < 0) & ~finite, step, m["bad_step"])

    return state.replace(stored=new, opt_state=opt_state, step=step + 1, dead=stats, metrics=m)


# ----------------------------------------------------------------------------------------------
# the compiled, sharded stepper
# ----------------------------------------------------------------------------------------------


def make_mesh(devices=None, mesh=None, n_latents=None) -> jax.sharding.Mesh:
    """The ``("data", "model")`` mesh (Auto axes) over ``devices`` (default: all devices); ``mesh``
    is ``TrainConfig.mesh`` (default: every device on "data"). See :mod:`jsdl.train.mesh`."""
    return _mesh.make_mesh(mesh, devices, n_latents)


def _is_array_pytree(x) -> bool:
    leaves = jax.tree.leaves(x)
    return bool(leaves) and all(isinstance(l, (jax.Array, np.ndarray)) for l in leaves)


class Stepper:
    """Compiles and runs the step (and the resampling step) for one model or a population.

    ``data_mode`` is ``"bench"`` (batches generated inside the step by ``data.sample(fold_in(
    data_key, step), batch_size)``) or ``"batch"`` (host batches passed in). ``n_members`` is None
    for one model, else the population size. The devices form the ``("data", "model")`` mesh of
    ``config.mesh`` (:mod:`jsdl.train.mesh`): latent-indexed state on "model", batch (or population
    members, when their number divides the "data" axis) on "data"."""

    def __init__(self, spec: SDLSpec, config: TrainConfig, *, data_mode: str, n_members: Optional[int] = None,
                 devices=None, bench=None):
        self.spec, self.config, self.data_mode, self.n_members = spec, config, data_mode, n_members
        self.mesh = make_mesh(devices, config.mesh, spec.n_latents)
        n_data = self.mesh.shape["data"]
        self.population = n_members is not None
        shard_members = self.population and n_data > 1 and n_members % n_data == 0
        shard_batch = n_data > 1 and not shard_members and config.batch_size % n_data == 0
        if n_data > 1 and not shard_members and not shard_batch:
            raise ValueError(
                f"batch_size={config.batch_size} is not divisible by the {n_data} devices of the 'data' mesh axis"
                + (f" (nor is the population size {n_members})" if self.population else "")
                + f"; use a multiple of {n_data} or pass devices=jax.devices()[:1]"
            )
        self.shard_members = shard_members
        self.batch_sharding = _mesh.batch_sharding(self.mesh, shard_batch)
        self.replicated = NamedSharding(self.mesh, P())
        # A bench made of arrays is passed as an argument (not baked into the program as constants).
        self.bench_is_arg = bench is not None and _is_array_pytree(bench)
        self._bench_static = None if self.bench_is_arg else bench
        tx = None if fuses_adam(config) else make_optimizer(config)  # Adam/AdamW: the step's own update
        one = lambda s, b, a: model_step(s, b, a, spec=spec, config=config, tx=tx)  # noqa: E731
        res = lambda k, s, b: resample_dead(k, s, b, spec, config)  # noqa: E731
        self._one = jax.vmap(one, in_axes=(0, None, None)) if self.population else one
        self._res = jax.vmap(res, in_axes=(0, 0, None)) if self.population else res
        # Outputs are constrained to the inputs' shardings (mesh.constrain_state): the step is
        # compiled exactly once. Donated state: the step updates params and Adam moments in place
        # (no second copy of the dictionary); the loop never reuses a state passed to the step.
        donate = (0,) if config.donate else ()
        # Called inside ``jax.set_mesh``: the mesh-aware selections (jsdl.shardops) read it at trace time.
        # The step's compiler options depend on the input width, known at the first call: a large
        # sparse step on CPU hands its encoder product to oneDNN (jsdl.cpudot).
        self.step = _ShapedProgram(self._step_fn, donate, self.mesh, self._step_options)
        self.resample = self._in_mesh(jax.jit(self._resample_fn, donate_argnums=donate))
        self.reset_metrics = self._in_mesh(jax.jit(self._reset_fn, donate_argnums=donate))

    def _in_mesh(self, fn):
        mesh = self.mesh

        @functools.wraps(fn)
        def call(*args):
            with jax.set_mesh(mesh):
                return fn(*args)

        call.lower = lambda *args: _lower_in(mesh, fn, *args)
        call._cache_size = fn._cache_size  # the compiled-once checks read it
        call.jitted = fn
        return call

    def _step_options(self, state) -> Optional[dict]:
        """XLA compiler options of the step on ``state`` (:func:`jsdl.cpudot.compiler_options`)."""
        from jsdl import cpudot

        W_E = state.stored.W_E
        return cpudot.compiler_options(
            self.mesh.devices.flat[0].platform, sparse=_kernels.use_sparse(self.spec, W_E.dtype),
            batch_size=self.config.batch_size, d_in=W_E.shape[-1], n_latents=self.spec.n_latents,
            population=self.population, data_devices=self.mesh.shape["data"],
            model_devices=self.mesh.shape["model"])

    # state helpers -------------------------------------------------------------------------
    def state_shardings(self, state):
        """NamedSharding of every leaf of ``state`` (a TrainState or a pytree of its parts)."""
        return _mesh.state_shardings(self.mesh, state, self.spec.n_latents, member_axis=self.population,
                                     shard_members=self.shard_members)

    def _constrain(self, state):
        return _mesh.constrain_state(self.mesh, state, self.spec.n_latents, member_axis=self.population,
                                     shard_members=self.shard_members)

    def place_state(self, state: TrainState) -> TrainState:
        """``state`` on the mesh. Every process must pass the same (global) values."""
        shardings = self.state_shardings(state)
        if jax.process_count() > 1:
            return jax.tree.map(_global_from_replicated_host, state, shardings)
        return jax.device_put(state, shardings)

    def place_data(self, data):
        """A bench (replicated) or a batch (rows over "data"). With several processes a batch holds
        this process's rows only (its share of the global batch, in process order) and is assembled
        into the global array with ``jax.make_array_from_process_local_data``."""
        if self.data_mode == "bench":
            if not self.bench_is_arg:
                return None
            # The feature matrices' transposes, kept on the bench, so that the step's draw does not
            # transpose them every step (SamplingMixin.with_feature_rows; same samples).
            rows = getattr(data, "with_feature_rows", None)
            return jax.device_put(rows() if rows is not None else data, self.replicated)
        if jax.process_count() > 1:
            return jax.tree.map(
                lambda x: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(x)), data)
        return jax.device_put(data, self.batch_sharding)

    def _shared(self, x):
        return x[0] if self.population else x

    def _batch(self, state, data):
        if self.data_mode == "batch":
            return data
        bench = data if self.bench_is_arg else self._bench_static
        key = jax.random.fold_in(self._shared(state.data_key), self._shared(state.step))
        batch = bench.sample(key, self.config.batch_size)
        return jax.lax.with_sharding_constraint(batch, self.batch_sharding)

    def _step_fn(self, state, data, anchors):
        return self._constrain(self._one(state, self._batch(state, data), anchors))

    def _resample_fn(self, state, data):
        batch = self._batch(state, data)
        keys = jax.vmap(jax.random.fold_in)(state.key, state.step) if self.population else \
            jax.random.fold_in(state.key, state.step)
        return self._constrain(self._res(keys, state, batch))

    def _reset_fn(self, metrics):
        return self._constrain(zero_metrics(metrics))


class _ShapedProgram:
    """A jitted program, called inside ``mesh``, whose XLA compiler options are chosen from its
    first argument (the state) by ``options_for(state)``: one ``jax.jit`` per distinct set of
    options. Behaves like the jitted function for ``__call__``, ``lower`` and ``_cache_size``."""

    def __init__(self, fn, donate, mesh, options_for):
        self._fn, self._donate, self._mesh, self._options_for = fn, donate, mesh, options_for
        self._jits: dict = {}
        self._by_shape: dict = {}
        self.__wrapped__ = fn

    def jitted_for(self, state):
        """The ``jax.jit`` of the program for ``state`` (a TrainState, arrays or abstract). The
        options are chosen once per shape and dtype of ``state.stored.W_E``."""
        W_E = state.stored.W_E
        shape = (W_E.shape, W_E.dtype)
        fn = self._by_shape.get(shape)
        if fn is None:
            options = self._options_for(state)
            key = tuple(sorted(options.items())) if options else ()
            if key not in self._jits:
                self._jits[key] = jax.jit(self._fn, donate_argnums=self._donate, compiler_options=options)
            fn = self._by_shape[shape] = self._jits[key]
        return fn

    def __call__(self, *args):
        with jax.set_mesh(self._mesh):
            return self.jitted_for(args[0])(*args)

    def lower(self, *args):
        return _lower_in(self._mesh, self.jitted_for(args[0]), *args)

    def _cache_size(self) -> int:
        return sum(j._cache_size() for j in self._jits.values())


def _lower_in(mesh, fn, *args):
    with jax.set_mesh(mesh):
        return fn.lower(*args)


def _global_from_replicated_host(x, sharding: NamedSharding):
    """A global array on ``sharding`` from a value every process holds in full (multi-process),
    or from a global array (e.g. restored by orbax) resharded."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x if x.sharding == sharding else jax.jit(lambda a: a, out_shardings=sharding)(x)
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def zero_metrics(metrics: dict) -> dict:
    """Metric sums reset after a log (``bad_step`` back to -1)."""
    return {k: (jnp.full_like(v, -1) if k == "bad_step" else jnp.zeros_like(v)) for k, v in metrics.items()}


# ----------------------------------------------------------------------------------------------
# compiled-stepper cache: repeated fits with the same static setting reuse one compiled program
# ----------------------------------------------------------------------------------------------

_CACHE: dict = {}
_CACHE_MAX = 32


def step_config(config: TrainConfig) -> TrainConfig:
    """``config`` with the fields the compiled step never reads set to fixed values (the learning
    rate is read from ``state.hyper``; logging, checkpointing, anchors and the resampling schedule
    are host-side; ``init_threshold_l0`` is applied to the initial state on the host), so runs that
    differ only in those share one compiled step."""
    return dataclasses.replace(config, learning_rate=1.0, log_every=1, checkpoint_every=0, keep_checkpoints=1,
                               init_threshold_l0=None,
                               progress=False, plots=False, anchors=0, anchor_coef=0.0,
                               anchor_source="ground_truth", resample_every=0, resample_until=0)


def step_spec(spec: SDLSpec) -> SDLSpec:
    """``spec`` with penalty coefficients zeroed: the step reads them from ``state.hyper``."""
    return dataclasses.replace(spec, penalties=tuple((p, 0.0) for p, _ in spec.penalties))


def get_stepper(spec: SDLSpec, config: TrainConfig, *, data_mode: str, n_members: Optional[int] = None,
                devices=None, bench=None) -> Stepper:
    """A (cached) :class:`Stepper`. Entries are keyed on everything the compiled step depends on;
    a bench that is not an array pytree is closed over, so it is keyed by identity."""
    spec, config = step_spec(spec), step_config(config)
    devs = tuple(jax.devices() if devices is None else devices)
    bench_key = None
    if data_mode == "bench":
        bench_key = ("arg", type(bench)) if _is_array_pytree(bench) else ("static", id(bench))
    key = (spec, config, data_mode, n_members, devs, bench_key)
    st = _CACHE.get(key)
    if st is None or (bench_key is not None and bench_key[0] == "static" and st._bench_static is not bench):
        st = Stepper(spec, config, data_mode=data_mode, n_members=n_members, devices=devs, bench=bench)
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = st
    return st
