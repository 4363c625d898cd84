"""Dead latents: tracking, Anthropic resampling, ghost grads (AuxK lives in ``jsdl.penalties``).

* **Tracking.** Every step counts, per latent, the samples of the batch on which it fired. A latent
  is *dead* when it has not fired for ``dead_window`` steps, or when its firing frequency over the
  last completed window of ``dead_window`` steps is below ``dead_threshold``.
* **Resampling** (Bricken et al. 2023, "Towards monosemanticity"): each dead latent i gets an input
  x^(j) drawn with probability proportional to its squared reconstruction loss; the decoder column
  becomes x_r^(j)/||x_r^(j)||, the encoder row x_p^(j)/||x_p^(j)|| times ``resample_scale`` times
  the mean alive encoder-row norm, b_E,i = 0, and the optimiser moments of row/column i are reset.
  This moves W_E to another activation region, escaping the polysemantic partial minima of the
  paper's section 3.4 (a dead latent gets exactly zero gradient under pure MSE).
* **Ghost grads** (Anthropic, Jan/Feb 2024 updates): dead latents with exp(z) activations
  reconstruct the residual, rescaled to half its norm, with the loss rescaled to the MSE's size.
* **AuxK** (Gao et al. 2024) is ``jsdl.penalties.auxk_loss``, enabled through ``sdl_loss(...,
  dead_mask=...)`` when the spec has ``aux_coef > 0``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jsdl import methods as _methods
from jsdl.objective import SDLParams, decode, pre_activations
from jsdl.train.config import TrainConfig
from jsdl.train.state import DeadStats, RowParams, TrainState

__all__ = ["dead_mask", "update_dead", "ghost_grads_loss", "resample_dead", "reset_opt_state"]


def dead_mask(dead: DeadStats, config: TrainConfig) -> jax.Array:
    """Boolean ``[n_q]``: not fired for ``dead_window`` steps, or last-window frequency below
    ``dead_threshold``."""
    never = dead.since_fired >= config.dead_window
    if config.dead_threshold > 0:
        return never | ((dead.freq >= 0) & (dead.freq < config.dead_threshold))
    return never


def update_dead(dead: DeadStats, fired: jax.Array, batch_size: int, config: TrainConfig) -> DeadStats:
    """Fold one step's firing counts ``fired [n_q]`` (samples on which each latent was non-zero)
    into the statistics."""
    since = jnp.where(fired > 0, 0, dead.since_fired + 1)
    wc = dead.window_count + fired.astype(dead.window_count.dtype)
    ws = dead.window_steps + 1
    full = ws >= config.dead_window
    freq = jnp.where(full, wc / (ws * batch_size), dead.freq)
    return DeadStats(
        since_fired=since,
        window_count=jnp.where(full, 0.0, wc),
        window_steps=jnp.where(full, 0, ws),
        freq=freq,
    )


def ghost_grads_loss(params: SDLParams, batch, spec, dead: jax.Array, mse: jax.Array) -> jax.Array:
    """Ghost-grads loss. Shapes: ``dead [n_q]`` bool; returns a scalar (0 when no latent is dead).

    With residual e = x_r - x_r^ (stop-gradient) and ghost output g = W_D (exp(z) * dead), rescaled
    to ||e|| / (2 ||g||) per sample (stop-gradient), the loss is ||g - e||^2 rescaled to the MSE
    (the factor mse / ghost_mse is a stop-gradient constant), so only dead latents learn from it."""
    x_p, x_r = _methods.prepare(batch.x_p, batch.x_r, spec)
    z = pre_activations(params, x_p, spec)
    codes = spec.activation(z, params)
    resid = jax.lax.stop_gradient(x_r - decode(params, codes, spec, x_p))
    ghost_acts = jnp.exp(jnp.minimum(z, 30.0)) * dead[None, :].astype(z.dtype)
    g = ghost_acts @ params.decoder.T
    scale = jnp.linalg.norm(resid, axis=-1, keepdims=True) / (2.0 * jnp.linalg.norm(g, axis=-1, keepdims=True) + 1e-6)
    g = g * jax.lax.stop_gradient(scale)
    ghost_mse = jnp.mean(jnp.sum((g - resid) ** 2, axis=-1))
    factor = jax.lax.stop_gradient(mse / (ghost_mse + 1e-6))
    return jnp.where(jnp.any(dead), factor * ghost_mse, 0.0)


def _latent_mask(params, keep: jax.Array):
    """A pytree shaped like ``params`` (:class:`SDLParams` or the training state's
    :class:`~jsdl.train.state.RowParams`) whose leaves broadcast ``keep [n_q]`` over latent-indexed
    axes (W_E rows, W_D columns, W_Dt rows, b_E, threshold) and are 1 elsewhere."""
    one = jnp.ones((), keep.dtype)
    latent = {"W_E": keep[:, None], "W_D": keep[None, :], "W_Dt": keep[:, None], "b_E": keep, "threshold": keep}
    return params.replace(**{f.name: None if getattr(params, f.name) is None else latent.get(f.name, one)
                             for f in dataclasses.fields(params)})


def reset_opt_state(opt_state, params, reset: jax.Array):
    """Zero the optimiser state (e.g. Adam mu, nu) of the latents where ``reset [n_q]`` is True.

    Every sub-tree of ``opt_state`` that is an :class:`SDLParams` or a
    :class:`~jsdl.train.state.RowParams` (optax keeps moments in the parameters' structure) is
    multiplied by the latent mask of its own storage; counters are left alone."""
    dtype = params.W_E.dtype

    def fix(sub):
        if isinstance(sub, (SDLParams, RowParams)):
            mask = _latent_mask(sub, 1.0 - reset.astype(dtype))
            return jax.tree.map(lambda leaf, m: leaf * m.astype(leaf.dtype), sub, mask)
        return sub

    return jax.tree.map(fix, opt_state, is_leaf=lambda x: isinstance(x, (SDLParams, RowParams)))


def resample_dead(key: jax.Array, state: TrainState, batch, spec, config: TrainConfig) -> TrainState:
    """Anthropic resampling of the dead latents of ``state`` using the inputs of ``batch``
    (``x_p [B, n_p]``, ``x_r [B, n_r]``); see the module docstring. jit/vmap-able: a no-op when
    nothing is dead."""
    params = state.params
    dead = dead_mask(state.dead, config)
    x_p, x_r = _methods.prepare(batch.x_p, batch.x_r, spec)
    z = pre_activations(params, x_p, spec)
    codes = spec.activation(z, params)
    err = jnp.sum((x_r - decode(params, codes, spec, x_p)) ** 2, axis=-1)
    # p_j proportional to err_j^2 (Bricken et al.); tiny floor keeps the logits finite.
    logits = 2.0 * jnp.log(err + jnp.finfo(err.dtype).tiny)
    idx = jax.random.categorical(key, logits, shape=(spec.n_latents,))

    def unit(v):
        return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)

    dir_p, dir_r = unit(x_p[idx]), unit(x_r[idx])          # [n_q, n_p], [n_q, n_r]
    alive = ~dead
    enc_norm = jnp.linalg.norm(params.W_E, axis=1)
    n_alive = jnp.sum(alive)
    mean_alive = jnp.where(n_alive > 0, jnp.sum(enc_norm * alive) / jnp.maximum(n_alive, 1), 1.0)
    d = dead[:, None]
    if params.W_D is None:  # tied: the encoder row is also the decoder column
        W_E = jnp.where(d, dir_p * mean_alive, params.W_E)
        W_D = None
    else:
        W_E = jnp.where(d, dir_p * (mean_alive * config.resample_scale), params.W_E)
        dec_norm = jnp.linalg.norm(params.W_D, axis=0)
        dec_scale = 1.0 if config.decoder_norm == "unit" else jnp.where(
            n_alive > 0, jnp.sum(dec_norm * alive) / jnp.maximum(n_alive, 1), 1.0)
        W_D = jnp.where(dead[None, :], dir_r.T * dec_scale, params.W_D)
    b_E = None if params.b_E is None else jnp.where(dead, 0.0, params.b_E)
    new_params = params.replace(W_E=W_E, W_D=W_D, b_E=b_E)
    opt_state = reset_opt_state(state.opt_state, params, dead)
    stats = state.dead.replace(
        since_fired=jnp.where(dead, 0, state.dead.since_fired),
        freq=jnp.where(dead, -1.0, state.dead.freq),
    )
    return state.replace(params=new_params, opt_state=opt_state, dead=stats)
