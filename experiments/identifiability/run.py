"""Identifiability: do different seeds find the same dictionary, and does
the reconstruction loss prefer the ground truth?

Part A, populations. For each method a population of ``seeds`` models is trained in one compiled
program (:func:`jsdl.train.fit_population`, same data stream, different initialisations). Reported:
per-seed recovery (M_GT / M_IP on encoder rows and decoder columns) and cross-seed agreement, the
Hungarian-matched MCC (:func:`jsdl.metrics.mcc`) between every pair of seeds' decoder dictionaries
(and encoder dictionaries), next to each seed's MCC with the ground truth.

Part B, zero-loss non-recovering solutions (paper Thm 3.4 and the reference notes' P5). On the same
bench with a bias-free ReLU SDL: the recovering construction of Theorem 3.3
(``W_E* = [W_p^T; 0]``, ``W_D* = [W_r, 0]``) against random encoders with a rank-n code matrix and the
least-squares decoder ``W_D = W_r Z^+`` (:func:`jsdl.landscape.theory.zero_loss_solution`). Both
have (near-)zero approximate loss L~ (eq. 11); they are compared by the true loss L_SDL (eq. 3) by
Monte Carlo at the bench's S, and by the stratified estimator L = L~ + sum_{m>=2} P(m) e_m over a
sweep of 1 - S (:func:`jsdl.landscape.multi_feature_gap`).
"""
from __future__ import annotations

import itertools
import os
import time

import jax
import numpy as np

from jsdl import landscape as L
from jsdl import metrics as M
from jsdl.experiments.common import LABELS, bench_for, figure, spec_for, train_config, write_json
from jsdl.landscape import theory as T
from jsdl.train import Grid, fit_population


def _pairwise_mcc(dicts):
    """MCC between every pair of ``dicts`` (each ``[dim, n_q]``): list of floats."""
    return [M.mcc(a, b) for a, b in itertools.combinations(dicts, 2)]


def _stats(xs):
    xs = np.asarray(xs, float)
    return {"mean": float(xs.mean()), "std": float(xs.std()), "min": float(xs.min()), "max": float(xs.max())}


def run(config: dict, out_dir: str, *, key) -> dict:
    k_bench, k_pop, k_zero = jax.random.split(key, 3)
    bench = bench_for(k_bench, "topk", config["data"])
    n_q, seeds = int(config["n_latents"]), int(config["seeds"])
    tcfg = train_config(config["train"])

    # ---- Part A: populations -------------------------------------------------------------------
    pops = {}
    for mi, method in enumerate(config["methods"]):
        spec = spec_for(method, n_q, config)
        t0 = time.time()
        states, hists = fit_population(jax.random.fold_in(k_pop, mi), Grid(spec, seeds=list(range(seeds))), bench, tcfg)
        secs = time.time() - t0
        params = jax.device_get(states.params)
        members = [jax.tree.map(lambda x: x[i], params) for i in range(seeds)]
        rec = [M.feature_recovery(p, bench, with_mcc=True) for p in members]
        dec = [np.asarray(p.decoder) for p in members]
        enc = [np.asarray(p.W_E).T for p in members]
        pm_dec, pm_enc = _pairwise_mcc(dec), _pairwise_mcc(enc)
        # For each GT feature: in how many seeds its best decoder match clears 0.95 (agreement on *what* is found).
        s_dec = np.stack([np.asarray(M.best_match(p.decoder.T, bench.W_r)) for p in members])  # [seeds, n]
        found = (s_dec > 0.95).sum(0)
        pops[method] = {
            "label": LABELS[method], "spec": spec.describe(), "seconds": round(secs, 1),
            "per_seed": [{k: float(v) for k, v in r.items()} for r in rec],
            "final_mse": [float(h["mse"][-1]) for h in hists],
            "l0": [float(h["l0"][-1]) for h in hists],
            "pairwise_mcc_dec": pm_dec, "pairwise_mcc_enc": pm_enc,
            "found_in_seeds_hist": np.bincount(found, minlength=seeds + 1).tolist(),
            "summary": {
                "m_gt": _stats([r["m_gt"] for r in rec]), "m_ip": _stats([r["m_ip"] for r in rec]),
                "m_gt_dec": _stats([r["m_gt_dec"] for r in rec]), "m_ip_dec": _stats([r["m_ip_dec"] for r in rec]),
                "mcc_gt_dec": _stats([r["mcc_dec"] for r in rec]), "mcc_gt_enc": _stats([r["mcc"] for r in rec]),
                "pairwise_mcc_dec": _stats(pm_dec), "pairwise_mcc_enc": _stats(pm_enc),
                "features_found_by_all_seeds": float(np.mean(found == seeds)),
                "features_found_by_no_seed": float(np.mean(found == 0)),
            },
        }
        s = pops[method]["summary"]
        print(f"[identifiability] {method}: M_GT dec {s['m_gt_dec']['mean']:.3f}+-{s['m_gt_dec']['std']:.3f}, "
              f"pairwise MCC dec {s['pairwise_mcc_dec']['mean']:.3f}, MCC vs GT {s['mcc_gt_dec']['mean']:.3f} "
              f"({secs:.0f}s)", flush=True)

    # ---- Part B: zero-loss solutions -----------------------------------------------------------
    zero = _zero_loss(k_zero, bench, n_q, config)

    write_json(out_dir, "results.json", {"config": config, "populations": pops, "zero_loss": zero,
                                         "realized_interference": float(bench.realized_interference)})
    _plot(pops, zero, bench, os.path.join(out_dir, "identifiability.png"))
    return {
        "n": config["data"]["n_features"], "d": config["data"]["d_input"], "n_q": n_q, "seeds": seeds,
        "sparsity": config["data"]["sparsity"],
        "steps": tcfg.steps, "populations": {m: p["summary"] | {"seconds": p["seconds"]} for m, p in pops.items()},
        "zero_loss": {k: v for k, v in zero.items() if k not in ("sweep",)},
    }


def _zero_loss(key, bench, n_q, config):
    """Theorem 3.3's recovering W* against random zero-L~ solutions W_D = W_r Z^+ (ReLU, no bias)."""
    problem = L.FeatureProblem.from_bench(bench, "relu")
    law = L.SparseLaw.from_bench(bench)
    spec = L.spec_for(problem, n_q)
    k_sol, k_mc, k_gap = jax.random.split(key, 3)
    W_star = T.theorem_3_3_solution(bench.W_p, bench.W_r, n_q)
    sols = [T.zero_loss_solution(jax.random.fold_in(k_sol, i), problem, n_q) for i in range(int(config["zero_solutions"]))]
    n_mc = int(config["mc_samples"])

    def describe(p):
        r = M.feature_recovery(p, bench)
        mc, se = L.mc_loss(k_mc, p, spec, bench, n_samples=n_mc, batch_size=min(n_mc, 16384))
        return {"L_approx": float(L.approx_loss(p, problem)), "L_true_mc": mc, "L_true_se": se,
                "m_gt": float(r["m_gt"]), "m_gt_dec": float(r["m_gt_dec"]), "m_ip": float(r["m_ip"]),
                "m_ip_dec": float(r["m_ip_dec"]),
                "pattern": {k: v for k, v in L.pattern_summary(L.activation_pattern(p, problem)).items()
                            if k in ("n_dead", "n_mono", "n_poly")}}

    star = describe(W_star)
    rand = [describe(p) for p in sols]
    one_minus = np.logspace(np.log10(float(config["sweep_min"])), np.log10(float(config["sweep_max"])), 9)
    S = 1.0 - one_minus
    g_star = L.multi_feature_gap(k_gap, W_star, problem, law, S, n_per_m=int(config["n_per_m"]))
    g_rand = [L.multi_feature_gap(k_gap, p, problem, law, S, n_per_m=int(config["n_per_m"])) for p in sols]
    L_rand = np.stack([g["mean_loss"] for g in g_rand])
    frac_better = (L_rand < g_star["mean_loss"][None, :]).mean(0)
    lower = [r["L_true_mc"] < star["L_true_mc"] - 3 * np.hypot(r["L_true_se"], star["L_true_se"]) for r in rand]
    higher = [r["L_true_mc"] > star["L_true_mc"] + 3 * np.hypot(r["L_true_se"], star["L_true_se"]) for r in rand]
    print(f"[identifiability] W*: L~ {star['L_approx']:.3g} L {star['L_true_mc']:.4g}; random zero-L~: "
          f"L~ max {max(r['L_approx'] for r in rand):.2g}, L {np.mean([r['L_true_mc'] for r in rand]):.4g} "
          f"(lower than W* in {sum(lower)}/{len(rand)}), M_GT {max(r['m_gt'] for r in rand):.2f}", flush=True)
    return {
        "bench_sparsity": float(bench.sparsity), "n_q": n_q, "activation": "relu, no bias",
        "W_star": star, "random": rand,
        "random_lower_true_loss_3se": int(sum(lower)), "random_higher_true_loss_3se": int(sum(higher)),
        "n_random": len(rand),
        "sweep": {"one_minus_S": one_minus.tolist(), "L_star": g_star["mean_loss"].tolist(),
                  "L_random": L_rand.tolist(), "fraction_random_better": frac_better.tolist(),
                  "L_approx_star": g_star["approx"].tolist()},
        "largest_one_minus_S_where_some_random_better": (float(one_minus[(L_rand < g_star["mean_loss"]).any(0)].max())
                                                        if (L_rand < g_star["mean_loss"]).any() else None),
    }


def _plot(pops, zero, bench, path):
    fig, ax = figure(1, 3, figsize=(16, 4.5))
    for method, r in pops.items():
        ax[0].hist(r["pairwise_mcc_dec"], bins=30, alpha=0.6, label=f"{method}: seed vs seed")
        ax[0].axvline(r["summary"]["mcc_gt_dec"]["mean"], ls="--", color=ax[0].patches[-1].get_facecolor(),
                      label=f"{method}: seed vs GT (mean)")
    ax[0].set_xlabel("MCC (decoder dictionaries, Hungarian-matched)")
    ax[0].set_title("cross-seed agreement")
    ax[0].legend(fontsize=7)
    for method, r in pops.items():
        ax[1].scatter([s["m_ip_dec"] for s in r["per_seed"]], [s["m_gt_dec"] for s in r["per_seed"]], s=14,
                      label=f"{method} (decoder)")
        ax[1].scatter([s["m_ip"] for s in r["per_seed"]], [s["m_gt"] for s in r["per_seed"]], s=14, marker="x",
                      label=f"{method} (encoder)")
    ax[1].set_xlabel("M_IP")
    ax[1].set_ylabel("M_GT(0.95)")
    ax[1].set_title(f"recovery of each of {len(next(iter(pops.values()))['per_seed'])} seeds")
    ax[1].legend(fontsize=7)
    sw = zero["sweep"]
    x = np.asarray(sw["one_minus_S"])
    ax[2].loglog(x, sw["L_star"], "k-o", ms=3, label="Thm 3.3 W* (recovers 100%)")
    for i, Lr in enumerate(sw["L_random"]):
        ax[2].loglog(x, Lr, color="C3", alpha=0.5, lw=1, label="random W_E, W_D = W_r Z^+ (M_GT 0)" if i == 0 else None)
    ax[2].axvline(1 - zero["bench_sparsity"], color="grey", ls=":", label="bench 1-S")
    ax[2].axvline(1.0 / bench.W_p.shape[1], color="grey", ls="--", label="1-S = 1/n")
    ax[2].set_xlabel("1 - S (activation probability)")
    ax[2].set_ylabel("true loss L_SDL (stratified estimate)")
    ax[2].set_title("zero-L~ solutions: true loss")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def results_row(summary: dict) -> str:
    s = summary
    lines = [
        f"n = {s['n']}, d = {s['d']}, n_q = {s['n_q']}, S = {s['sparsity']}, {s['seeds']} seeds per method "
        f"(one `fit_population` program each), {s['steps']} steps. Mean +- std over seeds; pairwise MCC over all "
        f"{s['seeds'] * (s['seeds'] - 1) // 2} seed pairs.",
        "",
        "| method | M_GT enc | M_GT dec | M_IP dec | MCC seed-vs-GT (dec) | MCC seed-vs-seed (dec) | MCC seed-vs-seed (enc) | "
        "GT features found by all / no seed | time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, p in s["populations"].items():
        f = lambda k: f"{p[k]['mean']:.3f} +- {p[k]['std']:.3f}"  # noqa: E731
        lines.append(f"| {m} | {f('m_gt')} | {f('m_gt_dec')} | {f('m_ip_dec')} | {f('mcc_gt_dec')} | "
                     f"{f('pairwise_mcc_dec')} | {f('pairwise_mcc_enc')} | "
                     f"{100 * p['features_found_by_all_seeds']:.0f}% / {100 * p['features_found_by_no_seed']:.0f}% | "
                     f"{p['seconds']:.0f} s |")
    z = s["zero_loss"]
    st = z["W_star"]
    rl = z["random"]
    lines += [
        "",
        f"Zero-loss solutions (ReLU, no bias, n_q = {z['n_q']}, bench S = {z['bench_sparsity']}): Thm 3.3's W* has "
        f"L~ = {st['L_approx']:.3g}, true L = {st['L_true_mc']:.4g} +- {st['L_true_se']:.1g}, M_GT {100 * st['m_gt']:.0f}%; "
        f"{z['n_random']} random encoders with W_D = W_r Z^+ have L~ <= {max(r['L_approx'] for r in rl):.1g}, "
        f"M_GT {100 * max(r['m_gt'] for r in rl):.0f}% (encoder) / {100 * max(r['m_gt_dec'] for r in rl):.0f}% (decoder), "
        f"true L = {np.mean([r['L_true_mc'] for r in rl]):.4g} (lower than W* by > 3 s.e. in "
        f"{z['random_lower_true_loss_3se']}/{z['n_random']}, higher in {z['random_higher_true_loss_3se']}/{z['n_random']}). "
        f"Largest 1-S of the sweep where some random solution has lower true loss than W*: "
        f"{z['largest_one_minus_S_where_some_random_better']}.",
    ]
    return "\n".join(lines)
