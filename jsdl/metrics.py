"""Metrics for sparse dictionaries against known ground truth, and over samples.

Dictionary metrics compare *normalised* learned directions with the ground-truth feature
matrices of a bench (anything with ``W_p [n_p, n]`` and ``W_r [n_r, n]``):

* encoder rows ``W_E [n_q, n_p]`` against the columns of ``W_p`` (paper section 4.4 / 5.1: learned
  features are the encoder rows);
* decoder columns ``W_D [n_r, n_q]`` against the columns of ``W_r`` (for SAEs ``W_r = W_p``; for
  transcoders the decoder writes the target; for the skip transcoder ``W_r`` is the feature part of
  the target; for crosscoders the sources are concatenated on both sides).

With ``S = |cos(learned_j, true_i)|`` ``[n_q, n]`` and ``s_i = max_j S_ji`` (best match of GT
feature i):

* ``M_GT(tau) = (1/n) sum_i 1{s_i > tau}`` (GT recovery, tau = 0.95 in the paper's Tables 1-2);
* ``M_IP = (1/n) sum_i s_i`` (mean best match, "maximum inner product").

``exclude`` removes GT features (anchored ones, as the paper's Table 1 does) from the averages;
``exclude_latents`` removes latents from the candidate set. Every metric is invariant to permuting
latents and to rescaling a latent (W_E row by c > 0, W_D column by 1/c, and the bias by c): they
use cosines, activity (code != 0) or code x decoder products only.

Sample metrics (:func:`code_statistics`, :func:`l0`, :func:`fvu`, :func:`dead_fraction`,
:func:`shrinkage`, :func:`absorption_score`) run the model on a sample drawn from a bench (or a
given :class:`jsdl.Batch` / array) in jitted batches.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jsdl import methods as _methods
from jsdl.objective import Batch, SDLParams, SDLSpec, decode, encode

__all__ = [
    "eval_batches",
    "unit_rows",
    "similarity",
    "best_match",
    "feature_recovery",
    "m_gt",
    "m_ip",
    "m_gt_curve",
    "mcc",
    "dictionary_mcc",
    "random_baseline",
    "code_statistics",
    "l0",
    "fvu",
    "dead_fraction",
    "shrinkage",
    "absorption_score",
    "match_latents",
    "shrinkage_matched",
    "evaluate",
    "TAUS",
]

TAUS = np.round(np.linspace(0.5, 0.99, 50), 4)  # thresholds of the M_GT(tau) curves of evaluate()


# --------------------------------------------------------------------------------------------------
# Dictionary metrics
# --------------------------------------------------------------------------------------------------


def unit_rows(A: jax.Array) -> jax.Array:
    """Rows of ``A [k, dim]`` scaled to unit norm; all-zero rows stay zero (similarity 0)."""
    A = jnp.asarray(A)
    nrm = jnp.linalg.norm(A, axis=-1, keepdims=True)
    return A / jnp.where(nrm > 0, nrm, 1.0)


def similarity(learned: jax.Array, true: jax.Array, *, signed: bool = False) -> jax.Array:
    """Cosine similarity ``[k, n]`` between the rows of ``learned [k, dim]`` and the columns of
    ``true [dim, n]`` (absolute value unless ``signed``)."""
    learned, true = jnp.asarray(learned), jnp.asarray(true)
    if learned.shape[-1] != true.shape[0]:
        raise ValueError(
            f"learned directions have width {learned.shape[-1]} (shape {tuple(learned.shape)}) but the "
            f"ground-truth matrix has {true.shape[0]} rows (shape {tuple(true.shape)})"
        )
    S = unit_rows(learned) @ unit_rows(true.T).T
    return S if signed else jnp.abs(S)


def _keep_mask(exclude: Any, n: int, what: str) -> np.ndarray:
    """Boolean ``[n]``: True for entries kept. ``exclude`` is None, indices, or a bool mask [n]."""
    keep = np.ones(n, bool)
    if exclude is None:
        return keep
    ex = np.asarray(exclude)
    if ex.dtype == bool:
        if ex.shape != (n,):
            raise ValueError(f"{what}: a boolean mask must have shape ({n},), got {ex.shape}")
        return ~ex
    ex = ex.astype(np.int64).ravel()
    if ex.size and (ex.min() < -n or ex.max() >= n):
        raise ValueError(f"{what}: indices must be in [0, {n}), got min {ex.min()} max {ex.max()}")
    keep[ex] = False
    return keep


def best_match(learned: jax.Array, true: jax.Array, exclude_latents: Any = None) -> jax.Array:
    """``s_i = max_j |cos(learned_j, true_i)|`` ``[n]`` over latents not in ``exclude_latents``."""
    S = similarity(learned, true)
    keep = _keep_mask(exclude_latents, S.shape[0], "exclude_latents")
    if not keep.all():
        S = jnp.where(jnp.asarray(keep)[:, None], S, -jnp.inf)
    return jnp.max(S, axis=0)


def _gt(bench: Any) -> tuple[jax.Array, jax.Array]:
    """(W_p, W_r) of a bench-like object, a (W_p, W_r) pair, or one matrix used for both."""
    if hasattr(bench, "W_p"):
        W_r = getattr(bench, "W_r", None)
        return bench.W_p, bench.W_p if W_r is None else W_r
    if isinstance(bench, (tuple, list)) and len(bench) == 2:
        return bench[0], bench[1]
    arr = jnp.asarray(bench)
    if arr.ndim != 2:
        raise TypeError(f"bench must have W_p/W_r, be a (W_p, W_r) pair or a [dim, n] matrix, got {type(bench)}")
    return arr, arr


def _directions(params: Any, which: str) -> jax.Array:
    if isinstance(params, SDLParams):
        if which == "encoder":
            return params.W_E
        if which == "decoder":
            return params.decoder.T
        raise ValueError(f"which must be 'encoder' or 'decoder', got {which!r}")
    arr = jnp.asarray(params)  # already [n_q, dim] directions
    if arr.ndim != 2:
        raise TypeError(f"params must be SDLParams or a [n_latents, dim] array, got shape {arr.shape}")
    return arr


def m_gt(s: jax.Array, threshold: float = 0.95) -> float:
    """GT recovery from best matches ``s [n]``: fraction with ``s_i > threshold``."""
    return float(jnp.mean(s > threshold))


def m_ip(s: jax.Array) -> float:
    """Mean best match of best matches ``s [n]``."""
    return float(jnp.mean(s))


def feature_recovery(
    params: SDLParams,
    bench: Any,
    threshold: float = 0.95,
    exclude: Any = None,
    *,
    exclude_latents: Any = None,
    with_mcc: bool = False,
) -> dict:
    """Ground-truth recovery (paper section 4.4) on encoder rows and decoder columns.

    Returns ``{"m_gt", "m_ip"}`` (normalised encoder rows vs ``W_p``), ``{"m_gt_dec", "m_ip_dec"}``
    (normalised decoder columns vs ``W_r``), ``"n_evaluated"`` (GT features not excluded), and with
    ``with_mcc`` also ``"mcc"``/``"mcc_dec"`` (Hungarian-matched, :func:`mcc`). ``exclude``: GT
    feature indices or bool mask ``[n]`` to leave out (anchored features)."""
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    W_p, W_r = _gt(bench)
    n = W_p.shape[1]
    keep = _keep_mask(exclude, n, "exclude")
    if not keep.any():
        raise ValueError("exclude removes every ground-truth feature; nothing to evaluate")
    out: dict = {"n_evaluated": int(keep.sum())}
    for suffix, which, true in (("", "encoder", W_p), ("_dec", "decoder", W_r)):
        learned = _directions(params, which)
        s = best_match(learned, true, exclude_latents)[keep]
        out["m_gt" + suffix] = m_gt(s, threshold)
        out["m_ip" + suffix] = m_ip(s)
        if with_mcc:
            lk = _keep_mask(exclude_latents, learned.shape[0], "exclude_latents")
            out["mcc" + suffix] = mcc(np.asarray(learned)[lk].T, np.asarray(true)[:, keep])
    return out


def m_gt_curve(
    params: SDLParams,
    bench: Any,
    taus: Any = None,
    exclude: Any = None,
    *,
    which: str = "encoder",
    exclude_latents: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``M_GT(tau)`` over thresholds (paper Fig. 6). Returns ``(taus [T], m_gt [T])``; default taus
    are 0, 0.01, ..., 1. ``which``: ``"encoder"`` (vs W_p) or ``"decoder"`` (vs W_r)."""
    W_p, W_r = _gt(bench)
    true = W_p if which == "encoder" else W_r
    taus = np.linspace(0.0, 1.0, 101) if taus is None else np.asarray(taus, float)
    keep = _keep_mask(exclude, true.shape[1], "exclude")
    s = np.asarray(best_match(_directions(params, which), true, exclude_latents))[keep]
    return taus, (s[None, :] > taus[:, None]).mean(axis=1)


def mcc(A: Any, B: Any, *, center: bool = False) -> float:
    """Mean correlation coefficient with Hungarian matching.

    Columns of ``A [m, k1]`` are matched one-to-one to columns of ``B [m, k2]`` to maximise the sum
    of ``|cos|`` (``scipy.optimize.linear_sum_assignment``); returns the mean ``|cos|`` over the
    ``min(k1, k2)`` matched pairs. ``center=True`` centres the columns first, so ``|cos|`` is the
    Pearson correlation: with ``A = codes [B, n_q]`` and ``B = features [B, n]`` this is the classical
    MCC of identifiability studies. For dictionaries pass ``A = W_E^T`` (or ``W_D``) and ``B = W_p``
    (or ``W_r``), see :func:`dictionary_mcc`."""
    from scipy.optimize import linear_sum_assignment

    A = np.asarray(A, np.float64)
    B = np.asarray(B, np.float64)
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[0]:
        raise ValueError(f"mcc needs A [m, k1] and B [m, k2] with the same m, got {A.shape} and {B.shape}")
    if center:
        A = A - A.mean(axis=0)
        B = B - B.mean(axis=0)

    def unit(X):
        nrm = np.linalg.norm(X, axis=0, keepdims=True)
        return X / np.where(nrm > 0, nrm, 1.0)

    C = np.abs(unit(A).T @ unit(B))
    r, c = linear_sum_assignment(C, maximize=True)
    return float(C[r, c].mean())


def dictionary_mcc(params: SDLParams, bench: Any, *, which: str = "encoder", exclude: Any = None) -> float:
    """:func:`mcc` of the encoder rows vs ``W_p`` (or decoder columns vs ``W_r``)."""
    W_p, W_r = _gt(bench)
    true = W_p if which == "encoder" else W_r
    keep = _keep_mask(exclude, true.shape[1], "exclude")
    return mcc(np.asarray(_directions(params, which)).T, np.asarray(true)[:, keep])


def random_baseline(key: jax.Array, n_latents: int, dim: int, n_features: int = 1000, threshold: float = 0.95) -> dict:
    """Monte Carlo chance level: ``M_IP`` and ``M_GT(threshold)`` of ``n_latents`` random Gaussian
    directions against ``n_features`` random unit features in ``R^dim`` (e.g. ~0.16 for
    n_latents = 16000, dim = 768)."""
    k1, k2 = jax.random.split(key)
    s = best_match(jax.random.normal(k1, (n_latents, dim)), jax.random.normal(k2, (dim, n_features)))
    return {"m_ip": m_ip(s), "m_gt": m_gt(s, threshold)}


# --------------------------------------------------------------------------------------------------
# Sample metrics
# --------------------------------------------------------------------------------------------------


def eval_batches(data: Any, key: Optional[jax.Array], n_samples: int, batch_size: int) -> Iterable[Batch]:
    """The evaluation batches of ``data``: a :class:`jsdl.Batch` (as is), a list/tuple of Batches,
    a bench (``n_samples`` rows sampled with ``key`` in batches of ``batch_size``, one jitted
    sampler) or an ``x_p`` array ``[B, n_p]``. Every sample metric (here and in
    :mod:`jsdl.metrics_synth`) reads its data through this one function."""
    if isinstance(data, Batch):
        yield data
        return
    if isinstance(data, (list, tuple)) and data and all(isinstance(b, Batch) for b in data):
        yield from data
        return
    if hasattr(data, "sample"):
        if key is None:
            raise ValueError("sampling metrics from a bench need key=...")
        fn = jax.jit(data.sample, static_argnums=1)
        done, i = 0, 0
        while done < n_samples:
            b = min(batch_size, n_samples - done)
            yield fn(jax.random.fold_in(key, i), b)
            done, i = done + b, i + 1
        return
    arr = jnp.asarray(data)
    if arr.ndim < 2:
        raise TypeError(f"data must be a bench, a Batch, a list of Batches or an x_p array [B, n_p], got shape {arr.shape}")
    yield Batch(x_p=arr)


def _run(params, spec, batch, inference):
    x_p, x_r = _methods.prepare(batch.x_p, batch.x_r, spec)
    codes = encode(params, x_p, spec, inference=inference)
    x_hat = decode(params, codes, spec, x_p)
    return codes, x_r, x_hat


def _stats(params, b, spec, inference):
    codes, x_r, x_hat = _run(params, spec, b, inference)
    return (
        jnp.sum((x_r - x_hat) ** 2), jnp.sum(x_r, axis=0), jnp.sum(x_r**2),
        jnp.sum(codes != 0, axis=0), x_r.shape[0],
    )


# Module-level jits with the (hashable) spec static: repeated evaluations reuse one compilation.
_stats_jit = jax.jit(_stats, static_argnums=(2, 3))


def code_statistics(
    params: SDLParams,
    spec: SDLSpec,
    data: Any,
    *,
    key: Optional[jax.Array] = None,
    n_samples: int = 16384,
    batch_size: int = 4096,
    inference: bool = False,
    exclude_latents: Any = None,
) -> dict:
    """Run the model over a sample and return ``l0`` (mean number of non-zero codes per sample),
    ``mse`` (mean ||x_r - x_r^||^2), ``fvu`` (sum of squared errors / sum ||x_r - mean(x_r)||^2 over
    the whole sample), ``fire_rate [n_q]`` (fraction of samples each latent is non-zero),
    ``dead_fraction`` (fraction of latents, excluding ``exclude_latents``, that never fire in the
    sample) and ``n_samples``. ``data``: a bench (needs ``key``), a Batch, or an x_p array."""

    sse = sx2 = 0.0
    sx = fire = None
    N = 0
    for b in eval_batches(data, key, n_samples, batch_size):
        e, s1, s2, f, m = _stats_jit(params, b, spec, inference)
        sse, sx2 = sse + float(e), sx2 + float(s2)
        sx = np.asarray(s1, np.float64) if sx is None else sx + np.asarray(s1, np.float64)
        fire = np.asarray(f, np.int64) if fire is None else fire + np.asarray(f, np.int64)
        N += int(m)
    var = sx2 - float(sx @ sx) / N
    keep = _keep_mask(exclude_latents, fire.shape[0], "exclude_latents")
    return {
        "l0": float(fire.sum() / N),
        "mse": sse / N,
        "fvu": sse / max(var, np.finfo(np.float64).tiny),
        "fire_rate": fire / N,
        "dead_fraction": float(np.mean(fire[keep] == 0)),
        "n_samples": N,
    }


def _codes_or_stats(fn_name, params_or_codes, spec, data, kw):
    if spec is None:
        if fn_name != "l0":
            raise ValueError(f"{fn_name} needs (params, spec, data)")
        c = jnp.asarray(params_or_codes)
        return float(jnp.mean(jnp.sum(c != 0, axis=-1)))
    if data is None:
        raise ValueError(f"{fn_name}(params, spec, data, ...) needs data (a bench with key=..., a Batch or an array)")
    return code_statistics(params_or_codes, spec, data, **kw)[fn_name]


def l0(params_or_codes: Any, spec: Optional[SDLSpec] = None, data: Any = None, **kw: Any) -> float:
    """Mean number of active latents per sample: ``l0(codes [B, n_q])`` or ``l0(params, spec, data,
    key=..., n_samples=...)`` (see :func:`code_statistics`)."""
    return _codes_or_stats("l0", params_or_codes, spec, data, kw)


def fvu(params: SDLParams, spec: SDLSpec, data: Any, **kw: Any) -> float:
    """Fraction of variance unexplained over a sample (:func:`code_statistics`)."""
    return _codes_or_stats("fvu", params, spec, data, kw)


def dead_fraction(params: SDLParams, spec: SDLSpec, data: Any, **kw: Any) -> float:
    """Fraction of latents never active over a sample (:func:`code_statistics`)."""
    return _codes_or_stats("dead_fraction", params, spec, data, kw)


def match_latents(params: SDLParams, bench: Any, *, which: str = "encoder") -> np.ndarray:
    """Latent matched to each GT feature ``[n]``: argmax of the *signed* cosine between encoder rows
    and ``W_p``'s columns (or decoder columns and ``W_r``'s). Signed because features are
    non-negative: a latent anti-aligned with a feature never fires for it."""
    W_p, W_r = _gt(bench)
    true = W_p if which == "encoder" else W_r
    return np.asarray(jnp.argmax(similarity(_directions(params, which), true, signed=True), axis=0))


def _shrink_sums(params, b, j, proj, wr_norm, spec, inference):
    codes, _, _ = _run(params, spec, b, inference)
    on = b.features > 0
    num = jnp.sum(jnp.where(on, codes[:, j] * proj, 0.0), axis=0)
    den = jnp.sum(jnp.where(on, b.features * wr_norm, 0.0), axis=0)
    return num, den


_shrink_jit = jax.jit(_shrink_sums, static_argnums=(5, 6))


def shrinkage(
    params: SDLParams,
    spec: SDLSpec,
    bench: Any,
    *,
    key: Optional[jax.Array] = None,
    data: Optional[Batch] = None,
    n_samples: int = 16384,
    batch_size: int = 4096,
    exclude: Any = None,
    inference: bool = False,
) -> dict:
    """Shrinkage of matched latents: for GT feature d with matched latent j (:func:`match_latents`)

        r_d = sum_{s: x_d(s) > 0} x_q,j(s) <w_D^j, w_r^d / ||w_r^d||>  /  sum_{s: x_d(s) > 0} x_d(s) ||w_r^d||

    the latent's reconstructed magnitude along the feature over the true one (1 = no shrinkage, < 1
    = shrunk, as an L1 penalty does). Invariant to rescaling latents. The sums run over ``data`` (a
    fixed evaluation :class:`jsdl.Batch` with ``features``) when given, else over ``n_samples`` rows
    drawn from ``bench`` with ``key``. Returns ``{"mean": mean of r_d over evaluated features,
    "per_feature": r [n] (nan for excluded or never-active features)}``."""
    W_p, W_r = _gt(bench)
    n = W_p.shape[1]
    j = jnp.asarray(match_latents(params, bench))
    wr_norm = jnp.linalg.norm(W_r, axis=0)
    proj = jnp.sum(params.decoder[:, j] * (W_r / wr_norm), axis=0)  # <w_D^j(d), w_r^d/||w_r^d||> [n]

    num = np.zeros(n)
    den = np.zeros(n)
    for b in eval_batches(bench if data is None else data, key, n_samples, batch_size):
        a, c = _shrink_jit(params, b, j, proj, wr_norm, spec, inference)
        num += np.asarray(a)
        den += np.asarray(c)
    keep = _keep_mask(exclude, n, "exclude") & (den > 0)
    r = np.full(n, np.nan)
    r[keep] = num[keep] / den[keep]
    return {"mean": float(np.mean(r[keep])) if keep.any() else float("nan"), "per_feature": r}


def _absorb_counts(params, b, child, j_par, carries, spec, inference):
    codes, _, _ = _run(params, spec, b, inference)
    active = codes != 0
    ev = (b.features > 0) & child
    parent_silent = ~active[:, j_par]
    carried = (active.astype(jnp.float32) @ carries) > 0  # j(p) is silent, so it is not counted
    absorbed = ev & parent_silent & carried
    return jnp.sum(ev, axis=0), jnp.sum(absorbed, axis=0)


_absorb_jit = jax.jit(_absorb_counts, static_argnums=(5, 6))


def absorption_score(
    params: SDLParams,
    spec: SDLSpec,
    bench: Any,
    *,
    key: Optional[jax.Array] = None,
    data: Optional[Batch] = None,
    n_samples: int = 16384,
    batch_size: int = 4096,
    carry_threshold: float = 0.5,
    parent_threshold: float = 0.2,
    exclude: Any = None,
    inference: bool = False,
    return_per_child: bool = False,
):
    """Feature absorption on hierarchical data (paper section 3.5, Thm 3.8).

    Definition. Let ``parent_of`` come from the bench (-1 for roots) and let ``j(f)`` be the latent
    matched to GT feature ``f`` (:func:`match_latents`: best signed cosine of encoder rows with
    ``w_p^f``). For a child ``c`` with parent ``p``, a latent ``k`` *absorbs* ``c`` if its normalised
    decoder column has cosine >= ``carry_threshold`` with ``w_r^c`` and >= ``parent_threshold`` with
    ``w_r^p`` (it writes the child and part of the parent, as the absorbing latent of Fig. 5 does;
    the parent condition keeps a faithful child latent from counting when the parent latent is
    silenced by a *sibling's* absorption). An event is a sample with ``x_c > 0`` (so the parent is
    active too, Definition 3.2); the event is *absorbed* if the parent's latent is silent
    (``x_q,j(p) = 0``) while some active latent absorbs ``c``. The
    score is (number of absorbed events) / (number of events), pooled over all children not in
    ``exclude``: 0 for a faithful dictionary (the parent latent fires whenever a child does), near 1
    when every child has its own latent that has taken the parent's firing (Fig. 5).

    A silent parent latent with nothing carrying the child is a plain miss, not absorption. Events
    are counted on ``data`` (a fixed :class:`jsdl.Batch` with ``features``) when given, else on
    ``n_samples`` rows drawn from ``bench`` with ``key``. Returns
    the score (nan if no child fired), or ``(score, per_child [n])`` with ``return_per_child`` (nan
    for roots, excluded and never-active children)."""
    parent_of = getattr(bench, "parent_of", None)
    if parent_of is None:
        raise ValueError("absorption_score needs a hierarchical bench (with parent_of [n], -1 for roots)")
    parent_of = np.asarray(parent_of)
    W_p, W_r = _gt(bench)
    n = W_p.shape[1]
    is_child = (parent_of >= 0) & _keep_mask(exclude, n, "exclude")
    j = match_latents(params, bench)
    j_par = jnp.asarray(j[np.maximum(parent_of, 0)])  # parent's latent per feature [n]
    cos = similarity(params.decoder.T, W_r, signed=True)  # [n_q, n]
    carries = ((cos >= carry_threshold) & (cos[:, np.maximum(parent_of, 0)] >= parent_threshold)).astype(jnp.float32)
    child = jnp.asarray(is_child)

    n_ev = np.zeros(n, np.int64)
    n_ab = np.zeros(n, np.int64)
    for b in eval_batches(bench if data is None else data, key, n_samples, batch_size):
        e, a = _absorb_jit(params, b, child, j_par, carries, spec, inference)
        n_ev += np.asarray(e)
        n_ab += np.asarray(a)
    score = float(n_ab.sum() / n_ev.sum()) if n_ev.sum() else float("nan")
    if not return_per_child:
        return score
    per = np.full(n, np.nan)
    ok = n_ev > 0
    per[ok] = n_ab[ok] / n_ev[ok]
    return score, per


# --------------------------------------------------------------------------------------------------
# Everything on one fixed evaluation batch
# --------------------------------------------------------------------------------------------------


def shrinkage_matched(params: SDLParams, spec: SDLSpec, bench: Any, data: Batch, *, cos_threshold: float = 0.9,
                      min_active: int = 5, inference: bool = True) -> tuple[float, int]:
    """Median shrinkage slope over confidently matched features: for each GT feature ``d`` whose
    best decoder column ``i`` (``|cos(w_D^i, w_r^d)| > cos_threshold``) exists and that is active in
    at least ``min_active`` rows of ``data``, the least-squares slope of
    ``sign(cos) x_q,i ||w_D^i||`` on ``x_d`` over the rows with ``x_d > 0``. Returns
    ``(median slope, number of features used)``; ``(nan, 0)`` when none qualifies. Unlike
    :func:`shrinkage` it ignores poorly matched features instead of averaging them in."""
    W_p, W_r = _gt(bench)
    codes = np.asarray(_run(params, spec, data, inference)[0], np.float64)
    feats = np.asarray(data.features, np.float64)
    W_D = np.asarray(params.decoder, np.float64)
    S = np.asarray(similarity(W_D.T, W_r, signed=True), np.float64)  # [n_q, n]
    best = np.abs(S).argmax(0)
    cos = S[best, np.arange(S.shape[1])]
    norms = np.linalg.norm(W_D, axis=0)
    slopes = []
    for d in np.flatnonzero(np.abs(cos) > cos_threshold):
        on = feats[:, d] > 0
        if on.sum() < min_active:
            continue
        i = best[d]
        y = np.sign(cos[d]) * codes[on, i] * norms[i]
        slopes.append(float(np.sum(y * feats[on, d]) / np.sum(feats[on, d] ** 2)))
    return (float(np.median(slopes)) if slopes else float("nan")), len(slopes)


def evaluate(params: SDLParams, spec: SDLSpec, bench: Any, data: Batch, *, threshold: float = 0.95,
             taus: Any = None, absorption: bool = False, inference: bool = True) -> dict:
    """Every per-model number of the penalty lab and the experiments on ONE fixed evaluation batch
    ``data`` (a :class:`jsdl.Batch` with ``features``), so that all models are scored on the same
    rows:

    * ``l0``, ``mse``, ``fvu``, ``dead_fraction`` (:func:`code_statistics` on ``data``);
    * ``m_gt``, ``m_ip``, ``m_gt_dec``, ``m_ip_dec`` (:func:`feature_recovery` at ``threshold``)
      and ``m_gt_curve`` / ``m_gt_dec_curve`` (:func:`m_gt_curve` over ``taus``, default
      :data:`TAUS`);
    * ``mcc``: :func:`mcc` of the codes and the true features (centred: Pearson, Hungarian);
    * ``shrinkage`` (:func:`shrinkage`, mean over features), ``shrinkage_matched`` and
      ``n_matched`` (:func:`shrinkage_matched`);
    * with ``absorption``: ``absorption`` (:func:`absorption_score`; ``bench`` must be
      hierarchical).

    ``inference=True`` encodes as at inference time (e.g. BatchTopK's learned threshold)."""
    if data.features is None:
        raise ValueError("evaluate needs a Batch with ground-truth features (data.features is None)")
    taus = TAUS if taus is None else np.asarray(taus, float)
    st = code_statistics(params, spec, data, inference=inference)
    out = {k: float(st[k]) for k in ("l0", "fvu", "mse", "dead_fraction")}
    out.update({k: v for k, v in feature_recovery(params, bench, threshold).items() if k != "n_evaluated"})
    out["m_gt_curve"] = [float(v) for v in m_gt_curve(params, bench, taus)[1]]
    out["m_gt_dec_curve"] = [float(v) for v in m_gt_curve(params, bench, taus, which="decoder")[1]]
    codes = np.asarray(_run(params, spec, data, inference)[0], np.float64)
    out["mcc"] = mcc(codes, np.asarray(data.features, np.float64), center=True)
    out["shrinkage"] = shrinkage(params, spec, bench, data=data, inference=inference)["mean"]
    out["shrinkage_matched"], out["n_matched"] = shrinkage_matched(params, spec, bench, data, inference=inference)
    if absorption:
        out["absorption"] = absorption_score(params, spec, bench, data=data, inference=inference)
    return out
from jsdl.metrics_synth import synth_best_matches, synth_classification, synth_eval, synth_mcc, synth_uniqueness  # noqa: E402,F401  (SynthSAEBench metrics)
