"""The large encoder product of a sparse CPU training step through oneDNN instead of XLA's own GEMM.

On a CPU, XLA compiles a ``dot`` to its own GEMM (YNNPACK/Eigen). jaxlib also carries oneDNN, off
by default and marked experimental; the compiler option
``xla_cpu_experimental_onednn_fusion_type`` hands dots to it, per compiled program
(``jax.jit(..., compiler_options=...)``). Measured on a 2-core Intel Xeon (AVX-512;
benchmarks/NOTES.md, "Speed round 14"), alternating processes:

- the product ``[B, d] x [d, n_q]`` alone is 7-16% faster at every size from (1024, 64, 512) to
  (2048, 768, 16384);
- the sparse TopK/BatchTopK step, whose one dense product is the encoder's, is 4-15% faster once
  ``B * d * n_q >= 2^30`` (the large shape of benchmarks/bench_step.py: 486-527 -> 456-488 ms
  between fresh processes, 4-8% alternating in one process; (512, 4096, 32, 4096) 10-15%);
- a small sparse step (B 1024, d 64, 512 latents) is *slower* (1.7 -> 2.1 ms), and so is the dense
  ReLU/JumpReLU step at every size measured (its five products run concurrently and compete for
  the two cores: 340 -> 410 ms at d 512, 4096 latents, B 4096).

Populations of 16 TopK SAEs (512 and 4096 latents) trained at the same speed either way. So the
default policy (``JSDL_CPU_DOT=auto``) asks for oneDNN only where it was measured to pay: a single
model's step on the sparse path (:func:`jsdl.kernels.use_sparse`) whose encoder product has
``B * d * n_q >= 2^30`` per device (the mesh's "data" axis splits B, its "model" axis n_q).
``on`` asks for it in every CPU step (for tests and measurements), ``off`` never. Accelerators
are never affected.

Only *individual* dots are handed over (``LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT``). The fusing mode
(``LIBRARY_FUSION_TYPE_DOT``, a dot with its elementwise neighbours) killed the process with
SIGILL ("partition compile failed") on a dot whose result is scaled by a broadcast vector, in
jaxlib 0.10.2: a crash, not an exception. The results agree with XLA's GEMM to float32 rounding
(another summation order), not bit for bit.
"""
from __future__ import annotations

import os
from typing import Optional

from jsdl import _env

__all__ = ["ENV", "LARGE_PRODUCT", "OPTIONS", "mode", "compiler_options"]

ENV = "JSDL_CPU_DOT"
"""Environment variable: ``auto`` (default: large sparse steps), ``on`` (every CPU step) or ``off``."""

LARGE_PRODUCT = 1 << 30
"""``auto`` hands the step to oneDNN when its encoder product has ``B * d * n_q`` at least this
(multiply-adds per device)."""

OPTIONS = {"xla_cpu_use_onednn": True,
           "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
"""The XLA compiler options of a step compiled with oneDNN dots."""


def mode(environ=os.environ) -> str:
    """The policy from ``JSDL_CPU_DOT``: ``auto``, ``on`` or ``off``."""
    return _env.policy(ENV, environ)


def compiler_options(platform: str, *, sparse: bool, batch_size: int, d_in: int, n_latents: int,
                     population: bool = False, data_devices: int = 1, model_devices: int = 1,
                     environ=os.environ) -> Optional[dict]:
    """The compiler options of one training step (None: XLA's defaults). ``batch_size`` and
    ``n_latents`` are global; each device's product has ``batch_size / data_devices`` rows and
    ``n_latents / model_devices`` columns (the mesh's "data" and "model" axes)."""
    if platform != "cpu":
        return None
    m = mode(environ)
    if m != "auto":
        return dict(OPTIONS) if m == "on" else None
    if not sparse or population:  # measured slower (dense) or no faster (populations)
        return None
    per_device = (int(batch_size) // max(1, int(data_devices))) * int(d_in) * (
        int(n_latents) // max(1, int(model_devices)))
    return dict(OPTIONS) if per_device >= LARGE_PRODUCT else None
