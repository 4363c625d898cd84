"""Feature absorption on hierarchical data.

The paper argues absorption from Theorem 3.8 (an absorbed pattern is realizable and, with Thm 3.6,
a spurious partial minimum) but measures nothing. Here: a hierarchical bench (Definition 3.2;
parents with 2-8 children, a parent fires iff one of its children fires), SAEs trained across TopK
k, L1 strength (ReLU) and dictionary width, each with and without feature anchoring, and
``jsdl.metrics.absorption_score``: the fraction of child firings on which the parent's matched
latent is silent while another active latent carries the child.

Anchoring modes: ``none``; ``random`` (the paper's FA: ``n_anchors`` random ground-truth features
pinned to the first latents, eq. 26; those features are excluded from the score and from M_GT);
``parents`` (a targeted variant: every parent pinned to its own latent).
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import jsdl
from jsdl.records import dump_json
from jsdl.experiments.common import train_config
from jsdl.train import Grid, anchors_from_ground_truth, fit, fit_population


def _hierarchy(seed: int, n_parents: int, lo: int, hi: int) -> dict:
    """``{parent: [children]}`` with a uniform number of children in ``[lo, hi]`` per parent;
    parents are features ``0..n_parents-1``, children follow."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(lo, hi + 1, size=n_parents)
    h, nxt = {}, n_parents
    for p, s in enumerate(sizes):
        h[p] = list(range(nxt, nxt + int(s)))
        nxt += int(s)
    return h


def make_data(key, cfg):
    from jsdl.data import make_structured_bench

    h = _hierarchy(int(jax.random.randint(key, (), 0, 2**31 - 1)), cfg["n_parents"], cfg["min_children"],
                   cfg["max_children"])
    n = cfg["n_parents"] + sum(len(c) for c in h.values())
    rates = np.full(n, cfg["child_rate"])
    rates[: cfg["n_parents"]] = cfg["parent_alone_rate"]
    bench = make_structured_bench(key, n, cfg["data"]["d_input"], cfg["data"]["max_interference"],
                                  firing_rates=rates, hierarchy=h)
    return bench, h, n


def _anchors(key, mode, bench, cfg, parents):
    if mode == "none":
        return None, None
    if mode == "random":
        a, idx = anchors_from_ground_truth(key, bench, int(cfg["n_anchors"]), cfg["anchor_coef"])
        return a, np.asarray(idx)
    if mode == "parents":
        W_p, W_r = jnp.asarray(bench.W_p), jnp.asarray(bench.W_r)
        unit = lambda w: w / jnp.linalg.norm(w, axis=0, keepdims=True)  # noqa: E731
        a = jsdl.Anchors(w_p=unit(W_p[:, parents]), w_r=unit(W_r[:, parents]),
                         latents=jnp.arange(len(parents), dtype=jnp.int32), coef=jnp.asarray(cfg["anchor_coef"]))
        return a, None  # parents are not children: nothing to exclude from the score
    raise ValueError(f"anchor mode must be none, random or parents, got {mode!r}")


def _score(params, spec, bench, key, exclude, cfg):
    from jsdl import metrics

    ab = metrics.absorption_score(params, spec, bench, key=key, n_samples=cfg["eval_samples"], exclude=exclude)
    rec = metrics.feature_recovery(params, bench, exclude=exclude)
    return {"absorption": float(ab), "m_gt": float(rec["m_gt"]), "m_gt_dec": float(rec["m_gt_dec"]),
            "l0": float(metrics.l0(params, spec, bench, key=key, n_samples=cfg["eval_samples"])),
            "fvu": float(metrics.fvu(params, spec, bench, key=key, n_samples=cfg["eval_samples"]))}


def run(config: dict, out_dir: str, *, key) -> dict:
    cfg = config
    t0 = time.time()
    k_data, k_train, k_anchor, k_eval = jax.random.split(key, 4)
    bench, h, n = make_data(k_data, cfg)
    parents = list(range(cfg["n_parents"]))
    n_children = [len(c) for c in h.values()]
    tcfg = train_config({"log_every": max(cfg["train"]["steps"] // 4, 1), **cfg["train"]})
    n_q = int(round(cfg["width_base"] * n))
    results = {"n_features": n, "n_parents": cfg["n_parents"], "children_per_parent": n_children,
               "realized_interference": float(bench.realized_interference), "sweeps": {}}

    def pop(spec, grid_kw, mode, specs_for_members):
        anchors, excl = _anchors(k_anchor, mode, bench, cfg, parents)
        states, hists = fit_population(k_train, Grid(spec, seeds=[0], **grid_kw), bench, tcfg, anchors=anchors)
        out = []
        for i, s in enumerate(specs_for_members):
            p = jax.tree.map(lambda x: x[i], jax.device_get(states.params))
            out.append(_score(p, s, bench, k_eval, excl, cfg))
        return out

    for mode in cfg["anchor_modes"]:
        # 1. TopK k (one population; n_q = width_base * n)
        ks = [int(k) for k in cfg["ks"]]
        base = jsdl.make_spec("sae", "topk", n_q, k=max(ks))
        rows = pop(base, {"k": ks}, mode, [jsdl.make_spec("sae", "topk", n_q, k=k) for k in ks])
        results["sweeps"].setdefault("k", {})[mode] = [{"k": k, **r} for k, r in zip(ks, rows)]
        # 2. L1 strength (ReLU; one population)
        l1s = [float(c) for c in cfg["l1s"]]
        base = jsdl.make_spec("sae", "relu", n_q, penalties={"l1": l1s[0]})
        rows = pop(base, {"coefs": {"l1": l1s}}, mode, [base] * len(l1s))
        results["sweeps"].setdefault("l1", {})[mode] = [{"l1": c, **r} for c, r in zip(l1s, rows)]
        # 3. width (TopK at k_width; one fit per width: shapes differ)
        wrows = []
        for w in cfg["widths"]:
            nq = max(int(round(w * n)), int(cfg["k_width"]) + 1,
                     (int(cfg["n_anchors"]) if mode == "random" else len(parents) if mode == "parents" else 0) + 1)
            spec = jsdl.make_spec("sae", "topk", nq, k=int(cfg["k_width"]))
            anchors, excl = _anchors(k_anchor, mode, bench, cfg, parents)
            st, _ = fit(k_train, spec, bench, tcfg, anchors=anchors)
            wrows.append({"width": float(w), "n_latents": nq,
                          **_score(jax.device_get(st.params), spec, bench, k_eval, excl, cfg)})
        results["sweeps"].setdefault("width", {})[mode] = wrows
    results["seconds"] = round(time.time() - t0, 1)
    dump_json(results, os.path.join(out_dir, "results.json"))
    _plot(results, out_dir)
    return {
        "seconds": results["seconds"],
        "n_features": n,
        "n_parents": cfg["n_parents"],
        "children_per_parent": n_children,
        "n_latents_base": n_q,
        "steps": cfg["train"]["steps"],
        "sweeps": results["sweeps"],
    }


_XKEY = {"k": ("k", "TopK k", "linear"), "l1": ("l1", "L1 coefficient (ReLU)", "log"),
         "width": ("width", "dictionary width n_q / n (TopK)", "log")}


def _plot(results, out_dir):
    from matplotlib.figure import Figure

    sweeps = results["sweeps"]
    fig = Figure(figsize=(15, 8))
    ax = fig.subplots(2, 3)
    for j, name in enumerate(("k", "l1", "width")):
        xk, lab, scale = _XKEY[name]
        for mode, rows in sweeps.get(name, {}).items():
            xs = [r[xk] for r in rows]
            ax[0, j].plot(xs, [r["absorption"] for r in rows], "o-", label=f"anchoring: {mode}")
            ax[1, j].plot(xs, [r["m_gt_dec"] for r in rows], "o-", label=f"M_GT dec ({mode})")
        for a in ax[:, j]:
            a.set_xscale(scale)
            a.set_xlabel(lab)
            a.legend(fontsize=7)
        ax[0, j].set_ylabel("absorption score")
        ax[1, j].set_ylabel("M_GT(0.95), decoder columns")
        ax[0, j].set_title(f"absorption vs {lab}")
    fig.suptitle(f"hierarchical bench: n={results['n_features']} features, {results['n_parents']} parents with "
                 f"{min(results['children_per_parent'])}-{max(results['children_per_parent'])} children")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "absorption.png"), dpi=100)


def results_row(summary: dict) -> str:
    lines = [
        f"Hierarchical bench: n={summary['n_features']} features ({summary['n_parents']} parents with "
        f"{min(summary['children_per_parent'])}-{max(summary['children_per_parent'])} children; a parent fires iff a "
        f"child does), base width n_q={summary['n_latents_base']}, {summary['steps']} steps. Absorption score "
        "(fraction of child firings where the parent's latent is silent and another latent carries the child); "
        "M_GT(0.95) on decoder columns in brackets.",
        "",
    ]
    for name, (xk, lab, _) in _XKEY.items():
        sw = summary["sweeps"].get(name, {})
        if not sw:
            continue
        modes = list(sw)
        xs = [r[xk] for r in sw[modes[0]]]
        lines.append(f"| {lab} | " + " | ".join(f"{x:g}" for x in xs) + " |")
        lines.append("|---" * (len(xs) + 1) + "|")
        for m in modes:
            lines.append(f"| anchoring {m} | " + " | ".join(
                f"{r['absorption']:.3f} ({r['m_gt_dec']:.2f})" for r in sw[m]) + " |")
        lines.append("")
    return "\n".join(lines)
