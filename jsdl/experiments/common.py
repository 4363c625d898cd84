"""The shared vocabulary of the experiments under ``experiments/`` (table1, ablations,
identifiability, ...), imported as ``from jsdl.experiments.common import ...``.

Everything here is a thin layer over the library: benches come from :func:`jsdl.data.make_bench`,
models are trained with :func:`jsdl.train.fit` / :func:`jsdl.train.fit_population`, and scored with
:mod:`jsdl.metrics`. What this module adds is the experiments' vocabulary:

* ``METHODS``: the paper's Table-1 rows as (bench method, spec builder) pairs, so a config can say
  ``methods: [relu_l1, topk, ...]``;
* :func:`bench_for`: the bench of a method from the config's ``data`` section
  (:func:`jsdl.data.make_bench` arguments);
* :func:`train_config`: a :class:`jsdl.train.TrainConfig` from the ``train`` section of a config
  (with progress bars and per-run plots off);
* :func:`score`: encoder-row *and* decoder-column recovery with anchored features excluded, plus
  the M_GT-over-tau curves;
* :func:`write_json` (:func:`jsdl.records.dump_json`), :func:`figure` (matplotlib's Figure API, no
  backend switch) and :func:`fmt_pct`.
"""
from __future__ import annotations

import os
import time
from typing import Any, Optional

import jax
import numpy as np

import jsdl
from jsdl import metrics as _metrics
from jsdl.data import make_bench
from jsdl.records import dump_json
from jsdl.train import TrainConfig, fit

__all__ = [
    "METHODS",
    "LABELS",
    "bench_for",
    "spec_for",
    "train_config",
    "score",
    "train_and_score",
    "write_json",
    "fmt_pct",
    "figure",
]

# method name -> (bench method, label). The spec is built by spec_for.
LABELS = {
    "relu_l1": "ReLU+L1 SAE",
    "jumprelu": "JumpReLU(+L0) SAE",
    "topk": "TopK SAE",
    "batchtopk": "BatchTopK SAE",
    "matryoshka": "Matryoshka SAE",
    "transcoder": "Transcoder (TopK)",
    "crosscoder": "Crosscoder (TopK)",
}
METHODS = tuple(LABELS)
_BENCH_METHOD = {"transcoder": "transcoder", "crosscoder": "crosscoder"}


def bench_for(key: jax.Array, method: str, data: dict, **over: Any):
    """The bench a Table-1 method trains on: ``sae`` data for the SAE rows, an independent target
    matrix for the transcoder, ``n_sources`` stacked sources for the crosscoder. ``data`` is the
    config's ``data`` section (:func:`jsdl.data.make_bench` arguments: ``n_features``,
    ``d_input``, ``max_interference``, ``sparsity`` = the paper's S = P(x_d = 0), ...); ``over``
    overrides them."""
    return make_bench(key, **{**data, **over, "method": _BENCH_METHOD.get(method, "sae")})


def spec_for(method: str, n_q: int, cfg: dict, **over: Any) -> jsdl.SDLSpec:
    """The SDL spec of a Table-1 row with ``n_q`` latents. TopK-family rows use ``k``; ReLU uses
    ``l1``; JumpReLU uses ``l0`` with ``jump_threshold`` / ``jump_bandwidth``; the transcoder and
    crosscoder are TopK (the paper does not say which activation they used); the crosscoder reads
    ``n_sources`` from the ``data`` section."""
    c = {**cfg, **over}
    k = int(c["k"])
    if method == "relu_l1":
        return jsdl.make_spec("sae", "relu", n_q, penalties={"l1": float(c["l1"])})
    if method == "jumprelu":
        return jsdl.make_spec("sae", "jumprelu", n_q, penalties={"l0": float(c["l0"])},
                              threshold=float(c["jump_threshold"]), bandwidth=float(c["jump_bandwidth"]))
    if method == "topk":
        return jsdl.make_spec("sae", "topk", n_q, k=k)
    if method == "batchtopk":
        return jsdl.make_spec("sae", "batchtopk", n_q, k=k)
    if method == "matryoshka":
        return jsdl.make_spec("matryoshka", "topk", n_q, k=k)
    if method == "transcoder":
        return jsdl.make_spec("transcoder", "topk", n_q, k=k)
    if method == "crosscoder":
        return jsdl.make_spec("crosscoder", "topk", n_q, k=k, n_sources=int(c.get("data", {}).get("n_sources", 2)))
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def train_config(train: dict, **over: Any) -> TrainConfig:
    """TrainConfig from a config's ``train`` mapping (progress bars and run plots off)."""
    d = {"progress": False, "plots": False, **(train or {}), **over}
    return TrainConfig(**d)


def score(params, bench, exclude=None, *, taus=None, with_mcc: bool = False) -> dict:
    """Recovery of ``params`` on ``bench`` with the GT features ``exclude`` left out: ``m_gt``,
    ``m_ip`` (encoder rows vs W_p, the paper's definition), ``m_gt_dec``, ``m_ip_dec`` (decoder
    columns vs W_r), the M_GT(tau) curves ``curve_enc`` / ``curve_dec`` and ``taus``."""
    params = jax.device_get(params)
    r = _metrics.feature_recovery(params, bench, exclude=exclude, with_mcc=with_mcc)
    taus = np.linspace(0.0, 1.0, 51) if taus is None else np.asarray(taus)
    _, ce = _metrics.m_gt_curve(params, bench, taus, exclude=exclude, which="encoder")
    _, cd = _metrics.m_gt_curve(params, bench, taus, exclude=exclude, which="decoder")
    out = {k: float(v) for k, v in r.items()}
    out.update(taus=taus.tolist(), curve_enc=np.asarray(ce).tolist(), curve_dec=np.asarray(cd).tolist())
    return out


def train_and_score(key: jax.Array, spec, bench, config: TrainConfig, *, anchors: int = 0,
                    anchor_coef: float = 0.1, taus=None) -> dict:
    """Train one model (``anchors`` GT anchors, the paper's feature anchoring) and score it with the
    anchored features excluded. Returns the :func:`score` dict plus ``l0``, ``fvu``, ``seconds``
    and ``anchor_features``."""
    import dataclasses

    cfg = dataclasses.replace(config, anchors=int(anchors), anchor_coef=float(anchor_coef))
    t0 = time.time()
    state, hist = fit(key, spec, bench, cfg)
    excl = hist["summary"].get("anchor_features")
    out = score(state.params, bench, excl, taus=taus)
    out.update(l0=float(hist["l0"][-1]), fvu=float(hist["fvu"][-1]), seconds=round(time.time() - t0, 1),
               anchor_features=excl)
    return out


def write_json(out_dir: str, name: str, obj: Any) -> str:
    return dump_json(obj, os.path.join(out_dir, name), indent=1)


def fmt_pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def figure(*subplots: int, figsize=(6, 4), **kw: Any):
    """``(fig, axes)``: a :class:`matplotlib.figure.Figure` and ``fig.subplots(*subplots, **kw)``;
    save with ``fig.savefig(path)`` (no pyplot state, no backend switch)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*subplots, **kw)
