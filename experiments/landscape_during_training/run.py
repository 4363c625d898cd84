"""Landscape during training.

At checkpoints of a TopK and a ReLU+L1 SAE trained on the Linear Representation Bench, look at the
approximate loss L~ of Theorem 3.1 (eq. 11) around the current parameters:

* the activation pattern ``P = sigma(W_E W_p) > 0`` and its summary (dead / monosemantic /
  polysemantic latents, uncovered / multi-covered features, partition or not; Def. 3.1);
* the extreme eigenvalues of the Hessian of the region's smooth piece of L~ (Theorem 3.2), by
  Lanczos on Hessian-vector products with the per-latent rescaling symmetry projected out, plus the
  same for the Monte-Carlo MSE on a fixed large batch (the loss training actually sees);
* the type of the point: the raw checkpoint (``classify``; usually ``not_stationary``), and the
  stationary point reached from it inside its region by alternating convex search (paper App. F),
  classified by its projected Hessian spectrum (minimum / strict saddle / degenerate).

Everything landscape-related runs in float64 (``jax.enable_x64``); training runs in float32.
"""
from __future__ import annotations

import functools
import os
import time

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

import jsdl
from jsdl.records import dump_json
from jsdl import landscape as L
from jsdl.landscape import stationary as LS
from jsdl.metrics import feature_recovery
from jsdl.data import make_bench
from jsdl.experiments.common import train_config
from jsdl.train import fit, init_state


def _bench(key, cfg):
    return make_bench(key, **cfg["data"])


def _specs(cfg):
    return {
        "topk": jsdl.make_spec("sae", "topk", cfg["n_latents"], bias=False, k=cfg["k"]),
        "relu": jsdl.make_spec("sae", "relu", cfg["n_latents"], penalties={"l1": cfg["l1"]}, bias=False),
    }


def _checkpoints(cfg):
    steps = cfg["train"]["steps"]
    ck = sorted({int(s) for s in cfg["checkpoints"] if 0 <= s <= steps} | {steps})
    return ck


def _to64(params):
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), params)


def _frozen(params, problem, mask):
    return L.approx_loss_frozen(params, problem, mask)


def _batch_mse(params, batch, spec):
    return jsdl.sdl_loss(params, batch, spec)[1]["mse"]


@functools.partial(jax.jit, static_argnames=("f", "num_iters"))
def _lanczos_ritz(f, num_iters, params, args, Q, key):
    """Ritz values ``theta [m]`` and residual bounds ``[m]`` of ``num_iters`` Lanczos steps
    (:func:`jsdl.landscape.lanczos`, full reorthogonalisation) on the HVP of ``f(params, *args)``
    deflated by the rows of ``Q``. Same computation as :func:`jsdl.landscape.lanczos_extremes`, but
    compiled once per (loss, shape) with parameters as operands: the library version builds a new
    jit per call, which cost ~4-10 s of compilation per checkpoint on this 2-core machine."""
    x, unravel = jax.flatten_util.ravel_pytree(params)
    g = jax.grad(lambda y: f(unravel(y), *args))

    def mv(v):
        return jax.jvp(g, (x,), (v,))[1]

    k0, k1 = jax.random.split(key)
    alpha, beta, V = L.lanczos(mv, jax.random.normal(k0, x.shape, x.dtype), num_iters, ortho=Q, key=k1)
    theta, U = jnp.linalg.eigh(jnp.diag(alpha) + jnp.diag(beta, 1) + jnp.diag(beta, -1))
    w = mv(V[-1])
    w = w - Q.T @ (Q @ w)
    w = w - V.T @ (V @ w)
    return theta, jnp.abs(jnp.linalg.norm(w) * U[-1, :])


def _lanczos_extremes(f, num_iters, params, args, Q, key):
    theta, res = _lanczos_ritz(f, num_iters, params, args, Q, key)
    return float(theta[0]), float(theta[-1]), float(res[0])


def _analyse(params32, problem, batch64, spec_mse, cfg, key):
    """All landscape quantities at one checkpoint (float64). Returns a JSON-able dict."""
    p = _to64(params32)
    tic = time.time()
    P = L.activation_pattern(p, problem)
    summ = L.pattern_summary(P)
    out = {k: summ[k] for k in ("n_dead", "n_mono", "n_poly", "is_partition", "is_polysemantic")}
    out["n_uncovered"] = len(summ["uncovered"])
    out["n_multi_covered"] = len(summ["multi_covered"])
    out["approx_loss"] = float(L.approx_loss(p, problem))
    mask = jnp.asarray(P)
    out["grad_norm"] = float(jnp.linalg.norm(jax.flatten_util.ravel_pytree(jax.grad(_frozen)(p, problem, mask))[0]))

    # Lanczos extremes of the region's smooth piece of L~, rescaling symmetry projected out.
    Q = L.rescaling_tangents(p, tol=1e-12)
    dim = int(jax.flatten_util.ravel_pytree(p)[0].size)
    iters = min(int(cfg["lanczos_iters"]), dim - int(Q.shape[0]))
    lo, hi, res = _lanczos_extremes(_frozen, iters, p, (problem, mask), Q, jax.random.fold_in(key, 1))
    out["approx_lambda_min"], out["approx_lambda_max"], out["approx_residual_min"] = lo, hi, res

    # The same on the Monte-Carlo MSE of a fixed batch (eq. 3, no penalty).
    lo = hi = float("nan")
    if cfg["batch_hessian"]:
        lo, hi, _ = _lanczos_extremes(_batch_mse, iters, p, (batch64, spec_mse), Q, jax.random.fold_in(key, 2))
    out["batch_lambda_min"], out["batch_lambda_max"] = lo, hi

    out["t_lanczos"] = time.time() - tic
    tic = time.time()
    # Type of the raw point, with a tolerance scaled to the loss (M_d sets the scale of L~).
    scale = float(jnp.max(problem.M))
    gtol = cfg["grad_tol"] * scale
    c0 = LS.classify(_frozen, p, problem, mask, grad_tol=gtol, probe=False)
    out["raw_kind"] = c0["kind"]
    out["raw_dense_lambda_min"], out["raw_dense_lambda_max"] = c0["lambda_min"], c0["lambda_max"]

    out["t_classify"] = time.time() - tic
    tic = time.time()
    # The stationary point reached inside this region: alternating convex search (App. F).
    q, hist = LS.alternating_convex_search(p, problem, iters=cfg["acs_iters"], stay_in_region=True)
    out["t_acs"] = time.time() - tic
    tic = time.time()
    Pq = L.activation_pattern(q, problem)
    cq = LS.classify(_frozen, q, problem, jnp.asarray(Pq), grad_tol=gtol)
    out["t_classify2"] = time.time() - tic
    out["acs_loss"] = hist["final_loss"]
    out["acs_hit_boundary"] = hist["hit_boundary"]
    out["acs_kind"] = cq["kind"] if not hist["hit_boundary"] else f"boundary/{cq['kind']}"
    out["acs_grad_norm"] = cq["grad_norm"]
    out["acs_n_neg"], out["acs_n_zero"], out["acs_n_pos"] = cq["n_neg"], cq["n_zero"], cq["n_pos"]
    out["acs_lambda_min"], out["acs_lambda_max"] = cq["lambda_min"], cq["lambda_max"]
    # zero eigenvalues explained by dead latents: each dead latent's encoder row and decoder column
    # do not enter L~ at all (z_d[i] = 0 for every d) -> n_p + n_r exact zeros each
    n_p, n_r = problem.W_p.shape[0], problem.W_r.shape[0]
    out["acs_zero_from_dead"] = int(L.pattern_summary(Pq)["n_dead"]) * (n_p + n_r)
    out["acs_pattern_same"] = bool(jnp.all(Pq == P))
    return out


def _recovery(params, bench):
    r = feature_recovery(params, bench)
    return {k: float(v) for k, v in r.items() if np.ndim(v) == 0}


def run(config: dict, out_dir: str, *, key) -> dict:
    cfg = config
    t0 = time.time()
    k_bench, k_train, k_lz, k_batch = jax.random.split(key, 4)
    bench = _bench(k_bench, cfg)
    ckpts = _checkpoints(cfg)
    tcfg = train_config(cfg["train"])
    results = {"checkpoints": ckpts, "runs": {}}
    with jax.enable_x64(True):
        W_p = jnp.asarray(np.asarray(bench.W_p), jnp.float64)
        W_r = jnp.asarray(np.asarray(bench.W_r), jnp.float64)
        M = jnp.asarray(np.asarray(bench.feature_weights()), jnp.float64)
    for name, spec in _specs(cfg).items():
        ts = time.time()
        snaps = {}
        if 0 in ckpts:
            snaps[0] = jax.device_get(init_state(k_train, spec, tcfg, cfg["data"]["d_input"]).params)

        def cb(step, state, row, snaps=snaps):
            if step in ckpts:
                snaps[step] = jax.device_get(state.params)

        state, hist = fit(k_train, spec, bench, tcfg, callback=cb)
        snaps[tcfg.steps] = jax.device_get(state.params)
        train_s = time.time() - ts
        rows = []
        ta = time.time()
        with jax.enable_x64(True):
            problem = L.make_problem(W_p, W_r, M, spec.activation)
            b = bench.sample(k_batch, cfg["hessian_batch"])
            batch64 = jsdl.Batch(jnp.asarray(np.asarray(b.x_p), jnp.float64), jnp.asarray(np.asarray(b.x_r), jnp.float64))
            spec_mse = jsdl.make_spec("sae", spec.activation.name, spec.n_latents, bias=False,
                                      **spec.activation.hyper_dict())
            for s in ckpts:
                if s not in snaps:
                    continue
                r = _analyse(snaps[s], problem, batch64, spec_mse, cfg, jax.random.fold_in(k_lz, s))
                r["step"] = s
                rows.append(r)
        rec = _recovery(snaps[tcfg.steps], bench)
        results["runs"][name] = {
            "spec": spec.describe(),
            "checkpoints": rows,
            "history": {k: hist[k] for k in ("step", "loss", "mse", "l0", "dead_frac")},
            "recovery_final": rec,
            "train_s": round(train_s, 1),
            "analysis_s": round(time.time() - ta, 1),
        }
    results["seconds"] = round(time.time() - t0, 1)
    dump_json(results, os.path.join(out_dir, "results.json"))
    _plot(results, out_dir)
    summary = {"seconds": results["seconds"]}
    for name, r in results["runs"].items():
        last = r["checkpoints"][-1]
        summary[name] = {
            "final_step": last["step"],
            "pattern": {k: last[k] for k in ("n_dead", "n_mono", "n_poly", "n_uncovered", "n_multi_covered", "is_partition")},
            "approx_loss": last["approx_loss"],
            "grad_norm": last["grad_norm"],
            "approx_lambda_min": last["approx_lambda_min"],
            "approx_lambda_max": last["approx_lambda_max"],
            "batch_lambda_min": last["batch_lambda_min"],
            "batch_lambda_max": last["batch_lambda_max"],
            "raw_kind": last["raw_kind"],
            "acs_kind": last["acs_kind"],
            "acs_loss": last["acs_loss"],
            "acs_n_zero": last["acs_n_zero"],
            "acs_zero_from_dead": last["acs_zero_from_dead"],
            "kinds_over_training": [c["acs_kind"] for c in r["checkpoints"]],
            "n_poly_over_training": [c["n_poly"] for c in r["checkpoints"]],
            "n_dead_over_training": [c["n_dead"] for c in r["checkpoints"]],
            "m_gt": r["recovery_final"].get("m_gt"),
        }
    summary["checkpoints"] = results["checkpoints"]
    summary["setting"] = ({k: cfg["data"][k] for k in ("n_features", "d_input", "sparsity")}
                          | {k: cfg[k] for k in ("n_latents", "k", "l1")} | {"steps": cfg["train"]["steps"]})
    return summary


def _plot(results, out_dir):
    from matplotlib.figure import Figure

    names = list(results["runs"])
    fig = Figure(figsize=(6 * len(names), 8))
    ax = fig.subplots(2, len(names), squeeze=False)
    for j, name in enumerate(names):
        rows = results["runs"][name]["checkpoints"]
        st = [max(r["step"], 1) for r in rows]
        a = ax[0, j]
        a.plot(st, [r["approx_lambda_max"] for r in rows], "o-", label="L~ region piece: lambda_max")
        a.plot(st, [r["approx_lambda_min"] for r in rows], "o-", label="L~ region piece: lambda_min")
        a.plot(st, [r["batch_lambda_max"] for r in rows], "s--", label="batch MSE: lambda_max")
        a.plot(st, [r["batch_lambda_min"] for r in rows], "s--", label="batch MSE: lambda_min")
        a.plot(st, [r["acs_lambda_min"] for r in rows], "x:", label="ACS point: lambda_min")
        a.set_xscale("log")
        a.set_yscale("symlog", linthresh=1e-6)
        a.set_title(f"{name}: Hessian extremes (rescaling projected out)")
        a.set_xlabel("training step (0 shown at 1)")
        a.legend(fontsize=7)
        b = ax[1, j]
        for key, lab in (("n_dead", "dead latents"), ("n_mono", "monosemantic"), ("n_poly", "polysemantic"),
                         ("n_uncovered", "uncovered features"), ("n_multi_covered", "multi-covered features")):
            b.plot(st, [r[key] for r in rows], "o-", label=lab)
        for s, r in zip(st, rows):
            b.annotate(r["acs_kind"].replace("degenerate_", "deg. ").replace("strict_", ""), (s, 0), fontsize=6,
                       rotation=60, xytext=(0, 5), textcoords="offset points")
        b.set_xscale("log")
        b.set_title(f"{name}: activation pattern (single-feature inputs); type of ACS point")
        b.set_xlabel("training step")
        b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "landscape_during_training.png"), dpi=100)


def results_row(summary: dict) -> str:
    s = summary["setting"]
    lines = [
        f"n={s['n_features']} features in d={s['d_input']}, n_q={s['n_latents']}, S={s['sparsity']}, "
        f"TopK k={s['k']}, ReLU L1={s['l1']}, {s['steps']} steps; checkpoints {summary['checkpoints']}.",
        "",
        "| run | dead / mono / poly latents | uncovered / multi-covered features | L~ | lambda_min / lambda_max (L~ region, Lanczos) "
        "| lambda_min / lambda_max (batch MSE) | raw point | ACS point (zeros / from dead) | type over training | M_GT |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("topk", "relu"):
        r = summary[name]
        p = r["pattern"]
        lines.append(
            f"| {name} | {p['n_dead']} / {p['n_mono']} / {p['n_poly']} | {p['n_uncovered']} / {p['n_multi_covered']} "
            f"| {r['approx_loss']:.3g} | {r['approx_lambda_min']:.2g} / {r['approx_lambda_max']:.2g} "
            f"| {r['batch_lambda_min']:.2g} / {r['batch_lambda_max']:.2g} | {r['raw_kind']} "
            f"| {r['acs_kind']} ({r['acs_n_zero']} / {r['acs_zero_from_dead']}) | {', '.join(r['kinds_over_training'])} "
            f"| {r['m_gt'] if r['m_gt'] is None else round(r['m_gt'], 3)} |"
        )
    return "\n".join(lines)
