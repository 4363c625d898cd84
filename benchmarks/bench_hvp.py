"""Landscape benchmark: Hessian-vector products and Lanczos on an SAE with ~66k parameters.

    .venv/bin/python benchmarks/bench_hvp.py [--x64] [--write]

* HVP (forward-over-reverse, jitted) cost relative to a jitted gradient of the same loss
  (goal: <= ~3x), on an SAE (ReLU, no bias, n_p=128, n_q=256: 65,536 parameters) and a batch of
  4096 samples from the Linear Representation Bench;
* Lanczos (80 steps, full reorthogonalisation) extreme eigenvalues with their Ritz residual bounds,
  with and without the rescaling symmetry deflated;
* correctness on a smaller case (n_p=16, n_q=32, 1024 parameters): Lanczos extremes vs a dense
  eigensolver (numpy) of the full Hessian.

``--write`` replaces the ``## Landscape: HVP and Lanczos`` section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import numpy as np

from jsdl.records import write_section


def _timeit(fn, *args, reps=10):
    jax.block_until_ready(fn(*args))  # compile
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--x64", action="store_true")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--iters", type=int, default=80)
    args = ap.parse_args(argv)
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    import jsdl
    from jsdl.data import make_bench
    from jsdl.landscape import hessian as hs

    def setup(n_p, n_q, n_feat, batch, seed=0):
        key = jax.random.PRNGKey(seed)
        kb, kp, kx = jax.random.split(key, 3)
        bench = make_bench(kb, n_features=n_feat, d_input=n_p, max_interference=0.3, sparsity=0.95)
        spec = jsdl.make_spec("sae", "relu", n_q, bias=False)
        params = jsdl.init_params(kp, spec, n_p)
        b = bench.sample(kx, batch)
        b = jsdl.Batch(b.x_p, b.x_p if b.x_r is None else b.x_r)

        def f(p, bb):
            return jsdl.sdl_loss(p, bb, spec)[0]

        return f, params, b

    lines = []

    def say(s=""):
        print(s)
        lines.append(s)

    # ---- large case: cost of an HVP vs a gradient, Lanczos
    f, params, batch = setup(128, 256, 160, 4096)
    P = jsdl.param_count(params)
    x, unravel, _ = hs.flatten(params)
    grad = jax.jit(jax.grad(lambda xv, b: f(unravel(xv), b)))
    mv, dim = hs.make_hvp(f, params, batch)
    v = jax.random.normal(jax.random.PRNGKey(1), (dim,), x.dtype)
    t_grad = _timeit(grad, x, batch)
    t_hvp = _timeit(mv.raw, x, v, batch)
    t0 = time.perf_counter()
    r = hs.lanczos_extremes(mv, dim, jax.random.PRNGKey(2), num_iters=args.iters)
    t_lz = time.perf_counter() - t0
    Q = hs.rescaling_tangents(params)
    t0 = time.perf_counter()
    rq = hs.lanczos_extremes(mv, dim, jax.random.PRNGKey(2), num_iters=args.iters, ortho=Q)
    t_lzq = time.perf_counter() - t0

    # ---- small case: Lanczos vs dense
    fs, ps, bs = setup(16, 32, 20, 4096, seed=3)
    Hs = hs.full_hessian(fs, ps, bs)
    ev = Hs.eigvalsh()
    mvs, dims = hs.make_hvp(fs, ps, bs)
    rs = hs.lanczos_extremes(mvs, dims, jax.random.PRNGKey(4), num_iters=args.iters)
    sc = float(np.abs(ev).max())

    dev = jax.devices()[0]
    say("## Landscape: HVP and Lanczos")
    say()
    say(f"`benchmarks/bench_hvp.py{' --x64' if args.x64 else ''}` on {dev.platform} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, shared), jax {jax.__version__}, {'float64' if args.x64 else 'float32'}. "
        "SAE (ReLU, no bias), Linear Representation Bench batch of 4096 samples; medians of 10 runs after compile.")
    say()
    say("| case | params | gradient | HVP (fwd-over-rev) | HVP / gradient | Lanczos |")
    say("|---|---|---|---|---|---|")
    say(f"| n_p=128, n_q=256, B=4096 | {P:,} | {t_grad * 1e3:.1f} ms | {t_hvp * 1e3:.1f} ms | **{t_hvp / t_grad:.2f}x** | "
        f"{args.iters} steps: {t_lz:.1f} s (incl. compile); deflated: {t_lzq:.1f} s |")
    say()
    say(f"Extremes at 65k parameters ({args.iters} steps): lambda_max = {r['max']:.6g} (Ritz residual {r['residual_max']:.1e}), "
        f"lambda_min = {r['min']:.6g} (residual {r['residual_min']:.1e}); with the {Q.shape[0]} rescaling directions "
        f"deflated: lambda_min = {rq['min']:.6g}, lambda_max = {rq['max']:.6g}. A dense Hessian here would take "
        f"{P * P * (8 if args.x64 else 4) / 2**30:.0f} GiB.")
    say()
    say(f"Agreement with a dense eigensolver (n_p=16, n_q=32: {dims} parameters, B=4096): lambda_max {rs['max']:.10g} vs "
        f"{ev[-1]:.10g}, lambda_min {rs['min']:.10g} vs {ev[0]:.10g} (relative errors "
        f"{abs(rs['max'] - ev[-1]) / sc:.1e}, {abs(rs['min'] - ev[0]) / sc:.1e}).")
    say()
    if args.write:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
        title, _, body = "\n".join(lines).partition("\n")
        write_section(path, title.removeprefix("## ").strip(), body, header="# jsdl benchmark results\n")
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
