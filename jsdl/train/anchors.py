"""Feature anchoring (paper section 5, eqs. 22-26): pin the first k latents to known directions.

    L_SDL-FA = L_SDL + lambda_anchor ( ||W_E[:k, :] - A_p^T||_F^2 + ||W_D[:, :k] - A_r||_F^2 )

Anchors come from ground truth (eq. 22: k random bench features, columns of W_p and W_r) or from
class means of labelled data (eqs. 23-24: the normalised mean input / target of each class). The
loss itself is ``jsdl.penalties.anchor_loss``; ``sdl_loss(..., anchors=...)`` adds it.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jsdl.objective import Anchors

__all__ = ["anchors_from_ground_truth", "anchors_from_class_means"]


def _unit_cols(w):
    return w / jnp.maximum(jnp.linalg.norm(w, axis=0, keepdims=True), 1e-12)


def anchors_from_ground_truth(key: jax.Array, bench, k: int, coef: float = 0.1) -> tuple[Anchors, np.ndarray]:
    """Anchors for ``k`` random features of ``bench`` (anything with ``W_p [n_p, n]`` and
    ``W_r [n_r, n]``), pinned to latents ``0..k-1``. Returns ``(anchors, feature_indices [k])``;
    pass the indices as ``exclude`` to the recovery metrics (the paper excludes anchors)."""
    if not (hasattr(bench, "W_p") and hasattr(bench, "W_r")):
        raise ValueError(
            f"ground-truth anchors need data with W_p and W_r (a Bench); got {type(bench).__name__}. "
            "Use anchor_source='class_means' with fit(..., anchors=anchors_from_class_means(...))"
        )
    W_p, W_r = jnp.asarray(bench.W_p), jnp.asarray(bench.W_r)
    n = W_p.shape[1]
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"anchors k must be an int in [1, n_features={n}], got {k!r}")
    idx = jax.random.choice(key, n, (k,), replace=False)
    anchors = Anchors(
        w_p=_unit_cols(W_p[:, idx]),
        w_r=_unit_cols(W_r[:, idx]),
        latents=jnp.arange(k, dtype=jnp.int32),
        coef=jnp.asarray(coef, W_p.dtype),
    )
    return anchors, np.asarray(idx)


def anchors_from_class_means(
    x_p, labels, x_r=None, *, coef: float = 1.0, classes: Optional[list] = None
) -> Anchors:
    """Anchors from labelled data (paper eqs. 23-24): for each class c (``classes`` or all labels in
    sorted order) the normalised class mean of ``x_p [N, n_p]`` (and of ``x_r [N, n_r]``, default
    ``x_p``), pinned to latents ``0..C-1``."""
    x_p = np.asarray(x_p)
    labels = np.asarray(labels)
    x_r = x_p if x_r is None else np.asarray(x_r)
    if labels.shape != (x_p.shape[0],) or x_r.shape[0] != x_p.shape[0]:
        raise ValueError(
            f"labels must have shape [N] matching x_p [N, n_p] and x_r; got labels {labels.shape}, "
            f"x_p {x_p.shape}, x_r {x_r.shape}"
        )
    classes = sorted(set(labels.tolist())) if classes is None else list(classes)
    missing = [c for c in classes if not np.any(labels == c)]
    if missing:
        raise ValueError(f"classes {missing} have no samples in labels")
    mp = np.stack([x_p[labels == c].mean(0) for c in classes], axis=1)
    mr = np.stack([x_r[labels == c].mean(0) for c in classes], axis=1)
    return Anchors(
        w_p=_unit_cols(jnp.asarray(mp)),
        w_r=_unit_cols(jnp.asarray(mr)),
        latents=jnp.arange(len(classes), dtype=jnp.int32),
        coef=jnp.asarray(coef, jnp.asarray(mp).dtype),
    )
