"""Mixed precision: ``TrainConfig.compute_dtype="bfloat16"`` runs the matmuls in bf16 while the
parameters and Adam state stay float32, and recovers the bench's features as well as float32;
bf16 activation files stream as bf16 (no float32 copy on the host)."""
import dataclasses
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsdl
from jsdl.train import TrainConfig, fit


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_bf16_recovery_matches_float32(seed):
    bench = jsdl.data.make_bench(jax.random.PRNGKey(seed), n_features=96, d_input=24, max_interference=0.4,
                                 sparsity=0.97)
    spec = jsdl.make_spec(activation="topk", n_latents=96, k=3)
    cfg = TrainConfig(steps=300, batch_size=256, learning_rate=3e-3, log_every=100, progress=False, plots=False)
    out = {}
    for cd in ("float32", "bfloat16"):
        s, h = fit(jax.random.PRNGKey(seed), spec, bench, dataclasses.replace(cfg, compute_dtype=cd))
        out[cd] = (s, h)
    s16, h16 = out["bfloat16"]
    s32, h32 = out["float32"]
    # master weights and optimiser state stay float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.params))
    assert s16.opt_state[0].mu.W_E.dtype == jnp.float32 and s16.opt_state[0].nu.W_E.dtype == jnp.float32
    # the bf16 run really computed in bf16 (its losses differ), yet recovers the same features
    assert not np.allclose(h16["loss"], h32["loss"], rtol=1e-6, atol=0)
    r16, r32 = h16["summary"]["recovery"], h32["summary"]["recovery"]
    assert abs(r16["m_gt_dec"] - r32["m_gt_dec"]) <= 0.02, (r16, r32)
    assert abs(r16["m_gt_dec@0.9"] - r32["m_gt_dec@0.9"]) <= 0.02, (r16, r32)


def test_compute_dtype_validated():
    with pytest.raises(ValueError, match="compute_dtype must be one of float32, bfloat16"):
        TrainConfig(compute_dtype="float16")


def test_bf16_files_stream_without_float32_copy(tmp_path):
    import ml_dtypes

    from jsdl.data.files import ActivationFiles

    x = np.random.default_rng(0).normal(size=(8192, 64)).astype(ml_dtypes.bfloat16)
    np.save(tmp_path / "x.npy", x)
    src = ActivationFiles(str(tmp_path), dtype="bfloat16", check_finite=False)
    it = src.batches(4096, seed=0)
    next(it)  # warm up (file mapping, index tables)
    tracemalloc.start()
    b = next(it)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert b.x_p.dtype == np.dtype(ml_dtypes.bfloat16)
    bf16_batch, f32_copy = 4096 * 64 * 2, 4096 * 64 * 4
    # The read holds about two bf16 copies at its peak (the gathered rows and the batch); a float32
    # conversion would add f32_copy on top of those.
    assert peak < bf16_batch + f32_copy, (peak, bf16_batch, f32_copy)
