"""Host memory for XLA on CPU: reuse a large step's temporaries instead of faulting them in again.

On a CPU, XLA's runtime allocates the temporaries of each call of a compiled program as one block
(106 MiB for the TopK step at d 512, 4096 latents, B 4096) and frees it when the call ends. By
default the call runs on one of XLA's worker threads, and glibc's malloc serves a block over
32 MiB in a thread's arena with a fresh ``mmap`` (``M_MMAP_MAX`` does not stop that), so every
step faults in all the pages of its temporaries again: 27,000 page faults per step at that shape,
109,000 (425 MiB) at d 768 with 16384 latents. :func:`tune_host` turns on two process-wide
switches:

1. ``jax_cpu_enable_async_dispatch = False``: the CPU client runs each call on the calling thread,
   so the block comes from glibc's main arena;
2. ``mallopt(M_MMAP_MAX, 0)`` and a 2 GiB ``M_TRIM_THRESHOLD``: the main arena serves large
   blocks from its heap and keeps them when they are freed, so the next step reuses them.

Measured on a 2-core CPU (benchmarks/NOTES.md, "Speed round 8"; A/B in alternating processes):
the TopK step 11-13% faster at (768, 16384, 32, 4096) and 9-15% at (512, 4096, 32, 4096), the ReLU
step 8% at the large shape; small steps and the SynthSAEBench ``cpu`` recipe unchanged. Small
steps gain nothing, and without asynchronous dispatch Python no longer prepares the next step
while the current one runs, so the default policy (``JSDL_HOST_TUNING=auto``) tunes only a large
step (:func:`wants_tuning`). The cost: the process keeps its peak host memory instead of returning
freed blocks to the operating system.

Both switches must be set before JAX creates its CPU client (the first array, ``jax.devices()``).
``jsdl train`` does it for you after reading its config. From Python, call :func:`tune_host` at the
top of the script, before any JAX array exists. Nothing changes on accelerators (their memory is
not allocated this way) beyond the host side of the process, and on systems without glibc only the
first switch applies.
"""
from __future__ import annotations

import ctypes
import os
from typing import Optional

from jsdl import _env

__all__ = ["ENV", "LARGE_STEP_ENTRIES", "mode", "wants_tuning", "tune_host", "status"]

ENV = "JSDL_HOST_TUNING"
"""Environment variable: ``auto`` (default: tune large steps), ``on`` (always) or ``off``."""

LARGE_STEP_ENTRIES = 1 << 23
"""``auto`` tunes a step whose ``members x batch x latents`` is at least this (8.4M entries: a
float32 pre-activation array of 32 MiB, glibc's largest ``mmap`` threshold)."""

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters
_TRIM_BYTES = 2**31 - 1
_applied: dict = {}


def mode(environ=os.environ) -> str:
    """The policy from ``JSDL_HOST_TUNING``: ``auto``, ``on`` or ``off`` (1/true/yes = on,
    0/false/no = off)."""
    return _env.policy(ENV, environ)


def wants_tuning(batch_size: int, n_latents: int, members: int = 1, environ=os.environ) -> bool:
    """Whether the policy (:func:`mode`) tunes a step of ``members`` models, ``batch_size`` samples
    and ``n_latents`` latents."""
    m = mode(environ)
    if m != "auto":
        return m == "on"
    return int(members) * int(batch_size) * int(n_latents) >= LARGE_STEP_ENTRIES


def _backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # a JAX without this private helper: assume the worst
        return True


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def tune_host() -> str:
    """Turn on both switches (module docstring) and return what was done, one line. Idempotent.
    After JAX created its CPU client only the allocator switch can apply (the line says so)."""
    if _applied:
        return _applied["line"]
    import jax

    parts = []
    if _backends_initialized():
        parts.append("asynchronous dispatch left on (JAX's backends already exist: call tune_host before any array)")
    else:
        jax.config.update("jax_cpu_enable_async_dispatch", False)
        parts.append("synchronous CPU dispatch")
    libc = _libc()
    ok = libc is not None and hasattr(libc, "mallopt") and bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES))
    parts.append("glibc keeps large blocks (M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GiB)" if ok else "no glibc mallopt")
    _applied["line"] = "host tuning: " + ", ".join(parts)
    return _applied["line"]


def status() -> Optional[str]:
    """The line :func:`tune_host` returned in this process, or None if it was not called."""
    return _applied.get("line")
