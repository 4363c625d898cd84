"""Shared fixtures. ``x64`` runs a test under float64 without leaking the flag to other tests."""
import os

import jax
import pytest


@pytest.fixture
def x64():
    """Enable float64 for the duration of one test (``jax.enable_x64`` is a context manager)."""
    with jax.enable_x64(True):
        yield


def sampler_or_skip(name: str) -> str:
    """``name`` (a bench ``sampler``: ``"jax"`` or ``"native"``) for a test that runs on both of a
    bench's samplers; skips the native one where jsdl's native kernels cannot be built."""
    if name == "native":
        import numpy as np

        from jsdl import native

        if not native.supports_synth(np.float32):
            pytest.skip(f"native sampler unavailable ({native.status()})")
    return name


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)


@pytest.fixture
def compiles():
    """A list that collects one entry per XLA backend compile while the test runs (a
    ``jax.monitoring`` listener, removed afterwards); ``compiles.clear()`` starts a new count."""
    import jax.monitoring

    seen = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def run_multidevice(code: str, n_devices: int = 8, timeout: int = 600) -> str:
    """Run ``code`` in a fresh Python with ``n_devices`` forced CPU devices; return its stdout.

    The XLA flag must be set before jax initialises, hence a subprocess."""
    import subprocess
    import sys

    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"multi-device subprocess failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout
