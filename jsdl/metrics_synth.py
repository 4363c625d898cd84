"""The metrics SynthSAEBench reports, computed as SAELens's ``eval_sae_on_synthetic_data`` does.

With learned latent directions ``D [n_q, d]`` (decoder rows: ``W_D^T``) and ground-truth feature
vectors ``E [n, d]`` (``W_r^T`` of a bench), ``C = |cos(D_j, E_i)|`` ``[n_q, n]``:

* ``mcc``: mean of ``C`` over the one-to-one matching maximising its sum (Hungarian; min(n_q, n)
  pairs);
* ``uniqueness``: (number of distinct ``argmax_i C_ji`` over latents j) / n_q;
* per-latent classification: latent j predicts that its best-matching feature ``m_j = argmax_i
  C_ji`` is active. Over the samples, ``TP_j = #{code_j != 0 and f_{m_j} > 0}``, likewise FP, FN,
  TN; precision ``TP/(TP+FP)``, recall ``TP/(TP+FN)``, ``F1 = 2PR/(P+R)`` (each 0 when undefined),
  accuracy; the reported values are the means over latents (dead latents count with 0);
* ``explained_variance = 1 - E||x - x^||^2 / (E||x||^2 - ||E x||^2)`` (x the SAE input);
* ``shrinkage``: mean over samples with ``||x|| > 1e-6`` of ``||x^|| / ||x||``;
* ``sae_l0`` (mean number of non-zero codes), ``true_l0`` (mean number of active features),
  ``dead_latents`` (latents never non-zero over the sample).

Codes are the deployed ones (``inference=True``: BatchTopK uses its inference threshold, as
SAELens's saved BatchTopK SAEs do). This module depends only on :mod:`jsdl.objective`; it is
re-exported by :mod:`jsdl.metrics`.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jsdl import methods as _methods
from jsdl.objective import SDLParams, SDLSpec, decode, encode

__all__ = ["synth_eval", "synth_mcc", "synth_uniqueness", "synth_best_matches", "synth_classification"]


def _unit_rows_np(A: np.ndarray) -> np.ndarray:
    A = np.asarray(A, np.float64)
    return A / np.maximum(np.linalg.norm(A, axis=1, keepdims=True), 1e-8)


def _abs_cos(latents: Any, features: Any) -> np.ndarray:
    """``|cos|`` ``[n_q, n]`` between the rows of ``latents [n_q, d]`` and ``features [n, d]``."""
    L, F = np.asarray(latents), np.asarray(features)
    if L.ndim != 2 or F.ndim != 2 or L.shape[1] != F.shape[1]:
        raise ValueError(f"latent directions [n_q, d] and feature vectors [n, d] must share d, got shapes "
                         f"{L.shape} and {F.shape}")
    return np.abs(_unit_rows_np(L) @ _unit_rows_np(F).T)


def synth_mcc(latents: Any, features: Any) -> float:
    """MCC of latent directions ``[n_q, d]`` vs feature vectors ``[n, d]`` (module docstring)."""
    from scipy.optimize import linear_sum_assignment

    C = _abs_cos(latents, features)
    r, c = linear_sum_assignment(C, maximize=True)
    return float(C[r, c].mean())


def synth_best_matches(latents: Any, features: Any) -> np.ndarray:
    """``argmax_i |cos(latent_j, feature_i)|`` ``[n_q]`` (int)."""
    return np.argmax(_abs_cos(latents, features), axis=1)


def synth_uniqueness(latents: Any, features: Any) -> float:
    """Distinct best-matching features over the number of latents (0 for no latents)."""
    n_q = np.shape(latents)[0]
    if n_q == 0:
        return 0.0
    return float(np.unique(synth_best_matches(latents, features)).size / n_q)


def synth_classification(tp: Any, fp: Any, fn: Any, tn: Any) -> dict:
    """Mean precision, recall, F1 and accuracy over latents from per-latent counts ``[n_q]``."""
    tp, fp, fn, tn = (np.asarray(a, np.float64) for a in (tp, fp, fn, tn))
    if tp.size == 0:
        return dict(precision=0.0, recall=0.0, f1=0.0, accuracy=0.0)
    prec = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
    rec = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
    f1 = np.where(prec + rec > 0, 2 * prec * rec / np.where(prec + rec > 0, prec + rec, 1.0), 0.0)
    acc = (tp + tn) / np.maximum(tp + fp + fn + tn, 1e-8)
    return dict(precision=float(prec.mean()), recall=float(rec.mean()), f1=float(f1.mean()), accuracy=float(acc.mean()))


def _synth_sums(params, batch, best, spec, inference):
    x_p, x_r = _methods.prepare(batch.x_p, batch.x_r, spec)
    codes = encode(params, x_p, spec, inference=inference)
    x_hat = decode(params, codes, spec, x_p)
    fires = codes != 0  # != 0: signed activations count as firing
    gt = batch.features[:, best] > 0  # [B, n_q]
    xn = jnp.linalg.norm(x_r, axis=-1)
    ok = xn > 1e-6
    ratio = jnp.where(ok, jnp.linalg.norm(x_hat, axis=-1) / jnp.where(ok, xn, 1.0), 0.0)
    i32 = jnp.int32
    return dict(
        tp=jnp.sum(fires & gt, axis=0, dtype=i32), fp=jnp.sum(fires & ~gt, axis=0, dtype=i32),
        fn=jnp.sum(~fires & gt, axis=0, dtype=i32), tn=jnp.sum(~fires & ~gt, axis=0, dtype=i32),
        fired=jnp.any(fires, axis=0), sae_l0=jnp.sum(fires, dtype=i32), true_l0=jnp.sum(batch.features > 0, dtype=i32),
        shrink=jnp.sum(ratio), shrink_n=jnp.sum(ok, dtype=i32), sum_x=jnp.sum(x_r, axis=0),
        sum_sq=jnp.sum(x_r * x_r), sse=jnp.sum((x_r - x_hat) ** 2), n=x_r.shape[0],
    )


_synth_sums_jit = jax.jit(_synth_sums, static_argnums=(3, 4))


def synth_eval(
    params: SDLParams,
    spec: SDLSpec,
    data: Any,
    *,
    key: Optional[jax.Array] = None,
    features: Any = None,
    n_samples: int = 100_000,
    batch_size: int = 8192,
    inference: bool = True,
) -> dict:
    """The SynthSAEBench report of an SAE (module docstring) as a dict with keys ``true_l0``,
    ``sae_l0``, ``dead_latents``, ``shrinkage``, ``explained_variance``, ``mcc``, ``uniqueness``,
    ``precision``, ``recall``, ``f1``, ``accuracy``, ``n_samples``.

    ``data``: a bench with ground truth (``sample`` and ``W_r``; sampled with ``key``,
    ``n_samples`` in batches of ``batch_size``), or a :class:`jsdl.Batch` / list of Batches with
    ``features``. ``features``: the ground-truth vectors ``[n, d]`` (default ``data.W_r.T``)."""
    if features is None:
        if not hasattr(data, "W_r"):
            raise ValueError("synth_eval needs the ground-truth feature vectors: pass a bench or features=[n, d]")
        features = np.asarray(data.W_r).T
    latents = np.asarray(params.decoder).T  # [n_q, d]
    best = jnp.asarray(synth_best_matches(latents, features), jnp.int32)
    from jsdl.metrics import eval_batches  # jsdl.metrics re-exports this module at its end: import late

    acc = None
    for b in eval_batches(data, key, n_samples, batch_size):
        if b.features is None:
            raise ValueError("synth_eval needs Batch.features (the ground-truth activations)")
        s = {k: np.asarray(v) for k, v in _synth_sums_jit(params, b, best, spec, inference).items()}
        # Counts add exactly in int64, float sums in float64 (the total variance is a difference of
        # two large numbers when the data have a large mean, e.g. the recipe's bias).
        s = {k: v if v.dtype == bool else v.astype(np.int64 if v.dtype.kind in "iu" else np.float64) for k, v in s.items()}
        acc = s if acc is None else {k: (acc[k] | v) if v.dtype == bool else acc[k] + v for k, v in s.items()}
    N = int(acc["n"])
    total_var = float(acc["sum_sq"]) / N - float(np.sum((acc["sum_x"] / N) ** 2))
    mse = float(acc["sse"]) / N
    ev = (1.0 if mse < 1e-10 else 0.0) if total_var < 1e-10 else 1.0 - mse / total_var
    out = dict(
        true_l0=float(acc["true_l0"]) / N,
        sae_l0=float(acc["sae_l0"]) / N,
        dead_latents=int(np.sum(~acc["fired"])),
        shrinkage=float(acc["shrink"]) / int(acc["shrink_n"]) if int(acc["shrink_n"]) else 0.0,
        explained_variance=ev,
        mcc=synth_mcc(latents, features),
        uniqueness=synth_uniqueness(latents, features),
        n_samples=N,
    )
    out.update(synth_classification(acc["tp"], acc["fp"], acc["fn"], acc["tn"]))
    return out
