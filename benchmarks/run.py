"""Run every jsdl benchmark and write benchmarks/RESULTS.md (``make bench`` runs this).

Order: the header (machine, versions, command), the training-step comparison with SAELens
(bench_step.py), the top-k selection study (bench_topk.py), then the other engineers' scripts when
present (bench_data.py, bench_population.py, bench_hvp.py), each of which owns its own ``## ``
section of RESULTS.md (they get no arguments; ``JSDL_BENCH_QUICK=1`` in the environment asks for a
smoke run). Sections of scripts that are not run are kept as they are.

Usage: python benchmarks/run.py [--quick] [--reps N] [--only step,topk,data,population,hvp]
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

OTHERS = ("bench_data.py", "bench_population.py", "bench_hvp.py")


def run_script(name: str, args: list[str], quick: bool = False) -> int:
    """Run one benchmark script with this interpreter; ``JSDL_BENCH_QUICK=1`` asks for a smoke run."""
    path = os.path.join(HERE, name)
    if not os.path.exists(path):
        common.log(f"[run] {name}: not present, skipped")
        return 0
    common.log(f"[run] {name} {' '.join(args)}")
    env = dict(os.environ, JSDL_BENCH_QUICK="1" if quick else "0")
    return subprocess.run([sys.executable, path, *args], cwd=os.path.dirname(HERE), env=env).returncode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="run all jsdl benchmarks and write benchmarks/RESULTS.md")
    ap.add_argument("--quick", action="store_true", help="small shape only (a smoke run, minutes)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per variant (default 3)")
    ap.add_argument("--only", default="step,topk,data,population,hvp")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    cmd = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (
        "# jsdl benchmark results\n\n"
        f"Written by `{cmd.strip()}` (`make bench` = `benchmarks/run.py` in `.venv-bench`, which adds torch "
        f"2.13.0 (CPU) and sae-lens to the pinned jax stack), {datetime.date.today().isoformat()}.\n\n"
        + common.machine_info()
        + "\n\nSpeed goals (ratios measured in one run, not timed assertions in tests): TopK at "
        "(768, 16384, 32, 4096) >= 3x faster than SAELens; ReLU+L1 >= 1.2x SAELens and >= 60% of the "
        "measured matmul FLOP/s; population of 16 >= 3x faster than 16 sequential runs; sparse-path peak "
        "memory <= dense path.\n"
    )
    common.write_header(header)
    rc = 0
    shapes = "small" if args.quick else "small,medium,large"
    if "step" in only:
        rc |= run_script("bench_step.py", ["--shapes", shapes, "--reps", str(args.reps)], args.quick)
    if "topk" in only:
        rc |= run_script("bench_topk.py", ["--quick"] if args.quick else [], args.quick)
    for name in OTHERS:
        key = name[len("bench_"):-len(".py")]
        if key in only:
            rc |= run_script(name, [], args.quick)
    common.order_sections()
    common.log(f"[run] wrote {common.RESULTS}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
