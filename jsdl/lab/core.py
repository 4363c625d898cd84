"""The penalty lab: one call that tells a researcher what a sparsity penalty does.

:func:`run_lab` runs, for a registered penalty ``name``:

1. mechanical checks (:mod:`jsdl.lab.checks`); a fatal failure (NaN, not jit-compatible, raising)
   skips everything that needs training;
2. the sparsity-fidelity frontier: the penalty at every coefficient of the grid trained as ONE
   vmapped population (:func:`jsdl.train.fit_population`, coefficients traced), beside L1,
   decoder-weighted L1 and TopK at the L0 the penalty reached, on the same data stream and seeds;
3. recovery (M_GT(tau), M_IP, MCC), shrinkage and dead fraction for every point;
4. the same populations on the hierarchical bench for absorption;
5. ground truth (Thm 3.3's W*) as a critical point (:mod:`jsdl.lab.critical`), on the bench and on
   an interference-free twin where W* is an exact minimiser of the reconstruction term, and
   training started at W*.

Decoder norms: a penalty that is invariant under the rescaling symmetry (mechanical check) trains
with free decoder norms; any other penalty could be lowered by shrinking codes and growing the
decoder, so it trains with unit-norm decoder columns (``decoder_norm="unit"``), like L1 and TopK.
Decoder-weighted L1 trains with free norms (with unit norms it would equal L1).
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jsdl
from jsdl import penalties as _pen
from jsdl.data import make_bench, make_hierarchical_bench
from jsdl.lab import checks as _checks
from jsdl.lab import critical as _crit
from jsdl.metrics import evaluate

__all__ = ["Scale", "SCALES", "run_lab", "auto_coefs", "make_benches", "orthonormal_twin"]


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes of one lab run. ``n`` features in ``d`` dimensions at max interference ``M`` and
    sparsity ``S``; ``n_q = n`` latents; ``steps`` x ``batch`` training; ``n_coefs`` grid points;
    ``eval_samples`` rows for metrics; ``gt_samples`` rows and ``lanczos`` iterations for the
    critical-point analysis; ``retrain_steps`` from W*; a hierarchical bench with ``hier_children``
    children per parent."""

    n: int
    d: int
    M: float
    S: float
    steps: int
    batch: int
    lr: float
    n_coefs: int
    seeds: int
    eval_samples: int
    gt_samples: int
    lanczos: int
    retrain_steps: int
    hier_steps: int
    hier_children: int = 3


SCALES = {
    "tiny": Scale(n=16, d=12, M=0.2, S=0.93, steps=150, batch=128, lr=3e-3, n_coefs=3, seeds=1, eval_samples=2048,
                  gt_samples=512, lanczos=8, retrain_steps=40, hier_steps=100),
    "small": Scale(n=64, d=48, M=0.1, S=0.975, steps=2500, batch=512, lr=2e-3, n_coefs=6, seeds=1,
                   eval_samples=16384, gt_samples=8192, lanczos=30, retrain_steps=500, hier_steps=2000),
    "paper": Scale(n=1000, d=768, M=0.1, S=0.99, steps=20000, batch=4096, lr=1e-3, n_coefs=8, seeds=2,
                   eval_samples=65536, gt_samples=32768, lanczos=60, retrain_steps=5000, hier_steps=20000),
}

BASELINES = ("l1", "weighted_l1", "topk")
PARTS = ("frontier", "hierarchy", "critical", "retrain")


def _log_default(msg):
    print(msg, flush=True)


def make_benches(key, scale: Scale):
    """``(bench, hierarchical_bench, parent_of, source)`` for ``scale``: the Linear Representation
    Bench (:func:`jsdl.data.make_bench`) and its hierarchical variant
    (:func:`jsdl.data.make_hierarchical_bench`, :func:`_make_hier`). When the hierarchical bench is
    infeasible at this size, ``hierarchical_bench`` is None and ``parent_of`` the reason (a str):
    absorption is then left out of the report instead of failing the whole lab."""
    k_b, k_h = jax.random.split(key)
    bench = make_bench(k_b, n_features=scale.n, d_input=scale.d, max_interference=scale.M, sparsity=scale.S)
    try:
        hier = _make_hier(make_hierarchical_bench, k_h, scale)
        parent = np.asarray(hier.parent_of)
    except ValueError as e:  # infeasible interference for the hierarchy's feature count
        hier, parent = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return bench, hier, parent, "jsdl.data.make_bench"


def _make_hier(fn, key, scale):
    """A hierarchical bench with about ``n`` features: ``n / (1 + children)`` roots with
    ``hier_children`` children each (depth 1); leaves fire at a rate giving about as many active
    features per sample as the plain bench, a parent fires whenever one of its children does."""
    b = scale.hier_children
    n_roots = max(2, scale.n // (1 + b))
    n_leaves = n_roots * b
    target = (1 - scale.S) * scale.n  # active features per sample on the plain bench
    # E[active] ~ n_leaves r + n_roots (1 - (1 - r)^b) ~ 2 n_leaves r for small r
    rate = float(min(0.5, target / (2 * n_leaves)))
    return fn(key, n_roots=n_roots, branching=b, depth=1, d_input=scale.d, max_interference=scale.M,
              child_rate=rate)


def auto_coefs(name: str, hyper: dict, bench, n_coefs: int, *, lo: float = 1e-2, hi: float = 0.5,
               samples: int = 4096) -> list:
    """A coefficient grid scaled to the penalty: ``lambda_ref * geomspace(lo, hi, n_coefs)`` where
    ``lambda_ref = E||x_r||^2 / penalty(ground-truth codes)`` is the coefficient at which the
    penalty of the true codes equals the signal energy (at ``lambda_ref`` coding nothing is about as
    good as coding the truth). The same relative grid for every penalty makes frontiers comparable."""
    b = bench.sample(jax.random.PRNGKey(123), samples)
    x_r = b.x_p if b.x_r is None else b.x_r
    energy = float(jnp.mean(jnp.sum(x_r * x_r, axis=-1)))
    n = bench.W_p.shape[1]
    spec = jsdl.make_spec("sae", _checks.activation_for(name), n_latents=n, penalties={name: (1.0, dict(hyper))})
    p = _crit.ground_truth_point(spec, bench.W_p, bench.W_r, 1.0)
    pen = spec.penalties[0][0]
    z = jsdl.pre_activations(p, b.x_p, spec)
    v = float(pen(b.features.astype(z.dtype), p, pre_acts=z, n_sources=1))
    if not (v > 0 and math.isfinite(v)):
        v = float(pen(spec.activation(z, p), p, pre_acts=z, n_sources=1))
    ref = energy / v if v > 0 and math.isfinite(v) else 1.0
    return [float(f"{c:.3g}") for c in ref * np.geomspace(lo, hi, n_coefs)]


def _config(scale: Scale, decoder_norm: str, steps: Optional[int] = None):
    from jsdl.train import TrainConfig

    steps = steps or scale.steps
    return TrainConfig(steps=steps, batch_size=scale.batch, learning_rate=scale.lr, decoder_norm=decoder_norm,
                       log_every=max(1, steps // 5), dead_window=max(10, min(200, steps // 4)), progress=False,
                       plots=False, warmup_steps=min(100, steps // 10))


def _train_population(key, spec, name, coefs, bench, config, seeds, can_vmap, *, k_values=None, spec_at=None):
    """Train the grid (``coefs`` of penalty ``name``, or TopK ``k_values``) x ``seeds``; one
    vmapped population, or member by member when the penalty cannot be vmapped (then
    ``spec_at(coef)`` builds each member's spec). Returns a list of ``(member_info, params)``."""
    from jsdl.train import Grid, fit, fit_population, member
    from jsdl.train.loop import population_data_key
    from jsdl.train.state import raw_key

    if k_values is not None:
        grid = Grid(spec, seeds=list(range(seeds)), k=list(k_values))
    else:
        grid = Grid(spec, seeds=list(range(seeds)), coefs={name: list(coefs)})
    ms = grid.members(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if can_vmap:
            states, hists = fit_population(key, grid, bench, config, devices=jax.devices()[:1], progress=False)
            out = []
            for i, (m, h) in enumerate(zip(ms, hists)):
                out.append(({**m, "diverged_at": h["summary"].get("diverged_at")},
                            jax.device_get(member(states, i).params)))
            return out
        out = []
        dkey = population_data_key(key)
        for m in ms:
            s = spec_at(m["coefs"][name])
            st, h = fit(jax.random.fold_in(raw_key(key), m["seed"]), s, bench, config, data_key=dkey,
                        devices=jax.devices()[:1], progress=False)
            out.append(({**m, "diverged_at": None}, jax.device_get(st.params)))
        return out


def _frontier_runs(key, name, hyper, coefs, bench, scale, checks, seeds, log, *, steps=None, hierarchy=None,
                   eval_batch=None, label="bench", baselines=BASELINES, topk_k=None):
    """Train the penalty and the baselines on ``bench`` and evaluate every member."""
    runs = {}
    n = bench.W_p.shape[1]
    dn_pen = "none" if checks.rescale_invariant else "unit"
    act = _checks.activation_for(name)
    todo = []
    if checks.can_train:
        todo.append((name, dict(hyper), act, dn_pen, coefs))
    l1_coefs = auto_coefs("l1", {}, bench, len(coefs))
    for b in baselines:
        if b == name and not hyper:
            continue
        if b == "l1":
            todo.append(("l1", {}, "relu", "unit", l1_coefs))
        elif b == "weighted_l1":
            todo.append(("weighted_l1", {}, "relu", "none", auto_coefs("weighted_l1", {}, bench, len(coefs))))
    for pname, phyper, pact, dn, cs in todo:
        t0 = time.perf_counter()
        spec = jsdl.make_spec("sae", pact, n_latents=n, penalties={pname: (cs[0], phyper)})
        cfg = _config(scale, dn, steps)
        try:
            members = _train_population(
                key, spec, pname, cs, bench, cfg, seeds, checks.can_vmap if pname == name else True,
                spec_at=lambda c, pact=pact, pname=pname, phyper=phyper: jsdl.make_spec(
                    "sae", pact, n_latents=n, penalties={pname: (c, phyper)}))
        except Exception as e:  # noqa: BLE001 - report it, keep the rest of the lab
            runs[pname] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            log(f"  [{label}] {pname}: training failed: {runs[pname]['error']}")
            continue
        pts = []
        for m, p in members:
            ev = evaluate(p, spec, bench, eval_batch, absorption=hierarchy is not None)
            pts.append({"coef": m["coefs"][pname], "seed": m["seed"], "diverged_at": m.get("diverged_at"), **ev})
        runs[pname] = {"decoder_norm": dn, "activation": pact, "coefs": list(cs), "points": pts,
                       "seconds": time.perf_counter() - t0, "population": len(members),
                       "vmapped": checks.can_vmap if pname == name else True}
        log(f"  [{label}] {pname}: {len(members)} models in {runs[pname]['seconds']:.1f}s")
    if "topk" in baselines:
        if topk_k is None:
            src = runs.get(name, {}).get("points") or runs.get("l1", {}).get("points") or []
            ks = sorted({int(min(max(round(p["l0"]), 1), n)) for p in src if math.isfinite(p["l0"])})
            topk_k = ks or [1, 2, 4]
        t0 = time.perf_counter()
        spec = jsdl.make_spec("sae", "topk", n_latents=n, k=max(topk_k))
        cfg = _config(scale, "unit", steps)
        try:
            members = _train_population(key, spec, None, None, bench, cfg, seeds, True, k_values=topk_k)
            pts = []
            for m, p in members:
                s_k = jsdl.make_spec("sae", "topk", n_latents=n, k=int(m["k"]))
                ev = evaluate(p, s_k, bench, eval_batch, absorption=hierarchy is not None)
                pts.append({"k": int(m["k"]), "seed": m["seed"], "diverged_at": m.get("diverged_at"), **ev})
            runs["topk"] = {"decoder_norm": "unit", "activation": "topk", "k": list(topk_k), "points": pts,
                            "seconds": time.perf_counter() - t0, "population": len(members), "vmapped": True}
            log(f"  [{label}] topk: {len(members)} models (k = {topk_k}) in {runs['topk']['seconds']:.1f}s")
        except Exception as e:  # noqa: BLE001
            runs["topk"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            log(f"  [{label}] topk: training failed: {runs['topk']['error']}")
    return runs


def orthonormal_twin(bench, key):
    """The interference-free twin of a :class:`jsdl.data.Bench`: the same bench (feature law,
    method) with orthonormal feature directions in ``R^n`` (``W_p = W_r = Q``, ``Q^T Q = I``, float64
    numpy so float64 analyses see it exactly), so Thm 3.3's W* is an exact zero of the
    reconstruction loss and every gradient there comes from the penalty."""
    n = bench.W_p.shape[1]
    seed = np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key)
    q, _ = np.linalg.qr(np.random.default_rng(seed.astype(np.uint32)).normal(size=(n, n)))
    G = q.T @ q - np.eye(n)
    return bench.replace(W_p=q, W_r=q, W_skip=None, method="sae", n_sources=1, max_interference=0.0,
                         realized_interference=float(np.abs(G).max()), realized_interference_r=float(np.abs(G).max()))


def _resolve_scale(scale) -> Scale:
    if isinstance(scale, str):
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
        return SCALES[scale]
    if isinstance(scale, Scale):
        return scale
    raise TypeError(f"scale must be a name ({', '.join(SCALES)}) or a jsdl.lab.Scale, got {type(scale).__name__}")


def _validate(name, hyper, coefs, parts, baselines, seeds, sc):
    """Check every argument of :func:`run_lab` before any work; returns ``(coefs, n_seeds)``."""
    _pen.get(name, **hyper)  # unknown name / hyperparameter -> ValueError naming what is allowed
    bad = set(parts) - set(PARTS)
    if bad:
        raise ValueError(f"unknown lab parts {sorted(bad)}; parts are {', '.join(PARTS)}")
    if coefs is not None:
        coefs = [float(c) for c in coefs]
        if not coefs or any(not (c >= 0 and math.isfinite(c)) for c in coefs):
            raise ValueError(f"coefs must be a non-empty list of finite numbers >= 0, got {coefs!r}")
    if set(baselines) - set(BASELINES):
        raise ValueError(f"unknown baselines {sorted(set(baselines) - set(BASELINES))}; choose from {', '.join(BASELINES)}")
    n_seeds = sc.seeds if seeds is None else int(seeds)
    if n_seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds!r}")
    return coefs, n_seeds


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def _run_checks(report, name, hyper, log):
    """Part 6: the mechanical checks (always run); sets the decoder-norm convention."""
    t0 = time.perf_counter()
    checks = _checks.check_penalty(name, hyper)
    report["checks"] = checks.to_dict()
    report["timings"]["checks"] = time.perf_counter() - t0
    for c in checks.failures:
        log(f"  check {c.name}: FAIL{' (fatal)' if c.fatal else ''}: {c.message}")
    if not checks.can_train:
        log("  the penalty cannot be trained (a fatal mechanical check failed): frontier, recovery and landscape "
            "are skipped")
    report["decoder_norm"] = "none" if checks.rescale_invariant else "unit"
    return checks


def _coef_grid(report, name, hyper, coefs, bench, sc, checks):
    """The coefficient grid: the user's, or :func:`auto_coefs` (a fixed geometric grid when the
    calibration itself fails on this penalty)."""
    if coefs is not None:
        report["coefs_source"] = "user"
        return coefs
    try:
        coefs = auto_coefs(name, hyper, bench, sc.n_coefs) if checks.can_train else []
        report["coefs_source"] = "auto: lambda_ref * geomspace(0.01, 0.5), lambda_ref = E||x||^2 / penalty(true codes)"
    except Exception as e:  # noqa: BLE001 - a user's penalty may fail on the true codes; fall back, say so
        coefs = list(np.geomspace(1e-3, 1.0, sc.n_coefs))
        report["coefs_source"] = f"default grid (auto calibration failed: {type(e).__name__})"
    return coefs


def _critical_part(report, name, hyper, coefs, bench, sc, keys, log):
    """Part 3: ground truth as a critical point on the bench and its interference-free twin."""
    k_gt, k_twin = keys
    t0 = time.perf_counter()
    log("ground truth as a critical point (Thm 3.3's W* at its best gain)")
    spec = jsdl.make_spec("sae", _checks.activation_for(name), n_latents=sc.n, penalties={name: (1.0, hyper)})
    crit = {}
    for label, b in (("bench", bench), ("twin", orthonormal_twin(bench, k_twin))):
        try:
            crit[label] = _crit.critical_point_analysis(k_gt, spec, name, b, coefs, decoder_norm=report["decoder_norm"],
                                                        n_samples=sc.gt_samples, lanczos_iters=sc.lanczos)
            log(f"  [{label}] " + "; ".join(f"{p['coef']:.3g}: {p['verdict']}" for p in crit[label]["points"]))
        except Exception as e:  # noqa: BLE001 - report it, keep the rest of the lab
            crit[label] = {"error": _error(e)}
            log(f"  [{label}] critical-point analysis failed: {crit[label]['error']}")
    report["critical"] = crit
    report["timings"]["critical"] = time.perf_counter() - t0
    return spec


def _retrain_part(report, name, spec, coefs, bench, sc, eval_batch, key, log):
    """Training started at W* (at each coefficient's best gain), scored on the evaluation batch."""
    crit = report["critical"]
    t0 = time.perf_counter()
    dn = report["decoder_norm"]
    try:
        cs = [0.0] + list(coefs)
        gains = [crit["bench"]["floor"]["gain"]] + [p["gain"] for p in crit["bench"]["points"]]
        rr = _crit.retrain_from_ground_truth(key, spec, name, bench, cs, gains, _config(sc, dn, sc.retrain_steps),
                                             decoder_norm=dn)
        for p in rr["points"]:
            ev = evaluate(p.pop("params"), spec, bench, eval_batch)
            p.update({k: ev[k] for k in ("l0", "fvu", "m_gt", "m_gt_dec", "mcc", "shrinkage")})
        report["retrain"] = rr
        log("  training from W*: " + "; ".join(
            f"{p['coef']:.3g}: moved {p['rel_dist_W_E']:.2f} (enc) / {p['rel_dist_W_D']:.2f} (dec)"
            for p in rr["points"]))
    except Exception as e:  # noqa: BLE001 - report it, keep the rest of the lab
        report["retrain"] = {"error": _error(e)}
        log(f"  training from W* failed: {report['retrain']['error']}")
    report["timings"]["retrain"] = time.perf_counter() - t0


def run_lab(name: str, *, hyper: Optional[dict] = None, coefs: Optional[Sequence[float]] = None,
            scale: str | Scale = "small", seed: int = 0, seeds: Optional[int] = None,
            out_dir: Optional[str] = None, log: Callable[[str], None] = _log_default,
            parts: Sequence[str] = PARTS, baselines: Sequence[str] = BASELINES) -> dict:
    """Run the penalty lab for the registered penalty ``name`` (bound to ``hyper``).

    coefs: the coefficient grid (default :func:`auto_coefs`). scale: ``tiny`` | ``small`` |
    ``paper`` or a :class:`Scale`. seed: the PRNG seed of benches, data and initialisations.
    seeds: models per grid point (default the scale's). out_dir: write ``report.md``,
    ``report.json`` and plots there. parts: which of ``frontier``, ``hierarchy``, ``critical``,
    ``retrain`` to run (the mechanical checks always run). baselines: a subset of ``l1``,
    ``weighted_l1``, ``topk``.

    Returns the report as a dict (what ``report.json`` holds)."""
    t_start = time.perf_counter()
    sc = _resolve_scale(scale)
    hyper = dict(hyper or {})
    coefs, n_seeds = _validate(name, hyper, coefs, parts, baselines, seeds, sc)
    k_bench, k_train, k_eval, k_gt, k_twin = jax.random.split(jax.random.PRNGKey(seed), 5)
    report: dict[str, Any] = {"penalty": name, "hyper": hyper, "scale": dataclasses.asdict(sc),
                              "scale_name": scale if isinstance(scale, str) else "custom", "seed": seed,
                              "seeds": n_seeds, "timings": {}}
    log(f"penalty lab: {name!r} {hyper or ''} at scale {report['scale_name']}")
    checks = _run_checks(report, name, hyper, log)

    t0 = time.perf_counter()
    bench, hier, parent, source = make_benches(k_bench, sc)
    report["bench"] = {"source": source, "n": sc.n, "d": sc.d, "max_interference": sc.M, "sparsity": sc.S,
                       "realized_interference": float(bench.realized_interference)}
    if hier is None:
        report["hierarchy_unavailable"] = parent
    report["timings"]["benches"] = time.perf_counter() - t0
    coefs = _coef_grid(report, name, hyper, coefs, bench, sc, checks)
    report["coefs"] = list(coefs)
    eval_batch = jax.jit(bench.sample, static_argnums=1)(k_eval, sc.eval_samples)

    if "frontier" in parts:
        t0 = time.perf_counter()
        log(f"frontier on the bench ({sc.n} features in {sc.d} dims, S={sc.S}, M={sc.M}); coefs {coefs}")
        report["frontier"] = _frontier_runs(k_train, name, hyper, coefs, bench, sc, checks, n_seeds, log,
                                            eval_batch=eval_batch, baselines=tuple(baselines))
        report["timings"]["frontier"] = time.perf_counter() - t0
    if "hierarchy" in parts and hier is not None:
        t0 = time.perf_counter()
        log("pathologies on the hierarchical bench")
        hb = jax.jit(hier.sample, static_argnums=1)(k_eval, sc.eval_samples)
        hk = report.get("frontier", {}).get("topk", {}).get("k")
        report["hierarchy"] = _frontier_runs(k_train, name, hyper, coefs or [], hier, sc, checks, n_seeds, log,
                                             steps=sc.hier_steps, hierarchy=parent, eval_batch=hb,
                                             label="hierarchical", topk_k=hk, baselines=tuple(baselines))
        report["timings"]["hierarchy"] = time.perf_counter() - t0
    if "critical" in parts and checks.can_train and coefs:
        spec = _critical_part(report, name, hyper, coefs, bench, sc, (k_gt, k_twin), log)
        if "retrain" in parts and "points" in report["critical"].get("bench", {}):
            _retrain_part(report, name, spec, coefs, bench, sc, eval_batch, k_train, log)

    report["summary"] = summarize(report)
    report["timings"]["total"] = time.perf_counter() - t_start
    if out_dir is not None:
        from jsdl.lab.report import write_report

        report["files"] = write_report(report, out_dir)
        log(f"report: {report['files']['md']} ({report['timings']['total']:.0f}s)")
    return report


def _interp(xs, ys, x):
    """Linear interpolation of ys(xs) at x (xs sorted ascending; NaN outside the range)."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    if len(xs) == 0 or x < xs.min() or x > xs.max():
        return float("nan")
    o = np.argsort(xs)
    return float(np.interp(x, xs[o], ys[o]))


def summarize(report: dict) -> dict:
    """The headline findings: shrinkage trend, stationarity of ground truth, recovery against TopK
    at matched L0, pathologies against the baselines."""
    name = report["penalty"]
    s: dict[str, Any] = {"can_train": report["checks"]["can_train"],
                         "failed_checks": [c["name"] for c in report["checks"]["checks"] if c["ok"] is False]}
    fr = report.get("frontier", {})
    pen = fr.get(name, {}).get("points") or []
    if pen:
        pts = sorted(pen, key=lambda p: p["coef"])
        n_feat = report["scale"]["n"]
        # Shrinkage is only meaningful where the dictionary recovers the features: the trend is read
        # on points with at least half the features matched (decoder cosine > 0.9), from the
        # per-feature regression slope (median), which a feature split over several latents does
        # not bias the way the mean ratio is.
        rec = [p for p in pts if p.get("n_matched", 0) >= n_feat / 2]
        s["shrinkage_by_coef"] = {f"{p['coef']:.3g}": p["shrinkage_matched"] for p in rec}
        s["shrinkage_mean_ratio_by_coef"] = {f"{p['coef']:.3g}": p["shrinkage"] for p in pts}
        fin = [p["shrinkage_matched"] for p in rec if math.isfinite(p["shrinkage_matched"])]
        s["shrinkage_below_1"] = bool(fin) and all(v < 1 for v in fin)
        s["shrinkage_grows_with_coef"] = len(fin) >= 2 and bool(np.all(np.diff(fin) <= 0.02)) and fin[-1] < fin[0]
        tk = fr.get("topk", {}).get("points") or []
        if tk:
            keys = ("m_gt", "m_gt_dec", "mcc")
            cmp = []
            for p in pts:
                near = min(tk, key=lambda q: abs(q["l0"] - p["l0"]))
                row = {"coef": p["coef"], "l0": p["l0"], "topk_nearest_k": near["k"]}
                for k in keys:
                    v = _interp([q["l0"] for q in tk], [q[k] for q in tk], p["l0"])
                    row[k] = p[k]
                    row[f"topk_{k}"] = v if math.isfinite(v) else near[k]
                cmp.append(row)
            s["vs_topk_at_matched_l0"] = cmp
            for k in keys:
                s[f"mean_{k}_minus_topk"] = float(np.mean([c[k] - c[f"topk_{k}"] for c in cmp]))
            d = [s[f"mean_{k}_minus_topk"] for k in keys]
            # lower recovery: no metric better on average and at least one worse (by > 0.01)
            s["recovery_below_topk"] = bool(all(x <= 0.01 for x in d) and any(x < -0.01 for x in d))
    crit = report.get("critical", {})
    for label in ("bench", "twin"):
        c = crit.get(label, {})
        if "points" in c:
            s[f"ground_truth_{label}"] = {f"{p['coef']:.3g}": p["verdict"] for p in c["points"]}
    tw = crit.get("twin", {})
    if "points" in tw:
        s["ground_truth_stationary_for_positive_coef"] = any(
            p["verdict"] != "not stationary" for p in tw["points"] if p["coef"] > 0)
    hi = report.get("hierarchy", {})
    if hi:
        path = {}
        for k, v in hi.items():
            if "points" in v:
                path[k] = {"dead_fraction": float(np.mean([p["dead_fraction"] for p in v["points"]])),
                           "absorption": float(np.nanmean([p.get("absorption", np.nan) for p in v["points"]]))
                           if any(math.isfinite(p.get("absorption", np.nan)) for p in v["points"]) else float("nan")}
        s["pathologies_hierarchical"] = path
    if fr:
        s["dead_fraction_bench"] = {k: float(np.mean([p["dead_fraction"] for p in v["points"]]))
                                    for k, v in fr.items() if "points" in v}
    return s
