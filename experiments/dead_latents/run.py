"""Dead latents over training, with and without resampling and AuxK (the
synthetic analogue of the paper's Fig. 7).

A TopK SAE with as many latents as ground-truth features (n_q = n), trained at a deliberately large
learning rate so that latents die (a latent that leaves every sample's top-k gets no gradient from
the MSE: paper section 3.4, a dead neuron of a polysemantic partial minimum). Treatments, same key
and data stream for all:

* ``baseline``: plain training;
* ``resample``: Anthropic resampling of dead latents (Bricken et al. 2023; ``jsdl.train``'s
  ``resample_every``) at fixed steps;
* ``auxk``: the AuxK loss of Gao et al. 2024 (``aux_coef``; dead latents reconstruct the residual);
* ``resample+auxk``: both.

Recorded: the training-time dead fraction (not fired for ``dead_window`` steps), the MSE curve
(plateau and its change after each resampling), and at the end the dead fraction over a fresh sample
(``jsdl.metrics.dead_fraction``) and feature recovery.
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np

import jsdl
from jsdl import metrics
from jsdl.data import make_bench
from jsdl.experiments.common import train_config
from jsdl.records import dump_json
from jsdl.train import fit


TREATMENTS = ("baseline", "resample", "auxk", "resample+auxk")


def run(config: dict, out_dir: str, *, key) -> dict:
    cfg = config
    data, train = cfg["data"], cfg["train"]
    t0 = time.time()
    k_bench, k_train, k_eval = jax.random.split(key, 3)
    bench = make_bench(k_bench, **data)
    n_q = int(round(cfg["width"] * data["n_features"]))
    resample_at = [int(s) for s in cfg["resample_at"]]
    every = resample_at[0] if resample_at else 0
    results = {"runs": {}, "resample_at": resample_at}
    for name in cfg["treatments"]:
        if name not in TREATMENTS:
            raise ValueError(f"treatment must be one of {TREATMENTS}, got {name!r}")
        aux = cfg["aux_coef"] if "auxk" in name else 0.0
        spec = jsdl.make_spec("sae", "topk", n_q, k=cfg["k"], aux_coef=aux)
        tcfg = train_config(
            train, resample_every=every if "resample" in name else 0,
            resample_until=resample_at[-1] if ("resample" in name and resample_at) else 0,
        )
        ts = time.time()
        state, hist = fit(k_train, spec, bench, tcfg)
        params = jax.device_get(state.params)
        rec = metrics.feature_recovery(params, bench)
        results["runs"][name] = {
            "spec": spec.describe(),
            "history": {k: hist[k] for k in ("step", "loss", "mse", "fvu", "l0", "dead_frac", "auxk")},
            "final_dead_sample": float(metrics.dead_fraction(params, spec, bench, key=k_eval,
                                                             n_samples=cfg["eval_samples"])),
            "final_fvu": float(metrics.fvu(params, spec, bench, key=k_eval, n_samples=cfg["eval_samples"])),
            "m_gt_dec": float(rec["m_gt_dec"]),
            "m_gt": float(rec["m_gt"]),
            "seconds": round(time.time() - ts, 1),
        }
    results["seconds"] = round(time.time() - t0, 1)
    dump_json(results, os.path.join(out_dir, "results.json"))
    _plot(results, out_dir)
    summary = {"seconds": results["seconds"], "resample_at": resample_at,
               "setting": {k: data[k] for k in ("n_features", "d_input", "sparsity")}
               | {k: cfg[k] for k in ("k", "aux_coef")}
               | {k: train[k] for k in ("learning_rate", "steps", "dead_window", "decay")} | {"n_latents": n_q}}
    for name, r in results["runs"].items():
        h = r["history"]
        summary[name] = {
            "max_dead_frac": float(np.max(h["dead_frac"])),
            "final_dead_frac": float(h["dead_frac"][-1]),
            "final_dead_sample": r["final_dead_sample"],
            "plateau_fvu": _window_mean(h, "fvu", resample_at[0] if resample_at else train["steps"]),
            "final_fvu": r["final_fvu"],
            "m_gt_dec": r["m_gt_dec"],
        }
    return summary


def _window_mean(h, key, before, frac=0.25):
    """Mean of ``h[key]`` over the last ``frac`` of the logs before step ``before`` (the plateau)."""
    st = np.asarray(h["step"])
    v = np.asarray(h[key])
    idx = np.flatnonzero(st <= before)
    if idx.size == 0:
        return float(v[0])
    lo = idx[-1] - max(int(frac * idx.size), 1) + 1
    return float(np.mean(v[max(lo, 0): idx[-1] + 1]))


def _plot(results, out_dir):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.5))
    ax = fig.subplots(1, 2)
    for name, r in results["runs"].items():
        h = r["history"]
        ax[0].plot(h["step"], h["dead_frac"], label=name)
        ax[1].plot(h["step"], h["fvu"], label=name)
    for a in ax:
        for s in results["resample_at"]:
            a.axvline(s, color="gray", ls=":", lw=0.8)
        a.set_xlabel("step")
        a.legend(fontsize=8)
    ax[0].set_ylabel("dead fraction (no firing for dead_window steps)")
    ax[1].set_ylabel("FVU (training batches)")
    ax[1].set_yscale("log")
    ax[0].set_title("dead latents over training (dotted: resampling steps)")
    ax[1].set_title("reconstruction: plateau and change after resampling")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "dead_latents.png"), dpi=100)


def results_row(summary: dict) -> str:
    s = summary["setting"]
    lines = [
        f"TopK SAE, n={s['n_features']} features in d={s['d_input']}, n_q={s['n_latents']}, k={s['k']}, "
        f"S={s['sparsity']}, lr={s['learning_rate']} (large on purpose, schedule {s.get('decay', 'constant')}), {s['steps']} steps, dead = no firing for "
        f"{s['dead_window']} steps; resampling at steps {summary['resample_at']}; AuxK coef {s['aux_coef']}.",
        "",
        "| treatment | max dead frac | final dead frac (train) | dead frac (fresh sample) | FVU plateau before 1st resample | final FVU | M_GT dec |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in TREATMENTS:
        if name not in summary:
            continue
        r = summary[name]
        lines.append(f"| {name} | {r['max_dead_frac']:.3f} | {r['final_dead_frac']:.3f} | {r['final_dead_sample']:.3f} "
                     f"| {r['plateau_fvu']:.4f} | {r['final_fvu']:.4f} | {r['m_gt_dec']:.3f} |")
    return "\n".join(lines)
