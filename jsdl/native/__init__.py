"""Native CPU kernels: XLA FFI custom calls that jsdl compiles on first use.

On a CPU, the ops of a TopK-family training step that do not go to the matrix library were XLA's
``TopK`` (a serial ``std::partial_sort`` per row, about 3.5 ns per entry; the largest single op of
a small step and of every population step, at the same cost per member) and the sparse kernels'
loops over the ``k`` slots (one gather or scatter-add of ``B`` rows per slot, each reading and
writing the whole accumulator). Three kernels replace them (``topk.cc``, ``scatter.cc``), a
fourth counts the dense step's fired latents, and two draw synthetic data (``synth.cc``):

- :func:`top_k_indices`: one SIMD pass per row behind a running threshold; a long row (BatchTopK's
  flat selection) is cut into segments whose candidates are merged. The indices ``jax.lax.top_k``
  returns, in the same order (IEEE total order: ``+NaN`` first and ``-NaN`` last, ``+0`` before
  ``-0``, ties to the lower index); callers read the values with a gather, which carries the
  gradient.
- :func:`scatter_rows`: ``out[c] += vals * src[r]`` over all entries, for both backward
  scatter-adds and the decode: counting-sorted once, each row summed in place in the order and
  with the roundings of XLA's slot loop, so equal to it to the bit.
- :func:`gather_dot`: ``<u[r], W[c]>`` per entry, the decoder's backward for the codes; equal to
  XLA's to float rounding.
- :func:`column_nonzero`: ``sum(x != 0, axis=-2)``, the dense step's fired counts, reading the
  codes once (``scatter.cc``; exact).
- :func:`synth_draw`: the SynthSAEBench sampler (:class:`jsdl.data.SynthBench`) one sample at a
  time, with control flow instead of fixed shapes: the same algorithm and distribution as the JAX
  sampler, a different random stream (``synth.cc`` describes it; ``SynthBench.sampler`` chooses).
- :func:`sparse_draw`: the independent-feature sampler of :class:`jsdl.data.Bench` and of the
  structured benches without a copula (thinned geometric gaps, the hierarchy's ancestors,
  magnitudes, ``x W^T`` summed over the active rows) one sample at a time: the JAX samplers' law,
  another random stream (``Bench.sampler`` / ``StructuredBench.sampler`` choose).

Each spreads its rows over XLA's intra-op threads (``ffi::ThreadPool``) and takes float32 on the
CPU backend; ``jsdl.shardops`` and ``jsdl.kernels`` call them where :func:`supports_top_k` /
:func:`supports_scatter_rows` say so and keep XLA's ops otherwise (float64, bfloat16, accelerators).
On a multi-device mesh ``jsdl.kernels`` keeps XLA's loops: the partitioner would gather a custom
call's batch onto every device (the top-k stays native, per device, in ``jsdl.shardops``).

The library is built with the host's C++ compiler (``$CXX``, else ``g++``, ``c++`` or ``clang++``)
against the FFI headers that ship with jaxlib, for this CPU (``-march=native``), into
``$JSDL_CACHE_DIR/native`` (default ``$XDG_CACHE_HOME/jsdl/native``, ``~/.cache/jsdl/native``),
under a name that hashes the sources, jaxlib's version, the compiler and the CPU, so a change of any
of them builds again (a cache directory that cannot be written gives way to the temporary
directory; a compiler that rejects ``-march=native`` builds the portable code). A build takes a few
seconds; concurrent processes each build and the last atomic rename wins.

``JSDL_NATIVE`` sets the policy: ``auto`` (default: use the kernels when they build, else fall back
to XLA's ops with one warning), ``on`` (a failed build is an error) or ``off`` (never build, always
XLA's ops). :func:`status` says what this process uses.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from jsdl import _env

__all__ = ["ENV", "mode", "available", "status", "library_path", "build", "top_k_indices", "supports_top_k",
           "scatter_rows", "gather_dot", "supports_scatter_rows", "column_nonzero", "supports_column_nonzero", "supports_synth", "synth_draw", "sparse_draw", "MAX_THREADS"]

ENV = "JSDL_NATIVE"
"""Environment variable: ``auto`` (default), ``on`` or ``off``."""

MAX_THREADS = 64
"""Upper bound on the threads one call uses (it also never uses more than XLA's pool + 1)."""

HERE = Path(__file__).parent
SOURCES = (HERE / "topk.cc", HERE / "scatter.cc", HERE / "synth.cc")
HEADERS = (HERE / "parallel.h",)
_TARGETS = {"jsdl_top_k_indices": "JsdlTopKIndices", "jsdl_scatter_rows": "JsdlScatterRows",
            "jsdl_gather_dot": "JsdlGatherDot", "jsdl_synth_draw": "JsdlSynthDraw", "jsdl_sparse_draw": "JsdlSparseDraw",
            "jsdl_column_nonzero": "JsdlColumnNonzero"}
_lock = threading.Lock()
_state: dict = {}


def mode(environ=os.environ) -> str:
    """The policy from ``JSDL_NATIVE``: ``auto``, ``on`` or ``off`` (1/true/yes = on, 0/false/no = off)."""
    return _env.policy(ENV, environ)


def _cache_dir() -> Path:
    root = os.environ.get("JSDL_CACHE_DIR")
    if root:
        return Path(root) / "native"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "jsdl" / "native"


def _compiler() -> Optional[str]:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or cxx
    for name in ("g++", "c++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("flags", "model name", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _flags(include: str) -> list[str]:
    # -ffp-contract=off: no fused multiply-adds, so the scatter rounds each product and each sum as
    # XLA does, and equals it to the bit. JSDL_NATIVE_CXXFLAGS comes last (e.g. "-mno-avx512f" to
    # build the AVX2 code on an AVX-512 machine, as tests/test_native.py does).
    extra = os.environ.get("JSDL_NATIVE_CXXFLAGS", "").split()
    return ["-O3", "-std=c++17", "-shared", "-fPIC", "-march=native", "-ffp-contract=off", "-w", f"-I{include}",
            f"-I{HERE}", *extra]


def library_path() -> Path:
    """Where this source, jaxlib, compiler and CPU put the library (it may not exist yet)."""
    import jax
    import jaxlib

    cxx = _compiler() or "none"
    h = hashlib.sha256()
    for part in (*(f.read_bytes() for f in SOURCES + HEADERS), jaxlib.__version__.encode(), cxx.encode(), _cpu_id().encode(),
                 " ".join(_flags(str(jax.ffi.include_dir()))).encode()):
        h.update(part)
        h.update(b"\0")
    return _cache_dir() / f"libjsdl_native-{h.hexdigest()[:16]}.so"


def build(force: bool = False) -> Path:
    """Compile the library if it is not in the cache (or if ``force``); return its path. Raises
    ``RuntimeError`` with the compiler's output when it cannot be built."""
    import jax

    path = library_path()
    if path.exists() and not force:
        return path
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    except OSError:  # an unwritable cache (a read-only home): this user's temporary directory
        path = Path(tempfile.gettempdir()) / f"jsdl-native-{os.getuid() if hasattr(os, 'getuid') else 0}" / path.name
        if path.exists() and not force:
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    flags = _flags(str(jax.ffi.include_dir()))
    errors = []
    try:
        # A compiler that does not know -march=native (some for arm64) builds the portable code.
        for fl in (flags, [f for f in flags if f != "-march=native"]):
            cmd = [cxx, *fl, *map(str, SOURCES), "-o", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(tmp, path)  # atomic: a concurrent build of the same sources writes the same file
                return path
            errors.append(f"{' '.join(cmd)}:\n{proc.stderr[-3000:]}")
        raise RuntimeError(f"building {', '.join(f.name for f in SOURCES)} failed: " + "\n".join(errors))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> bool:
    """Build (if needed), load and register the kernels once per process; whether they are usable."""
    if "ok" in _state:
        return _state["ok"]
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        m = mode()
        if m == "off":
            _state.update(ok=False, line="native kernels: off (JSDL_NATIVE=off)")
            return False
        try:
            import jax

            path = build()
            lib = ctypes.CDLL(str(path))
            for target, symbol in _TARGETS.items():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
            jax.ffi.register_ffi_target_as_batch_partitionable("jsdl_top_k_indices")
            _state.update(ok=True, lib=lib, path=path, line=f"native kernels: on ({path})")
        except Exception as e:  # noqa: BLE001 - any failure means: fall back, or raise under "on"
            if m == "on":
                raise RuntimeError(f"{ENV}=on but the native kernels are unavailable: {e}") from e
            warnings.warn(f"jsdl's native CPU kernels are unavailable ({str(e).splitlines()[0]}); using XLA's "
                          f"ops. Set {ENV}=off to silence this.", RuntimeWarning, stacklevel=3)
            _state.update(ok=False, line=f"native kernels: unavailable ({str(e).splitlines()[0]})")
        return _state["ok"]


def available() -> bool:
    """Whether the native kernels are built and registered in this process (builds them on the
    first call under ``auto``/``on``)."""
    return _load()


def status() -> str:
    """One line: whether this process uses the native kernels, and from where."""
    _load()
    return _state["line"]


def supports_top_k(z, k: int) -> bool:
    """Whether :func:`top_k_indices` takes this operand: float32, on the CPU backend, ``1 <= k <= n``
    with ``n < 2^31``, and the kernels available."""
    import jax

    n = z.shape[-1] if z.ndim else 0
    return (z.ndim >= 1 and z.dtype == np.float32 and 1 <= k <= n and n < 2**31
            and jax.default_backend() == "cpu" and available())


def top_k_indices(z, k: int):
    """Indices ``[..., k]`` of the ``k`` largest entries along the last axis of float32 ``z``, in
    ``jax.lax.top_k``'s order (module docstring). CPU only; check :func:`supports_top_k` first. Not
    differentiable (indices): read values with ``jnp.take_along_axis(z, idx, -1)``. Leading axes are
    rows: ``vmap`` adds one, and a partitioner may split them (the target is batch-partitionable)."""
    import jax
    import jax.numpy as jnp

    if not supports_top_k(z, k):
        raise ValueError(f"native top_k needs float32 on CPU with 1 <= k <= n; got {z.dtype} {z.shape}, k={k}")
    out = jax.ShapeDtypeStruct(z.shape[:-1] + (k,), jnp.int32)
    call = jax.ffi.ffi_call("jsdl_top_k_indices", out, vmap_method="broadcast_all")
    return call(jax.lax.stop_gradient(z), k=np.int64(k), max_threads=np.int64(MAX_THREADS))


def supports_column_nonzero(x) -> bool:
    """Whether :func:`column_nonzero` takes ``x``: float32 of rank >= 2 with fewer than 2^31 rows, on
    the CPU backend, the kernels available."""
    import jax

    return (x.dtype == np.float32 and x.ndim >= 2 and x.shape[-2] < 2**31 and jax.default_backend() == "cpu"
            and available())


def column_nonzero(x):
    """``sum(x != 0, axis=-2)`` as int32 (``x [..., B, n]`` -> ``[..., n]``; NaN counts, -0 does
    not), reading ``x`` once: the dense step's fired counts. Leading axes (vmap) are independent.
    Not differentiable; CPU only (check :func:`supports_column_nonzero`); one device's array (a
    partitioner would gather a split operand)."""
    import jax
    import jax.numpy as jnp

    if not supports_column_nonzero(x):
        raise ValueError(f"native column_nonzero needs float32 of rank >= 2 on CPU; got {x.dtype} {x.shape}")
    out = jax.ShapeDtypeStruct(x.shape[:-2] + x.shape[-1:], jnp.int32)
    call = jax.ffi.ffi_call("jsdl_column_nonzero", out, vmap_method="broadcast_all")
    return call(jax.lax.stop_gradient(x), max_threads=np.int64(MAX_THREADS))


def supports_scatter_rows(vals, src) -> bool:
    """Whether :func:`scatter_rows` takes these operands: float32, on the CPU backend, the kernels
    available."""
    import jax

    return (vals.dtype == np.float32 and src.dtype == np.float32 and vals.ndim >= 2 and src.ndim == vals.ndim
            and jax.default_backend() == "cpu" and available())


def scatter_rows(vals, src, cols, rows, n: int, *, fused: bool = False):
    """``out[c] = sum over entries (b, j) with cols[b, j] = c of vals[b, j] src[r]``, ``r = rows[b, j]``
    (or ``b`` when ``rows`` is None): ``vals, cols, rows [..., B, k]``, ``src [..., S, m]`` ->
    ``[..., n, m]``; leading axes (vmap) are independent groups.

    The backward of the sparse kernels' gathers (``jsdl.kernels._scatter_rows``), equal to the bit
    to XLA's loop of one scatter-add per slot: the entries are counting-sorted by latent and each
    latent's row is summed in that loop's order (slot, then sample), with each product and sum
    rounded as XLA rounds them: separately, or with ``fused=True`` as one fused multiply-add (what
    XLA's CPU backend emits when a loop adds the products into its accumulator in one fusion).
    Latents are spread over XLA's threads. Not differentiable; CPU
    only (check :func:`supports_scatter_rows`)."""
    import jax
    import jax.numpy as jnp

    if not supports_scatter_rows(vals, src):
        raise ValueError(f"native scatter_rows needs float32 on CPU; got {vals.dtype}, {src.dtype}")
    out = jax.ShapeDtypeStruct(src.shape[:-2] + (int(n), src.shape[-1]), jnp.float32)
    call = jax.ffi.ffi_call("jsdl_scatter_rows", out, vmap_method="broadcast_all")
    has_rows = rows is not None
    return call(vals, src, cols.astype(jnp.int32), (rows if has_rows else cols).astype(jnp.int32),
                has_rows=np.int64(has_rows), fused=np.int64(bool(fused)), max_threads=np.int64(MAX_THREADS))


def gather_dot(u, W, cols, rows):
    """``out[b, j] = <u[r], W[cols[b, j]]>``, ``r = rows[b, j]`` (or ``b`` when ``rows`` is None):
    ``u [..., S, m]``, ``W [..., n, m]``, ``cols, rows [..., B, k]`` -> ``[..., B, k]``; leading axes
    are groups. The sparse decoder's backward for the codes (``jsdl.kernels._gather_dot``); equal
    to XLA's to float rounding (16 partial sums per dot), not to the bit. Not differentiable; CPU
    only (check :func:`supports_scatter_rows` with ``u, W``)."""
    import jax
    import jax.numpy as jnp

    if not supports_scatter_rows(u, W):
        raise ValueError(f"native gather_dot needs float32 on CPU; got {u.dtype}, {W.dtype}")
    out = jax.ShapeDtypeStruct(u.shape[:-2] + cols.shape[-2:], jnp.float32)
    call = jax.ffi.ffi_call("jsdl_gather_dot", out, vmap_method="broadcast_all")
    has_rows = rows is not None
    return call(u, W, cols.astype(jnp.int32), (rows if has_rows else cols).astype(jnp.int32),
                has_rows=np.int64(has_rows), max_threads=np.int64(MAX_THREADS))


def supports_synth(dtype) -> bool:
    """Whether :func:`synth_draw` can draw a generator of this dtype: float32, on the CPU backend,
    the kernels available."""
    import jax

    return np.dtype(dtype) == np.float32 and jax.default_backend() == "cpu" and available()


def synth_draw(key_data, W_rows, bias, feat, F, Ft, children, exclusive, sparse, batch_size: int, *, n_roots: int,
               tree_end: int, sparse_start: int, rank: int, rescale: bool, features: bool, offset=None):
    """``batch_size`` samples of a SynthSAEBench generator (``synth.cc``): ``x_p [..., B, d]``, or
    with ``features=True`` the dense features ``[..., B, n]`` of the same samples. Inputs (float32,
    int32 for ``children`` and ``exclusive``, uint32 ``key_data [kw]``): ``W_rows [n, d]``,
    ``bias [d]``, ``feat [6, n]`` (firing probabilities, copula thresholds, idiosyncratic sds, mean
    and std magnitudes, positive fractions), ``F [n, max(rank, 1)]``, ``Ft [max(rank, 1),
    max(m, 1)]`` (the sparse block's rows of ``F``, transposed; ``m = n - sparse_start``),
    ``children [n, b]``, ``exclusive [n]`` and ``sparse [3, max(m, 1)]`` (cumulative candidate
    hazards, candidate probabilities, violation margins: ``+inf`` for none). ``offset`` (an int32
    scalar, default 0): the index of the first sample, so that rows ``[offset, offset + B)`` of a
    larger batch are drawn exactly (a device's share of a sharded batch). Under ``vmap``
    inputs that are not batched stay shared (not broadcast). Deterministic in the key; sample
    ``b`` does not depend on ``batch_size``. Not differentiable; CPU only (check
    :func:`supports_synth`). ``jsdl.data.SynthBench`` builds the tables."""
    import jax
    import jax.numpy as jnp

    if not supports_synth(W_rows.dtype):
        raise ValueError(f"native synth_draw needs float32 on CPU with the kernels available; got {W_rows.dtype}")
    n, d = W_rows.shape[-2:]
    out = jax.ShapeDtypeStruct((int(batch_size), n if features else d), jnp.float32)
    call = jax.ffi.ffi_call("jsdl_synth_draw", out, vmap_method="expand_dims")
    return call(key_data.astype(jnp.uint32), W_rows, bias, feat, F, Ft, children.astype(jnp.int32),
                exclusive.astype(jnp.int32), sparse,
                jnp.reshape(jnp.asarray(0 if offset is None else offset, jnp.int32), (1,)), n_roots=np.int64(n_roots), tree_end=np.int64(tree_end),
                sparse_start=np.int64(sparse_start), rank=np.int64(rank), rescale=np.int64(bool(rescale)),
                mode=np.int64(1 if features else 0), max_threads=np.int64(MAX_THREADS))


def sparse_draw(key_data, W_rows, rates, importance, parent, batch_size: int, *, rate_bound: float, thin: bool,
                c_min: float, beta: float, magnitude: str = "exponential", depth: int = 0, features: bool,
                offset=None):
    """``batch_size`` samples of independent features (``synth.cc``, ``SparseDraw``): ``x W^T
    [..., B, m]`` with ``W_rows = W^T [n, m]``, or with ``features=True`` the dense features
    ``[..., B, n]`` of the same samples. Candidates are Bernoulli(``rate_bound``) per feature; with
    ``thin`` candidate ``i`` is kept with probability ``rates[i] / rate_bound`` (all outputs NaN if
    some ``rates[i] > rate_bound``), else every candidate fires; the ancestors of a firing feature
    (``parent [n]`` int32, -1 for roots, at most ``depth`` levels) fire too. A firing feature's
    value is ``(c_min + beta E) importance[i]``, ``E ~ Exp(1)`` (``magnitude="exponential"``) or
    ``U(0, 1)`` (``"uniform"``). ``offset``, leading axes and determinism as :func:`synth_draw`
    (sample ``b`` of a key does not depend on ``batch_size``; ``features`` and the projection of
    one key describe the same samples). Not differentiable; CPU only (check
    :func:`supports_synth`)."""
    import jax
    import jax.numpy as jnp

    if not supports_synth(W_rows.dtype):
        raise ValueError(f"native sparse_draw needs float32 on CPU with the kernels available; got {W_rows.dtype}")
    if magnitude not in ("exponential", "uniform"):
        raise ValueError(f"magnitude must be 'exponential' or 'uniform', got {magnitude!r}")
    n, m = W_rows.shape[-2:]
    out = jax.ShapeDtypeStruct((int(batch_size), n if features else m), jnp.float32)
    call = jax.ffi.ffi_call("jsdl_sparse_draw", out, vmap_method="expand_dims")
    return call(key_data.astype(jnp.uint32), W_rows, jnp.asarray(rates, jnp.float32),
                jnp.asarray(importance, jnp.float32), jnp.asarray(parent, jnp.int32),
                jnp.reshape(jnp.asarray(0 if offset is None else offset, jnp.int32), (1,)),
                rate_bound=np.float64(rate_bound), thin=np.int64(bool(thin)), c_min=np.float64(c_min),
                beta=np.float64(beta), magnitude=np.int64(magnitude == "uniform"), depth=np.int64(depth),
                mode=np.int64(1 if features else 0), max_threads=np.int64(_cpus()))


def _cpus() -> int:
    """The CPUs this process may run on (at most :data:`MAX_THREADS`): the sampler's threads. Its
    blocks are equal work, so a thread more than the cores (XLA's pool plus the caller) leaves one
    core with two blocks at the end: measured 15-20% slower on 2 cores."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, n))
