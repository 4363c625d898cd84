"""Training throughput: one model, a vmapped population of 16, and 16 sequential runs.

    python benchmarks/bench_population.py [--steps 300] [--write]

Every run goes through ``jsdl.train.fit`` / ``fit_population`` on a synthetic bench sampled on
device inside the step (no host data), so the numbers are the engine's. Steps/s exclude the first
(compiling) step; the sequential total includes each run's compile, as a user would pay it.
``--write`` replaces the "## Training: population vs sequential" section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
from flax import struct

import jsdl
from jsdl.records import write_section
from jsdl.train import Grid, TrainConfig, fit, fit_population


@struct.dataclass
class _Bench:
    """Fallback sparse-feature stream with the Bench interface (used if jsdl.data is missing)."""

    W_p: jax.Array
    W_r: jax.Array

    def sample(self, key, batch_size):
        k1, k2 = jax.random.split(key)
        n = self.W_p.shape[1]
        f = (jax.random.uniform(k1, (batch_size, n)) > 0.99) * jax.random.uniform(k2, (batch_size, n))
        return jsdl.Batch(f @ self.W_p.T, f @ self.W_r.T, f)


def make_data(n, d):
    try:
        from jsdl.data import make_bench

        return make_bench(jax.random.PRNGKey(0), n_features=n, d_input=d, max_interference=0.3, sparsity=0.99), "make_bench"
    except Exception:
        W = jax.random.normal(jax.random.PRNGKey(0), (d, n))
        return _Bench(W / jnp.linalg.norm(W, axis=0), W / jnp.linalg.norm(W, axis=0)), "fallback generator"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--members", type=int, default=16)
    ap.add_argument("--n-latents", type=int, default=64)
    ap.add_argument("--d", type=int, default=16)
    ap.add_argument("--n-features", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()

    data, src = make_data(a.n_features, a.d)
    spec = jsdl.make_spec(activation="topk", n_latents=a.n_latents, k=4)
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch, learning_rate=3e-3, log_every=100, progress=False, plots=False)
    P = a.members

    _, h = fit(jax.random.PRNGKey(0), spec, data, cfg)
    single = h["summary"]["steps_per_s"]

    t = time.perf_counter()
    seq_sps = []
    for i in range(P):
        _, h = fit(jax.random.PRNGKey(i), spec, data, cfg)
        seq_sps.append(h["summary"]["steps_per_s"])
    seq_wall = time.perf_counter() - t

    t = time.perf_counter()
    _, hs = fit_population(jax.random.PRNGKey(0), Grid(spec, seeds=list(range(P))), data, cfg)
    pop_wall = time.perf_counter() - t
    pop = hs[0]["summary"]["steps_per_s"]

    seq_steady = P * a.steps / sum(a.steps / s for s in seq_sps)  # model-steps/s over the 16 runs
    rows = [
        ("one model", f"{single:.0f}", f"{single:.0f}", "-"),
        (f"{P} sequential runs", f"{seq_steady:.0f}", f"{seq_steady:.0f}", f"{seq_wall:.1f}"),
        (f"population of {P} (vmap)", f"{pop:.0f}", f"{pop * P:.0f}", f"{pop_wall:.1f}"),
    ]
    speedup_steady = pop * P / seq_steady
    speedup_wall = seq_wall / pop_wall
    lines = [
        "## Training: population vs sequential",
        "",
        f"`python benchmarks/bench_population.py --steps {a.steps} --n-latents {a.n_latents} --d {a.d} "
        f"--batch {a.batch}` on {platform.machine()} CPU "
        f"({os.cpu_count()} cores, shared; jax {jax.__version__}, {jax.device_count()} device). "
        f"TopK SAE n_q={a.n_latents}, d={a.d}, k=4, batch {a.batch}, {a.steps} steps, data from {src} "
        "sampled on device inside the step. Steps/s exclude the compiling first step; wall time includes compiles "
        "(the 16 sequential runs share one cached compiled step, so they pay one compile; the population pays "
        "one compile of the vmapped program).",
        "",
        "| run | steps/s | model-steps/s | wall s |",
        "|---|---|---|---|",
        *[f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in rows],
        "",
        f"Population speed-up over {P} sequential runs: **{speedup_steady:.1f}x** in steady-state model-steps/s, "
        f"**{speedup_wall:.1f}x** in wall time (goal >= 3x).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if a.write:
        path = os.path.join(os.path.dirname(__file__), "RESULTS.md")
        title, _, body = text.partition("\n")
        write_section(path, title.removeprefix("## ").strip(), body, header="# jsdl benchmark results\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
