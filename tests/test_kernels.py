"""Sparse TopK/BatchTopK kernels (jsdl.kernels) against the dense reference path, and the lean
training step (no recompilation across steps)."""
import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import jsdl
from jsdl import kernels as K

IMPLS = ("slots", "gather")


def _batch(key, B, d):
    x = jax.random.normal(key, (B, d))
    return jsdl.Batch(x_p=x)


def _perturb(key, params, scale=0.1):
    """Non-zero biases (and thresholds) so their gradients are exercised."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    leaves = [l + scale * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, leaves)


def _loss_and_grads(spec, params, batch, **kw):
    (loss, aux), g = jax.jit(jax.value_and_grad(lambda p: jsdl.sdl_loss(p, batch, spec, **kw), has_aux=True))(params)
    return loss, aux, g


def _spec_pair(**kw):
    return jsdl.make_spec(sparse=True, **kw), jsdl.make_spec(sparse=False, **kw)


def _assert_close(a, b, rtol, atol):
    chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
@pytest.mark.parametrize("tied", [False, True])
def test_sparse_equals_dense_loss_and_grads(activation, tied):
    key = jax.random.PRNGKey(0)
    d, n_q, k, B = 12, 96, 5, 40
    sp, de = _spec_pair(method="sae", activation=activation, n_latents=n_q, k=k, tied=tied)
    params = _perturb(jax.random.PRNGKey(1), jsdl.init_params(key, sp, d))
    batch = _batch(jax.random.PRNGKey(2), B, d)
    ls, auxs, gs = _loss_and_grads(sp, params, batch)
    ld, auxd, gd = _loss_and_grads(de, params, batch)
    np.testing.assert_allclose(ls, ld, rtol=1e-5)
    for name in ("mse", "fvu", "l0"):
        np.testing.assert_allclose(auxs[name], auxd[name], rtol=1e-5, err_msg=name)
    # Every leaf, biases included, must match; float32 summation order differs (gathers vs matmul).
    _assert_close(gs, gd, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(gs.b_E).max()) > 0 and float(jnp.abs(gs.b_D).max()) > 0
    if tied:
        assert gs.W_D is None


@pytest.mark.parametrize("fold", [False, True])
def test_sparse_equals_dense_float64_with_penalty_auxk_and_transcoder(x64, fold, monkeypatch):
    # fold: the encoder bias folded into the product (kernels.preacts), forced at this small d
    monkeypatch.setattr(K, "FOLD_BIAS_MIN_D", 0 if fold else 10**9)
    key = jax.random.PRNGKey(3)
    d, dt, n_q, k, B = 10, 7, 64, 4, 32
    kw = dict(method="transcoder", activation="topk", n_latents=n_q, k=k, penalties={"weighted_l1": 1e-2},
              aux_k=6, aux_coef=0.5)
    sp, de = _spec_pair(**kw)
    params = _perturb(jax.random.PRNGKey(4), jsdl.init_params(key, sp, d, dt, dtype=jnp.float64))
    assert params.W_E.dtype == jnp.float64
    x = jax.random.normal(jax.random.PRNGKey(5), (B, d), jnp.float64)
    y = jax.random.normal(jax.random.PRNGKey(6), (B, dt), jnp.float64)
    batch = jsdl.Batch(x_p=x, x_r=y)
    dead = jnp.arange(n_q) % 3 == 0
    ls, auxs, gs = _loss_and_grads(sp, params, batch, dead_mask=dead)
    ld, auxd, gd = _loss_and_grads(de, params, batch, dead_mask=dead)
    assert float(auxs["auxk"]) > 0
    np.testing.assert_allclose(auxs["auxk"], auxd["auxk"], rtol=1e-12)
    np.testing.assert_allclose(ls, ld, rtol=1e-12)
    _assert_close(gs, gd, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_folded_encoder_bias_equals_the_sum(x64, activation, monkeypatch):
    """kernels.preacts folds b_E into the sparse path's selection product ([x, 1, 0..] [W_E, b_E,
    0..]^T) on CPU from d = FOLD_BIAS_MIN_D on: a re-association, so the loss, metrics and every
    gradient equal those of the plain x W_E^T + b_E in float64, with AuxK (a second selection)."""
    assert K.FOLD_BIAS_MIN_D == 256
    d, n_q, B = 12, 64, 16
    spec = jsdl.make_spec("sae", activation, n_q, k=4, sparse=True, aux_k=6, aux_coef=0.5)
    params = _perturb(jax.random.PRNGKey(7), jsdl.init_params(jax.random.PRNGKey(6), spec, d, dtype=jnp.float64))
    batch = jsdl.Batch(x_p=jax.random.normal(jax.random.PRNGKey(8), (B, d), jnp.float64))
    dead = jnp.arange(n_q) % 3 == 0
    out = {}
    for fold in (False, True):
        monkeypatch.setattr(K, "FOLD_BIAS_MIN_D", 0 if fold else 10**9)
        hlo = jax.jit(lambda p: K.preacts(batch.x_p, p.W_E, p.b_E)).lower(params).as_text()
        assert ("concatenate" in hlo) == fold
        out[fold] = _loss_and_grads(spec, params, batch, dead_mask=dead)
    (l0, a0, g0), (l1, a1, g1) = out[False], out[True]
    assert float(a0["auxk"]) > 0
    np.testing.assert_allclose(l1, l0, rtol=1e-12)
    for name in a0:
        np.testing.assert_allclose(a1[name], a0[name], rtol=1e-11, atol=1e-13, err_msg=name)
    _assert_close(g1, g0, rtol=1e-10, atol=1e-12)
    assert float(jnp.abs(g1.b_E).max()) > 0


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_matryoshka_sparse_equals_dense_float64(x64, activation):
    """Matryoshka on the sparse path: every prefix reconstruction comes from one decode of the
    stored entries into per-band rows, summed cumulatively (kernels.sparse_decode_prefixes); the
    loss (the weighted prefix sum), metrics and every gradient equal the dense path's, with
    unequal prefix weights, a penalty and AuxK."""
    key = jax.random.PRNGKey(11)
    d, n_q, k, B = 9, 64, 4, 24
    sp, de = _spec_pair(method="matryoshka", activation=activation, n_latents=n_q, k=k, prefixes=(5, 16, 40, 64),
                        prefix_weights=(0.4, 0.3, 0.2, 0.1), penalties={"weighted_l1": 1e-2}, aux_k=6, aux_coef=0.5)
    params = _perturb(jax.random.PRNGKey(12), jsdl.init_params(key, sp, d, dtype=jnp.float64))
    batch = jsdl.Batch(x_p=jax.random.normal(jax.random.PRNGKey(13), (B, d), jnp.float64))
    dead = jnp.arange(n_q) % 3 == 0
    ls, auxs, gs = _loss_and_grads(sp, params, batch, dead_mask=dead)
    ld, auxd, gd = _loss_and_grads(de, params, batch, dead_mask=dead)
    # the prefixes matter: the nested term differs from the full reconstruction's
    assert abs(float(auxd["recon"]) - float(auxd["mse"])) > 1e-3
    for name in ("recon", "mse", "fvu", "l0", "auxk", "penalty/weighted_l1"):
        np.testing.assert_allclose(auxs[name], auxd[name], rtol=1e-12, err_msg=name)
    np.testing.assert_allclose(ls, ld, rtol=1e-12)
    _assert_close(gs, gd, rtol=1e-10, atol=1e-12)


def test_auto_mode_choice():
    d = 8
    big = jsdl.make_spec(activation="topk", n_latents=256, k=8)
    small_ratio = jsdl.make_spec(activation="topk", n_latents=32, k=8)
    relu = jsdl.make_spec(activation="relu", n_latents=256, penalties={"l1": 1e-3})
    assert big.sparse == "auto" and K.use_sparse(big, jnp.float32)
    assert not K.use_sparse(big, jnp.float64)  # forward-mode autodiff (Hessians) needs the dense path
    assert not K.use_sparse(small_ratio, jnp.float32)
    assert not K.use_sparse(relu, jnp.float32)
    assert not K.use_sparse(jsdl.make_spec(activation="topk", n_latents=256, k=8, sparse=False))
    matry = jsdl.make_spec(method="matryoshka", activation="batchtopk", n_latents=256, k=8)
    assert K.use_sparse(matry, jnp.float32)  # one decode of the stored entries into prefix bands
    with pytest.raises(ValueError, match="sparse=True is not available"):
        K.use_sparse(jsdl.make_spec(activation="relu", n_latents=64, sparse=True))
    with pytest.raises(ValueError, match="sparse must be"):
        jsdl.make_spec(activation="topk", n_latents=64, k=2, sparse="yes")
    del d


@pytest.mark.parametrize("impl", IMPLS)
def test_impls_agree_with_autodiff_of_dense_gather(impl):
    """Both kernel layouts give the VJP of the plain (dense) formula z[rows, cols] @ ... ."""
    key = jax.random.PRNGKey(7)
    B, d, n, k = 9, 6, 20, 3
    ks = jax.random.split(key, 5)
    x = jax.random.normal(ks[0], (B, d))
    W = jax.random.normal(ks[1], (n, d))
    b = jax.random.normal(ks[2], (n,))
    cols = jax.random.randint(ks[3], (B, k), 0, n)  # repeats across rows exercise the scatter-add
    rows = jax.random.randint(ks[4], (B, k), 0, B)

    def ref(x, W, b):
        z = x @ W.T + b
        return z[rows, cols]

    def ker(x, W, b):
        return K.gather_preact(x, W, b, cols, rows, impl=impl)

    def ker_z(x, W, b):  # values read off a precomputed (gradient-free) z, same VJP
        return K.gather_preact(x, W, b, cols, rows, z=x @ W.T + b, impl=impl)

    ct = jax.random.normal(jax.random.PRNGKey(8), (B, k))
    vr, fr = jax.vjp(ref, x, W, b)
    for f in (ker, ker_z):
        vk, fk = jax.vjp(f, x, W, b)
        _assert_close(vk, vr, rtol=1e-5, atol=1e-5)
        _assert_close(fk(ct), fr(ct), rtol=1e-5, atol=1e-5)

    codes = K.SparseCodes(vals=ct, cols=cols, rows=rows, n_latents=n)
    dense = K.densify(codes)

    def dec_ref(vals, W):
        return K.densify(K.SparseCodes(vals, cols, rows, n)) @ W

    def dec_ker(vals, W):
        return K.sparse_decode(K.SparseCodes(vals, cols, rows, n), W, impl=impl)

    g = jax.random.normal(jax.random.PRNGKey(9), (B, d))
    vr, fr = jax.vjp(dec_ref, ct, W)
    vk, fk = jax.vjp(dec_ker, ct, W)
    _assert_close(vk, vr, rtol=1e-5, atol=1e-5)
    _assert_close(fk(g), fr(g), rtol=1e-5, atol=1e-5)
    _assert_close(vk, dense @ W, rtol=1e-5, atol=1e-5)


def _flat_topk_set(z, k):
    B, n = z.shape
    _, i = jax.lax.top_k(z.reshape(-1), k * B)
    return set(np.asarray(i).tolist())


@pytest.mark.parametrize("skewed", [False, True])
def test_batchtopk_selection_is_exact(skewed):
    """The one- and two-stage selections equal the top-(kB) of the flat batch, including when one
    row holds far more than its share (the two-stage fallback branch)."""
    B, n, k = 16, 128, 3
    z = jax.random.normal(jax.random.PRNGKey(10), (B, n))
    if skewed:
        z = z.at[0].add(100.0)  # row 0 owns all kB = 48 entries > cap = 4k = 12
    for cap in (None, 4 * k):
        vals, rows, cols = jax.jit(lambda z: K.select_batchtopk(z, k, cap=cap))(z)
        got = set((np.asarray(rows) * n + np.asarray(cols)).reshape(-1).tolist())
        assert got == _flat_topk_set(z, k)
    np.testing.assert_array_equal(vals, z[rows, cols])
    if skewed:
        assert np.all(np.asarray(rows) == 0)


def test_sparse_loss_under_vmap_and_grad_matches_loop():
    """Populations vmap the loss over stacked params: the sparse kernels must batch."""
    d, n_q, k, B, P = 6, 64, 4, 16, 3
    spec = jsdl.make_spec(activation="batchtopk", n_latents=n_q, k=k, sparse=True)
    keys = jax.random.split(jax.random.PRNGKey(11), P)
    params = jax.vmap(lambda kk: jsdl.init_params(kk, spec, d))(keys)
    batch = _batch(jax.random.PRNGKey(12), B, d)
    f = lambda p: jsdl.sdl_loss(p, batch, spec)[0]  # noqa: E731
    gv = jax.jit(jax.vmap(jax.grad(f)))(params)
    for i in range(P):
        gi = jax.grad(f)(jax.tree.map(lambda a: a[i], params))
        _assert_close(jax.tree.map(lambda a: a[i], gv), gi, rtol=1e-5, atol=1e-6)


def test_sparse_path_does_not_densify():
    """The compiled sparse value-and-grad holds no dot product of the dictionary size except the
    encoder forward (one [B, n_p] x [n_p, n_q] matmul), where the dense path has five."""
    d, n_q, k, B = 16, 256, 4, 32
    sp, de = _spec_pair(activation="topk", n_latents=n_q, k=k)
    params = jsdl.init_params(jax.random.PRNGKey(0), sp, d)
    batch = _batch(jax.random.PRNGKey(1), B, d)

    def n_big_dots(spec):
        fn = jax.value_and_grad(lambda p: jsdl.sdl_loss(p, batch, spec)[0])
        jaxpr = jax.make_jaxpr(fn)(params)
        count = 0

        def walk(jp):
            nonlocal count
            for eqn in jp.eqns:
                if eqn.primitive.name == "dot_general":
                    shapes = [v.aval.shape for v in eqn.invars]
                    if any(n_q in s for s in shapes):
                        count += 1
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    walk(sub)

        walk(jaxpr.jaxpr)
        return count

    assert n_big_dots(sp) == 1
    assert n_big_dots(de) >= 4


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_dynamic_k_population_activation_matches_dense(activation):
    """jsdl.train's varying-k activation (traced k <= k_max) gives the same loss/grads sparse and dense."""
    from jsdl.train.step import with_dynamic_k

    d, n_q, k_max, B = 8, 64, 6, 24
    sp, de = _spec_pair(activation=activation, n_latents=n_q, k=k_max)
    params = _perturb(jax.random.PRNGKey(13), jsdl.init_params(jax.random.PRNGKey(14), sp, d))
    batch = _batch(jax.random.PRNGKey(15), B, d)
    for k in (2, 5):
        ls, auxs, gs = _loss_and_grads(with_dynamic_k(sp, jnp.int32(k)), params, batch)
        ld, auxd, gd = _loss_and_grads(with_dynamic_k(de, jnp.int32(k)), params, batch)
        assert K.use_sparse(with_dynamic_k(sp, jnp.int32(k)))
        np.testing.assert_allclose(ls, ld, rtol=1e-5)
        np.testing.assert_allclose(auxs["l0"], auxd["l0"], rtol=1e-6)
        _assert_close(gs, gd, rtol=1e-4, atol=1e-5)


def test_train_step_compiles_once_and_shares_the_encoder(compiles):
    """Lean step: the jsdl.train step compiles once however many steps and log intervals
    run (jax.monitoring compile events counted over two fits of different lengths), data is
    sampled inside the compiled step, and the sparse step holds a single dictionary-size matmul and
    a single top_k (the statistics share the loss's selection through CSE)."""
    from jsdl.data import make_bench
    from jsdl.train import Stepper, TrainConfig, fit, init_state

    d, n_q, k = 16, 128, 4
    spec = jsdl.make_spec("sae", "topk", n_q, k=k)
    assert K.use_sparse(spec, jnp.float32)
    bench = make_bench(jax.random.PRNGKey(0), n_features=32, d_input=d)
    counts = []
    for steps in (4, 12):
        compiles.clear()
        cfg = TrainConfig(steps=steps, batch_size=32, log_every=2, progress=False, plots=False)
        state, hist = fit(jax.random.PRNGKey(1), spec, bench, cfg)
        counts.append(len(compiles))
    assert int(state.step) == 12
    # The second, 3x longer fit with 3x the log intervals compiles no more than the first.
    assert counts[1] <= counts[0], counts

    cfg = TrainConfig(steps=5, batch_size=32, log_every=5, progress=False, plots=False)
    st = Stepper(spec, cfg, data_mode="bench", devices=jax.devices()[:1], bench=bench)
    state = st.place_state(init_state(jax.random.PRNGKey(2), spec, cfg, d))
    data = st.place_data(bench)
    for _ in range(3):
        state = st.step(state, data, None)
    assert st.step._cache_size() == 1
    hlo = st.step.lower(state, data, None).compile().as_text()
    # One selection: XLA's TopK, or jsdl's native kernel where it is built (jsdl.native).
    assert sum(hlo.count(f'custom_call_target="{t}"') for t in ("TopK", "jsdl_top_k_indices")) == 1
    dots = [l for l in hlo.splitlines() if " dot(" in l and str(n_q) in l.split(" dot(")[0]]
    assert len(dots) == 1, dots


@pytest.mark.parametrize("activation,pre_bias", [("topk", False), ("batchtopk", False), ("batchtopk", True)])
def test_sparse_code_statistics_equal_dense(activation, pre_bias):
    """fired_counts / min_positive of sparse codes equal the dense codes' firing counts and BatchTopK
    threshold, and the training step built on them keeps the same dead-latent statistics and
    inference threshold as the dense path, without a [B, n_q] array in the compiled sparse step."""
    from jsdl.activations import batchtopk_threshold
    from jsdl.data import make_bench
    from jsdl.train import Stepper, TrainConfig, init_state

    d, n_q, k, B = 16, 64, 3, 24
    sp, de = _spec_pair(activation=activation, n_latents=n_q, k=k, pre_bias=pre_bias)
    params = _perturb(jax.random.PRNGKey(3), jsdl.init_params(jax.random.PRNGKey(4), sp, d), 0.5 if pre_bias else 0.1)
    x = _batch(jax.random.PRNGKey(5), B, d).x_p
    codes, _ = K.sparse_encode(params, x, sp)
    dense = K.densify(codes)
    # the sparse codes are the dense path's codes (for pre_bias: of x - b_D)
    np.testing.assert_allclose(dense, jsdl.encode(params, x, de), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(K.fired_counts(codes), jnp.sum(dense != 0, axis=0))
    np.testing.assert_array_equal(K.min_positive(codes), batchtopk_threshold(dense))
    empty = K.SparseCodes(vals=jnp.zeros((2, k)), cols=jnp.zeros((2, k), jnp.int32), n_latents=n_q)
    assert float(K.min_positive(empty)) == 0.0 and int(K.fired_counts(empty).sum()) == 0

    bench = make_bench(jax.random.PRNGKey(0), n_features=32, d_input=d)
    cfg = TrainConfig(steps=6, batch_size=B, dead_window=2, progress=False, plots=False)
    states = {}
    for name, spec in (("sparse", sp), ("dense", de)):
        st = Stepper(spec, cfg, data_mode="bench", devices=jax.devices()[:1], bench=bench)
        state = st.place_state(init_state(jax.random.PRNGKey(2), spec, cfg, d))
        data = st.place_data(bench)
        for _ in range(5):
            state = st.step(state, data, None)
        states[name] = state
        if name == "sparse":
            hlo = st.step.lower(state, data, None).compile().as_text()
            dense_scatters = [l for l in hlo.splitlines() if "scatter" in l and f" = s32[{B},{n_q}]" in l
                              or "scatter" in l and f" = f32[{B},{n_q}]" in l]
            assert not dense_scatters, dense_scatters  # the dense codes used to be scattered for the statistics
    _assert_close(states["sparse"].dead, states["dense"].dead, rtol=0, atol=0)
    if activation == "batchtopk":
        np.testing.assert_allclose(states["sparse"].params.threshold, states["dense"].params.threshold, rtol=1e-5)


@pytest.mark.parametrize("sparse", [True, False])
def test_auxk_skipped_when_nothing_is_dead(sparse):
    """AuxK runs its top-k under a lax.cond: with no dead latent the loss and its gradient are exactly
    0 (the branch is not run); with dead latents it equals the loss computed without the guard."""
    from jsdl import penalties as P

    d, n_q, k, B = 16, 64, 4, 32
    spec = jsdl.make_spec(activation="topk", n_latents=n_q, k=k, aux_coef=1.0, aux_k=8, sparse=sparse)
    params = _perturb(jax.random.PRNGKey(7), jsdl.init_params(jax.random.PRNGKey(8), spec, d))
    batch = _batch(jax.random.PRNGKey(9), B, d)
    none = jnp.zeros((n_q,), bool)
    some = jnp.arange(n_q) % 3 == 0

    def auxk(p, dead):
        return jsdl.sdl_loss(p, batch, spec, dead_mask=dead)[1]["auxk"]

    v0, g0 = jax.value_and_grad(auxk)(params, none)
    assert float(v0) == 0.0
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g0))
    v1, g1 = jax.value_and_grad(auxk)(params, some)
    assert float(v1) > 0
    # Without the guard: the branch itself (the previous jnp.where form), same value and gradient.
    guard = P.when_any_dead
    try:
        P.when_any_dead = lambda dead, fn, *a: fn(*a)
        v2, g2 = jax.value_and_grad(auxk)(params, some)
    finally:
        P.when_any_dead = guard
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    _assert_close(g1, g2, rtol=1e-5, atol=1e-7)
    jaxpr = str(jax.make_jaxpr(auxk)(params, some))
    assert "cond[" in jaxpr


@pytest.mark.parametrize("shape,k", [((8, 4096), 32), ((3, 8192), 5), ((131072,), 64), ((2, 3, 4096), 16)])
def test_block_top_k_is_lax_top_k(shape, k):
    """The block-max prefilter selection (used on CPU for long rows and the flat BatchTopK) returns
    exactly lax.top_k's values and indices: continuous values, heavy ties (lower index first) and
    rows that are mostly -inf; its gradient and JVP are lax.top_k's."""
    from jsdl.shardops import block_top_k, local_top_k

    rng = np.random.default_rng(0)
    cases = {"normal": rng.standard_normal(shape), "ties": rng.integers(0, 5, shape),
             "inf": np.where(rng.random(shape) < 0.995, -np.inf, rng.standard_normal(shape))}
    for kind, z in cases.items():
        z = jnp.asarray(z, jnp.float32)
        v1, i1 = jax.lax.top_k(z, k)
        for fn in (block_top_k, local_top_k):
            v2, i2 = jax.jit(fn, static_argnums=1)(z, k)
            np.testing.assert_array_equal(i1, i2, err_msg=kind)
            np.testing.assert_array_equal(v1, v2, err_msg=kind)
    z = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.arange(k, dtype=jnp.float32)
    g1 = jax.grad(lambda z: jnp.sum(jax.lax.top_k(z, k)[0] * w))(z)
    g2 = jax.grad(lambda z: jnp.sum(block_top_k(z, k)[0] * w))(z)
    np.testing.assert_array_equal(g1, g2)
    t1 = jax.jvp(lambda z: jax.lax.top_k(z, k)[0], (z,), (z * 2,))[1]
    t2 = jax.jvp(lambda z: block_top_k(z, k)[0], (z,), (z * 2,))[1]
    np.testing.assert_array_equal(t1, t2)


def test_local_top_k_rule_for_flat_and_row_selections(monkeypatch):
    """Without the native kernel, on CPU the block prefilter needs at least 2 k blocks per row, and
    4 k for a flat (1-D, BatchTopK) selection, where it was measured slower below that
    (shardops.local_top_k)."""
    from jsdl import shardops
    from jsdl.shardops import local_top_k

    monkeypatch.setattr(shardops._native, "supports_top_k", lambda z, k: False)

    def n_top_k(shape, k):
        return str(jax.make_jaxpr(lambda z: local_top_k(z, k))(jnp.zeros(shape))).count("top_k[")

    assert jax.default_backend() == "cpu"
    assert n_top_k((1024 * 512,), 8 * 1024) == 1  # 16384 blocks < 4 k: one lax.top_k
    assert n_top_k((1024 * 512,), 4 * 1024) == 2  # 16384 blocks = 4 k: block maxima + candidates
    assert n_top_k((4, 8192), 128) == 2  # a row: 256 blocks >= 2 k


def test_block_top_k_rejects_bad_shapes():
    from jsdl.shardops import block_top_k

    with pytest.raises(ValueError, match="divisible"):
        block_top_k(jnp.zeros((2, 100)), 4)
    with pytest.raises(ValueError, match="n / block >= k"):
        block_top_k(jnp.zeros((2, 64)), 4)


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_pre_bias_sparse_equals_dense_float64_with_auxk(x64, activation):
    """``pre_bias`` (encode x - b_D): the sparse kernels give the dense path's loss and gradients,
    AuxK and a penalty included; b_D's gradient then also flows through the encoder."""
    d, n_q, k, B = 10, 64, 4, 32
    kw = dict(activation=activation, n_latents=n_q, k=k, penalties={"weighted_l1": 1e-2}, aux_k=6, aux_coef=0.5,
              pre_bias=True)
    sp, de = _spec_pair(**kw)
    params = _perturb(jax.random.PRNGKey(4), jsdl.init_params(jax.random.PRNGKey(3), sp, d, dtype=jnp.float64), 0.5)
    batch = jsdl.Batch(x_p=jax.random.normal(jax.random.PRNGKey(5), (B, d), jnp.float64))
    dead = jnp.arange(n_q) % 3 == 0
    ls, auxs, gs = _loss_and_grads(sp, params, batch, dead_mask=dead)
    ld, auxd, gd = _loss_and_grads(de, params, batch, dead_mask=dead)
    assert float(auxs["auxk"]) > 0
    np.testing.assert_allclose(ls, ld, rtol=1e-12)
    _assert_close(gs, gd, rtol=1e-10, atol=1e-12)
    # the same model without pre_bias (b_E absorbs -W_E b_D) has the same loss, another b_D gradient
    plain = jsdl.make_spec(sparse=True, **{**kw, "pre_bias": False})
    folded = params.replace(b_E=params.b_E - params.W_E @ params.b_D)
    lp, _, gp = _loss_and_grads(plain, folded, batch, dead_mask=dead)
    np.testing.assert_allclose(lp, ls, rtol=1e-12)
    np.testing.assert_allclose(gp.b_D - gs.b_D, gs.b_E @ params.W_E, rtol=1e-9, atol=1e-12)
