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


def test_bench_population_runs_a_tuned_size_in_fresh_processes(capsys, monkeypatch):
    """A size whose population step `jsdl train` would host-tune runs each part in a child process,
    tuned as the CLI would tune it (forced here with JSDL_HOST_TUNING=on)."""
    import bench_population

    monkeypatch.setenv("JSDL_HOST_TUNING", "on")
    assert bench_population.tuned_parts(bench_population.SIZES["tiny"], 2) == (True, True)
    bench_population.main(["--sizes", "tiny", "--members", "2", "--reps", "1", "--steps", "10", "--no-write"])
    out = capsys.readouterr().out
    assert "| tiny (64, 16, 128, 4), 10 |" in out
    assert "ran each part in a fresh process per repetition" in out
    monkeypatch.setenv("JSDL_HOST_TUNING", "off")
    assert bench_population.tuned_parts(bench_population.SIZES["medium"], 16) == (False, False)


def test_bench_population_one_core_pins_its_children(capsys):
    """--one-core runs both parts in children pinned to one CPU (each child reports its affinity;
    the script refuses an unpinned one) and adds the per-core table."""
    import bench_population

    bench_population.main(["--sizes", "tiny", "--members", "2", "--reps", "1", "--steps", "10", "--one-core",
                           "--no-write"])
    out = capsys.readouterr().out
    assert "**On one core.**" in out
    row = [ln for ln in out.splitlines() if ln.startswith("| tiny |")]
    assert len(row) == 1 and row[0].count("x") >= 2


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


def test_bench_step_profile_names_each_op_and_its_origin(capsys, monkeypatch):
    """``bench_step.py --profile topk``: the per-op table of the real step, each op traced to the
    JAX operation it came from (the encoder product, the top-k), loop-body ops counted per step.
    The sparse kernels' slot loops are kept (jsdl.native's scatter switched off) so that there are
    loop bodies to count."""
    import bench_step

    from jsdl import native

    monkeypatch.setattr(native, "supports_scatter_rows", lambda *a: False)

    bench_step.main(["--shapes", "small", "--profile", "topk", "--reps", "1", "--no-write"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    assert len(rows) >= 10
    # the selection: XLA's top_k, or jsdl's native kernel (an ffi_call) where it is built
    assert any("jvp()/dot_general" in r for r in rows) and any("top_k" in r or "ffi_call" in r for r in rows)
    assert any("| 8 |" in r for r in rows)  # a k-slot loop body runs k = 8 times per step


def test_synth_quality_cost_model_tables_and_plot(tmp_path):
    """The budget sweep's summaries from rows of known cost: the least-squares fit recovers fixed
    seconds and samples/s exactly, the end-to-end ratio is the ratio of the mean walls, the time to
    SAELens's quality takes jsdl's first budget at or above it (or says it was not reached), and the
    plot is written. No SAELens needed: rows as run.py writes them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("synth_quality_run",
                                                  os.path.join(ROOT, "benchmarks", "synth_quality", "run.py"))
    sq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sq)
    cost = {"jsdl": (5.0, 50_000.0), "saelens": (15.0, 10_000.0)}
    mcc = {"jsdl": {1000: 0.40, 2000: 0.55, 4000: 0.60}, "saelens": {1000: 0.45, 2000: 0.50, 4000: 0.58}}
    rows = [dict(arch=arch, framework=fw, seed=s, samples=n, wall_s=cost[fw][0] + n / cost[fw][1] + 0.0,
                 mcc=mcc[fw][n] + (0.01 if s else -0.01) * (arch == "topk"),
                 f1=0.5 * mcc[fw][n] - 0.2 * (arch != "topk"))
            for arch in ("topk", "batchtopk") for s in (0, 1) for n in (1000, 2000, 4000) for fw in cost]
    for fw, (fixed, rate) in cost.items():
        f, r = sq.cost_model([r for r in rows if r["framework"] == fw and r["arch"] == "topk"])
        assert f == pytest.approx(fixed) and r == pytest.approx(rate)
    table = sq.cost_table(rows)
    assert "| topk | jsdl | 6 | 5.0 | 50,000 | 20.5 | **5.0x** |" in table
    budgets = sq.budget_table(rows)
    e2e = (15 + 4000 / 10_000) / (5 + 4000 / 50_000)
    assert "| topk | 4,000 | 2 | 0.600 ± 0.010 |" in budgets and f"**{e2e:.1f}x** |" in budgets
    match = sq.match_table(rows)
    # SAELens's MCC at 4000 is 0.58: jsdl's first budget at or above is 4000 (0.60), not 2000 (0.55)
    assert f"| topk | MCC | 0.580 at 4,000 | 15.4 | 0.600 at 4,000 | 5.1 | **{15.4 / 5.08:.1f}x** |" in match
    # F1 of batchtopk: SAELens 0.09 at 4000; jsdl reaches 0.075 at 2000 (< 0.09), 0.10 at 4000
    assert "| batchtopk | F1 | 0.090 at 4,000 |" in match
    rows_low = [dict(r, mcc=r["mcc"] - 0.5) if r["framework"] == "jsdl" else r for r in rows]
    assert "not reached (best 0.100)" in sq.match_table(rows_low)
    png = tmp_path / "q.png"
    sq.plot(rows, str(png))
    assert png.stat().st_size > 10_000
