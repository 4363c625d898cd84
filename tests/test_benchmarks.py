"""Smoke runs of the benchmark scripts that RESULTS.md is regenerated from (tiny shapes, no writes):
a script that breaks is found here, not when `make bench` runs for half an hour."""
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_bench_population_smoke(capsys):
    import bench_population

    bench_population.main(["--sizes", "tiny", "--members", "2", "--reps", "1", "--steps", "30", "--profile",
                           "--no-write"])
    out = capsys.readouterr().out
    assert "| tiny (64, 16, 128, 4), 30 |" in out
    assert "steady speed-up" in out and "XLA op (top level)" in out


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu"])
def test_bench_step_floor_and_table(arch):
    import bench_step
    import common

    d, n_q, k, B = 16, 256, 4, 64
    x = np.random.default_rng(0).standard_normal((B, d)).astype(np.float32)
    fns = dict(bench_step.floor_parts(arch, x, n_q, k))
    run, mem, info = bench_step.jsdl_step(arch, x, n_q, k)
    fns["jsdl"] = run
    fns["jax matmul"] = bench_step.jsdl_matmul(x, n_q)
    times = common.alternate(fns, 1)
    assert ("floor: top-k" in times) == (arch != "relu")
    assert bench_step.floor_time(arch, times) > 0
    row = {"shape": "tiny", "arch": arch, "dims": (d, n_q, k, B), "times": times, "mem": {"jsdl": mem},
           "jsdl": "jsdl", "flops_mm": 2.0 * B * d * n_q, "failed": {}, "torch_threads": None}
    table = bench_step.format_rows([row])
    assert "jsdl step / floor" in table and f"| {arch} |" in table


def test_bench_step_profile_names_each_op_and_its_origin(capsys):
    """``bench_step.py --profile topk``: the per-op table of the real step, each op traced to the
    JAX operation it came from (the encoder product, the top-k), loop-body ops counted per step."""
    import bench_step

    bench_step.main(["--shapes", "small", "--profile", "topk", "--reps", "1", "--no-write"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    assert len(rows) >= 10
    assert any("jvp()/dot_general" in r for r in rows) and any("top_k" in r for r in rows)
    assert any("| 8 |" in r for r in rows)  # a k-slot loop body runs k = 8 times per step
