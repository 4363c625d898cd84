"""Data generation benchmark: the synthetic samplers against the training step they feed.

For every shape of ``benchmarks/bench_step.py`` (d, n_q, k, B) it builds, with ``n_features = n_q``
(``--wide`` adds ``n_features = 2 n_q``), ``d_input = d`` and S = 0.99:

* ``Bench`` (the Linear Representation Bench, eqs. 30-32) and a hierarchical ``StructuredBench``
  (n/4 roots with 3 children each, leaves firing at 0.01, parents iff a child fires);
* for each, its two current samplers: the JAX one (``sampler="jax"``: active sets drawn as
  geometric gaps, ``x W_p^T`` summed over the active columns where that is cheaper) and the native
  CPU one (``sampler="native"``, the default on a CPU: ``jsdl.native.sparse_draw``, the same law one
  sample at a time); with ``--old`` also the sampler the JAX one replaced ("old": a Bernoulli mask
  and a magnitude for each of the B n entries, ``x W_p^T`` as one dense product);
* the real jitted TopK training step of ``jsdl.train`` (``Stepper.step``) on a fixed batch, and
  the same step generating its batch on device from the bench (each sampler), which is how
  ``jsdl.fit`` trains on a bench.

All variants of a shape are timed alternating round-robin in one fresh process per shape
(``common.alternate``), its host tuned as ``jsdl train`` would tune that step
(:func:`jsdl.hosttune.wants_tuning`; the synchronous dispatch of a tuned host made the small step's
in-step draw cost about twice as much).
Reported: samples/s of each generator alone (jitted ``sample``, all three outputs x_p, x_r and
the dense features [B, n] materialised), the sampler's time as a fraction of the step on a fixed
batch, and the share of the in-step generation in the step that generates its batch ((t_bench -
t_fixed) / t_bench). The feature matrices are random unit columns, not PGD solutions: sampling
time does not depend on their values, and PGD at n = 16384 would need a 1 GB Gram matrix per
iteration. Also: the crossover measurements behind the sampler's static rules
(``SPARSE_SAMPLER_RATIO``, ``SPARSE_DECODE_RATIO`` in jsdl/data/bench.py), and the time to build
the paper's bench (n = 1000, d = 768, M = 0.1) by PGD.

    nice -n 10 .venv/bin/python benchmarks/bench_data.py [--shapes small,medium,large] [--reps 3]
        [--wide] [--old] [--no-crossover] [--no-write]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import struct  # noqa: E402

from common import host_tuning, log, machine_info, med, print_result, run_child, spread, write_section  # noqa: E402
from bench_step import SHAPES  # noqa: E402
from jsdl.data import Bench, StructuredBench, build_hierarchy, make_bench  # noqa: E402
from jsdl.data import bench as _bench  # noqa: E402
from jsdl.kernels import densify  # noqa: E402

S = 0.99
CHILD_RATE = 0.01
SHAPES = {**SHAPES, "tiny": (16, 256, 4, 64)}  # "tiny": the smoke test's shape, not a benchmark


# --------------------------------------------------------------------------------------------------
# benches with random unit-column matrices, and the replaced sampler
# --------------------------------------------------------------------------------------------------


def unit_columns(key, d, n):
    W = jax.random.normal(key, (d, n), jnp.float32)
    return W / jnp.linalg.norm(W, axis=0, keepdims=True)


def random_bench(n, d, sampler="jax"):
    W = unit_columns(jax.random.PRNGKey(n + d), d, n)
    return Bench(W_p=W, W_r=W, sparsity=S, method="sae", sampler=sampler)


def random_hierarchy(n, d, sampler="jax"):
    """As ``make_hierarchical_bench(n_roots=n/4, branching=3, depth=1, child_rate=0.01)``, random W."""
    parent_of = build_hierarchy(n // 4, 3, 1)
    n = parent_of.shape[0]
    is_parent = np.zeros(n, bool)
    is_parent[parent_of[parent_of >= 0]] = True
    rates = np.where(is_parent, 0.0, CHILD_RATE)
    edges = np.flatnonzero(parent_of >= 0)
    W = unit_columns(jax.random.PRNGKey(n + d + 1), d, n)
    return StructuredBench(
        W_p=W, W_r=W, rates=jnp.asarray(rates, jnp.float32), importance=jnp.ones((n,), jnp.float32),
        parent_of=jnp.asarray(parent_of, jnp.int32), child_idx=jnp.asarray(edges, jnp.int32),
        parent_idx=jnp.asarray(parent_of[edges], jnp.int32), depth=1, kind="hierarchical",
        rate_bound=float(rates.max()), sorted_parents=True, sampler=sampler,
    )


def old_bench_sample(b, key, batch_size):
    """The replaced ``Bench.sample`` (same law): a Bernoulli mask and a magnitude for each of the
    ``B n`` entries, ``x_p = x W_p^T`` as one dense product."""
    k_x, k_obs = jax.random.split(key)
    k_m, k_e = jax.random.split(k_x)
    n = b.n_features
    mask = jax.random.bernoulli(k_m, 1.0 - b.sparsity, (batch_size, n))
    x = jnp.where(mask, b.law.sample_magnitudes(k_e, (batch_size, n), b.W_p.dtype), 0.0)
    return b.observe(x, k_obs)


@struct.dataclass
class OldBench:
    """A Bench whose ``sample`` is the replaced dense sampler (to run it inside the step)."""

    bench: Bench

    def sample(self, key, batch_size):
        return old_bench_sample(self.bench, key, batch_size)


def dense_structured(b):
    """The structured bench with its sparse sampler switched off: the replaced dense code path."""
    return b.replace(rate_bound=None, sampler="jax")


def alternate(fns, reps, target_s=0.3, max_inner=50):
    """Seconds per call of each callable, round-robin over ``reps`` rounds (as ``common.alternate``),
    each measurement averaging ``inner`` back-to-back calls with ``inner`` chosen so a measurement
    lasts about ``target_s``: short calls are otherwise dominated by scheduler noise on a loaded
    machine. Each callable runs twice first (compilation, then the calibration call)."""
    inner = {}
    for name, f in fns.items():
        f()
        t0 = time.perf_counter()
        f()
        inner[name] = int(min(max_inner, max(1, round(target_s / max(time.perf_counter() - t0, 1e-6)))))
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                f()
            times[name].append((time.perf_counter() - t0) / inner[name])
    return times


# --------------------------------------------------------------------------------------------------
# timed callables
# --------------------------------------------------------------------------------------------------


def sampler_fn(sample, batch_size):
    fn = jax.jit(sample, static_argnums=1)
    box = {"i": 0}

    def run():
        box["i"] += 1
        jax.block_until_ready(fn(jax.random.PRNGKey(box["i"]), batch_size))

    return run


def step_fn(spec, d, batch_size, data):
    """The real TopK step of jsdl.train on a fixed batch (``data`` a Batch) or generating its batch
    from ``data`` (a bench) inside the compiled step."""
    from jsdl.train import Stepper, TrainConfig, init_state

    mode = "bench" if hasattr(data, "sample") else "batch"
    config = TrainConfig(steps=10**9, batch_size=batch_size, learning_rate=1e-4, grad_clip=1.0, log_every=10**9,
                         progress=False)
    stepper = Stepper(spec, config, data_mode=mode, devices=jax.devices()[:1], bench=data if mode == "bench" else None)
    state = stepper.place_state(init_state(jax.random.PRNGKey(0), spec, config, d, data_key=jax.random.PRNGKey(1)))
    arg = stepper.place_data(data)
    box = {"state": state}

    def run():
        box["state"] = stepper.step(box["state"], arg, None)
        jax.block_until_ready(box["state"])

    return run


GENERATORS = ("old", "jax", "native")


def _shape_child(shape, n, reps, archs, old):
    """One shape's measurements in this fresh process (tuned first when ``JSDL_HOST_TUNING=on``);
    prints a ``RESULT`` JSON line."""
    from jsdl import hosttune

    host = hosttune.tune_host() if hosttune.mode() == "on" else "host not tuned"
    r = measure_shape(shape, n, reps, archs, old)
    r["host"] = host
    print_result(r)


def measure_shape_in_child(shape, n, reps, archs, old):
    """:func:`measure_shape` in a fresh process whose host is tuned as ``jsdl train`` would tune
    the shape's step (or as ``JSDL_HOST_TUNING`` says)."""
    from jsdl import hosttune

    d, n_q, k, B = SHAPES[shape]
    args = ["--child", shape, n, "--reps", reps, "--archs", ",".join(archs)] + (["--old"] if old else [])
    return run_child(__file__, args, hosttune.wants_tuning(B, n_q), f"bench_data {shape} (n={n})")


def measure_shape(shape, n, reps, archs, old):
    import jsdl

    d, n_q, k, B = SHAPES[shape]
    benches = {"bench": {g: random_bench(n, d, g) for g in ("jax", "native")},
               "hier": {g: random_hierarchy(n, d, g) for g in ("jax", "native")}}
    if old:
        benches["bench"]["old"] = OldBench(benches["bench"]["jax"])
        benches["hier"]["old"] = dense_structured(benches["hier"]["jax"])
    assert benches["bench"]["native"].uses_native() and benches["hier"]["native"].uses_native()
    bench = benches["bench"]["jax"]
    fixed = jax.jit(bench.sample, static_argnums=1)(jax.random.PRNGKey(0), B)
    fixed = jsdl.Batch(x_p=fixed.x_p)
    fns = {f"{name} {g}": sampler_fn(b.sample, B) for name, gs in benches.items() for g, b in gs.items()}
    for arch in archs:
        spec = (jsdl.make_spec("sae", "topk", n_q, k=k) if arch == "topk"
                else jsdl.make_spec("sae", "relu", n_q, penalties={"weighted_l1": 1e-3}))
        fns[f"{arch} step, fixed batch"] = step_fn(spec, d, B, fixed)
        for name, gs in benches.items():
            for g, b in gs.items():
                fns[f"{arch} step + {name} {g}"] = step_fn(spec, d, B, b)
    log(f"[bench_data] {shape} n={n}: compiling and timing {len(fns)} variants x {reps} reps ...")
    t = alternate(fns, reps)
    for name, ts in t.items():
        log(f"  {name}: {spread(ts)}")
    return dict(shape=shape, d=d, n_q=n_q, k=k, B=B, n=n, K=int(bench.law.capacity(n)),
                K_hier=int(benches["hier"]["jax"].sparse_capacity), times=t, archs=archs,
                gens=[g for g in GENERATORS if f"bench {g}" in t])


# --------------------------------------------------------------------------------------------------
# crossover of the static rules
# --------------------------------------------------------------------------------------------------


def crossover(reps):
    rows_s, rows_d = [], []
    B = 4096
    for n in (1024, 4096):
        for s in (0.99, 0.95, 0.9, 0.8):
            law = _bench.SparseLaw(s)
            K = law.capacity(n)

            def dense(key, law=law, n=n):
                return jnp.where(jax.random.bernoulli(key, 1 - law.sparsity, (B, n)),
                                 law.sample_magnitudes(key, (B, n)), 0.0)

            def sparse(key, law=law, n=n):
                return densify(law.sample_active(key, B, n)[0])

            t = alternate({"dense": sampler_fn(lambda k, _b, f=dense: f(k), B),
                           "sparse": sampler_fn(lambda k, _b, f=sparse: f(k), B)}, reps)
            rows_s.append((n, s, K, med(t["dense"]), med(t["sparse"])))
            log(f"[bench_data] sampler crossover n={n} S={s}: K/n={K / n:.3f} dense {spread(t['dense'])} sparse {spread(t['sparse'])}")
    for d, n, Bd in ((64, 512, 1024), (512, 4096, 4096), (768, 16384, 4096)):
        W = unit_columns(jax.random.PRNGKey(0), d, n)
        for s in (0.99, 0.98, 0.95, 0.9):
            law = _bench.SparseLaw(s)
            codes, count = jax.jit(lambda key, law=law, n=n, Bd=Bd: law.sample_active(key, Bd, n))(jax.random.PRNGKey(1))
            x = densify(codes)
            dn = jax.jit(lambda x, W: x @ W.T)
            sp = jax.jit(lambda c, m, W: _bench.decode_active(c, m, W.T))
            t = alternate({"dense": lambda: jax.block_until_ready(dn(x, W)),
                           "sparse": lambda: jax.block_until_ready(sp(codes, count, W))}, reps)
            rows_d.append((d, n, Bd, s, codes.vals.shape[1], int(count.max()), med(t["dense"]), med(t["sparse"])))
            log(f"[bench_data] decode crossover d={d} n={n} S={s}: dense {spread(t['dense'])} sparse {spread(t['sparse'])}")
    return rows_s, rows_d


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def ms(t):
    return f"{t * 1e3:,.0f} ms" if t >= 0.1 else f"{t * 1e3:.1f} ms"


def pct(x):
    return f"{100 * x:.0f}%" if x >= 0.1 else f"{100 * x:.1f}%"


def report(results, cross, gen, args, load0, load1):
    cmd = "python benchmarks/bench_data.py " + " ".join(args.argv)
    out = [
        machine_info(),
        f"- load average at the end: {load1[0]:.1f} / {load1[1]:.1f} / {load1[2]:.1f} (at the start {load0[0]:.1f} / "
        f"{load0[1]:.1f} / {load0[2]:.1f}); niceness {os.nice(0)}",
        f"- device: {jax.devices()[0].device_kind} ({jax.default_backend()}); command: `{cmd.strip()}`",
        "- each shape in its own process, its host tuned as `jsdl train` would tune its step (`jsdl.hosttune`; "
        "`JSDL_HOST_TUNING=on|off` forces it): " + "; ".join(f"{r['shape']} (n = {r['n']}): {r['host']}" for r in results)
        + (f"; crossover and PGD: {args.host}" if cross is not None or gen is not None else ""),
        "",
        f"Per benchmark shape of bench_step.py, S = {S}, d_input = d, feature matrices random unit columns; jax = the",
        "JAX sampler (active sets drawn as geometric gaps, capacity K per row, P(truncation) < 1e-15, x W_p^T",
        "summed over active columns), native = `jsdl.native.sparse_draw` (the default on a CPU: the same law",
        "one sample at a time, x W_p^T summed in the same pass)" + (", old = the sampler the JAX one replaced (a Bernoulli"
        " mask and a magnitude for every entry, x W_p^T dense)" if any("old" in r["gens"] for r in results) else "")
        + ". All rows of a shape alternate round-robin in one process per shape; median (min-max) of the reps.",
        "",
        "**Generators alone** (jitted `sample`: x_p, x_r and the dense features [B, n]); 'of step' = the",
        "sampler's time over the TopK step on a fixed batch:",
        "",
    ]
    gens = results[0]["gens"] if results else list(GENERATORS[1:])
    out += ["| shape (d, n_q, k, B) | n | generator | " + " | ".join(gens) + " | "
            + " | ".join(f"{g} samples/s" for g in gens) + " | native speed-up over jax | "
            + " | ".join(f"{g} of step" for g in gens) + " |",
            "|---|---|---|" + "---|" * (3 * len(gens) + 1)]
    for r in results:
        t = r["times"]
        step = med(t[f"{r['archs'][0]} step, fixed batch"])
        for gname, label, K in (("bench", "Bench", r["K"]), ("hier", "hierarchical", r["K_hier"])):
            m = {g: med(t[f"{gname} {g}"]) for g in gens}
            out.append(
                f"| ({r['d']}, {r['n_q']}, {r['k']}, {r['B']}) | {r['n']} | {label} (K = {K}) | "
                + " | ".join(spread(t[f"{gname} {g}"]) for g in gens) + " | "
                + " | ".join(f"{r['B'] / m[g]:,.0f}" for g in gens) + f" | {m['jax'] / m['native']:.1f}x | "
                + " | ".join(("**" + pct(m[g] / step) + "**") if g == "native" else pct(m[g] / step) for g in gens) + " |")
    cols = [(name, g) for name in ("bench", "hier") for g in gens]
    label = {"bench": "Bench", "hier": "hierarchical"}
    out += [
        "",
        "**Inside the training step** (`Stepper.step` generating its batch on device from the bench, as",
        "`jsdl.fit` does; the dense features are not used by the step, so XLA drops their computation). Data",
        "share = (t with generation - t on a fixed batch) / t with generation, per round of the alternation",
        "(the runs of a round are back to back), median over rounds [and from the minima]:",
        "",
        "| shape (d, n_q, k, B) | n | step | fixed batch | " + " | ".join(f"+ {label[a]} {g}" for a, g in cols) + " | "
        + " | ".join(f"data share {label[a]} {g}" for a, g in cols) + " |",
        "|---|---|---|---|" + "---|" * (2 * len(cols)),
    ]
    for r in results:
        t = r["times"]
        for arch in r["archs"]:
            f = np.asarray(t[f"{arch} step, fixed batch"])
            share = []
            for a, g in cols:
                gt = np.asarray(t[f"{arch} step + {a} {g}"])
                sh = (f"{pct(max(float(np.median((gt - f) / gt)), 0.0))} "
                      f"[{pct(max((gt.min() - f.min()) / gt.min(), 0.0))}]")
                share.append(f"**{sh}**" if g == "native" else sh)
            out.append(
                f"| ({r['d']}, {r['n_q']}, {r['k']}, {r['B']}) | {r['n']} | {arch} | {spread(t[f'{arch} step, fixed batch'])} | "
                + " | ".join(spread(t[f"{arch} step + {a} {g}"]) for a, g in cols) + " | " + " | ".join(share) + " |")
    if cross is not None:
        rows_s, rows_d = cross
        out += [
            "",
            "**Crossover of the static rules** (jsdl/data/bench.py). Sampler, B = 4096, dense features from",
            "dense masks vs from active sets (rule: sparse when K <= n / "
            f"{_bench.SPARSE_SAMPLER_RATIO}):",
            "",
            "| n | S | K | K/n | dense | sparse | rule picks |",
            "|---|---|---|---|---|---|---|",
        ]
        for n, s, K, td, tsp in rows_s:
            pick = "sparse" if K * _bench.SPARSE_SAMPLER_RATIO <= n else "dense"
            out.append(f"| {n} | {s} | {K} | {K / n:.3f} | {ms(td)} | {ms(tsp)} | {pick} |")
        out += [
            "",
            f"x W^T from given active sets: dense product vs `decode_active` (rule: sum when K <= n / {_bench.SPARSE_DECODE_RATIO}):",
            "",
            "| d | n | B | S | K | largest count | dense | sum of active columns | rule picks |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for d, n, Bd, s, K, mx, td, tsp in rows_d:
            pick = "sum" if _bench.use_sparse_decode(K, n) else "dense"
            out.append(f"| {d} | {n} | {Bd} | {s} | {K} | {mx} | {ms(td)} | {ms(tsp)} | {pick} |")
    if gen is not None:
        times, its, ms_ = gen
        out += [
            "",
            "Bench generation by PGD, n = 1000, d = 768, M = 0.1 (eq. 28, adaptive step; wall clock including",
            "the host-side float64 re-check; the first rep includes jit compilation):",
            "",
            "| reps | time per bench | PGD iterations | realised max overlap |",
            "|---|---|---|---|",
            f"| {len(times)} (keys 0..{len(times) - 1}) | {spread(times)} | {', '.join(map(str, its))} | "
            f"{', '.join(f'{m:.4f}' for m in ms_)} |",
        ]
    return "\n".join(out)


def pgd_generation(reps):
    times, its, ms_ = [], [], []
    for r in range(reps):
        t0 = time.perf_counter()
        b = make_bench(jax.random.PRNGKey(r), 1000, 768, 0.1, S)
        jax.block_until_ready(b.W_p)
        times.append(time.perf_counter() - t0)
        its.append(dict(b.generation)["iterations_p"][0])
        ms_.append(b.realized_interference)
    return times, its, ms_


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="small,medium,large")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--archs", default="topk", help="steps to compare with: topk and/or relu")
    ap.add_argument("--wide", action="store_true", help="also n_features = 2 n_q")
    ap.add_argument("--old", action="store_true", help="also the sampler the JAX sampler replaced (slow at large shapes)")
    ap.add_argument("--no-crossover", action="store_true")
    ap.add_argument("--no-pgd", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("SHAPE", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    archs = args.archs.split(",")
    if args.child:
        _shape_child(args.child[0], int(args.child[1]), args.reps, archs, args.old)
        return 0
    args.argv = argv if argv is not None else sys.argv[1:]
    args.host = host_tuning()
    load0 = os.getloadavg()
    results = []
    for shape in args.shapes.split(","):
        d, n_q, k, B = SHAPES[shape]
        for n in (n_q, 2 * n_q) if args.wide else (n_q,):
            results.append(measure_shape_in_child(shape, n, args.reps, archs, args.old))
    cross = None if args.no_crossover else crossover(max(2, args.reps - 1))
    gen = None if args.no_pgd else pgd_generation(args.reps)
    text = report(results, cross, gen, args, load0, os.getloadavg())
    print(text)
    if not args.no_write:
        write_section("Data generation", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
