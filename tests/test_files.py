"""Activation files as a data source (jsdl.data.files): streaming, pairs, splits, errors, NaN, memory."""
import itertools
import json
import os

import numpy as np
import pytest

from jsdl.data import files as F
from jsdl.data.shards import np_dtype


def _x(n=3000, d=12, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


OPTS = dict(holdout=0.1, chunk_rows=50, shuffle_buffer=400)


def _take(it, n):
    return list(itertools.islice(it, n))


# ------------------------------------------------------------------------------------------------
# Streams from shards equal streams from the same arrays in memory
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,rows", [("npy", 333), ("npy", 3000), ("safetensors", 1000)])
def test_shards_stream_equals_in_memory(tmp_path, fmt, rows):
    x = _x()
    F.write_shards(tmp_path, x, rows_per_shard=rows, format=fmt)
    disk = F.ActivationFiles(tmp_path, **OPTS)
    mem = F.ActivationFiles.from_arrays(x, **OPTS)
    n = 3 * disk.n_train // 64  # three epochs
    for (i1, b1), (i2, b2) in zip(_take(disk.batches(64, seed=5, with_indices=True), n),
                                  _take(mem.batches(64, seed=5, with_indices=True), n)):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(b1.x_p, b2.x_p)
        np.testing.assert_array_equal(b1.x_p, x[i1])  # rows are what the indices say
        assert b1.x_r is None and b1.x_p.dtype == np.float32


def test_bfloat16_and_float16_shards(tmp_path):
    x = _x()
    for fmt in ("npy", "safetensors"):
        for dt in ("bfloat16", "float16"):
            d = tmp_path / f"{fmt}_{dt}"
            F.write_shards(d, x, rows_per_shard=700, format=fmt, dtype=dt)
            src = F.ActivationFiles(d, **OPTS)
            assert src.inputs[0].shards[0].dtype == np_dtype(dt)
            ref = F.ActivationFiles.from_arrays(x.astype(np_dtype(dt)), **OPTS)
            for b1, b2 in zip(_take(src.batches(32, seed=1), 20), _take(ref.batches(32, seed=1), 20)):
                np.testing.assert_array_equal(b1.x_p, b2.x_p)
                assert b1.x_p.dtype == np.float32
            # and the values are the rounded originals
            idx, b = next(src.batches(32, seed=1, with_indices=True))
            np.testing.assert_array_equal(b.x_p, x[idx].astype(np_dtype(dt)).astype(np.float32))


def test_epoch_covers_training_rows_once_and_seed_reproducible():
    x = _x(n=2000)
    src = F.ActivationFiles.from_arrays(x, **OPTS)
    B = 40
    assert src.n_train % B == 0
    per_epoch = src.n_train // B
    idx = np.concatenate(_take(src.index_batches(B, seed=3), per_epoch))
    train_rows = src._rows_of(src.train_chunks)
    np.testing.assert_array_equal(np.sort(idx), train_rows)  # a permutation of the training rows
    assert not np.array_equal(idx, train_rows)  # ... and shuffled
    again = np.concatenate(_take(src.index_batches(B, seed=3), per_epoch))
    other = np.concatenate(_take(src.index_batches(B, seed=4), per_epoch))
    np.testing.assert_array_equal(idx, again)
    assert not np.array_equal(idx, other)
    # the second epoch is a different order of the same rows
    two = np.concatenate(_take(src.index_batches(B, seed=3), 2 * per_epoch))
    np.testing.assert_array_equal(np.sort(two[len(idx):]), train_rows)
    assert not np.array_equal(two[len(idx):], idx)


def test_heldout_split_disjoint_fixed_and_complete():
    x = _x(n=2000)
    src = F.ActivationFiles.from_arrays(x, holdout=0.2, chunk_rows=50, shuffle_buffer=300, seed=1)
    src2 = F.ActivationFiles.from_arrays(x, holdout=0.2, chunk_rows=50, shuffle_buffer=300, seed=2)
    held = np.concatenate([i for i, _ in src.batches(64, split="heldout", with_indices=True)])
    assert held.size == src.n_heldout == 400  # one pass, the short last batch included
    assert len(set(held.tolist())) == held.size
    train = np.concatenate(_take(src.index_batches(64), 50))
    assert not set(train.tolist()) & set(held.tolist())
    # whole chunks are held out, chosen by split_seed only (not by the training seed)
    np.testing.assert_array_equal(np.unique(held // 50), src.heldout_chunks)
    np.testing.assert_array_equal(src.heldout_chunks, src2.heldout_chunks)
    src3 = F.ActivationFiles.from_arrays(x, holdout=0.2, chunk_rows=50, split_seed=9)
    assert not np.array_equal(src3.heldout_chunks, src.heldout_chunks)
    # held-out batches are read in file order
    np.testing.assert_array_equal(held, np.sort(held))


def test_resume_with_start_step_equals_skipping(tmp_path):
    x = _x()
    F.write_shards(tmp_path, x, rows_per_shard=500)
    src = F.ActivationFiles(tmp_path, **OPTS)
    full = _take(src.batches(64, seed=7), 60)
    resumed = _take(src.batches(64, seed=7, start_step=45), 15)
    for a, b in zip(full[45:], resumed):
        np.testing.assert_array_equal(a.x_p, b.x_p)


def test_transcoder_pairs_from_dirs_and_from_safetensors_keys(tmp_path):
    x = _x()
    y = np.tanh(x[:, :5] * 2.0) + 0.5  # a different width, a function of the row
    F.write_shards(tmp_path / "in", x, rows_per_shard=600)
    F.write_shards(tmp_path / "out", y, rows_per_shard=600)
    F.write_shards(tmp_path / "st", {"mlp_in": x, "mlp_out": y}, rows_per_shard=600, format="safetensors")
    a = F.ActivationFiles(tmp_path / "in", target=tmp_path / "out", **OPTS)
    b = F.ActivationFiles({"path": tmp_path / "st", "key": "mlp_in"}, target={"key": "mlp_out"}, **OPTS)
    c = F.ActivationFiles.from_arrays(x, y, **OPTS)
    assert a.method_hint == "transcoder" and (a.d_input, a.d_target) == (12, 5)
    for ba, bb, bc in _take(zip(a.batches(32, seed=0), b.batches(32, seed=0), c.batches(32, seed=0)), 30):
        np.testing.assert_allclose(ba.x_r, np.tanh(ba.x_p[:, :5] * 2.0) + 0.5, rtol=1e-6)  # rows stay paired
        for u, v in ((ba, bb), (ba, bc)):
            np.testing.assert_array_equal(u.x_p, v.x_p)
            np.testing.assert_array_equal(u.x_r, v.x_r)


def test_crosscoder_sources(tmp_path):
    xs = [_x(seed=s) for s in range(3)]
    for i, x in enumerate(xs):
        F.write_shards(tmp_path / f"m{i}", x, rows_per_shard=1000)
    src = F.ActivationFiles(sources=[tmp_path / f"m{i}" for i in range(3)], **OPTS)
    assert src.method_hint == "crosscoder" and src.n_sources == 3
    idx, b = next(src.batches(16, seed=0, with_indices=True))
    assert b.x_p.shape == (16, 3, 12) and b.x_r is None
    for i in range(3):
        np.testing.assert_array_equal(b.x_p[:, i], xs[i][idx])
    # a crosscoder spec accepts the [B, L, d] batch
    import jax

    import jsdl

    spec = jsdl.make_spec("crosscoder", "relu", n_latents=8, n_sources=3)
    params = jsdl.init_params(jax.random.PRNGKey(0), spec, d_input=12)
    loss, _ = jsdl.sdl_loss(params, b, spec)
    assert np.isfinite(float(loss))


# ------------------------------------------------------------------------------------------------
# Errors name the file
# ------------------------------------------------------------------------------------------------


def test_empty_sets_fail(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .npy or .safetensors shards in directory .*empty"):
        F.ActivationFiles(tmp_path / "empty")
    d = tmp_path / "zero"
    F.write_shards(d, np.zeros((0, 4), np.float32), rows_per_shard=10)
    with pytest.raises(ValueError, match="hold no rows"):
        F.ActivationFiles(d)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        F.ActivationFiles(tmp_path / "nowhere")


def test_corrupt_and_truncated_shards_fail_naming_the_file(tmp_path):
    x = _x(n=400)
    for fmt in ("npy", "safetensors"):
        d = tmp_path / f"trunc_{fmt}"
        paths = F.write_shards(d, x, rows_per_shard=100, format=fmt)
        with open(paths[2], "r+b") as f:
            f.truncate(os.path.getsize(paths[2]) - 7)
        with pytest.raises(ValueError, match=rf"{os.path.basename(paths[2])}.*truncated"):
            F.ActivationFiles(d)
        d = tmp_path / f"corrupt_{fmt}"
        paths = F.write_shards(d, x, rows_per_shard=100, format=fmt)
        with open(paths[1], "r+b") as f:
            f.write(b"\x00garbage\xff" * 3)
        with pytest.raises(ValueError, match=rf"{os.path.basename(paths[1])}.*(corrupt|not a valid)"):
            F.ActivationFiles(d)
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "a.safetensors").write_bytes(b"abc")
    with pytest.raises(ValueError, match="a.safetensors.*not a valid"):
        F.ActivationFiles(d)


def test_mismatched_dimensions_and_pairs_fail_naming_the_file(tmp_path):
    d = tmp_path / "dims"
    F.write_shards(d, _x(n=200, d=8), rows_per_shard=100, prefix="a")
    F.write_shards(d, _x(n=100, d=9), rows_per_shard=100, prefix="b")
    with pytest.raises(ValueError, match=r"b_00000.npy: rows have width 9 but .*a_00000.npy has width 8"):
        F.ActivationFiles(d)
    F.write_shards(tmp_path / "p", _x(n=300), rows_per_shard=100)
    F.write_shards(tmp_path / "q", _x(n=300, d=4), rows_per_shard=150)
    with pytest.raises(ValueError, match="x_r has 2 shards .* but x_p has 3"):
        F.ActivationFiles(tmp_path / "p", target=tmp_path / "q")
    F.write_shards(tmp_path / "r", _x(n=290, d=4), rows_per_shard=100)
    with pytest.raises(ValueError, match=r"r/shard_00002.npy: 90 rows, but its pair .*p/shard_00002.npy has 100"):
        F.ActivationFiles(tmp_path / "p", target=tmp_path / "r")
    F.write_shards(tmp_path / "s", _x(n=300, d=4), rows_per_shard=100, prefix="other")
    with pytest.raises(ValueError, match="matching file names"):
        F.ActivationFiles(tmp_path / "p", target=tmp_path / "s")
    F.write_shards(tmp_path / "c2", _x(n=300, d=5), rows_per_shard=100)
    with pytest.raises(ValueError, match="share one width"):
        F.ActivationFiles(sources=[tmp_path / "p", tmp_path / "c2"])


def test_bad_dtypes_and_shapes_fail(tmp_path):
    np.save(tmp_path / "ints.npy", np.ones((5, 3), np.int32))
    with pytest.raises(TypeError, match="ints.npy: dtype int32 is not a float"):
        F.ActivationFiles(tmp_path / "ints.npy")
    np.save(tmp_path / "vec.npy", np.ones((5,), np.float32))
    with pytest.raises(ValueError, match=r"vec.npy: expected a 2-D array"):
        F.ActivationFiles(tmp_path / "vec.npy")
    F.write_shards(tmp_path / "two", {"a": _x(n=10), "b": _x(n=10)}, rows_per_shard=10, format="safetensors")
    with pytest.raises(ValueError, match="name the one to read with key="):
        F.ActivationFiles(tmp_path / "two")
    with pytest.raises(ValueError, match="has no tensor 'c'"):
        F.ActivationFiles(tmp_path / "two", key="c")


def test_option_validation():
    x = _x(n=200)
    with pytest.raises(ValueError, match="nonfinite"):
        F.ActivationFiles.from_arrays(x, nonfinite="ignore")
    with pytest.raises(ValueError, match="holdout"):
        F.ActivationFiles.from_arrays(x, holdout=1.0)
    with pytest.raises(ValueError, match="leaves no training chunk"):
        F.ActivationFiles.from_arrays(x, holdout=4, chunk_rows=50)
    with pytest.raises(ValueError, match="batch_size"):
        next(F.ActivationFiles.from_arrays(x).batches(0))
    with pytest.raises(ValueError, match="heldout split holds no rows"):
        next(F.ActivationFiles.from_arrays(x).batches(8, split="heldout"))


# ------------------------------------------------------------------------------------------------
# NaN / inf rows
# ------------------------------------------------------------------------------------------------


def _with_nans(tmp_path):
    x = _x(n=1000)
    x[[3, 250, 251]] = np.nan
    x[777, 5] = np.inf
    paths = F.write_shards(tmp_path, x, rows_per_shard=250)
    return x, paths


def test_nonfinite_rows_rejected_by_default(tmp_path):
    _, paths = _with_nans(tmp_path)
    with pytest.raises(ValueError, match=r"shard_00000.npy: row 3 holds NaN or inf \(1 such rows"):
        F.ActivationFiles(tmp_path)


def test_nonfinite_rows_reported_and_skipped(tmp_path):
    x, paths = _with_nans(tmp_path)
    with pytest.warns(RuntimeWarning, match=r"skipping 4 rows holding NaN or inf .*shard_00000.npy: 1.*shard_00001.npy: 2.*shard_00003.npy: 1"):
        src = F.ActivationFiles(tmp_path, nonfinite="skip", chunk_rows=50, shuffle_buffer=200)
    rep = src.info()["nonfinite_rows"]
    assert rep["total"] == 4 and rep["by_file"] == {paths[0]: 1, paths[1]: 2, paths[3]: 1}
    assert src.n_train + src.n_heldout == 996
    idx = np.concatenate(_take(src.index_batches(32, seed=0), 3 * src.n_train // 32))
    assert not set(idx.tolist()) & {3, 250, 251, 777}
    for b in _take(src.batches(32, seed=0), src.n_train // 32):
        assert np.isfinite(b.x_p).all()


def test_nonfinite_rows_without_scan_raise_when_met(tmp_path):
    _with_nans(tmp_path)
    src = F.ActivationFiles(tmp_path, check_finite=False, chunk_rows=50)
    with pytest.raises(ValueError, match=r"shard_0000[013].npy: row \d+ holds NaN or inf"):
        for _ in src.batches(100, seed=0):
            pass


def test_bfloat16_overflow_to_inf_is_caught(tmp_path):
    x = _x(n=100).astype(np.float64)
    x[10, 0] = 1e39  # finite in float64, inf once stored as bfloat16 (max ~3.4e38)
    d = tmp_path / "bf"
    with np.errstate(over="ignore"):
        F.write_shards(d, x, rows_per_shard=100, dtype="bfloat16")
    with pytest.raises(ValueError, match="row 10 holds NaN or inf"):
        F.ActivationFiles(d)


# ------------------------------------------------------------------------------------------------
# Normalisation
# ------------------------------------------------------------------------------------------------


def test_normalization_unit_mean_squared_norm_and_fold_back(tmp_path):
    import jax
    import jax.numpy as jnp

    import jsdl
    from jsdl.export import fold_normalization

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(4000, 10)) * 7.0 + 3.0).astype(np.float32)
    y = (rng.normal(size=(4000, 6)) * 0.2).astype(np.float32)
    src = F.ActivationFiles.from_arrays(x, y, normalize=True, norm_sample=2000, chunk_rows=100)
    info = src.info()["normalization"]
    s_p, s_r = info["input_scale"], info["target_scale"]
    assert s_p == pytest.approx(1 / np.sqrt(np.mean(np.sum(x.astype(np.float64) ** 2, 1))), rel=0.05)
    assert s_r == pytest.approx(1 / np.sqrt(np.mean(np.sum(y.astype(np.float64) ** 2, 1))), rel=0.05)
    b = np.concatenate([b.x_p for b in _take(src.batches(500, seed=0), 8)])
    assert np.mean(np.sum(b.astype(np.float64) ** 2, 1)) == pytest.approx(1.0, rel=0.05)
    json.dumps(src.info())  # the record is JSON-able
    # Folding: the folded model on raw data equals the trained model on normalised data, rescaled.
    spec = jsdl.make_spec("transcoder", "jumprelu", n_latents=16, threshold=0.05)
    p = jsdl.init_params(jax.random.PRNGKey(1), spec, d_input=10, d_target=6)
    p = p.replace(b_E=jnp.full((16,), 0.1), b_D=jnp.full((6,), 0.3))
    q = fold_normalization(p, spec, s_p, s_r)
    xr = jnp.asarray(x[:64])
    c_norm = jsdl.encode(p, xr * s_p, spec)
    np.testing.assert_allclose(jsdl.encode(q, xr, spec), c_norm, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(jsdl.decode(q, c_norm, spec), jsdl.decode(p, c_norm, spec) / s_r, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


def test_from_config(tmp_path):
    F.write_shards(tmp_path / "a", _x(), rows_per_shard=1000)
    src = F.from_config({"path": str(tmp_path / "a"), "holdout": 0.1, "chunk_rows": 100, "seed": 3, "normalize": True})
    assert src.seed == 3 and src.n_heldout == 300 and src.scales is not None
    assert F.from_config(str(tmp_path / "a")).n_rows == 3000
    with pytest.raises(ValueError, match="unknown keys \\['shuffle'\\]"):
        F.from_config({"path": str(tmp_path / "a"), "shuffle": True})


# ------------------------------------------------------------------------------------------------
# Resident memory
# ------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _write_big(directory, n_shards, rows, d, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    for i in range(n_shards):
        a = np.lib.format.open_memmap(os.path.join(directory, f"shard_{i:03d}.npy"), mode="w+", dtype=np.float32, shape=(rows, d))
        for j in range(0, rows, 32768):
            a[j:j + 32768] = rng.standard_normal((min(32768, rows - j), d), dtype=np.float32)
        a.flush()
        del a
    return n_shards * rows * d * 4


def _stream_rss(directory, set_bytes, batch_size=4096):
    src = F.ActivationFiles(directory, holdout=0.01)  # includes the full NaN scan
    base = _rss_bytes()
    peak, n = base, 0
    for b in itertools.islice(src.batches(batch_size, seed=0), src.n_train // batch_size):
        n += b.x_p.shape[0]
        peak = max(peak, _rss_bytes())
    return n, peak - base


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux) to read resident memory")
def test_streaming_resident_memory_fast(tmp_path):
    set_bytes = _write_big(tmp_path, 4, 32768, 512)  # 256 MiB
    n, grown = _stream_rss(tmp_path, set_bytes)
    print(f"streamed {n} rows of a {set_bytes / 2**20:.0f} MiB set; RSS grew {grown / 2**20:.1f} MiB")
    assert n >= 0.95 * 4 * 32768
    # pages read through the (closed) maps do not stay resident: a few batches, not the set
    assert grown < 0.25 * set_bytes, f"RSS grew by {grown / 2**20:.0f} MiB streaming a {set_bytes / 2**20:.0f} MiB set"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux) to read resident memory")
def test_streaming_resident_memory_2gb(tmp_path):
    set_bytes = _write_big(tmp_path, 8, 131072, 512)  # 2 GiB
    n, grown = _stream_rss(tmp_path, set_bytes)
    print(f"streamed {n} rows of a {set_bytes / 2**20:.0f} MiB set; RSS grew {grown / 2**20:.1f} MiB")
    assert n >= 0.95 * 8 * 131072
    assert grown < 0.05 * set_bytes, f"RSS grew by {grown / 2**20:.0f} MiB streaming a {set_bytes / 2**30:.1f} GiB set"


# ------------------------------------------------------------------------------------------------
# Training from shards equals training from the same arrays in memory
# ------------------------------------------------------------------------------------------------


def test_fit_from_shards_equals_fit_from_memory(tmp_path):
    import jax

    import jsdl
    from jsdl.objective import Batch
    from jsdl.train import TrainConfig, fit

    x = _x(n=2400, d=10)
    F.write_shards(tmp_path, x, rows_per_shard=700, format="safetensors")
    disk = F.ActivationFiles(tmp_path, **OPTS)
    spec = jsdl.make_spec("sae", "topk", n_latents=24, k=3)
    cfg = TrainConfig(steps=12, batch_size=48, learning_rate=3e-3, log_every=4, plots=False, progress=False)
    key = jax.random.PRNGKey(0)
    s1, h1 = fit(key, spec, disk.batches(48, seed=11), cfg)
    # the reference: plain in-memory arrays indexed by the same batch indices, no jsdl.data.files code
    idx = list(itertools.islice(disk.index_batches(48, seed=11), cfg.steps))
    s2, h2 = fit(key, spec, (Batch(x_p=x[i]) for i in idx), cfg)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert h1["loss"] == h2["loss"]
    assert not np.array_equal(np.asarray(s1.params.W_E), np.asarray(jsdl.init_params(jax.random.PRNGKey(9), spec, 10).W_E))


@pytest.mark.slow
def test_fit_population_from_shards(tmp_path):
    import jax

    import jsdl
    from jsdl.train import TrainConfig, fit, fit_population, member

    x = _x(n=2400, d=10)
    F.write_shards(tmp_path, x, rows_per_shard=700)
    disk = F.ActivationFiles(tmp_path, **OPTS)
    spec = jsdl.make_spec("sae", "topk", n_latents=24, k=3)
    cfg = TrainConfig(steps=12, batch_size=48, learning_rate=3e-3, log_every=4, plots=False, progress=False)
    key = jax.random.PRNGKey(0)
    states, hists = fit_population(key, jsdl.train.Grid(spec, seeds=[0, 1]), disk.batches(48, seed=11), cfg)
    assert states.params.W_E.shape == (2, 24, 10) and len(hists) == 2
    # member i equals a single fit on the same stream with the member's key
    mk = jax.numpy.asarray(hists[1]["member"]["key"], jax.numpy.uint32)
    s1, _ = fit(mk, spec, disk.batches(48, seed=11), cfg, data_key=jsdl.train.population_data_key(key))
    np.testing.assert_allclose(np.asarray(member(states, 1).params.W_E), np.asarray(s1.params.W_E), rtol=1e-5, atol=1e-6)


def test_train_cli_reads_files_from_yaml(tmp_path):
    """`data: {files: ...}` in a `jsdl train` config trains from shards and records the normalisation."""
    import json

    import yaml

    from jsdl.cli import main as jsdl_main
    from jsdl.data.files import write_shards

    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(size=(512, 8))).astype(np.float32)
    write_shards(str(tmp_path / "acts"), x, rows_per_shard=200)
    cfg = {"spec": {"activation": "topk", "k": 2, "n_latents": 16},
           "data": {"files": {"path": str(tmp_path / "acts"), "normalize": True, "shuffle_buffer": 64}},
           "train": {"steps": 6, "batch_size": 32, "log_every": 3, "plots": False, "progress": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert jsdl_main(["train", str(tmp_path / "c.yaml"), "--out", str(out), "--no-progress"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["record"]["data"]["normalization"]["scales"]["x_p"] > 0
    bad = dict(cfg, data={"files": {"path": str(tmp_path / "acts"), "bogus": 1}})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert jsdl_main(["train", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "r2")]) == 2
