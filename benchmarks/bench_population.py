"""Training throughput: a vmapped population of M TopK SAEs against M sequential runs, at several sizes.

    python benchmarks/bench_population.py [--sizes tiny,xsmall,small,medium] [--members 16] [--reps 2]
                                          [--profile] [--one-core] [--no-write]

Every run goes through ``jsdl.train.fit`` / ``fit_population`` on a Linear Representation Bench
sampled on device inside the step (no host data), so the numbers are the engine's. For each size
and repetition, in one process and alternating: M sequential ``fit`` calls (seeds 0..M-1; they share
one cached compiled step, so they pay one compile, as a user's loop would) and one
``fit_population`` over the same seeds (one compile of the vmapped program). Steady state = the
summaries' steps/s (first, compiling step excluded); wall = end-to-end seconds of the M fits vs the
population call, compiles included. Medians over the repetitions. A size whose population step
``jsdl train`` would host-tune (``jsdl.hosttune.wants_tuning``: members x B x n_q >= 2^23; the
medium size) runs each part in a fresh process per repetition instead, tuned as the CLI would tune
it, so that it does not measure an untuned process faulting in the population's temporaries every
step; there both walls include a compile in every repetition.

``--one-core`` repeats every size with each part in a fresh process pinned to one CPU: the
population's speed-up per core. One small model's step does not get faster with a second core, a
population's independent members do, so on a host of c cores the population's steady speed-up is at
most about c times its one-core speed-up, divided by how much faster the sequential runs are on all
cores than on one (benchmarks/NOTES.md, "Speed round 16").

``--profile`` adds the per-op time of the compiled population step at the first size (JAX profiler
trace, top-level XLA ops, ms per step), so the section shows where a population step goes.
The section "## Training: population vs sequential" of benchmarks/RESULTS.md is replaced unless
``--no-write``.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import jsdl  # noqa: E402
from jsdl.data import make_bench  # noqa: E402
from jsdl.train import Grid, TrainConfig, fit, fit_population  # noqa: E402

SIZES = {
    "tiny": dict(n_latents=64, d=16, n_features=32, batch=128, k=4, steps=3000),
    # The configuration of the first version of this benchmark, whose 1.8x / 1.1x issue 17 quotes.
    "xsmall": dict(n_latents=256, d=32, n_features=64, batch=256, k=4, steps=1000),
    "small": dict(n_latents=512, d=64, n_features=256, batch=256, k=8, steps=1000),
    "medium": dict(n_latents=4096, d=256, n_features=2048, batch=1024, k=32, steps=100),
}


def setup(size: dict, steps: int):
    data = make_bench(jax.random.PRNGKey(0), n_features=size["n_features"], d_input=size["d"],
                      max_interference=0.3, sparsity=0.99)
    spec = jsdl.make_spec(activation="topk", n_latents=size["n_latents"], k=size["k"])
    cfg = TrainConfig(steps=steps, batch_size=size["batch"], learning_rate=3e-3, log_every=max(steps // 10, 1),
                      progress=False, plots=False)
    return data, spec, cfg


def sequential(data, spec, cfg, members):
    t = time.perf_counter()
    sps = []
    for i in range(members):
        _, h = fit(jax.random.PRNGKey(i), spec, data, cfg)
        sps.append(h["summary"]["steps_per_s"])
    wall = time.perf_counter() - t
    steady = members * cfg.steps / sum(cfg.steps / s for s in sps)  # model-steps/s over the M runs
    return steady, wall


def population(data, spec, cfg, members):
    t = time.perf_counter()
    _, hs = fit_population(jax.random.PRNGKey(0), Grid(spec, seeds=list(range(members))), data, cfg)
    wall = time.perf_counter() - t
    return hs[0]["summary"]["steps_per_s"] * members, wall, hs[0]["summary"].get("compile_s")


def tuned_parts(size: dict, members: int) -> tuple[bool, bool]:
    """Whether ``jsdl train`` would tune the host (``jsdl.hosttune``) for one member's step and for
    the population's step at ``size``."""
    from jsdl import hosttune

    return (hosttune.wants_tuning(size["batch"], size["n_latents"], 1),
            hosttune.wants_tuning(size["batch"], size["n_latents"], members))


def _child(name: str, part: str, members: int, steps: int) -> None:
    """One part (``seq`` or ``pop``) of one repetition in this fresh process; prints a JSON line.
    ``JSDL_HOST_TUNING=on`` in the environment tunes the process first."""
    from jsdl import hosttune

    if hosttune.mode() == "on":
        common.log(f"[bench_population] {name} {part}: {hosttune.tune_host()}")
    data, spec, cfg = setup(SIZES[name], steps)
    if part == "seq":
        s, w = sequential(data, spec, cfg, members)
        out = {"steady": s, "wall": w}
    else:
        s, w, c = population(data, spec, cfg, members)
        out = {"steady": s, "wall": w, "compile": c}
    out["cpus"] = len(os.sched_getaffinity(0))
    common.print_result(out)


def _in_child(name: str, part: str, members: int, steps: int, tune: bool, cpus=None) -> dict:
    r = common.run_child(__file__, ["--child", name, part, members, steps], tune, f"bench_population {name} {part}",
                         cpus=cpus)
    if cpus is not None and r["cpus"] != len(cpus):
        raise RuntimeError(f"the {part} child of {name} ran on {r['cpus']} CPUs, not pinned to {len(cpus)}")
    return r


def _parts(result: dict, *keys) -> tuple:
    return tuple(result[k] for k in keys)


def bench_size(name: str, size: dict, members: int, reps: int, steps: int | None, cpus=None):
    """Sequential runs against the population at ``size``, alternating ``reps`` times. ``cpus``: run
    both parts in fresh processes pinned to these CPUs (``--one-core``: how much faster the
    population is per core; a population's members can fill every core where one small model's
    step may not, so on c cores its speed-up is bounded by about c times the one-core ratio, divided
    by the sequential runs' own gain from the other cores)."""
    steps = steps or size["steps"]
    tune_seq, tune_pop = tuned_parts(size, members)
    # Each part in its own process: tuned as `jsdl train` would tune it, or pinned.
    separate = tune_seq or tune_pop or cpus is not None
    where = "" if cpus is None else f" on {len(cpus)} CPU{'s' if len(cpus) > 1 else ''}"
    if separate:
        run_seq = lambda: _parts(_in_child(name, "seq", members, steps, tune_seq, cpus), "steady", "wall")  # noqa: E731
        run_pop = lambda: _parts(_in_child(name, "pop", members, steps, tune_pop, cpus), "steady", "wall", "compile")  # noqa: E731
    else:
        data, spec, cfg = setup(size, steps)
        run_seq = lambda: sequential(data, spec, cfg, members)  # noqa: E731
        run_pop = lambda: population(data, spec, cfg, members)  # noqa: E731
    rows = collections.defaultdict(list)
    for rep in range(reps):
        common.log(f"[bench_population] {name}{where} rep {rep + 1}/{reps}: {members} sequential runs")
        s, w = run_seq()
        rows["seq_steady"].append(s)
        rows["seq_wall"].append(w)
        common.log(f"[bench_population] {name}{where} rep {rep + 1}/{reps}: population of {members}")
        s, w, c = run_pop()
        rows["pop_steady"].append(s)
        rows["pop_wall"].append(w)
        rows["pop_compile"].append(c or float("nan"))
    r = {k: common.med(v) for k, v in rows.items()}
    r.update(name=name, size=size, steps=steps, raw=dict(rows), separate=separate, tune_seq=tune_seq,
             tune_pop=tune_pop)
    r["speedup_steady"] = r["pop_steady"] / r["seq_steady"]
    r["speedup_wall"] = r["seq_wall"] / r["pop_wall"]
    common.log(f"[bench_population] {name}{where}: steady {r['speedup_steady']:.2f}x, wall {r['speedup_wall']:.2f}x")
    return r


def profile_ops(size: dict, members: int, steps: int = 200, top: int = 12) -> tuple[str, float]:
    """Per-op time of the population step (top-level XLA ops of a profiler trace), markdown rows."""
    data, spec, cfg = setup(size, steps)
    run = lambda: fit_population(jax.random.PRNGKey(0), Grid(spec, seeds=list(range(members))), data, cfg)  # noqa: E731
    run()
    ops, _ = common.trace_ops(run, 1)
    # Ops run once per step (or once more for the first) are top level; loop-body ops run k times.
    topl = {n: t for n, (t, c, _) in ops.items() if c <= steps + 1}
    total = sum(topl.values()) / steps
    lines = ["| XLA op (top level) | ms per step | share |", "|---|---|---|"]
    for n, t in sorted(topl.items(), key=lambda x: -x[1])[:top]:
        lines.append(f"| `{n}` | {t / steps:.3f} | {100 * t / steps / total:.0f}% |")
    return "\n".join(lines), total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="tiny,xsmall,small,medium")
    ap.add_argument("--members", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="override every size's step count")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--one-core", action="store_true",
                    help="also run every size with each part in a fresh process pinned to one CPU")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", nargs=4, metavar=("SIZE", "PART", "MEMBERS", "STEPS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        _child(a.child[0], a.child[1], int(a.child[2]), int(a.child[3]))
        return 0
    if os.environ.get("JSDL_BENCH_QUICK") == "1":
        a.sizes, a.reps, a.steps = "tiny", 1, a.steps or 200
    names = [s for s in a.sizes.split(",") if s]
    M = a.members
    results = [bench_size(n, SIZES[n], M, a.reps, a.steps) for n in names]
    one = {min(os.sched_getaffinity(0))}
    pinned = [bench_size(n, SIZES[n], M, a.reps, a.steps, cpus=one) for n in names] if a.one_core else []
    lines = [
        f"Command: `python benchmarks/bench_population.py --sizes {a.sizes} --members {M} --reps {a.reps}"
        + (f" --steps {a.steps}" if a.steps else "") + (" --profile" if a.profile else "") + (" --one-core" if a.one_core else "") + "` "
        f"(jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} device, "
        f"{os.cpu_count()} cores; load average before: {os.getloadavg()[0]:.1f}). TopK SAEs on a Linear "
        "Representation Bench (S = 0.99) sampled on device inside the step; medians of "
        f"{a.reps} alternating repetitions. Steady state: model-steps/s without the compiling first step; "
        f"wall: the {M} sequential `fit` calls (sharing one cached compile) vs one `fit_population`, "
        "compiles included.",
        "",
        "| size (n_q, d, B, k), steps | sequential model-steps/s | population model-steps/s | steady speed-up | "
        "sequential wall | population wall (compile) | wall speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["size"]
        lines.append(
            f"| {r['name']} ({s['n_latents']}, {s['d']}, {s['batch']}, {s['k']}), {r['steps']} | "
            f"{r['seq_steady']:.0f} | {r['pop_steady']:.0f} | **{r['speedup_steady']:.2f}x** | {r['seq_wall']:.1f} s | "
            f"{r['pop_wall']:.1f} s ({r['pop_compile']:.1f} s) | **{r['speedup_wall']:.2f}x** |")
    sep = [r for r in results if r["separate"]]
    if sep:
        lines += ["", "Sizes whose population step is large (" + ", ".join(r["name"] for r in sep) + ": members x B x "
                  "n_q >= 2^23, `jsdl.hosttune.wants_tuning`) ran each part in a fresh process per repetition, "
                  "host-tuned where `jsdl train` would tune it (the population" + ("" if all(r["tune_pop"] for r in sep)
                  else " where it wants tuning") + "; one member's step " + ("too" if all(r["tune_seq"] for r in sep)
                  else "is below the threshold: untuned, with asynchronous dispatch") + "), so both walls include "
                  "a compile in every repetition. In an untuned process a large population step faults in its "
                  "temporaries every step (jsdl warns; docs/training.md, 'Speed on a CPU host')."]
    if pinned:
        lines += ["", f"**On one core.** The same sizes, each part in a fresh process pinned to one CPU (as `taskset -c 0` "
                  "pins it), medians of the repetitions. A population's members are independent work that can fill "
                  "every core; one small model's step may gain nothing from the other cores (the last column: "
                  "sequential model-steps/s on all cores over those on one). On c cores a population's steady speed-up is "
                  "therefore at most about c x its one-core speed-up / the last column (here c = "
                  f"{os.cpu_count()}):", "",
                  "| size | sequential model-steps/s | population model-steps/s | steady speed-up | wall speed-up | "
                  "sequential on all cores / on one |", "|---|---|---|---|---|---|"]
        for r, p in zip(results, pinned):
            lines.append(f"| {p['name']} | {p['seq_steady']:.0f} | {p['pop_steady']:.0f} | **{p['speedup_steady']:.2f}x** | "
                         f"{p['speedup_wall']:.2f}x | {r['seq_steady'] / p['seq_steady']:.2f} |")
    lines += ["", f"Goal: a population of {M} small SAEs >= 3x {M} sequential runs in steady state and >= 2x in "
              "wall time including compilation."]
    if a.profile:
        table, total = profile_ops(SIZES[names[0]], M)
        lines += ["", f"Where a population step goes ({names[0]}, {M} members; JAX profiler, top-level XLA ops, "
                  f"{total:.2f} ms per step in all; ops of the same step can overlap on the 2 cores):", "", table]
    text = "\n".join(lines)
    print(text)
    if not a.no_write:
        common.write_section("Training: population vs sequential", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
