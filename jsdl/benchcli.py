"""``jsdl bench``: run the benchmarks of ``benchmarks/`` (a source checkout) and update
``benchmarks/RESULTS.md``.

The SAELens comparison needs torch and sae-lens, which are not jsdl dependencies: ``make bench``
creates ``.venv-bench`` with them. ``jsdl bench`` runs with the current interpreter and, without
them, times jsdl alone."""
from __future__ import annotations

import os
import subprocess
import sys


def _run_py() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "run.py")


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="small shape only: a smoke run of a few minutes")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per variant (default 3)")
    p.add_argument("--only", default=None,
                   help="comma-separated subset of step,topk,data,population,hvp (default: all)")


def run(args) -> int:
    path = _run_py()
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"benchmarks/run.py not found at {path}: `jsdl bench` needs a source checkout of jsdl "
            "(git clone, then `make bench`)"
        )
    if args.reps < 1:
        raise ValueError(f"--reps must be >= 1, got {args.reps}")
    cmd = [sys.executable, path, "--reps", str(args.reps)]
    if args.quick:
        cmd.append("--quick")
    if args.only:
        cmd += ["--only", args.only]
    return subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(path))).returncode
