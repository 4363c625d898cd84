"""End-of-run plots of a run directory: ``training.png`` (loss and MSE, L0, FVU against the step)
and ``recovery.png`` (M_GT(tau) against the cosine threshold tau, when the data has ground truth).

Uses matplotlib's object API (``matplotlib.figure.Figure``) and never switches the backend, so it
leaves a notebook user's matplotlib state alone.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

__all__ = ["training_plot", "recovery_plot", "write_plots"]


def _series(h: dict, k: str) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in h[k]], dtype=float)


def training_plot(path: str, histories: Sequence[dict], labels: Sequence[str]) -> None:
    """Loss (solid) and MSE (dashed), mean active latents L0 and FVU per log interval."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4))
    ax = fig.subplots(1, 3)
    for h, lab in zip(histories, labels):
        if not h["step"]:
            continue
        ax[0].plot(h["step"], _series(h, "loss"), label=f"loss {lab}".strip())
        ax[0].plot(h["step"], _series(h, "mse"), "--", label=f"mse {lab}".strip())
        ax[1].plot(h["step"], _series(h, "l0"), label=lab or "L0")
        ax[2].plot(h["step"], _series(h, "fvu"), label=lab or "FVU")
    ax[0].set_yscale("log")
    ax[0].set_title("loss")
    ax[1].set_title("L0 (mean active latents)")
    ax[2].set_title("FVU")
    ax[2].set_yscale("log")
    for a in ax:
        a.set_xlabel("step")
        if len(histories) <= 8:
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _curve_xy(c):
    if isinstance(c, dict) and "thresholds" in c:
        return c["thresholds"], c.get("m_gt", c.get("values"))
    if isinstance(c, (tuple, list)) and len(c) == 2:
        return c
    return None


def recovery_plot(path: str, curves: Sequence[tuple]) -> bool:
    """M_GT(tau) curves ``[(curve, label)]`` (a curve: ``{"thresholds", "m_gt"}`` or ``(xs, ys)``).
    Returns False (and writes nothing) when there is no curve."""
    from matplotlib.figure import Figure

    xy = [(_curve_xy(c), lab) for c, lab in curves if c is not None]
    xy = [(p, lab) for p, lab in xy if p is not None]
    if not xy:
        return False
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for (xs, ys), lab in xy:
        ax.plot(np.asarray(xs), np.asarray(ys), label=lab or None)
    ax.set_xlabel("cosine threshold tau")
    ax.set_ylabel("M_GT(tau)")
    ax.set_title("feature recovery")
    if any(lab for _, lab in xy) and len(xy) <= 8:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def _recovery_curve(params, data, exclude=None):
    from jsdl import metrics

    if data is None or not hasattr(data, "W_p"):
        return None
    kw = {} if exclude is None else {"exclude": np.asarray(exclude), "exclude_latents": np.arange(len(exclude))}
    try:
        return metrics.m_gt_curve(params, data, **kw)
    except Exception:  # a plot is a report, not a reason to lose a trained run
        return None


def write_plots(out_dir: str, histories: Sequence[dict], params_list, data, exclude: Optional[Sequence[int]],
                labels: Sequence[str]) -> None:
    """Write ``training.png`` and, when ``data`` has ground truth, ``recovery.png`` into ``out_dir``."""
    training_plot(os.path.join(out_dir, "training.png"), histories, labels)
    curves = [(_recovery_curve(p, data, exclude), lab) for p, lab in zip(params_list, labels)]
    recovery_plot(os.path.join(out_dir, "recovery.png"), curves)
