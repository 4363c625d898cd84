"""Shared helpers for the benchmarks: timing, machine/version info, RESULTS.md sections.

RESULTS.md layout: a header (machine, versions, command, date) written by ``run.py``, then one
``## `` section per benchmark. :func:`write_section` replaces a section by its title and keeps every
other section as it is, so each benchmark script (ours and other engineers') owns its own section.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from typing import Callable, Optional

import numpy as np

from jsdl import records

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "RESULTS.md")


def host_tuning() -> str:
    """Tune the process as ``jsdl train`` tunes a large step (:func:`jsdl.hosttune.tune_host`:
    synchronous CPU dispatch, glibc keeping large blocks) unless ``JSDL_HOST_TUNING=off``; call it
    before the first JAX array. Both frameworks of a comparison run in this process, so both get
    it. Returns the line to record with the results."""
    from jsdl import hosttune

    if hosttune.mode() == "off":
        return "host tuning: off (JSDL_HOST_TUNING=off)"
    return hosttune.tune_host()


def print_result(result: dict) -> None:
    """A child process's answer to :func:`run_child`: one ``RESULT`` JSON line on stdout."""
    print("RESULT " + json.dumps(result), flush=True)


def run_child(script: str, args: list[str], tune: bool, what: str, cpus: Optional[set] = None) -> dict:
    """``python script *args`` in a fresh process with ``JSDL_HOST_TUNING=on`` (``tune``) or
    ``off``, as ``jsdl train`` would set it for the step measured there; returns the dict of the
    child's last :func:`print_result` line. Its stderr (progress) passes through. ``cpus``: pin the
    child to these CPUs (as ``taskset`` would)."""
    env = dict(os.environ, JSDL_HOST_TUNING="on" if tune else "off")
    cmd = [sys.executable, os.path.abspath(script), *map(str, args)]
    if cpus is not None:  # the child pins itself before it imports anything (no preexec_fn: a fork of a JAX process)
        cmd = [sys.executable, "-c", "import os, runpy, sys; os.sched_setaffinity(0, set(map(int, sys.argv[1].split(',')))); "
               "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')",
               ",".join(map(str, sorted(cpus))), *cmd[1:]]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed in its child process (exit {proc.returncode}):\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def timeit(fn: Callable[[], object], reps: int) -> list[float]:
    """Wall-clock seconds of ``reps`` calls of ``fn`` (which must block until its work is done)."""
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def alternate(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time several callables round-robin (A B C A B C ...) so slow drifts of a shared machine hit
    all of them alike. Each is called ``warmup`` times first (compilation, allocator warm-up)."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, f in fns.items():
            times[name].extend(timeit(f, 1))
    return times


def trace_ops(run: Callable[[], object], calls: int, hlo_text: str = "") -> tuple[dict, float]:
    """Per-op time of ``calls`` calls of ``run`` from a JAX profiler trace: ``({op: (ms per call,
    times per call, JAX origin)}, ms per call in all)``. Ops inside a loop body run several times
    per call and are summed; the origin is the op's ``op_name`` metadata in ``hlo_text`` (the
    compiled module's ``as_text()``), when given. Ops of one call can overlap on several cores."""
    import collections
    import glob
    import gzip
    import json
    import re
    import shutil
    import tempfile

    import jax

    origin = {}
    for m in re.finditer(r'^\s*%?([\w.\-]+) = [^\n]*?op_name="([^"]*)"', hlo_text, re.M):
        origin[m.group(1)] = m.group(2)
    d = tempfile.mkdtemp(prefix="jsdl_trace_")
    try:
        with jax.profiler.trace(d):
            for _ in range(calls):
                run()
        f = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)[0]
        events = json.load(gzip.open(f))["traceEvents"]
    finally:
        shutil.rmtree(d, ignore_errors=True)
    tot, cnt = collections.Counter(), collections.Counter()
    skip = ("$", "Thunk", "Pjit", "Common", "np.", "Execute", "Slinky", "Parse", "Allocate", "Handle", "end:")
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(skip) and "profiler" not in e["name"]:
            tot[e["name"]] += e["dur"]
            cnt[e["name"]] += 1
    ops = {n: (t / 1e3 / calls, cnt[n] / calls, origin.get(n, "")) for n, t in tot.items()}
    return ops, sum(t for t, _, _ in ops.values())


def med(ts) -> float:
    return float(np.median(ts))


def fmt(t: float) -> str:
    """Seconds as ``1.23 s`` or ``45.6 ms``."""
    return f"{t:.2f} s" if t >= 1.0 else f"{t * 1e3:.1f} ms"


def spread(ts) -> str:
    """``median (min-max)`` in seconds or milliseconds."""
    m, lo, hi = med(ts), float(np.min(ts)), float(np.max(ts))
    if m < 1.0:
        return f"{m * 1e3:.1f} ms ({lo * 1e3:.0f}-{hi * 1e3:.0f})"
    return f"{m:.2f} s ({lo:.2f}-{hi:.2f})"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> str:
    lines = [f"- machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"]
    try:
        load = os.getloadavg()
        lines.append(f"- load average at start: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
                     "(the machine is shared with other jobs: timings are noisy, ratios are measured alternating)")
    except OSError:
        pass
    lines.append(f"- python {platform.python_version()}")
    vers = []
    for mod in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "sae_lens"):
        try:
            m = __import__(mod)
            vers.append(f"{mod} {getattr(m, '__version__', '?')}")
        except Exception:  # noqa: BLE001 - optional packages
            vers.append(f"{mod} (not installed)")
    lines.append("- " + ", ".join(vers))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
        if rev:
            lines.append(f"- jsdl commit {rev}")
    except OSError:
        pass
    return "\n".join(lines)


def read_sections(path: str = RESULTS) -> tuple[str, list[tuple[str, str]]]:
    """(header, [(title, body)]) of a RESULTS.md (:func:`jsdl.records.read_sections`)."""
    return records.read_sections(path)


def write_sections(header: str, secs: list[tuple[str, str]], path: str = RESULTS) -> None:
    records.write_sections(header, secs, path)


def write_section(title: str, body: str, path: str = RESULTS) -> None:
    """Replace (or append) the section ``## title`` of RESULTS.md, keeping all others (locked)."""
    records.write_section(path, title, body, header="# jsdl benchmark results\n")


def write_header(header: str, path: str = RESULTS) -> None:
    with records.locked(path):
        _, secs = read_sections(path)
        write_sections(header, secs, path)


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


# Section order of RESULTS.md: ours (by title prefix) first, then every other section as found.
ORDER = ("Training step: jsdl vs SAELens (small", "Training step: jsdl vs SAELens (medium",
         "Training step: jsdl vs SAELens (large", "Training step", "Where the training step goes",
         "Top-k selection", "Data",
         "Training: population", "Landscape", "Sharding", "SynthSAEBench")


def order_sections(path: str = RESULTS) -> None:
    """Sort the sections of RESULTS.md by :data:`ORDER` (stable for the rest)."""
    def rank(title):
        for i, p in enumerate(ORDER):
            if title.startswith(p):
                return i
        return len(ORDER)

    with records.locked(path):
        header, secs = read_sections(path)
        secs = sorted(secs, key=lambda s: rank(s[0]))
        write_sections(header, secs, path)
