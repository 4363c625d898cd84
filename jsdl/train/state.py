"""Training state, optimiser and schedules.

:class:`TrainState` is one pytree holding everything a resumed run needs: parameters, optimiser
state, step, dead-latent statistics, RNG keys, the traced hyperparameters (learning rate, penalty
coefficients, TopK k) and the on-device metric sums since the last log. A population is the same
pytree with a leading member axis on every leaf.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jsdl.objective import SDLParams, SDLSpec, init_params
from jsdl.train.config import TrainConfig

__all__ = [
    "DeadStats",
    "TrainState",
    "RowParams",
    "stores_decoder_rows",
    "as_stored",
    "as_params",
    "relayout_opt_state",
    "METRIC_NAMES",
    "make_optimizer",
    "fuses_adam",
    "adam_update",
    "lr_multiplier",
    "coef_multiplier",
    "init_state",
    "spec_to_dict",
    "spec_from_dict",
    "raw_key",
]

# Metrics summed on device every step and averaged at log time.
METRIC_NAMES = ("loss", "mse", "fvu", "l0", "dead_frac", "auxk", "anchor", "ghost")


@struct.dataclass
class DeadStats:
    """Dead-latent statistics, shapes ``[n_q]`` (plus a leading member axis in a population).

    since_fired: steps since the latent last fired on any sample of the batch.
    window_count: number of (sample, step) firings in the current window.
    window_steps: steps in the current window (scalar).
    freq: firing frequency (fraction of samples) over the last completed window; -1 before one.
    """

    since_fired: jax.Array
    window_count: jax.Array
    window_steps: jax.Array
    freq: jax.Array


@struct.dataclass
class RowParams:
    """How the training state stores the parameters of an untied model on the sparse path: the
    fields of :class:`jsdl.SDLParams`, but the decoder as rows, ``W_Dt = W_D^T [n_q, n_r]``
    (:func:`stores_decoder_rows`).

    The sparse kernels gather and scatter decoder *columns*, i.e. rows of ``W_D^T``. Stored as
    ``W_D [n_r, n_q]``, every step transposed the decoder in (50 MB at n_q 16384, d 768), its
    gradient out, and clipped and Adam-updated a gradient read transposed: ~12% of the large TopK
    step (benchmarks/NOTES.md, "Speed round 7"). Stored as rows, the loss sees ``W_D = W_Dt^T``
    and XLA cancels the two transposes. The dense path keeps ``W_D`` (there rows were 4-7% slower).

    Read parameters through :attr:`TrainState.params`, which always returns :class:`SDLParams`."""

    W_E: jax.Array
    W_Dt: jax.Array
    b_E: Optional[jax.Array] = None
    b_D: Optional[jax.Array] = None
    threshold: Optional[jax.Array] = None
    W_S: Optional[jax.Array] = None


def _swap(x):
    """``x`` with its last two axes swapped (also for ``jax.ShapeDtypeStruct`` and numpy arrays)."""
    if x is None:
        return None
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((*x.shape[:-2], x.shape[-1], x.shape[-2]), x.dtype)
    return x.swapaxes(-1, -2)


def stores_decoder_rows(spec: SDLSpec, dtype=None) -> bool:
    """Whether the training state of ``spec`` stores the decoder as rows (:class:`RowParams`): an
    untied decoder trained on the sparse path (:func:`jsdl.kernels.use_sparse`)."""
    from jsdl import kernels

    return not spec.method_info.tied and kernels.use_sparse(spec, dtype)


def as_stored(params: SDLParams, rows: bool) -> Union[SDLParams, RowParams]:
    """``params`` in the training state's storage: :class:`RowParams` when ``rows`` (and the model
    has a decoder matrix), else ``params`` itself."""
    if isinstance(params, RowParams):
        params = as_params(params)
    if not rows or params.W_D is None:
        return params
    return RowParams(W_E=params.W_E, W_Dt=_swap(params.W_D), b_E=params.b_E, b_D=params.b_D,
                     threshold=params.threshold, W_S=params.W_S)


def as_params(stored: Union[SDLParams, RowParams]) -> SDLParams:
    """The :class:`jsdl.SDLParams` of a stored parameter pytree (the inverse of :func:`as_stored`)."""
    if not isinstance(stored, RowParams):
        return stored
    return SDLParams(W_E=stored.W_E, W_D=_swap(stored.W_Dt), b_E=stored.b_E, b_D=stored.b_D,
                     threshold=stored.threshold, W_S=stored.W_S)


def relayout_opt_state(opt_state, rows: bool):
    """``opt_state`` with every parameter-shaped sub-tree (optax keeps moments in the parameters'
    structure) converted to the storage :func:`as_stored` gives for ``rows``."""
    return jax.tree.map(lambda sub: as_stored(sub, rows) if isinstance(sub, (SDLParams, RowParams)) else sub,
                        opt_state, is_leaf=lambda x: isinstance(x, (SDLParams, RowParams)))


@struct.dataclass
class TrainState:
    """Everything needed to continue a run.

    stored: the parameters as stored for training, :class:`jsdl.SDLParams` or, for an untied
    decoder on the sparse path, :class:`RowParams` (the decoder as rows); read them as
    :attr:`params`, which is always :class:`jsdl.SDLParams`, and write them with
    ``state.replace(params=...)``, which stores them the same way;
    opt_state: optax state (its moments in the storage of ``stored``); step: int32 scalar;
    dead: :class:`DeadStats`; key: raw uint32 PRNG key ``[2]`` for resampling;
    data_key: raw key of the synthetic data stream (batch t uses ``fold_in(data_key, t)``);
    hyper: traced hyperparameters ``{"lr": scalar, "coefs": {penalty: scalar}, "k": int32 scalar}``
    (``k`` only when a population varies TopK k); metrics: on-device sums of METRIC_NAMES since the
    last log, with ``count`` and ``bad_step`` (first step with a non-finite loss, -1 if none).
    """

    stored: Union[SDLParams, RowParams]
    opt_state: Any
    step: jax.Array
    dead: DeadStats
    key: jax.Array
    data_key: jax.Array
    hyper: dict
    metrics: dict

    @property
    def params(self) -> SDLParams:
        """The parameters as :class:`jsdl.SDLParams` (``W_D [n_r, n_q]``), whatever the storage."""
        return as_params(self.stored)

    @property
    def decoder_rows(self) -> bool:
        """Whether the decoder is stored as rows (:class:`RowParams`)."""
        return isinstance(self.stored, RowParams)


def _replace_state(self, **updates) -> "TrainState":
    """``dataclasses.replace``; ``params=`` (:class:`jsdl.SDLParams`) is stored as ``stored`` in
    the state's storage."""
    if "params" in updates:
        if "stored" in updates:
            raise TypeError("pass params= or stored=, not both")
        updates["stored"] = as_stored(updates.pop("params"), isinstance(self.stored, RowParams))
    return dataclasses.replace(self, **updates)


TrainState.replace = _replace_state  # flax's struct.dataclass sets its own replace; this one knows params=


# Checkpoints: format 2 holds a TrainState (field ``stored``); format 1, written before the
# decoder could be stored as rows, named the field ``params`` and always held SDLParams.
STATE_FORMAT = 2


@struct.dataclass
class TrainStateV1:
    """The field names of a format-1 checkpoint (see :data:`STATE_FORMAT`); only for reading one."""

    params: SDLParams
    opt_state: Any
    step: jax.Array
    dead: DeadStats
    key: jax.Array
    data_key: jax.Array
    hyper: dict
    metrics: dict


_V1_SAME = ("step", "dead", "key", "data_key", "hyper", "metrics")  # fields both formats share


def state_to_v1(state: TrainState) -> TrainStateV1:
    """``state`` (arrays or ``jax.ShapeDtypeStruct``) as a format-1 tree: SDLParams everywhere."""
    return TrainStateV1(params=as_params(state.stored), opt_state=relayout_opt_state(state.opt_state, False),
                        **{n: getattr(state, n) for n in _V1_SAME})


def state_from_v1(old: TrainStateV1, rows: bool) -> TrainState:
    """A format-1 tree as a :class:`TrainState` storing the decoder as rows when ``rows``."""
    return TrainState(stored=as_stored(old.params, rows), opt_state=relayout_opt_state(old.opt_state, rows),
                      **{n: getattr(old, n) for n in _V1_SAME})


def raw_key(key) -> jax.Array:
    """A raw uint32 key from a typed key or a raw key."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def _decay_mask(params):
    # Thresholds and biases are not weight-decayed (params: SDLParams or RowParams).
    decayed = ("W_E", "W_D", "W_Dt", "W_S")
    return params.replace(**{f.name: None if getattr(params, f.name) is None else f.name in decayed
                             for f in dataclasses.fields(params)})


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """The optax transformation *without* the learning rate: the step multiplies its output by
    ``-lr * lr_multiplier(step)`` with ``lr`` traced (so populations can vary it)."""
    parts = []
    if config.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip))
    if config.optimizer in ("adam", "adamw"):
        parts.append(optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps))
    elif config.momentum > 0:
        parts.append(optax.trace(decay=config.momentum))
    if config.optimizer == "adamw" and config.weight_decay > 0:
        parts.append(optax.add_decayed_weights(config.weight_decay, mask=_decay_mask))
    return optax.chain(*parts) if parts else optax.identity()


def fuses_adam(config: TrainConfig) -> bool:
    """Whether the training step applies :func:`make_optimizer`'s chain through :func:`adam_update`
    (Adam and AdamW) rather than through ``tx.update``."""
    return config.optimizer in ("adam", "adamw")


def adam_update(grads, opt_state, params, lr, g_norm, finite, config: TrainConfig):
    """One step of :func:`make_optimizer`'s chain for Adam/AdamW (global-norm clipping, Adam,
    decoupled weight decay), the learning rate ``lr`` applied, written out per parameter array.

    Returns ``(new params, new optimiser state)``; the state has optax's structure, so
    :func:`make_optimizer`'s ``init`` and checkpoints are unchanged. The new parameters equal
    ``apply_updates(params, -lr * tx.update(grads, opt_state, params)[0])`` to rounding (a few
    ulps). When ``finite`` is false the optimiser state is returned unchanged (the moments and the
    count); the parameters are not guarded here: the step selects the old ones itself, after the
    decoder-norm and threshold updates (``model_step``). ``g_norm`` is ``optax.tree.norm(grads)``.

    Why not ``tx.update``: there the parameter update reads the *unguarded* new moments while the
    state keeps the guarded ones. XLA then computes both from the old moments in separate fusions
    and, the state being donated, first copies both moments to update them in place. Here the
    parameter update reads exactly the moments the state keeps: no copies, and the large TopK
    step's optimiser went from ~86 to ~40 ms (31 ms timed alone; benchmarks/NOTES.md, "Speed
    round 8")."""
    if not fuses_adam(config):
        raise ValueError(f"adam_update applies to optimizer adam/adamw, not {config.optimizer!r}")
    i = next(j for j, s in enumerate(opt_state) if isinstance(s, optax.ScaleByAdamState))
    adam = opt_state[i]
    b1, b2, eps = config.b1, config.b2, config.eps
    count = optax.safe_increment(adam.count)
    clip = config.grad_clip
    decay = config.weight_decay if config.optimizer == "adamw" else 0.0
    decayed = _decay_mask(params)
    # min(1, c / |g|): written as a select of 1 and c / |g|, XLA turned g * scale back into g / |g|
    scale = jnp.minimum(1.0, clip / g_norm) if clip > 0 else None

    new_p, new_m, new_v = {}, {}, {}
    for f in dataclasses.fields(params):
        p, g = getattr(params, f.name), getattr(grads, f.name)
        if p is None:
            continue
        m, v = getattr(adam.mu, f.name), getattr(adam.nu, f.name)
        dt = p.dtype
        if clip > 0:
            # optax.clip_by_global_norm computes (g / g_norm) * clip; a scalar factor instead (equal to
            # rounding) keeps the clipped gradient out of memory: XLA does not duplicate a divide into
            # the two moments' fusions, so it wrote g / g_norm to memory and read it twice.
            g = g * scale.astype(g.dtype)
        m2 = jnp.where(finite, (1 - b1) * g + b1 * m, m)
        v2 = jnp.where(finite, (1 - b2) * (g**2) + b2 * v, v)
        u = optax.tree.bias_correction(m2, b1, count) / (jnp.sqrt(optax.tree.bias_correction(v2, b2, count)) + eps)
        if decay > 0 and getattr(decayed, f.name):
            u = u + decay * p
        new_p[f.name] = (p + -lr.astype(dt) * u).astype(dt)
        new_m[f.name], new_v[f.name] = m2, v2
    adam = adam._replace(count=jnp.where(finite, count, adam.count), mu=adam.mu.replace(**new_m),
                         nu=adam.nu.replace(**new_v))
    return params.replace(**new_p), (*opt_state[:i], adam, *opt_state[i + 1:])


def lr_multiplier(step, config: TrainConfig, xp=jnp):
    """Schedule factor in [min_lr_ratio, 1]: linear warm-up, then constant / linear / cosine decay
    from ``decay_start * steps`` to ``steps``. ``xp=numpy`` evaluates it on the host."""
    t = xp.asarray(step).astype(xp.float32)
    warm = xp.minimum(1.0, (t + 1.0) / config.warmup_steps) if config.warmup_steps > 0 else 1.0
    if config.decay == "constant":
        return warm * xp.ones_like(t)
    start = max(float(config.decay_start * config.steps), float(config.warmup_steps))
    span = max(config.steps - start, 1.0)
    frac = xp.clip((t - start) / span, 0.0, 1.0)
    if config.decay == "linear":
        shape = 1.0 - frac
    else:
        shape = 0.5 * (1.0 + xp.cos(xp.pi * frac))
    return warm * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * shape)


def coef_multiplier(step: jax.Array, config: TrainConfig) -> jax.Array:
    """Penalty-coefficient warm-up factor min(1, t / coef_warmup_steps) (0 at the first step)."""
    if config.coef_warmup_steps <= 0:
        return jnp.ones((), jnp.float32)
    return jnp.minimum(1.0, step.astype(jnp.float32) / config.coef_warmup_steps)


def _zero_metrics(dtype) -> dict:
    m = {k: jnp.zeros((), dtype) for k in METRIC_NAMES}
    m["count"] = jnp.zeros((), jnp.int32)
    m["bad_step"] = jnp.full((), -1, jnp.int32)
    return m


def init_state(
    key: jax.Array,
    spec: SDLSpec,
    config: TrainConfig,
    d_input: int,
    d_target: Optional[int] = None,
    *,
    data_key: Optional[jax.Array] = None,
    learning_rate: Any = None,
    coefs: Optional[dict] = None,
    k: Any = None,
    dtype: Any = None,
    rows: Optional[bool] = None,
) -> TrainState:
    """Initial state. ``key`` is split into (init, data, train) keys; ``data_key`` overrides the data
    key (a population feeds every member the same stream). ``learning_rate``/``coefs``/``k`` override
    the config/spec values (populations). ``rows`` overrides :func:`stores_decoder_rows` (how the state
    stores the decoder; the parameters are the same either way)."""
    key = raw_key(key)
    k_init, k_data, k_train = jax.random.split(key, 3)
    if data_key is not None:
        k_data = raw_key(data_key)
    params = init_params(k_init, spec, d_input, d_target, decoder_norm=config.init_decoder_norm,
                         encoder=config.init_encoder, dtype=dtype)
    tx = make_optimizer(config)
    dtype = params.W_E.dtype
    stored = as_stored(params, stores_decoder_rows(spec, dtype) if rows is None else rows)
    n_q = spec.n_latents
    dead = DeadStats(
        since_fired=jnp.zeros((n_q,), jnp.int32),
        window_count=jnp.zeros((n_q,), dtype),
        window_steps=jnp.zeros((), jnp.int32),
        freq=jnp.full((n_q,), -1.0, dtype),
    )
    base = spec.penalty_coefs
    coefs = {**base, **(coefs or {})}
    hyper = {
        "lr": jnp.asarray(config.learning_rate if learning_rate is None else learning_rate, dtype),
        "coefs": {n: jnp.asarray(c, dtype) for n, c in coefs.items()},
    }
    if k is not None:
        hyper["k"] = jnp.asarray(k, jnp.int32)
    return TrainState(
        stored=stored,
        opt_state=tx.init(stored),
        step=jnp.zeros((), jnp.int32),
        dead=dead,
        key=k_train,
        data_key=k_data,
        hyper=hyper,
        metrics=_zero_metrics(dtype),
    )


def threshold_for_l0(params: SDLParams, spec: SDLSpec, x_p: Any, l0: float) -> float:
    """The one JumpReLU threshold at which ``params`` fire ``l0`` latents per sample on average on
    ``x_p [N, n_p]``: the value between the ``m``-th and ``(m+1)``-th largest pre-activations of the
    batch, ``m = round(l0 N)``, so that exactly ``m`` entries lie above it (fewer with ties). It is
    clipped at 0 (a JumpReLU threshold is ``>= 0``), so an ``l0`` above what positive
    pre-activations give returns 0.

    Use it to choose a JumpReLU SAE's initial threshold by the sparsity it starts at rather than by
    a raw pre-activation value. Adam moves a threshold by about the learning rate per step, so a
    small default threshold may not reach the target within the budget (docs/training.md). Compute
    the initial parameters as ``fit`` does, then pass the value as the activation's ``threshold``::

        probe = init_state(key, spec, config, d_input).params      # fit(key, ...)'s initial parameters
        theta = threshold_for_l0(probe, spec, bench.sample(k, 4096).x_p, l0=40)
        spec = jsdl.make_spec("sae", "jumprelu", n_q, penalties={"l0": c}, threshold=theta)
        fit(key, spec, bench, config)

    The starting L0 is not the final one. On the SynthSAEBench ``cpu`` recipe (true L0 8.3, 1M
    samples, lr 1e-3), two seeds each:

    - starting at L0 8.3 (threshold 3.3) ended at L0 3.4-3.5 (MCC 0.49-0.50);
    - starting at L0 40 (threshold 2.0) ended at 8.3 (MCC 0.655-0.671).

    Treat the starting L0 as a hyperparameter to calibrate.

    Only ``W_E`` and ``b_E`` of ``params`` are read, and ``b_D`` for a ``pre_bias`` spec (the initial
    parameters do not depend on the threshold's value). ``TrainConfig(init_threshold_l0=...)`` does
    all of this inside ``fit``."""
    from jsdl.objective import pre_activations

    x_p = jnp.asarray(x_p)
    if x_p.ndim != 2 or x_p.shape[1] != params.W_E.shape[1]:
        raise ValueError(f"x_p must be [N, {params.W_E.shape[1]}] (the encoder's input width), got shape {x_p.shape}")
    n_q = spec.n_latents
    if not 0 < l0 < n_q:
        raise ValueError(f"l0 must be in (0, n_latents = {n_q}), got {l0!r}")
    z = np.asarray(jax.device_get(pre_activations(params, x_p, spec)), np.float64).ravel()
    m = min(int(round(l0 * x_p.shape[0])), z.size - 1)
    if m < 1:
        raise ValueError(f"l0 * N = {l0 * x_p.shape[0]:.3g} selects no entry; use more samples")
    # The (m+1) largest entries, descending: the threshold lies between the m-th and the (m+1)-th.
    top = np.sort(np.partition(z, z.size - m - 1)[z.size - m - 1:])[::-1]
    theta = 0.5 * (top[m - 1] + top[m])
    return float(max(theta, 0.0))


# ----------------------------------------------------------------------------------------------
# spec <-> JSON (checkpoints record the spec so a run loads without the code that made it)
# ----------------------------------------------------------------------------------------------


# spec <-> JSON lives with the spec (jsdl.objective); re-exported as jsdl.train.spec_to_dict/spec_from_dict.
from jsdl.objective import spec_from_dict, spec_to_dict  # noqa: E402,F401
