"""Quality per compute on the SynthSAEBench recipe: jsdl vs SAELens, same config, same budget.

For each seed and architecture (TopK, BatchTopK, ReLU+L1, JumpReLU, Matryoshka BatchTopK) it trains
one SAE with jsdl (``jsdl.data.make_synth`` generated on device inside the jitted step,
``jsdl.train.fit``) and one with SAELens (``sae_lens.synthetic.SyntheticModel`` +
``train_toy_sae``), alternating jsdl / SAELens so load drifts of a shared machine hit both, then
scores each against its own generator's ground truth with the SynthSAEBench metrics
(``jsdl.metrics.synth_eval`` and ``sae_lens.synthetic.eval_sae_on_synthetic_data``, which agree to
float tolerance: tests/test_synth_saelens.py). Wall time is end to end: building the generator
(orthogonalisation included), compilation, data generation and training; evaluation is not timed.

Matched settings: batch size, learning rate, Adam (0.9, 0.999), constant schedule, grad-norm
clipping 1.0; k for TopK/BatchTopK/Matryoshka = the true L0 of the n_q most frequent features;
AuxK (k_aux = d/2, coefficient 1, dead after 1000 steps) for the TopK family as SAELens's defaults;
ReLU penalises sum_i |f_i| ||W_dec,i|| (SAELens "standard" = jsdl ``weighted_l1``) and JumpReLU the
step L0 (bandwidth 0.05, initial threshold ``--jumprelu-threshold``, default 0.01 as SAELens's) with
coefficients set per framework by ``--calibrate`` (a bracket search to the true L0) or given.
Initialisation: each framework's default unless ``--jsdl-init saelens`` (jsdl starts as SAELens
does) or ``--saelens-init jsdl`` (SAELens ``decoder_init_norm=1``, i.e. jsdl's default).
BatchTopK/Matryoshka are evaluated as SAELens's runner does (the training SAE, batch-level top-k
over eval batches of the training batch size).

Usage (bench environment, ``make .venv-bench/.jsdl-bench-installed``)::

    nice .venv-bench/bin/python benchmarks/synth_quality/run.py --scale cpu --samples 1000000 \\
        --seeds 0 --out synth_quality.json --write-results
    .venv-bench/bin/python benchmarks/synth_quality/run.py --scale paper   # accelerator: 16k, d 768, 200M
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")  # SAELens's progress bars (orthogonalisation, training)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

ARCHS = ("topk", "batchtopk", "relu", "jumprelu", "matryoshka")
# scale -> (synth preset, n_q latents, samples, batch size, learning rate, eval samples)
SCALES = {
    "cpu": ("cpu", 512, 1_000_000, 1024, 1e-3, 100_000),
    "paper": ("16k", 4096, 200_000_000, 1024, 3e-4, 500_000),
}
# Coefficients found by --calibrate at the cpu scale (true L0 of the top 512 features); see README.
DEFAULT_COEFS = {"cpu": {fw: {"relu": 1.0, "jumprelu": 1.0} for fw in ("jsdl", "saelens")},
                 "paper": {fw: {"relu": 1.0, "jumprelu": 1.0} for fw in ("jsdl", "saelens")}}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def load_avg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


# --------------------------------------------------------------------------------------------------
# jsdl
# --------------------------------------------------------------------------------------------------


def jsdl_spec(arch, n_q, k, d, coef):
    import jsdl

    aux = dict(aux_k=d // 2, aux_coef=1.0, **_SPEC)
    if arch in ("topk", "batchtopk"):
        return jsdl.make_spec("sae", arch, n_q, k=k, **aux)
    if arch == "matryoshka":
        return jsdl.make_spec("matryoshka", "batchtopk", n_q, k=k, prefixes=_widths(n_q), **aux)
    if arch == "relu":
        return jsdl.make_spec("sae", "relu", n_q, penalties={"weighted_l1": coef}, **_SPEC)
    if arch == "jumprelu":
        return jsdl.make_spec("sae", "jumprelu", n_q, penalties={"l0": coef}, threshold=JUMPRELU["threshold"],
                              bandwidth=JUMPRELU["bandwidth"], **_SPEC)
    raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHS}")


def _widths(n_q):
    return tuple(w for w in (n_q // 8, n_q // 4, n_q // 2, n_q))


JSDL_INIT = {"default": {}, "saelens": {"init_decoder_norm": 0.1, "init_encoder": "transpose"}}
_INIT = {}
# Spec options of every jsdl model (``--jsdl-pre-bias``: encode x - b_D, as SAELens does by default).
_SPEC = {"pre_bias": False}
_SAMPLER = {"sampler": "auto"}  # jsdl's SynthBench sampler (--jsdl-sampler)
# SAELens's ``decoder_init_norm``: 0.1 is its default; "jsdl" = 1.0, unit-norm decoder rows and
# ``W_enc = W_dec^T``, which is jsdl's default initialisation.
SAELENS_INIT = {"default": 0.1, "jsdl": 1.0}
_SAELENS_INIT = {"decoder_init_norm": 0.1, "apply_b_dec_to_input": True}
# JumpReLU hyperparameters, the same in both frameworks (``--jumprelu-threshold``).
JUMPRELU = {"threshold": 0.01, "bandwidth": 0.05}


def use_jsdl_init(kind):
    """``"default"``: jsdl's initialisation (unit-norm decoder columns, ``W_E = W_D^T`` with unit
    rows). ``"saelens"``: SAELens's (decoder columns of norm 0.1, ``W_E = W_D^T`` at that norm):
    ``TrainConfig(init_decoder_norm=0.1, init_encoder="transpose")``."""
    if kind not in JSDL_INIT:
        raise ValueError(f"unknown init {kind!r}; choose {', '.join(JSDL_INIT)}")
    _INIT.clear()
    _INIT.update(JSDL_INIT[kind])


def jsdl_train(synth_cfg, arch, n_q, k, coef, samples, batch, lr, seed):
    """(params, spec, bench, wall seconds end to end)."""
    import jax

    from jsdl.data import make_synth
    from jsdl.train import TrainConfig, fit

    # Every run is timed as a fresh process would be: nothing compiled by an earlier run (another
    # seed or budget in this process) is reused.
    jax.clear_caches()
    t0 = time.perf_counter()
    bench = make_synth(jax.random.PRNGKey(1000 + seed), synth_cfg, sampler=_SAMPLER["sampler"])
    spec = jsdl_spec(arch, n_q, k, synth_cfg.d_input, coef)
    steps = samples // batch
    cfg = TrainConfig(steps=steps, batch_size=batch, learning_rate=lr, grad_clip=1.0, dead_window=1000,
                      log_every=max(steps // 4, 1), progress=False, **_INIT)
    state, _ = fit(jax.random.PRNGKey(seed), spec, bench, cfg)
    params = jax.block_until_ready(state.params)
    return params, spec, bench, time.perf_counter() - t0


def jsdl_eval(params, spec, bench, arch, n_eval, batch, seed):
    import jax

    from jsdl.metrics import synth_eval

    # BatchTopK-style SAEs: batch-level top-k over eval batches of the training size, as SAELens's
    # SyntheticSAERunner evaluates its training SAE.
    inference = arch not in ("batchtopk", "matryoshka")
    return synth_eval(params, spec, bench, key=jax.random.PRNGKey(10_000 + seed), n_samples=n_eval,
                      batch_size=batch if not inference else 8192, inference=inference)


def true_l0_top(bench, n_q, n=20000):
    import jax

    f = jax.jit(bench.sample_features, static_argnums=1)(jax.random.PRNGKey(7), n)
    return float((f[:, :n_q] > 0).sum(1).mean()), float((f > 0).sum(1).mean())


# --------------------------------------------------------------------------------------------------
# SAELens
# --------------------------------------------------------------------------------------------------


def saelens_model_config(c, seed):
    from sae_lens.synthetic import (FoldedNormalMagnitudeConfig, HierarchyConfig, LinearMagnitudeConfig,
                                    LowRankCorrelationConfig, OrthogonalizationConfig, SyntheticModelConfig,
                                    ZipfianFiringProbabilityConfig)

    return SyntheticModelConfig(
        num_features=c.n_features, hidden_dim=c.d_input,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=c.zipf_exponent, max_prob=c.max_prob,
                                                          min_prob=c.min_prob),
        hierarchy=HierarchyConfig(total_root_nodes=c.n_roots, branching_factor=c.branching, max_depth=c.depth,
                                  mutually_exclusive_portion=c.mutually_exclusive_portion,
                                  mutually_exclusive_min_depth=c.mutually_exclusive_min_depth,
                                  mutually_exclusive_max_depth=c.mutually_exclusive_max_depth,
                                  compensate_probabilities=c.compensate_probabilities,
                                  scale_children_by_parent=c.scale_children_by_parent) if c.n_roots else None,
        orthogonalization=OrthogonalizationConfig(num_steps=c.orthogonalize_steps, lr=c.orthogonalize_lr)
        if c.orthogonalize_steps else None,
        correlation=LowRankCorrelationConfig(rank=c.correlation_rank, correlation_scale=c.correlation_scale)
        if c.correlation_rank else None,
        mean_firing_magnitudes=LinearMagnitudeConfig(start=c.magnitude_mean_start, end=c.magnitude_mean_end),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=c.magnitude_std_mean, std=c.magnitude_std_std),
        bias=c.bias if c.bias > 0 else False, seed=seed,
    )


TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")


def saelens_sae(arch, n_q, k, d, coef, rescale=None):
    """SAELens's training SAE of ``arch``. ``rescale``: ``rescale_acts_by_decoder_norm`` of the
    TopK family (None: SAELens's default, True: the top-k selects on ``h_i ||W_dec,i||`` and decodes
    with unit directions; False: the plain forward, jsdl's)."""
    common = dict(d_in=d, d_sae=n_q, dtype="float32", device="cpu", **_SAELENS_INIT)
    if rescale is not None and arch in TOPK_FAMILY:
        common["rescale_acts_by_decoder_norm"] = bool(rescale)
    if arch == "topk":
        from sae_lens import TopKTrainingSAE as C, TopKTrainingSAEConfig as Cfg

        return C(Cfg(k=k, **common))
    if arch == "batchtopk":
        from sae_lens import BatchTopKTrainingSAE as C, BatchTopKTrainingSAEConfig as Cfg

        return C(Cfg(k=k, **common))
    if arch == "matryoshka":
        from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE as C,
                                                            MatryoshkaBatchTopKTrainingSAEConfig as Cfg)

        return C(Cfg(k=k, matryoshka_widths=list(_widths(n_q)), **common))
    if arch == "relu":
        from sae_lens import StandardTrainingSAE as C, StandardTrainingSAEConfig as Cfg

        return C(Cfg(l1_coefficient=coef, **common))
    if arch == "jumprelu":
        from sae_lens import JumpReLUTrainingSAE as C, JumpReLUTrainingSAEConfig as Cfg

        return C(Cfg(l0_coefficient=coef, jumprelu_init_threshold=JUMPRELU["threshold"],
                     jumprelu_bandwidth=JUMPRELU["bandwidth"], **common))
    raise ValueError(arch)


def saelens_train(synth_cfg, arch, n_q, k, coef, samples, batch, lr, seed):
    import torch
    from sae_lens.synthetic import SyntheticModel, train_toy_sae

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = SyntheticModel(saelens_model_config(synth_cfg, 1000 + seed), device="cpu")
    sae = saelens_sae(arch, n_q, k, synth_cfg.d_input, coef)
    train_toy_sae(sae, model.feature_dict, model.activation_generator, training_samples=samples,
                  batch_size=batch, lr=lr, device="cpu")
    return sae, model, time.perf_counter() - t0


def saelens_eval(sae, model, n_eval, batch):
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    r = eval_sae_on_synthetic_data(sae, model.feature_dict, model.activation_generator, num_samples=n_eval,
                                   batch_size=batch).to_dict()
    cl = r.pop("classification")
    r.update(precision=cl["precision"], recall=cl["recall"], f1=cl["f1_score"], accuracy=cl["accuracy"])
    return r


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def calibrate(synth_cfg, fw, arch, n_q, target_l0, batch, lr, samples, start, iters=6):
    """Coefficient of ``arch`` for framework ``fw`` whose SAE lands closest to ``target_l0`` (log
    scale) after ``samples`` training samples: a geometric bracket search (L0 falls as the
    coefficient grows) from ``start``, then ``iters`` geometric bisections in total. Each framework
    is calibrated on its own generator (seed 99, not a reported seed)."""
    tried = {}

    def l0_at(c):
        if c not in tried:
            if fw == "jsdl":
                p, spec, bench, _ = jsdl_train(synth_cfg, arch, n_q, 0, c, samples, batch, lr, 99)
                tried[c] = jsdl_eval(p, spec, bench, arch, 20000, batch, 99)["sae_l0"]
            else:
                sae, model, _ = saelens_train(synth_cfg, arch, n_q, 0, c, samples, batch, lr, 99)
                tried[c] = saelens_eval(sae, model, 20000, batch)["sae_l0"]
            log(f"[calibrate] {fw} {arch} coef={c:.4g}: L0 {tried[c]:.2f} (target {target_l0:.2f}) | load {load_avg()}")
        return tried[c]

    lo, hi = None, None  # lo: L0 above target, hi: L0 below target
    c = start
    for _ in range(iters):
        if l0_at(c) > target_l0:
            lo = c
            c = c * 10 if hi is None else (lo * hi) ** 0.5
        else:
            hi = c
            c = c / 10 if lo is None else (lo * hi) ** 0.5
    return min(tried, key=lambda c: abs(np.log(max(tried[c], 1e-3) / target_l0))), tried


def table(rows):
    keys = ("mcc", "f1", "precision", "recall", "explained_variance", "sae_l0", "dead_latents", "uniqueness",
            "shrinkage", "wall_s", "samples_per_s")
    out = ["| arch | framework | seeds | MCC | F1 | precision | recall | EV | L0 | dead | uniqueness | shrinkage | "
           "wall s | samples/s |", "|" + "---|" * 14]
    for arch in ARCHS:
        for fw in ("jsdl", "saelens"):
            rs = [r for r in rows if r["arch"] == arch and r["framework"] == fw]
            if not rs:
                continue
            cells = []
            for k in keys:
                v = np.array([r[k] for r in rs], float)
                fmt = "{:.0f}" if k in ("dead_latents", "wall_s", "samples_per_s") else "{:.3f}"
                cells.append(fmt.format(v.mean()) + (f" ± {fmt.format(v.std())}" if len(v) > 1 and k in
                                                     ("mcc", "f1", "explained_variance") else ""))
            out.append(f"| {arch} | {fw} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _cells(rows, arch, fw, samples=None):
    return [r for r in rows if r["arch"] == arch and r["framework"] == fw
            and (samples is None or r["samples"] == samples)]


def _ms(rs, key):
    v = np.array([r[key] for r in rs], float)
    return v.mean(), (v.std() if len(v) > 1 else float("nan"))


def _archs(rows):
    return [a for a in ARCHS if any(r["arch"] == a for r in rows)]


def budget_table(rows):
    """Per architecture and budget: both frameworks' MCC, F1 and wall seconds (means over seeds) and
    jsdl's end-to-end samples/s over SAELens's (the ratio of the mean walls)."""
    out = ["| arch | samples | seeds | jsdl MCC | jsdl F1 | jsdl wall s | SAELens MCC | SAELens F1 | SAELens wall s | "
           "end-to-end samples/s, jsdl / SAELens |", "|" + "---|" * 10]
    for arch in _archs(rows):
        for n in sorted({r["samples"] for r in rows if r["arch"] == arch}):
            j, s = _cells(rows, arch, "jsdl", n), _cells(rows, arch, "saelens", n)
            if not j or not s:
                continue
            f = lambda rs, k: "{:.3f} ± {:.3f}".format(*_ms(rs, k)) if len(rs) > 1 else f"{rs[0][k]:.3f}"  # noqa: E731
            out.append(f"| {arch} | {n:,} | {min(len(j), len(s))} | {f(j, 'mcc')} | {f(j, 'f1')} | "
                       f"{_ms(j, 'wall_s')[0]:.1f} | {f(s, 'mcc')} | {f(s, 'f1')} | {_ms(s, 'wall_s')[0]:.1f} | "
                       f"**{_ms(s, 'wall_s')[0] / _ms(j, 'wall_s')[0]:.1f}x** |")
    return "\n".join(out)


def cost_model(rs):
    """Least squares ``wall = fixed + samples / rate`` over runs at several budgets: (fixed seconds,
    steady samples/s). The fixed part is what a run pays whatever its length: building the generator
    (orthogonalisation), compilation or framework start-up, the end-of-run work inside the timed call."""
    n = np.array([r["samples"] for r in rs], float)
    w = np.array([r["wall_s"] for r in rs], float)
    slope, fixed = np.polyfit(n, w, 1)
    return float(fixed), float(1.0 / slope)


def cost_table(rows):
    out = ["| arch | framework | runs | fixed s | steady samples/s | ms per 1024 samples | "
           "steady samples/s, jsdl / SAELens |", "|" + "---|" * 7]
    for arch in _archs(rows):
        fits = {}
        for fw in ("jsdl", "saelens"):
            rs = _cells(rows, arch, fw)
            if len({r["samples"] for r in rs}) < 2:
                continue
            fits[fw] = (len(rs),) + cost_model(rs)
        for fw, (m, fixed, rate) in fits.items():
            ratio = (f"**{fits['jsdl'][2] / fits['saelens'][2]:.1f}x**" if fw == "jsdl" and "saelens" in fits else "")
            out.append(f"| {arch} | {fw} | {m} | {fixed:.1f} | {rate:,.0f} | {1024e3 / rate:.1f} | {ratio} |")
    return "\n".join(out)


def match_table(rows):
    """Time to SAELens's quality: SAELens's mean MCC (and F1) at its largest budget, and the smallest
    budget at which jsdl's mean reaches it (no interpolation: a conservative time for jsdl)."""
    out = ["| arch | metric | SAELens at its largest budget | SAELens wall s | jsdl's first budget at or above | "
           "jsdl wall s | wall time to that quality, SAELens / jsdl |", "|" + "---|" * 7]
    for arch in _archs(rows):
        sb = [r["samples"] for r in _cells(rows, arch, "saelens")]
        jb = sorted({r["samples"] for r in _cells(rows, arch, "jsdl")})
        if not sb or not jb:
            continue
        top = _cells(rows, arch, "saelens", max(sb))
        for key, name in (("mcc", "MCC"), ("f1", "F1")):
            target, sw = _ms(top, key)[0], _ms(top, "wall_s")[0]
            hit = next((n for n in jb if _ms(_cells(rows, arch, "jsdl", n), key)[0] >= target), None)
            if hit is None:
                out.append(f"| {arch} | {name} | {target:.3f} at {max(sb):,} | {sw:.1f} | not reached "
                           f"(best {max(_ms(_cells(rows, arch, 'jsdl', n), key)[0] for n in jb):.3f}) | | |")
                continue
            jw = _ms(_cells(rows, arch, "jsdl", hit), "wall_s")[0]
            got = _ms(_cells(rows, arch, "jsdl", hit), key)[0]
            out.append(f"| {arch} | {name} | {target:.3f} at {max(sb):,} | {sw:.1f} | {got:.3f} at {hit:,} | "
                       f"{jw:.1f} | **{sw / jw:.1f}x** |")
    return "\n".join(out)


def plot(rows, path):
    """MCC and F1 (means over seeds, bars: their std) against end-to-end wall seconds, one panel
    per architecture and metric; each point a run at one budget, labelled with its samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = _archs(rows)
    fig, axes = plt.subplots(2, len(archs), figsize=(4.2 * len(archs), 6.4), squeeze=False)
    style = {"jsdl": dict(color="C0", marker="o"), "saelens": dict(color="C3", marker="s")}
    for c, arch in enumerate(archs):
        for r_, (key, name) in enumerate((("mcc", "MCC"), ("f1", "F1"))):
            ax = axes[r_, c]
            for fw, label in (("jsdl", "jsdl"), ("saelens", "SAELens")):
                ns = sorted({r["samples"] for r in _cells(rows, arch, fw)})
                if not ns:
                    continue
                w = [_ms(_cells(rows, arch, fw, n), "wall_s")[0] for n in ns]
                m = [_ms(_cells(rows, arch, fw, n), key) for n in ns]
                ax.errorbar(w, [v for v, _ in m], yerr=[0 if np.isnan(e) else e for _, e in m], label=label,
                            capsize=2, **style[fw])
                for x, (y, _), n in zip(w, m, ns):
                    ax.annotate(f"{n / 1e3:g}k", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7,
                                color=style[fw]["color"])
            ax.set_xscale("log")
            ax.grid(alpha=0.3, which="both")
            ax.set_title(f"{arch}: {name}" if r_ == 0 else "")
            ax.set_ylabel(name)
            if r_ == 1:
                ax.set_xlabel("end-to-end wall s (generator, compilation, training)")
            if c == 0 and r_ == 0:
                ax.legend(loc="lower right")
    seeds = sorted({r["seed"] for r in rows})
    fig.suptitle(f"SynthSAEBench `cpu` recipe: quality against wall time (seeds {', '.join(map(str, seeds))}; "
                 "points: training budgets)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log(f"[synth_quality] wrote {path}")


def generator_only(n, batch, threads, reps=10):
    """Seconds per batch of jsdl's jitted sampler (features + observation; and ``x_p`` alone, what
    a training step uses: the dense features are then not built) and SAELens's
    ``SyntheticModel.sample_with_features``, alternating, the recipe at ``n`` features (d = n/16)."""
    import jax
    import torch
    from sae_lens.synthetic import SyntheticModel

    import common
    from jsdl.data import make_synth
    from jsdl.data.synth import synth_config

    torch.set_num_threads(threads)
    cfg = synth_config("16k", n_features=n, d_input=max(n // 16, 8), n_roots=max(n // 128, 1),
                       correlation_rank=25 if n >= 4096 else 8, orthogonalize_steps=0)
    model = SyntheticModel(saelens_model_config(cfg, 0), device="cpu")
    box = {"i": 0}
    fns = {}
    for sampler in ("jax", "native"):
        bench = make_synth(jax.random.PRNGKey(0), cfg, sampler=sampler)
        if sampler == "native" and not bench.uses_native():
            continue
        fn = jax.jit(bench.sample, static_argnums=1)
        fx = jax.jit(lambda key, bench=bench: bench.sample(key, batch).x_p)

        def j(fn=fn):
            box["i"] += 1
            jax.block_until_ready(fn(jax.random.PRNGKey(box["i"]), batch))

        def jx(fx=fx):
            box["i"] += 1
            jax.block_until_ready(fx(jax.random.PRNGKey(box["i"])))

        fns[f"jsdl {sampler}"], fns[f"jsdl {sampler} x_p"] = j, jx

    def s():
        model.sample_with_features(batch)

    t = common.alternate({**fns, "saelens": s}, reps)
    sl = common.med(t["saelens"])
    parts = [f"{name} {common.spread(t[name])} ({sl / common.med(t[name]):.2f}x)" for name in fns]
    print(f"generator only, n={n} d={cfg.d_input} batch {batch} (load {load_avg()}), per batch (SAELens / it): "
          + ", ".join(parts) + f"; SAELens {common.spread(t['saelens'])}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--samples", help="training samples per run (default: the scale's); a comma-separated list "
                                      "runs every budget (quality per compute: --plot, the cost model)")
    ap.add_argument("--eval-samples", type=int)
    ap.add_argument("--frameworks", default="jsdl,saelens")
    ap.add_argument("--coef-relu", type=float)
    ap.add_argument("--coef-jumprelu", type=float)
    ap.add_argument("--calibrate", action="store_true", help="set the ReLU/JumpReLU coefficients by a jsdl sweep")
    ap.add_argument("--calibrate-samples", type=int, default=300_000)
    ap.add_argument("--calibrate-iters", type=int, default=6, help="training runs per framework and architecture")
    ap.add_argument("--coefs", help='per-framework coefficients as JSON, e.g. {"jsdl": {"relu": 3}, "saelens": {"relu": 5}}')
    ap.add_argument("--calibrate-only", action="store_true", help="print the calibrated coefficients and stop")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads (1: on the shared 2-core machine 2 threads were slower)")
    ap.add_argument("--jsdl-init", choices=("default", "saelens"), default="default",
                    help="jsdl's parameter initialisation (saelens: decoder norm 0.1, W_E = W_D^T)")
    ap.add_argument("--saelens-init", choices=tuple(SAELENS_INIT), default="default",
                    help="SAELens's decoder_init_norm (jsdl: 1.0, jsdl's default initialisation)")
    ap.add_argument("--jsdl-sampler", choices=("auto", "jax", "native"), default="auto",  # synth.SAMPLERS
                    help="jsdl's SynthSAEBench sampler (SynthBench.sampler): auto = the native CPU kernel where "
                         "available, else the JAX sampler")
    ap.add_argument("--jsdl-pre-bias", action="store_true",
                    help="jsdl encodes x - b_D (make_spec(pre_bias=True)), as SAELens's default apply_b_dec_to_input")
    ap.add_argument("--saelens-bdec-in", choices=("true", "false"), default="true",
                    help="SAELens's apply_b_dec_to_input (default true: it encodes x - b_dec; jsdl encodes x, "
                         "which false matches)")
    ap.add_argument("--jumprelu-threshold", type=float, default=0.01,
                    help="initial JumpReLU threshold, both frameworks (SAELens's default 0.01)")
    ap.add_argument("--out", default="synth_quality.json")
    ap.add_argument("--write-results", action="store_true", help="write the table into benchmarks/RESULTS.md")
    ap.add_argument("--from-json", help="only print the table (and --plot) of the JSON written by an earlier run "
                                        "(several, comma-separated: their rows together)")
    ap.add_argument("--plot", metavar="PNG", help="MCC and F1 against end-to-end wall seconds, per architecture "
                                                  "(runs at several --samples budgets)")
    ap.add_argument("--generator-only", type=int, metavar="N_FEATURES",
                    help="time one batch of the two generators alone (the recipe at N_FEATURES), alternating")
    a = ap.parse_args(argv)
    if a.from_json:
        rows = [r for f in a.from_json.split(",") for r in json.load(open(f))["rows"]]
        if len({r["samples"] for r in rows}) > 1:
            print(budget_table(rows) + "\n\n" + cost_table(rows) + "\n\n" + match_table(rows))
        else:
            print(table(rows))
        if a.plot:
            plot(rows, a.plot)
        return
    if a.generator_only:
        return generator_only(a.generator_only, SCALES[a.scale][3], a.torch_threads)

    from jsdl.data.synth import synth_config

    preset, n_q, samples, batch, lr, n_eval = SCALES[a.scale]
    budgets = [int(float(v)) for v in a.samples.split(",")] if a.samples else [samples]
    samples = max(budgets)
    n_eval = a.eval_samples or n_eval
    synth_cfg = synth_config(preset)
    archs = [s for s in a.archs.split(",") if s]
    seeds = [int(s) for s in a.seeds.split(",")]
    fws = [s for s in a.frameworks.split(",") if s]
    if "saelens" in fws:
        import torch

        torch.set_num_threads(a.torch_threads)

    import jax

    from jsdl.data import make_synth

    use_jsdl_init(a.jsdl_init)
    _SAELENS_INIT["decoder_init_norm"] = SAELENS_INIT[a.saelens_init]
    _SAELENS_INIT["apply_b_dec_to_input"] = a.saelens_bdec_in == "true"
    _SPEC["pre_bias"] = bool(a.jsdl_pre_bias)
    _SAMPLER["sampler"] = a.jsdl_sampler
    JUMPRELU["threshold"] = a.jumprelu_threshold
    probe = make_synth(jax.random.PRNGKey(1000), synth_cfg, orthogonalize_steps=0)
    l0_top, l0_all = true_l0_top(probe, n_q)
    k = max(1, int(round(l0_top)))
    log(f"[synth_quality] {a.scale}: n={synth_cfg.n_features} d={synth_cfg.d_input} n_q={n_q} true L0 {l0_all:.2f} "
        f"(top {n_q}: {l0_top:.2f}) -> k={k}; {samples} samples, batch {batch}, lr {lr}")
    # Coefficients per framework: {"jsdl": {"relu": c, ...}, "saelens": {...}}.
    coefs = {fw: dict(DEFAULT_COEFS[a.scale][fw]) for fw in ("jsdl", "saelens")}
    calibration = {}
    if a.calibrate:
        cal_samples = min(samples, a.calibrate_samples)
        for fw in fws:
            for arch in ("relu", "jumprelu"):
                if arch in archs:
                    c, tried = calibrate(synth_cfg, fw, arch, n_q, l0_top, batch, lr, cal_samples,
                                         DEFAULT_COEFS[a.scale][fw][arch], a.calibrate_iters)
                    coefs[fw][arch] = c
                    calibration[f"{fw}/{arch}"] = {f"{k:.6g}": v for k, v in tried.items()}
        log(f"[synth_quality] calibrated coefficients: {coefs}")
        if a.calibrate_only:
            print(json.dumps(dict(coefs=coefs, calibration=calibration, samples=cal_samples, target_l0=l0_top)))
            return
    for fw in fws:
        if a.coef_relu is not None:
            coefs[fw]["relu"] = a.coef_relu
        if a.coef_jumprelu is not None:
            coefs[fw]["jumprelu"] = a.coef_jumprelu
        for arch, c in json.loads(a.coefs or "{}").get(fw, {}).items():
            coefs[fw][arch] = c

    rows = []
    for seed in seeds:
        for arch in archs:
            for samples, fw in [(b, fw) for b in budgets for fw in fws]:
                coef = coefs[fw].get(arch, 0.0)
                load0 = load_avg()
                if fw == "jsdl":
                    p, spec, bench, wall = jsdl_train(synth_cfg, arch, n_q, k, coef, samples, batch, lr, seed)
                    r = jsdl_eval(p, spec, bench, arch, n_eval, batch, seed)
                else:
                    sae, model, wall = saelens_train(synth_cfg, arch, n_q, k, coef, samples, batch, lr, seed)
                    r = saelens_eval(sae, model, n_eval, batch)
                r = {kk: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v) for kk, v in r.items()}
                sl_init = (f"saelens (decoder_init_norm {SAELENS_INIT[a.saelens_init]}"
                           + ("" if a.saelens_bdec_in == "true" else ", apply_b_dec_to_input false") + ")")
                r.update(arch=arch, framework=fw, seed=seed, coef=coef, k=k,
                         init=(a.jsdl_init + (", pre_bias" if a.jsdl_pre_bias else "")) if fw == "jsdl" else sl_init,
                         jumprelu_threshold=a.jumprelu_threshold if arch == "jumprelu" else None,
                         samples=samples, wall_s=wall,
                         sampler=(("native" if bench.uses_native() else "jax") if fw == "jsdl" else None),
                         samples_per_s=samples / wall, load_before=load0, load_after=load_avg())
                rows.append(r)
                log(f"[synth_quality] seed {seed} {arch:10s} {fw:8s} MCC {r['mcc']:.3f} F1 {r['f1']:.3f} "
                    f"EV {r['explained_variance']:.3f} L0 {r['sae_l0']:.1f} dead {r['dead_latents']:.0f} "
                    f"uniq {r['uniqueness']:.3f} | {wall:.1f} s, {samples / wall:,.0f} samples/s | load {load0}")
                with open(a.out, "w") as f:
                    json.dump(dict(scale=a.scale, synth=synth_cfg.to_dict(), n_q=n_q, k=k, true_l0=l0_all,
                                   true_l0_top=l0_top, coefs=coefs, calibration=calibration, batch=batch, lr=lr, rows=rows), f, indent=1)
    sweep = len(budgets) > 1
    print(budget_table(rows) + "\n\n" + cost_table(rows) + "\n\n" + match_table(rows) if sweep else table(rows))
    if a.plot:
        plot(rows, a.plot)
    if a.write_results:
        import common

        body = (f"Command: `nice .venv-bench/bin/python benchmarks/synth_quality/run.py {' '.join(argv or sys.argv[1:])}`\n\n"
                f"Recipe `{preset}` ({synth_cfg.n_features} features, d={synth_cfg.d_input}), SAE width {n_q}, "
                f"k={k} (true L0 of the top {n_q} features {l0_top:.2f}; all features {l0_all:.2f}), "
                f"{', '.join(f'{b:,}' for b in budgets)} samples, batch {batch}, lr {lr:g}, coefficients {coefs}. "
                f"Metrics on {n_eval:,} fresh samples.\n\n"
                + (budget_table(rows) + "\n\n" + cost_table(rows) + "\n\n" + match_table(rows) if sweep else table(rows))
                + "\n")
        common.write_section("SynthSAEBench quality per compute (synth_quality)", body)


if __name__ == "__main__":
    main()
