"""jsdl's native CPU top-k (jsdl/native): the same indices and values as ``jax.lax.top_k`` on every
path of the kernel (sorted candidates for k <= 64, the nth_element buffer above, segments for few
long rows, SIMD blocks and scalar tails), the same gradient through ``shardops.local_top_k``, vmap,
and the JSDL_NATIVE policy with a failed build. Everything needs the kernel built: on a machine with
a C++ compiler a failed build fails these tests instead of skipping them."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsdl import native, shardops

ROOT = Path(__file__).resolve().parents[1]

if shutil.which(os.environ.get("CXX", "g++")) is None and native.mode() != "on":
    pytestmark = pytest.mark.skipif(not native.available(), reason="no C++ compiler: jsdl.native not built")


def _native(z, k):
    idx = jax.jit(native.top_k_indices, static_argnums=1)(z, k)
    return jnp.take_along_axis(z, idx, axis=-1), idx


def _assert_equal_to_lax(z, k):
    z = jnp.asarray(z)
    v0, i0 = jax.jit(jax.lax.top_k, static_argnums=1)(z, k)
    v1, i1 = _native(z, k)
    np.testing.assert_array_equal(np.asarray(i1), np.asarray(i0))
    np.testing.assert_array_equal(np.asarray(v1), np.asarray(v0))  # NaNs compare equal here


def test_builds_where_a_compiler_exists():
    assert native.available(), native.status()
    assert native.status().startswith("native kernels: on")
    assert native.library_path().exists()


@pytest.mark.parametrize("shape,k", [
    ((64, 512), 8),  # sorted candidates behind a block-maximum floor, SIMD blocks
    ((9, 5000), 8),  # rows too long for the floor
    ((7, 33), 5),  # a scalar tail after two blocks
    ((3, 16), 16),  # k = n
    ((1, 5), 1),  # shorter than one block
    ((5, 1000), 700),  # the buffer path (k > 64), k close to n
    ((16, 4096), 384),  # the buffer path, AuxK-like
    ((4, 8, 300), 12),  # several leading axes are rows
    ((2**18 + 3,), 1000),  # one long row: segments merged, odd length
    ((3, 2**16), 40),  # few long rows: segments per row
])
def test_equals_lax_top_k(shape, k):
    z = np.random.default_rng(sum(shape) + k).standard_normal(shape).astype(np.float32)
    _assert_equal_to_lax(z, k)


def test_ties_and_special_values_follow_lax_order():
    """IEEE total order: +NaN first, -NaN last, +0 before -0; equal values by lower index."""
    rng = np.random.default_rng(0)
    _assert_equal_to_lax(rng.integers(0, 4, (50, 300)).astype(np.float32), 20)
    _assert_equal_to_lax(rng.integers(0, 3, (2, 2**16)).astype(np.float32), 100)  # ties across segments
    for k in (1, 8, 32):  # rows of 64 blocks: the block-maximum floor, equal to many entries
        _assert_equal_to_lax(rng.integers(0, 5, (30, 1024)).astype(np.float32), k)
    neg_nan = np.frombuffer(np.uint32(0xFFC00000).tobytes(), np.float32)[0]
    special = np.array([np.nan, neg_nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0], np.float32)
    for shape in ((40, 200), (20, 1024)):  # without and with the floor
        z = rng.choice(special, shape)
        for k in (1, 10, 200):
            _assert_equal_to_lax(z, k)


def test_large_k_of_few_long_rows_sampled_threshold():
    """k >= 1024 of rows of at least 8k entries (a flat BatchTopK selection): a threshold estimated
    from a strided sample, one pass collecting the entries above it; exact, and declined in favour
    of the segment path when fewer than k pass (many ties at the estimate, adversarial orders)."""
    rng = np.random.default_rng(5)
    _assert_equal_to_lax(rng.standard_normal((2**19,)).astype(np.float32), 8192)  # the BatchTopK recipe
    _assert_equal_to_lax(rng.standard_normal((2, 3 * 2**15 + 7)).astype(np.float32), 1024)  # two rows, odd length
    _assert_equal_to_lax(np.abs(rng.standard_normal((2**17,))).astype(np.float32) * (rng.random(2**17) < 0.3), 4096)
    _assert_equal_to_lax(rng.integers(0, 3, (2**16,)).astype(np.float32), 2000)  # ties: declined, segments
    z = np.sort(rng.standard_normal(2**16).astype(np.float32))
    for row in (z, z[::-1].copy(), np.roll(z, 12345)):  # the strided sample of a sorted row is still fair
        _assert_equal_to_lax(row, 1500)
    neg_nan = np.frombuffer(np.uint32(0xFFC00000).tobytes(), np.float32)[0]
    special = np.array([np.nan, neg_nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0], np.float32)
    _assert_equal_to_lax(rng.choice(special, 2**15), 1024)


def test_adversarial_orders():
    """Ascending rows move the threshold at every entry; descending rows never."""
    z = np.sort(np.random.default_rng(1).standard_normal((8, 2000)).astype(np.float32), axis=1)
    for k in (8, 64, 65, 500):
        _assert_equal_to_lax(z, k)
        _assert_equal_to_lax(z[:, ::-1].copy(), k)


def test_local_top_k_uses_it_with_the_same_gradient_and_vmap():
    z = jnp.asarray(np.random.default_rng(2).standard_normal((4, 64, 512)).astype(np.float32))
    jaxpr = str(jax.make_jaxpr(lambda z: shardops.local_top_k(z, 8))(z))
    assert "jsdl_top_k_indices" in jaxpr and "top_k[" not in jaxpr
    w = jnp.arange(8.0)
    g0 = jax.grad(lambda z: jnp.sum(jax.lax.top_k(z, 8)[0] ** 2 * w))(z)
    g1 = jax.grad(lambda z: jnp.sum(shardops.local_top_k(z, 8)[0] ** 2 * w))(z)
    np.testing.assert_array_equal(g1, g0)
    i0 = jax.lax.top_k(z, 8)[1]
    i1 = jax.jit(jax.vmap(lambda zm: shardops.local_top_k(zm, 8)[1]))(z)
    np.testing.assert_array_equal(i1, i0)


def test_what_it_does_not_take():
    z64 = jnp.zeros((4, 8), jnp.float64) if jax.config.jax_enable_x64 else None
    if z64 is not None:
        assert not native.supports_top_k(z64, 2)
    z = jnp.zeros((4, 8), jnp.float32)
    assert native.supports_top_k(z, 8)
    assert not native.supports_top_k(z, 9) and not native.supports_top_k(z, 0)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        native.top_k_indices(z, 9)
    # what it does not take falls back to lax.top_k
    assert "top_k[" in str(jax.make_jaxpr(lambda z: shardops.local_top_k(z, 2))(jnp.zeros((4, 8), jnp.bfloat16)))


def test_mode_parsing():
    assert native.mode({}) == "auto"
    assert native.mode({"JSDL_NATIVE": "1"}) == "on" and native.mode({"JSDL_NATIVE": "Off"}) == "off"
    with pytest.raises(ValueError, match="JSDL_NATIVE"):
        native.mode({"JSDL_NATIVE": "sometimes"})


def _child(code, **env):
    e = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=e,
                          cwd=ROOT, timeout=300)


PROBE = """
    import warnings, jax, jax.numpy as jnp, numpy as np
    from jsdl import native, shardops
    z = jnp.asarray(np.random.default_rng(0).standard_normal((32, 256)).astype(np.float32))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        v, i = shardops.local_top_k(z, 8)
    assert (np.asarray(i) == np.asarray(jax.lax.top_k(z, 8)[1])).all()
    print("STATUS", native.status())
    print("WARNINGS", len([x for x in w if "native" in str(x.message)]))
"""


def test_policy_in_fresh_processes(tmp_path):
    """off: never built; auto with no compiler: one warning, XLA's top_k, same result; on with no
    compiler: an error; a cache directory that cannot be created: the temporary directory; a fresh
    cache directory: two processes build concurrently and both load."""
    off = _child(PROBE, JSDL_NATIVE="off", JSDL_CACHE_DIR=str(tmp_path / "off"))
    assert off.returncode == 0, off.stderr
    assert "STATUS native kernels: off" in off.stdout and not (tmp_path / "off").exists()

    broken = dict(JSDL_CACHE_DIR=str(tmp_path / "broken"), CXX=str(tmp_path / "no-such-compiler"))
    auto = _child(PROBE, JSDL_NATIVE="auto", **broken)
    assert auto.returncode == 0, auto.stderr
    assert "STATUS native kernels: unavailable" in auto.stdout and "WARNINGS 1" in auto.stdout, auto.stdout

    on = _child(PROBE, JSDL_NATIVE="on", **broken)
    assert on.returncode != 0 and "JSDL_NATIVE=on but the native kernels are unavailable" in on.stderr

    readonly = _child(PROBE, JSDL_NATIVE="on", JSDL_CACHE_DIR="/proc/jsdl-cache")  # cannot be created
    assert readonly.returncode == 0, readonly.stderr[-3000:]
    assert "STATUS native kernels: on" in readonly.stdout and "jsdl-native-" in readonly.stdout

    fresh = dict(JSDL_NATIVE="on", JSDL_CACHE_DIR=str(tmp_path / "fresh"))
    e = dict(os.environ, PYTHONPATH=str(ROOT), **fresh)
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(PROBE)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=e, cwd=ROOT) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "STATUS native kernels: on" in out and "WARNINGS 0" in out
    libs = list((tmp_path / "fresh" / "native").iterdir())
    assert len(libs) == 1 and libs[0].suffix == ".so", libs  # no temporary left behind


def _xla_kernels(monkeypatch):
    """jsdl.kernels with the native kernels switched off (XLA's slot loops), for reference."""
    from jsdl import kernels as K

    monkeypatch.setattr(native, "supports_scatter_rows", lambda *a: False)
    return K


def _entries(rng, B, k, n, S, rows):
    cols = jnp.asarray(rng.integers(0, n, (B, k)).astype(np.int32))
    r = jnp.asarray(rng.integers(0, S, (B, k)).astype(np.int32)) if rows else None
    vals = jnp.asarray(rng.standard_normal((B, k)).astype(np.float32))
    return vals, cols, r


@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("B,k,n,m", [(64, 4, 100, 16), (256, 8, 512, 70), (512, 16, 64, 33)])
def test_scatter_and_decode_equal_xla_loops_to_the_bit(monkeypatch, B, k, n, m, rows):
    """dW = scatter of vals x src rows (both backward scatters) and the decode (TopK: XLA fuses its
    product and sum; BatchTopK: it scatters) against XLA's slot loops, every bit; n = 64 < B
    makes most latents collect several entries."""
    from jsdl import kernels as K

    rng = np.random.default_rng(B + k + n + m + rows)
    vals, cols, r = _entries(rng, B, k, n, B, rows)
    src = jnp.asarray(rng.standard_normal((B, m)).astype(np.float32))
    Wr = jnp.asarray(rng.standard_normal((n, m)).astype(np.float32))
    scatter = jax.jit(lambda v, s, c, r: K._scatter_rows(v, s, c, r, n, "slots"))
    decode = jax.jit(lambda v, W, c, r: K._decode_rows(v, W, c, r, B, "slots"))
    assert "jsdl_scatter_rows" in scatter.lower(vals, src, cols, r).as_text()
    got_s, got_d = scatter(vals, src, cols, r), decode(vals, Wr, cols, r)
    with monkeypatch.context() as mp:
        Kx = _xla_kernels(mp)
        ref_s = jax.jit(lambda v, s, c, r: Kx._scatter_rows(v, s, c, r, n, "slots"))(vals, src, cols, r)
        ref_d = jax.jit(lambda v, W, c, r: Kx._decode_rows(v, W, c, r, B, "slots"))(vals, Wr, cols, r)
    np.testing.assert_array_equal(np.asarray(got_s), np.asarray(ref_s))
    np.testing.assert_array_equal(np.asarray(got_d), np.asarray(ref_d))
    # and the vectorised form (segment sums), to rounding
    np.testing.assert_allclose(got_s, K._scatter_rows(vals, src, cols, r, n, "gather"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [False, True])
def test_gather_dot_equals_xla_to_rounding(monkeypatch, rows):
    from jsdl import kernels as K

    rng = np.random.default_rng(3 + rows)
    B, k, n, m = 300, 8, 200, 77  # m not a multiple of 16: a scalar tail
    _, cols, r = _entries(rng, B, k, n, B, rows)
    u = jnp.asarray(rng.standard_normal((B, m)).astype(np.float32))
    W = jnp.asarray(rng.standard_normal((n, m)).astype(np.float32))
    got = jax.jit(lambda u, W, c, r: K._gather_dot(u, W, c, r, "slots"))(u, W, cols, r)
    with monkeypatch.context() as mp:
        Kx = _xla_kernels(mp)
        ref = jax.jit(lambda u, W, c, r: Kx._gather_dot(u, W, c, r, "slots"))(u, W, cols, r)
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=2e-6 * float(jnp.max(jnp.abs(ref))))
    exact = np.einsum("bkm,bkm->bk", np.asarray(u, np.float64)[np.asarray(r) if rows else np.arange(B)[:, None]],
                      np.asarray(W, np.float64)[np.asarray(cols)])
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5)


def test_vmapped_groups_and_dropped_latents(monkeypatch):
    """A population (vmap over members: leading axes are groups) equals each member alone, and latent
    indices follow JAX's ``.at[c].add``: -1 is the last latent, n + 3 is dropped."""
    from jsdl import kernels as K

    rng = np.random.default_rng(5)
    M, B, k, n, m = 3, 64, 4, 50, 24
    vals = jnp.asarray(rng.standard_normal((M, B, k)).astype(np.float32))
    cols = jnp.asarray(rng.integers(0, n, (M, B, k)).astype(np.int32)).at[0, 0, 0].set(n + 3).at[1, 2, 1].set(-1)
    src = jnp.asarray(rng.standard_normal((M, B, m)).astype(np.float32))
    pop = jax.jit(jax.vmap(lambda v, s, c: K._scatter_rows(v, s, c, None, n, "slots")))(vals, src, cols)
    with monkeypatch.context() as mp:
        Kx = _xla_kernels(mp)
        for i in range(M):
            ref = jax.jit(lambda v, s, c: Kx._scatter_rows(v, s, c, None, n, "slots"))(vals[i], src[i], cols[i])
            np.testing.assert_array_equal(np.asarray(pop[i]), np.asarray(ref))


@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (300, 200), (2, 5, 130), (1000, 16)])
def test_column_nonzero_counts_like_jnp(shape):
    """``column_nonzero`` equals ``sum(x != 0, axis=-2)``: zeros, -0 (not counted), NaN and inf
    (counted), leading axes as groups, under ``vmap`` and ``jit``; and the dense step's fired counts
    use it on one device."""
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape).astype(np.float32)
    x[rng.random(shape) < 0.6] = 0.0
    flat = x.reshape(-1)
    flat[: min(4, flat.size)] = [-0.0, np.nan, np.inf, -np.inf][: min(4, flat.size)]
    x = jnp.asarray(flat.reshape(shape))
    ref = np.sum(np.asarray(x) != 0, axis=-2).astype(np.int32)
    got = jax.jit(native.column_nonzero)(x)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), ref)
    if x.ndim == 3:
        np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(native.column_nonzero))(x)), ref)


def test_dense_fired_counts_use_the_kernel_on_one_device():
    from jsdl.train import step as S

    rng = np.random.default_rng(0)
    codes = jnp.asarray(np.maximum(rng.standard_normal((64, 40)), 0).astype(np.float32))
    hlo = jax.jit(S._fired_dense).lower(codes).as_text()
    assert "jsdl_column_nonzero" in hlo
    np.testing.assert_array_equal(np.asarray(jax.jit(S._fired_dense)(codes)),
                                  np.sum(np.asarray(codes) != 0, axis=0))
    with pytest.raises(ValueError, match="float32"):
        native.column_nonzero(codes.astype(jnp.float16))


@pytest.mark.parametrize("shape", [(64, 40), (8, 3, 40)])
def test_dense_l0_counts_like_the_mean_of_nonzeros(shape):
    """The objective's dense ``l0`` metric (``kernels.dense_l0``) is the mean number of non-zero
    codes per code vector, for 2-D and 3-D codes, float32 and float64, with and without a gradient
    flowing around it; in a dense training step one native count serves both the metric and the
    dead-latent statistics."""
    import jsdl
    from jsdl import kernels as K
    from jsdl.train import Stepper, TrainConfig, init_state

    rng = np.random.default_rng(1)
    c = np.maximum(rng.standard_normal(shape), 0).astype(np.float32)
    c[0, ...] = -0.0  # negative zeros are zeros
    ref = np.mean(np.sum(c != 0, axis=-1))
    for dt in (jnp.float32, jnp.float64) if jax.config.jax_enable_x64 else (jnp.float32,):
        x = jnp.asarray(c, dt)
        got = jax.jit(K.dense_l0)(x)
        assert got.dtype == x.dtype
        np.testing.assert_allclose(float(got), ref, rtol=1e-7)
    # inside a differentiated loss it carries no gradient and does not break forward mode
    f = lambda v: jnp.sum(v ** 2) + K.dense_l0(v)  # noqa: E731
    x = jnp.asarray(c)
    np.testing.assert_allclose(np.asarray(jax.grad(f)(x)), 2 * c, rtol=1e-6)
    np.testing.assert_allclose(float(jax.jvp(f, (x,), (jnp.ones_like(x),))[1]), 2 * c.sum(), rtol=1e-5)
    if len(shape) == 2:
        spec = jsdl.make_spec("sae", "relu", 40, penalties={"l1": 1e-3})
        cfg = TrainConfig(batch_size=64, log_every=10, progress=False)
        st = Stepper(spec, cfg, data_mode="batch", devices=jax.devices()[:1])
        s = st.place_state(init_state(jax.random.PRNGKey(0), spec, cfg, 12, dtype=jnp.float32))
        batch = st.place_data(jsdl.Batch(x_p=jnp.asarray(rng.standard_normal((64, 12)), jnp.float32)))
        hlo = st.step.lower(s, batch, None).compile().as_text()
        assert hlo.count('custom_call_target="jsdl_column_nonzero"') == 1, hlo
        codes = np.asarray(jax.nn.relu(batch.x_p @ s.params.W_E.T + s.params.b_E))  # the state is donated
        s2 = st.step(s, batch, None)
        np.testing.assert_allclose(float(s2.metrics["l0"]), float(np.mean(np.sum(codes != 0, -1))),
                                   rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(s2.dead.window_count), np.sum(codes != 0, 0))


def test_sparse_step_gradients_match_the_dense_path():
    """The whole sparse TopK and BatchTopK loss (its scatters, decode and gather_dot native) has the
    dense path's gradient to float32 rounding."""
    import jsdl

    rng = np.random.default_rng(7)
    d, n_q, B = 24, 96, 128
    x = jnp.asarray(rng.standard_normal((B, d)).astype(np.float32))
    batch = jsdl.Batch(x, x, None)
    for act in ("topk", "batchtopk"):
        sp = jsdl.make_spec(activation=act, n_latents=n_q, k=6, sparse=True)
        dn = jsdl.make_spec(activation=act, n_latents=n_q, k=6, sparse=False)
        p = jsdl.init_params(jax.random.PRNGKey(1), sp, d, d)
        gs = jax.grad(lambda p: jsdl.sdl_loss(p, batch, sp)[0])(p)
        gd = jax.grad(lambda p: jsdl.sdl_loss(p, batch, dn)[0])(p)
        assert "jsdl_scatter_rows" in str(jax.make_jaxpr(lambda p: jax.grad(lambda p: jsdl.sdl_loss(p, batch, sp)[0])(p))(p))
        for a, b in zip(jax.tree.leaves(gs), jax.tree.leaves(gd)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b))) + 1e-7)


PORTABLE_PROBE = """
    import jax, jax.numpy as jnp, numpy as np
    from jsdl import native, shardops
    from jsdl import kernels as K
    assert native.available(), native.status()
    rng = np.random.default_rng(0)
    cases = [((64, 512), 8), ((9, 5000), 8), ((7, 33), 5), ((16, 4096), 100), ((2**17 + 5,), 700),
             ((2**16 + 3,), 2048)]
    for shape, k in cases:
        z = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
        assert (np.asarray(shardops.local_top_k(z, k)[1]) == np.asarray(jax.lax.top_k(z, k)[1])).all(), shape
    z = jnp.asarray(rng.integers(0, 4, (30, 1024)).astype(np.float32))
    assert (np.asarray(shardops.local_top_k(z, 8)[1]) == np.asarray(jax.lax.top_k(z, 8)[1])).all()
    vals = jnp.asarray(rng.standard_normal((128, 4)).astype(np.float32))
    cols = jnp.asarray(rng.integers(0, 40, (128, 4)).astype(np.int32))
    src = jnp.asarray(rng.standard_normal((128, 37)).astype(np.float32))
    got = K._scatter_rows(vals, src, cols, None, 40, "slots")
    ref = np.zeros((40, 37)); np.add.at(ref, np.asarray(cols).reshape(-1), (np.asarray(vals)[..., None] * np.asarray(src)[:, None]).reshape(-1, 37))
    assert np.allclose(got, ref, atol=1e-5), float(np.abs(got - ref).max())
    print("PORTABLE OK", native.status())
"""


@pytest.mark.parametrize("flags", ["-mno-avx512f",  # the narrowest: a build of its own, ~30 s, in `make test-slow`
                                   pytest.param("-mno-avx512f -mno-avx2 -mno-avx", marks=pytest.mark.slow)])
def test_narrower_instruction_sets(tmp_path, flags):
    """The AVX2 and the portable code paths, built on this machine by masking its wider instructions
    (a machine without AVX-512, e.g. many AMD and ARM hosts, runs them)."""
    out = _child(PORTABLE_PROBE, JSDL_NATIVE="on", JSDL_CACHE_DIR=str(tmp_path), JSDL_NATIVE_CXXFLAGS=flags)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "PORTABLE OK" in out.stdout
