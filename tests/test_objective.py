"""Core objective: sigma property, loss vs numpy, gradients vs finite differences, jit/vmap/eager
equality, methods, and clear errors."""
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jsdl
from jsdl import activations as A
from jsdl import penalties as P

# ------------------------------------------------------------------------------------------------
# Activations: sigma(z)_i in {0, z_i} (paper eq. 10) for every registered activation
# ------------------------------------------------------------------------------------------------

ACT_CASES = {
    "identity": {},
    "relu": {},
    "jumprelu": {"threshold": 0.3},
    "topk": {"k": 5},
    "batchtopk": {"k": 5},
}


def _params_with_threshold(n_q, value, key):
    th = jnp.abs(jax.random.normal(key, (n_q,))) * value
    return jsdl.SDLParams(W_E=jnp.zeros((n_q, 1)), threshold=th)


def test_every_registered_activation_has_a_case():
    assert set(A.names()) <= set(ACT_CASES) | {"relu|topk"}, "add new activations to ACT_CASES"


@pytest.mark.parametrize("name", sorted(ACT_CASES) + ["relu|topk", "topk|relu", "relu|batchtopk"])
@pytest.mark.parametrize("inference", [False, True])
def test_sigma_property(name, inference, key):
    hyper = dict(ACT_CASES.get(name, {"k": 3}))
    sigma = A.get(name, **hyper)
    for i in range(5):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        z = jax.random.normal(k1, (16, 40)) * (i + 1)
        params = _params_with_threshold(40, 0.5, k2) if (sigma.info.needs_threshold or sigma.info.inference_threshold) else None
        out = np.asarray(sigma(z, params, inference=inference))
        z = np.asarray(z)
        ok = (out == 0) | (out == z)
        assert ok.all(), f"{name}: sigma(z)_i not in {{0, z_i}} at {np.argwhere(~ok)[:3]}"


def test_topk_keeps_exactly_k_largest(key):
    z = jax.random.normal(key, (8, 50))
    out = A.get("topk", k=7, relu=False)(z)
    assert ((out != 0).sum(-1) == 7).all()
    kth = jnp.sort(z, axis=-1)[:, -7]
    np.testing.assert_array_equal(np.asarray(out != 0), np.asarray(z >= kth[:, None]))


def test_batchtopk_keeps_k_times_batch(key):
    z = jax.random.normal(key, (8, 50)) + 3.0  # all positive, so relu removes nothing
    out = A.get("batchtopk", k=4)(z)
    assert int((out != 0).sum()) == 4 * 8
    thr = jnp.sort(z.ravel())[-32]
    np.testing.assert_array_equal(np.asarray(out != 0), np.asarray(z >= thr))


def test_batchtopk_inference_threshold(key):
    z = jax.random.normal(key, (4, 10))
    params = jsdl.SDLParams(W_E=jnp.zeros((10, 1)), threshold=jnp.full((10,), 0.5))
    out = A.get("batchtopk", k=2)(z, params, inference=True)
    np.testing.assert_array_equal(np.asarray(out), np.where(np.asarray(z) > 0.5, np.asarray(z), 0))


def test_composition_top1_relu_example_35():
    # Example 3.5: Top-1 o ReLU with W_E = [[1,1],[0,0]] fires neuron 1 for both features.
    sigma = A.get("relu|topk", k=1)
    W_E = jnp.array([[1.0, 1.0], [0.0, 0.0]])
    out = sigma(jnp.eye(2) @ W_E.T)
    np.testing.assert_allclose(out, [[1.0, 0.0], [1.0, 0.0]])


def test_activation_registry_user_defined(key):
    @A.register("_test_shrinkgate")
    def _gate(z, params=None, *, inference=False, cut=1.0):
        return jnp.where(z > cut, z, 0.0)

    s = A.get("_test_shrinkgate", cut=0.5)
    z = jax.random.normal(key, (3, 6))
    np.testing.assert_array_equal(np.asarray(s(z)), np.where(np.asarray(z) > 0.5, np.asarray(z), 0))
    with pytest.raises(ValueError, match="accepts"):
        A.get("_test_shrinkgate", bogus=1)


# ------------------------------------------------------------------------------------------------
# sdl_loss equals a plain numpy computation
# ------------------------------------------------------------------------------------------------


def _np_loss(W_E, W_D, b_E, b_D, x_p, x_r, act, l1=0.0, wl1=0.0):
    z = x_p @ W_E.T + b_E
    if act == "relu":
        c = np.maximum(z, 0)
    elif act.startswith("topk"):
        k = int(act[4:])
        c = np.zeros_like(z)
        idx = np.argsort(-z, axis=1)[:, :k]
        for r in range(z.shape[0]):
            c[r, idx[r]] = np.maximum(z[r, idx[r]], 0)
    xh = c @ W_D.T + b_D
    mse = np.mean(np.sum((x_r - xh) ** 2, -1))
    norms = np.linalg.norm(W_D, axis=0)
    pen = l1 * np.mean(np.abs(c).sum(-1)) + wl1 * np.mean((np.abs(c) * norms).sum(-1))
    fvu = np.sum((x_r - xh) ** 2) / np.sum((x_r - x_r.mean(0)) ** 2)
    l0 = np.mean((c != 0).sum(-1))
    return mse + pen, mse, fvu, l0


@pytest.mark.parametrize("act,kw", [("relu", {}), ("topk3", {"k": 3})])
@pytest.mark.parametrize("method", ["sae", "transcoder"])
def test_loss_matches_numpy(act, kw, method, x64, key):
    spec = jsdl.make_spec(method=method, activation=act.rstrip("0123456789"), n_latents=12,
                          penalties={"l1": 0.01, "weighted_l1": 0.02}, **kw)
    d_t = 5 if method == "transcoder" else None
    params = jsdl.init_params(key, spec, 7, d_t)
    ks = jax.random.split(key, 4)
    params = params.replace(b_E=0.1 * jax.random.normal(ks[0], (12,)), b_D=0.1 * jax.random.normal(ks[1], (d_t or 7,)))
    x_p = jax.random.normal(ks[2], (9, 7))
    x_r = jax.random.normal(ks[3], (9, d_t)) if d_t else None
    loss, aux = jsdl.sdl_loss(params, jsdl.Batch(x_p, x_r), spec)
    ref = _np_loss(*(np.asarray(a) for a in (params.W_E, params.W_D, params.b_E, params.b_D, x_p)),
                   np.asarray(x_r if x_r is not None else x_p), act, l1=0.01, wl1=0.02)
    np.testing.assert_allclose(float(loss), ref[0], rtol=1e-10)
    np.testing.assert_allclose(float(aux["mse"]), ref[1], rtol=1e-10)
    np.testing.assert_allclose(float(aux["fvu"]), ref[2], rtol=1e-10)
    np.testing.assert_allclose(float(aux["l0"]), ref[3], rtol=1e-12)
    for name in ("penalty/l1", "penalty/weighted_l1", "loss", "recon"):
        assert name in aux


# ------------------------------------------------------------------------------------------------
# Gradients vs central finite differences (float64)
# ------------------------------------------------------------------------------------------------


def _fd_check(f, params, key, n_dirs=6, eps=1e-6, rtol=1e-5):
    f = jax.jit(f)
    g = jax.jit(jax.grad(f))(params)
    for i in range(n_dirs):
        leaves, tdef = jax.tree.flatten(params)
        ks = jax.random.split(jax.random.fold_in(key, i), len(leaves))
        v = jax.tree.unflatten(tdef, [jax.random.normal(k, l.shape, l.dtype) for k, l in zip(ks, leaves)])
        plus = jax.tree.map(lambda p, d: p + eps * d, params, v)
        minus = jax.tree.map(lambda p, d: p - eps * d, params, v)
        fd = (f(plus) - f(minus)) / (2 * eps)
        an = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v)))
        np.testing.assert_allclose(float(an), float(fd), rtol=rtol, atol=1e-7)


@pytest.mark.parametrize(
    "method,act,pens,kw",
    [
        ("sae", "relu", {"l1": 0.05}, {}),
        ("sae", "relu", {"weighted_l1": 0.05, "tanh": 0.1, "log": 0.01, "lp": 0.02}, {}),
        ("sae", "topk", {}, {"k": 4}),
        ("tied_sae", "relu", {"l1": 0.05}, {}),
        ("skip_transcoder", "relu", {"l1": 0.01}, {}),
        ("crosscoder", "relu", {"weighted_l1": 0.05}, {"n_sources": 2}),
        ("matryoshka", "topk", {}, {"k": 4}),
    ],
)
def test_gradients_match_finite_differences(method, act, pens, kw, x64, key):
    spec = jsdl.make_spec(method=method, activation=act, n_latents=16, penalties=pens, **kw)
    L = kw.get("n_sources", 1)
    d_t = 6 if "transcoder" in method else None
    params = jsdl.init_params(key, spec, 5, d_t)
    k1, k2, k3 = jax.random.split(key, 3)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(k3, p.shape, p.dtype), params)
    x_p = jax.random.normal(k1, (10, L, 5) if L > 1 else (10, 5))
    x_r = jax.random.normal(k2, (10, d_t)) if d_t else None
    batch = jsdl.Batch(x_p, x_r)
    _fd_check(lambda p: jsdl.sdl_loss(p, batch, spec)[0], params, key)


def test_jumprelu_threshold_ste_matches_smoothed_fd(x64, key):
    """The rectangle-kernel pseudo-gradient of E[L0] wrt theta equals (up to Monte-Carlo and kernel
    bias) the finite difference of the expected L0 with a step much wider than the sample spacing:
    both estimate -p_z(theta), the density of the pre-activation at the threshold."""
    n = 200_000
    z = jax.random.normal(key, (n, 1))  # pre-activations of one latent
    bw, theta0 = 0.05, 0.4
    params = jsdl.SDLParams(W_E=jnp.zeros((1, 1)), threshold=jnp.array([theta0]))
    pen = P.get("l0", bandwidth=bw)

    def expected_l0(th):
        return pen(jnp.zeros_like(z), params.replace(threshold=th), pre_acts=z)

    ste = jax.grad(expected_l0)(jnp.array([theta0]))[0]
    h = 0.05
    fd = (expected_l0(jnp.array([theta0 + h])) - expected_l0(jnp.array([theta0 - h]))) / (2 * h)
    density = np.exp(-theta0**2 / 2) / np.sqrt(2 * np.pi)
    np.testing.assert_allclose(float(ste), float(fd), rtol=0.03)
    np.testing.assert_allclose(float(ste), -density, rtol=0.03)
    # jumprelu activation itself: d/dtheta of E[z H(z - theta)] = -theta p(theta)
    act = A.get("jumprelu", bandwidth=bw)
    g_act = jax.grad(lambda th: jnp.mean(act(z, params.replace(threshold=th))))(jnp.array([theta0]))[0]
    np.testing.assert_allclose(float(g_act), -theta0 * density, rtol=0.03)


def test_jumprelu_l0_penalty_trains_threshold(key):
    spec = jsdl.make_spec(activation="jumprelu", n_latents=8, penalties={"l0": 1.0}, threshold=0.1, bandwidth=0.2)
    params = jsdl.init_params(key, spec, 4)
    x = jax.random.normal(key, (64, 4))
    g = jax.grad(lambda p: jsdl.sdl_loss(p, jsdl.Batch(x), spec)[0])(params)
    assert float(jnp.abs(g.threshold).sum()) > 0, "the L0 penalty must reach the threshold"


def test_l0_penalty_takes_the_jumprelu_bandwidth(key):
    """One kernel width for the threshold's two straight-through gradients: ``l0`` inherits the
    activation's ``bandwidth`` unless given its own; a stored record keeps the width it recorded.
    The threshold's gradient is then -coef/(B eps) sum_b K(u) - (theta/eps) sum_b K(u) g_b with one eps
    (before this, ``l0`` kept its own default 0.001 beside a JumpReLU of width 0.05, and its
    threshold gradient differed from SAELens's by 28% on the SynthSAEBench recipe)."""
    from jsdl.objective import spec_from_dict, spec_to_dict

    def bw(spec):
        return dict(spec.penalties[0][0].hyper)["bandwidth"]

    spec = jsdl.make_spec("sae", "jumprelu", 8, penalties={"l0": 0.5}, threshold=0.1, bandwidth=0.3)
    assert bw(spec) == 0.3
    assert bw(jsdl.make_spec("sae", "jumprelu", 8, penalties={"l0": {"coef": 0.5, "bandwidth": 0.2}}, bandwidth=0.3)) == 0.2
    assert bw(jsdl.make_spec("sae", "jumprelu", 8, penalties={"l0": 0.5})) == 0.001
    assert bw(spec_from_dict(spec_to_dict(spec))) == 0.3
    old = {**spec_to_dict(spec), "penalties": {"l0": {"coef": 0.5, "bandwidth": 0.001}}}
    assert bw(spec_from_dict(old)) == 0.001

    params = jsdl.init_params(key, spec, 4)
    params = params.replace(b_E=jnp.full((8,), 0.1))  # pre-activations near the threshold
    x = 0.3 * jax.random.normal(key, (256, 4))
    z = x @ params.W_E.T + params.b_E
    codes = z * (z > params.threshold)
    g_codes = 2 * ((codes @ params.W_D.T + params.b_D) - x) @ params.W_D / x.shape[0]  # d mse / d codes
    K = (jnp.abs((z - params.threshold) / 0.3) < 0.5).astype(z.dtype)
    expect = -0.5 / (x.shape[0] * 0.3) * K.sum(0) - (params.threshold / 0.3) * (K * g_codes).sum(0)
    got = jax.grad(lambda p: jsdl.sdl_loss(p, jsdl.Batch(x), spec)[0])(params).threshold
    assert float(jnp.abs(expect).max()) > 0.1
    np.testing.assert_allclose(np.asarray(got), np.asarray(expect), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# jit, vmap over stacked params, and eager agree
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act,kw", [("relu", {}), ("topk", {"k": 3}), ("batchtopk", {"k": 3}), ("jumprelu", {})])
def test_jit_vmap_eager_agree(act, kw, key):
    pens = {"l0": 1e-2} if act == "jumprelu" else {"l1": 1e-2}
    spec = jsdl.make_spec(activation=act, n_latents=24, penalties=pens, **kw)
    keys = jax.random.split(key, 4)
    stack = jax.vmap(lambda k: jsdl.init_params(k, spec, 8))(keys)
    x = jax.random.normal(key, (16, 8))
    batch = jsdl.Batch(x)

    def f(p):
        return jsdl.sdl_loss(p, batch, spec)

    eager = [f(jax.tree.map(lambda a: a[i], stack)) for i in range(4)]
    jitted = [jax.jit(f)(jax.tree.map(lambda a: a[i], stack)) for i in range(4)]
    vm_loss, vm_aux = jax.jit(jax.vmap(f))(stack)
    for i in range(4):
        chex.assert_trees_all_close(eager[i], jitted[i], rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(eager[i][0], vm_loss[i], rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(eager[i][1], jax.tree.map(lambda a: a[i], vm_aux), rtol=1e-5, atol=1e-6)


def test_coefs_override_is_traceable(key):
    spec = jsdl.make_spec(activation="relu", n_latents=8, penalties={"l1": 0.1})
    params = jsdl.init_params(key, spec, 4)
    batch = jsdl.Batch(jax.random.normal(key, (5, 4)))
    lam = jnp.array([0.0, 0.1, 1.0])
    losses = jax.vmap(lambda c: jsdl.sdl_loss(params, batch, spec, coefs={"l1": c})[0])(lam)
    _, aux = jsdl.sdl_loss(params, batch, spec)
    np.testing.assert_allclose(losses, aux["recon"] + lam * aux["penalty/l1"], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Methods
# ------------------------------------------------------------------------------------------------


def test_tied_sae_has_one_weight_matrix(key):
    spec = jsdl.make_spec(method="tied_sae", n_latents=10)
    params = jsdl.init_params(key, spec, 6)
    assert params.W_D is None
    mats = [l for l in jax.tree.leaves(params) if l.ndim == 2]
    assert len(mats) == 1
    np.testing.assert_array_equal(params.decoder, params.W_E.T)
    assert jsdl.make_spec(method="sae", tied=True, n_latents=4).tied


@pytest.mark.parametrize("method", jsdl.methods.names())
def test_every_method_runs_through_sdl_loss(method, key):
    kw = {"n_sources": 3} if method == "crosscoder" else {}
    spec = jsdl.make_spec(method=method, activation="topk", k=2, n_latents=16, **kw)
    own_target = not jsdl.methods.get(method).self_target
    params = jsdl.init_params(key, spec, 4, 5 if own_target else None)
    L = kw.get("n_sources", 1)
    x_p = jax.random.normal(key, (6, L, 4) if L > 1 else (6, 4))
    x_r = jax.random.normal(key, (6, 5)) if own_target else None
    loss, aux = jax.jit(lambda p, b: jsdl.sdl_loss(p, b, spec))(params, jsdl.Batch(x_p, x_r))
    assert np.isfinite(float(loss))
    for key_ in ("mse", "fvu", "l0", "loss"):
        assert key_ in aux
    codes = jsdl.encode(params, x_p, spec)
    assert codes.shape == (6, 16)
    rec = jsdl.decode(params, codes, spec, x_p)
    assert rec.shape == (6, (5 if own_target else 4 * L))


def test_skip_transcoder_uses_skip(key):
    spec = jsdl.make_spec(method="skip_transcoder", activation="relu", n_latents=8)
    params = jsdl.init_params(key, spec, 4, 3)
    W_S = jax.random.normal(key, (3, 4))
    params = params.replace(W_S=W_S, W_D=jnp.zeros_like(params.W_D), b_D=jnp.zeros(3))
    x = jax.random.normal(key, (5, 4))
    np.testing.assert_allclose(jsdl.decode(params, jsdl.encode(params, x, spec), spec, x), x @ W_S.T, rtol=1e-6)
    with pytest.raises(ValueError, match="needs x_p"):
        jsdl.decode(params, jsdl.encode(params, x, spec), spec)


def test_matryoshka_prefix_losses(x64, key):
    spec = jsdl.make_spec(method="matryoshka", activation="relu", n_latents=8, prefixes=(2, 4, 8), prefix_weights=(1.0, 2.0, 3.0))
    params = jsdl.init_params(key, spec, 5, )
    x = jax.random.normal(key, (7, 5))
    _, aux = jsdl.sdl_loss(params, jsdl.Batch(x), spec)
    codes = np.asarray(jsdl.encode(params, x, spec))
    W_D, b_D, xn = np.asarray(params.W_D), np.asarray(params.b_D), np.asarray(x)
    ref = sum(w * np.mean(np.sum((xn - codes[:, :m] @ W_D[:, :m].T - b_D) ** 2, -1)) for m, w in [(2, 1.0), (4, 2.0), (8, 3.0)])
    np.testing.assert_allclose(float(aux["recon"]), ref, rtol=1e-10)


def test_crosscoder_weighted_l1_sums_source_norms(x64, key):
    spec = jsdl.make_spec(method="crosscoder", n_latents=6, n_sources=2, penalties={"weighted_l1": 1.0})
    params = jsdl.init_params(key, spec, 3)
    norms = P.decoder_norms(params, 2)
    W = np.asarray(params.W_D)
    np.testing.assert_allclose(norms, np.linalg.norm(W[:3], axis=0) + np.linalg.norm(W[3:], axis=0))


# ------------------------------------------------------------------------------------------------
# Clear errors before compilation
# ------------------------------------------------------------------------------------------------


def test_error_unknown_activation_lists_known():
    with pytest.raises(ValueError, match=r"unknown activation 'sigmoidz'.*relu.*topk"):
        jsdl.make_spec(activation="sigmoidz")


def test_error_unknown_penalty_lists_known():
    with pytest.raises(ValueError, match=r"unknown penalty 'l3'.*l1"):
        jsdl.make_spec(penalties={"l3": 0.1})


def test_error_unknown_method():
    with pytest.raises(ValueError, match=r"unknown method 'autoencoder'.*sae"):
        jsdl.make_spec(method="autoencoder")


def test_error_k_exceeds_latents():
    with pytest.raises(ValueError, match=r"k=100 exceeds n_latents=10"):
        jsdl.make_spec(activation="topk", k=100, n_latents=10)


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), "x"])
def test_error_bad_coefficient(bad):
    with pytest.raises((ValueError, TypeError), match="l1"):
        jsdl.make_spec(penalties={"l1": bad})


def test_error_unknown_hyperparameter():
    with pytest.raises(ValueError, match=r"does not take \['kk'\]"):
        jsdl.make_spec(activation="topk", kk=3)


def test_error_l0_needs_jumprelu():
    with pytest.raises(ValueError, match="jumprelu"):
        jsdl.make_spec(activation="relu", penalties={"l0": 0.1})


def test_error_mismatched_batch_shapes(key):
    spec = jsdl.make_spec(method="transcoder", n_latents=8)
    params = jsdl.init_params(key, spec, 4, 3)
    with pytest.raises(ValueError, match=r"x_p has shape \(5, 6\).*W_E has shape \(8, 4\)"):
        jsdl.sdl_loss(params, jsdl.Batch(jnp.zeros((5, 6)), jnp.zeros((5, 3))), spec)
    with pytest.raises(ValueError, match=r"x_r has shape \(5, 4\).*decoder has shape \(3, 8\)"):
        jsdl.sdl_loss(params, jsdl.Batch(jnp.zeros((5, 4)), jnp.zeros((5, 4))), spec)
    with pytest.raises(ValueError, match=r"batch size mismatch.*\(5, 4\).*\(6, 3\)"):
        jsdl.sdl_loss(params, jsdl.Batch(jnp.zeros((5, 4)), jnp.zeros((6, 3))), spec)
    with pytest.raises(ValueError, match="needs a target"):
        jsdl.sdl_loss(params, jsdl.Batch(jnp.zeros((5, 4))), spec)


def test_error_crosscoder_sources(key):
    with pytest.raises(ValueError, match="n_sources >= 2"):
        jsdl.make_spec(method="crosscoder")
    spec = jsdl.make_spec(method="crosscoder", n_sources=2, n_latents=8)
    params = jsdl.init_params(key, spec, 4)
    with pytest.raises(ValueError, match=r"x_p has 3 sources.*n_sources=2"):
        jsdl.sdl_loss(params, jsdl.Batch(jnp.zeros((5, 3, 4))), spec)
    with pytest.raises(ValueError, match="n_sources"):
        jsdl.make_spec(method="sae", n_sources=2)


def test_error_matryoshka_prefixes():
    with pytest.raises(ValueError, match="ending at n_latents=8"):
        jsdl.make_spec(method="matryoshka", n_latents=8, prefixes=(2, 4))
    with pytest.raises(ValueError, match="only apply to method 'matryoshka'"):
        jsdl.make_spec(prefixes=(2, 4))


def test_errors_raised_before_compilation(key):
    """Shape errors come from Python checks at trace time, not from XLA."""
    spec = jsdl.make_spec(n_latents=8)
    params = jsdl.init_params(key, spec, 4)
    with pytest.raises(ValueError, match="x_p has shape"):
        jax.jit(lambda p, b: jsdl.sdl_loss(p, b, spec))(params, jsdl.Batch(jnp.zeros((2, 5))))


# ------------------------------------------------------------------------------------------------
# A user-defined penalty trains with no change to jsdl
# ------------------------------------------------------------------------------------------------


def test_user_penalty_trains(key):
    @P.register("_test_sqrt")
    def sqrt_penalty(codes, params, *, eps=1e-6):
        return jnp.sum(jnp.sqrt(jnp.abs(codes) + eps), axis=-1).mean()

    spec = jsdl.make_spec(activation="relu", n_latents=32, penalties={"_test_sqrt": 1e-3})
    params = jsdl.init_params(key, spec, 8)
    x = jax.nn.relu(jax.random.normal(key, (128, 8)))
    opt = optax.adam(1e-2)
    st = opt.init(params)

    @jax.jit
    def step(p, s):
        (l, aux), g = jax.value_and_grad(jsdl.sdl_loss, has_aux=True)(p, jsdl.Batch(x), spec)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, l, aux

    losses = []
    for _ in range(30):
        params, st, l, aux = step(params, st)
        losses.append(float(l))
    assert losses[-1] < 0.5 * losses[0]
    assert "penalty/_test_sqrt" in aux


def test_spec_is_hashable_and_static(key):
    s1 = jsdl.make_spec(activation="topk", k=4, n_latents=8, penalties={"l1": 0.1})
    s2 = jsdl.make_spec(activation="topk", k=4, n_latents=8, penalties={"l1": 0.1})
    assert hash(s1) == hash(s2) and s1 == s2
    assert jax.tree.leaves(s1) == []
    f = jax.jit(lambda p, b, s: jsdl.sdl_loss(p, b, s)[0], static_argnums=2)
    params = jsdl.init_params(key, s1, 4)
    f(params, jsdl.Batch(jnp.ones((2, 4))), s1)
    f(params, jsdl.Batch(jnp.ones((2, 4))), s2)
    assert f._cache_size() == 1


@pytest.mark.parametrize(
    "kw",
    [
        dict(method="matryoshka", activation="topk", k=3, n_latents=64, penalties={"lp": (0.1, {"p": 0.5})}, sparse=False),
        dict(method="crosscoder", n_sources=3, activation="jumprelu", penalties={"l0": 0.1}, threshold=0.2),
        dict(method="tied_sae", activation="relu|topk", k=1, n_latents=8, bias=False, aux_coef=0.5),
    ],
)
def test_spec_json_round_trip(kw):
    import json

    spec = jsdl.make_spec(**kw)
    assert jsdl.spec_from_dict(json.loads(json.dumps(jsdl.spec_to_dict(spec)))) == spec


@pytest.mark.parametrize("activation,hyper", [("relu", {}), ("jumprelu", {"threshold": 0.05, "bandwidth": 0.1}),
                                               ("topk", {"k": 3})])
def test_pre_bias_is_a_reparameterisation_with_the_right_gradient(x64, activation, hyper):
    """``pre_bias``: z = W_E (x - b_D) + b_E. Its loss equals the plain model's with b_E - W_E b_D,
    and the gradient of every parameter (b_D's path through the encoder included) matches central
    finite differences in float64."""
    d, n_q, B = 6, 16, 24
    pens = {"l1": 1e-2} if activation == "relu" else {"l0": 1e-2} if activation == "jumprelu" else {}
    spec = jsdl.make_spec("sae", activation, n_q, penalties=pens, pre_bias=True, sparse=False, **hyper)
    assert spec.pre_bias and "pre_bias" in spec.describe()
    assert jsdl.spec_from_dict(jsdl.spec_to_dict(spec)) == spec
    params = jsdl.init_params(jax.random.PRNGKey(0), spec, d, dtype=jnp.float64)
    params = params.replace(b_D=jax.random.normal(jax.random.PRNGKey(1), (d,), jnp.float64),
                            b_E=0.1 * jax.random.normal(jax.random.PRNGKey(2), (n_q,), jnp.float64))
    batch = jsdl.Batch(x_p=jax.random.normal(jax.random.PRNGKey(3), (B, d), jnp.float64))
    loss = lambda p, s=spec: jsdl.sdl_loss(p, batch, s)[0]  # noqa: E731
    plain = jsdl.make_spec("sae", activation, n_q, penalties=pens, sparse=False, **hyper)
    np.testing.assert_allclose(loss(params.replace(b_E=params.b_E - params.W_E @ params.b_D), plain), loss(params),
                               rtol=1e-12)
    z = jsdl.pre_activations(params, batch.x_p, spec)
    np.testing.assert_allclose(z, (batch.x_p - params.b_D) @ params.W_E.T + params.b_E, rtol=1e-12)
    if activation == "jumprelu":
        return  # its threshold gradient is a straight-through estimate, not the derivative
    g = jax.grad(loss)(params)
    leaves, tree = jax.tree.flatten(params)
    dirs = jax.tree.unflatten(tree, [jax.random.normal(jax.random.PRNGKey(10 + i), l.shape, l.dtype)
                                     for i, l in enumerate(leaves)])
    eps = 1e-6
    shift = lambda s: jax.tree.map(lambda p, v: p + s * v, params, dirs)  # noqa: E731
    fd = (loss(shift(eps)) - loss(shift(-eps))) / (2 * eps)
    an = sum(jnp.sum(a * v) for a, v in zip(jax.tree.leaves(g), jax.tree.leaves(dirs)))
    np.testing.assert_allclose(an, fd, rtol=1e-6)
    assert float(jnp.abs(g.b_D).max()) > 0


def test_pre_bias_errors():
    with pytest.raises(ValueError, match="needs bias=True"):
        jsdl.make_spec("sae", "relu", 8, bias=False, pre_bias=True)
    with pytest.raises(ValueError, match="reconstructs its input"):
        jsdl.make_spec("transcoder", "relu", 8, pre_bias=True)
    with pytest.raises(TypeError, match="pre_bias must be a bool"):
        jsdl.make_spec("sae", "relu", 8, pre_bias=1)


def test_decoder_product_barrier_form_has_the_plain_products_value_and_derivatives():
    """``decoder_product`` routes ``W_D^T`` through an optimisation barrier on the CPU from
    ``ROWS_PRODUCT_MIN_NR x ROWS_PRODUCT_MIN_NQ`` on (a faster gradient form for XLA's CPU dot):
    value, reverse- and forward-mode derivatives equal those of ``codes @ W_D.T``; below the
    threshold the program has no barrier."""
    from jsdl.objective import ROWS_PRODUCT_MIN_NQ, ROWS_PRODUCT_MIN_NR, decoder_product

    n_r, n_q = ROWS_PRODUCT_MIN_NR, ROWS_PRODUCT_MIN_NQ
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
    codes = jax.nn.relu(jax.random.normal(k1, (8, n_q)))
    W = 0.05 * jax.random.normal(k2, (n_r, n_q))
    target = jax.random.normal(k3, (8, n_r))

    def loss(f):
        return lambda W, c: jnp.sum((f(c, W) - target) ** 2)

    new, ref = loss(decoder_product), loss(lambda c, W: c @ W.T)
    if jax.default_backend() == "cpu":
        assert "optimization_barrier" in jax.jit(new).lower(W, codes).as_text()
        assert "optimization_barrier" not in jax.jit(new).lower(W[:, :128], codes[:, :128]).as_text()
        # the compiled gradient's product is the [n_q, n_r] one (codes^T g), not g^T codes
        hlo = jax.jit(jax.grad(new)).lower(W, codes).compile().as_text()
        assert re.search(rf"f32\[{n_q},{n_r}\]\S* dot\(", hlo), hlo
    np.testing.assert_allclose(jax.jit(new)(W, codes), ref(W, codes), rtol=1e-5)
    for a, b in zip(jax.jit(jax.grad(new, argnums=(0, 1)))(W, codes), jax.grad(ref, argnums=(0, 1))(W, codes)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))
    tW = jax.random.normal(k3, W.shape)
    _, t_new = jax.jvp(lambda W: new(W, codes), (W,), (tW,))
    _, t_ref = jax.jvp(lambda W: ref(W, codes), (W,), (tW,))
    np.testing.assert_allclose(t_new, t_ref, rtol=1e-4)
