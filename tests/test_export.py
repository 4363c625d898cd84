"""SAELens export / import (jsdl.export): exact round trip, SAELens semantics, run directories, CLI."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsdl
from jsdl import export as E

D_IN, N_Q = 12, 40


def _params(spec, seed=0, d_in=D_IN):
    """Random params with non-trivial biases and positive thresholds (as training leaves them)."""
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
    p = jsdl.init_params(k1, spec, d_input=d_in)
    rep = {}
    if p.b_E is not None:
        rep["b_E"] = 0.1 * jax.random.normal(k2, p.b_E.shape)
        rep["b_D"] = jax.random.normal(k3, p.b_D.shape)
    if p.threshold is not None:
        rep["threshold"] = 0.05 + 0.2 * jax.random.uniform(k4, p.threshold.shape)
    return p.replace(**rep)


CASES = [
    dict(method="sae", activation="relu", penalties={"l1": 3e-3}),
    dict(method="sae", activation="topk", k=5, aux_coef=1 / 32),
    dict(method="sae", activation="batchtopk", k=4),
    dict(method="sae", activation="jumprelu", threshold=0.1, bandwidth=0.05, penalties={"l0": 1e-2}),
    dict(method="tied_sae", activation="relu", penalties={"l1": 1e-3}),
    dict(method="sae", activation="topk", k=3, bias=False),
    dict(method="matryoshka", activation="batchtopk", k=4, prefixes=(5, 10, 20, 40)),
    # encodes x - b_D: exported with apply_b_dec_to_input = True
    dict(method="sae", activation="jumprelu", threshold=0.1, bandwidth=0.05, penalties={"l0": 1e-2}, pre_bias=True),
    dict(method="sae", activation="topk", k=5, pre_bias=True),
]


def _spec(case):
    return jsdl.make_spec(n_latents=N_Q, **case)


def _x(n=64, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, D_IN)) * 1.5 + 0.3


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['method']}-{c['activation']}")
def test_round_trip_is_exact(tmp_path, case):
    spec = _spec(case)
    p = _params(spec)
    E.export_saelens(p, spec, tmp_path)
    p2, spec2 = E.import_saelens(tmp_path)
    assert spec2 == spec
    assert jax.tree.structure(p2) == jax.tree.structure(p)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p2)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit-exact


def test_round_trip_float64(tmp_path, x64):
    spec = _spec(CASES[3])
    p = jax.tree.map(lambda a: a.astype(jnp.float64), _params(spec))
    state, cfg = E.to_saelens(p, spec)
    assert cfg["dtype"] == "float64" and state["W_enc"].dtype == np.float64
    E.export_saelens(p, spec, tmp_path)
    p2, _ = E.import_saelens(tmp_path)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_saelens_layout_and_names():
    spec = _spec(CASES[1])
    p = _params(spec)
    state, cfg = E.to_saelens(p, spec, metadata={"model_name": "m", "hook_name": "blocks.3.hook_resid_post"})
    assert set(state) == {"W_enc", "W_dec", "b_enc", "b_dec"}
    assert state["W_enc"].shape == (D_IN, N_Q) and state["W_dec"].shape == (N_Q, D_IN)
    assert state["b_enc"].shape == (N_Q,) and state["b_dec"].shape == (D_IN,)
    np.testing.assert_array_equal(state["W_enc"], np.asarray(p.W_E).T)
    np.testing.assert_array_equal(state["W_dec"], np.asarray(p.W_D).T)
    assert cfg["architecture"] == "topk" and cfg["k"] == 5 and cfg["rescale_acts_by_decoder_norm"] is False
    assert cfg["d_in"] == D_IN and cfg["d_sae"] == N_Q
    assert cfg["apply_b_dec_to_input"] is False and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg["metadata"]["sae_lens_version"] >= "6"
    json.dumps(cfg)
    s_j, c_j = E.to_saelens(_params(_spec(CASES[3])), _spec(CASES[3]))
    assert c_j["architecture"] == "jumprelu" and s_j["threshold"].shape == (N_Q,)
    s_b, c_b = E.to_saelens(_params(_spec(CASES[2])), _spec(CASES[2]))
    assert c_b["architecture"] == "jumprelu" and "k" not in c_b  # BatchTopK is saved as JumpReLU, as SAELens does


# A numpy transcription of SAELens' inference SAEs (sae_lens/saes/{standard,topk,jumprelu}_sae.py):
#   sae_in = x - b_dec * apply_b_dec_to_input;  hidden_pre = sae_in @ W_enc + b_enc
#   standard: relu(hidden_pre); topk: relu of the k largest (rescale_acts_by_decoder_norm=False);
#   jumprelu: relu(hidden_pre) * (hidden_pre > relu(threshold));  decode: acts @ W_dec + b_dec.
def _saelens_numpy(state, cfg, x):
    x = np.asarray(x, np.float64)
    W_enc, W_dec = state["W_enc"].astype(np.float64), state["W_dec"].astype(np.float64)
    b_enc, b_dec = state["b_enc"].astype(np.float64), state["b_dec"].astype(np.float64)
    sae_in = x - b_dec * float(cfg["apply_b_dec_to_input"])
    h = sae_in @ W_enc + b_enc
    arch = cfg["architecture"]
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        h = h * np.linalg.norm(W_dec, axis=1)
    if arch == "standard":
        acts = np.maximum(h, 0)
    elif arch == "topk":
        acts = np.zeros_like(h)
        idx = np.argsort(-h, axis=1)[:, : cfg["k"]]
        np.put_along_axis(acts, idx, np.maximum(np.take_along_axis(h, idx, 1), 0), 1)
    elif arch == "jumprelu":
        acts = np.maximum(h, 0) * (h > np.maximum(state["threshold"].astype(np.float64), 0))
    else:
        raise AssertionError(arch)
    dec_acts = acts / np.linalg.norm(W_dec, axis=1) if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm") else acts
    return acts, dec_acts @ W_dec + b_dec


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['method']}-{c['activation']}")
def test_exported_weights_mean_the_same_under_saelens_semantics(case):
    spec = _spec(case)
    p = _params(spec)
    state, cfg = E.to_saelens(p, spec)
    x = _x()
    acts, recon = _saelens_numpy(state, cfg, x)
    codes = jsdl.encode(p, x, spec, inference=True)  # BatchTopK: the per-sample inference rule
    np.testing.assert_allclose(np.asarray(codes), acts, rtol=1e-5, atol=1e-5)
    assert (np.asarray(codes) != 0).sum() > 0
    np.testing.assert_array_equal(np.asarray(codes) != 0, acts != 0)  # identical active sets
    np.testing.assert_allclose(np.asarray(jsdl.decode(p, codes, spec)), recon, rtol=1e-5, atol=1e-5)


def test_import_of_native_saelens_files_folds_b_dec_and_rescaling(tmp_path):
    """Files written by SAELens itself (apply_b_dec_to_input=True, TopK rescale_acts_by_decoder_norm)."""
    rng = np.random.default_rng(0)
    d_in, d_sae = 10, 30
    state = {
        "W_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32),
        "W_dec": rng.normal(size=(d_sae, d_in)).astype(np.float32),
        "b_enc": (0.1 * rng.normal(size=d_sae)).astype(np.float32),
        "b_dec": rng.normal(size=d_in).astype(np.float32),
        "threshold": np.abs(rng.normal(size=d_sae)).astype(np.float32),
    }
    x = rng.normal(size=(50, d_in)).astype(np.float32)
    for arch, extra in (("standard", {}), ("topk", {"k": 6, "rescale_acts_by_decoder_norm": True}),
                        ("jumprelu", {})):
        st = {k: v for k, v in state.items() if arch == "jumprelu" or k != "threshold"}
        cfg = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "apply_b_dec_to_input": True,
               "normalize_activations": "none", "metadata": {"sae_lens_version": "6.5.0"}, **extra}
        d = tmp_path / arch
        d.mkdir()
        from jsdl.data.files import write_safetensors

        write_safetensors(str(d / "sae_weights.safetensors"), st)
        (d / "cfg.json").write_text(json.dumps(cfg))
        p, spec = E.import_saelens(str(d))
        acts, recon = _saelens_numpy(st, cfg, x)
        codes = np.asarray(jsdl.encode(p, jnp.asarray(x), spec))
        np.testing.assert_allclose(codes, acts if arch != "topk" else acts, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(jsdl.decode(p, jnp.asarray(codes), spec)), recon, rtol=1e-4, atol=1e-4)
    bad = dict(cfg, normalize_activations="expected_average_only_in")
    (tmp_path / "jumprelu" / "cfg.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="normalize_activations"):
        E.import_saelens(str(tmp_path / "jumprelu"))


def test_export_errors():
    spec = jsdl.make_spec("transcoder", "relu", n_latents=8)
    with pytest.raises(ValueError, match="method 'transcoder'"):
        E.to_saelens(jsdl.init_params(jax.random.PRNGKey(0), spec, 4, 3), spec)
    spec = jsdl.make_spec("sae", "identity", n_latents=8)
    with pytest.raises(ValueError, match="activations .* not 'identity'"):
        E.to_saelens(jsdl.init_params(jax.random.PRNGKey(0), spec, 4), spec)
    spec = jsdl.make_spec("sae", "topk", n_latents=8, k=2, relu=False)
    with pytest.raises(ValueError, match="relu=False"):
        E.to_saelens(jsdl.init_params(jax.random.PRNGKey(0), spec, 4), spec)
    spec = jsdl.make_spec("sae", "jumprelu", n_latents=8)
    p = jsdl.init_params(jax.random.PRNGKey(0), spec, 4)
    with pytest.raises(ValueError, match="1 jumprelu thresholds are negative"):
        E.to_saelens(p.replace(threshold=p.threshold.at[3].set(-0.1)), spec)
    pop = jax.tree.map(lambda a: jnp.stack([a, a]), p)
    with pytest.raises(ValueError, match="one model at a time"):
        E.to_saelens(pop, spec)
    with pytest.raises(FileNotFoundError, match="nonexistent-dir: sae_weights.safetensors is missing"):
        E.import_saelens("/nonexistent-dir")


def test_export_folds_normalization(tmp_path):
    spec = _spec(CASES[3])  # JumpReLU: thresholds act on pre-activations, unchanged by the fold
    p = _params(spec)
    s = 0.37
    E.export_saelens(p, spec, tmp_path, normalization={"input_scale": s, "target_scale": s})
    q, spec2 = E.import_saelens(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["metadata"]["jsdl"]["folded_normalization"] == {"input_scale": s, "target_scale": s}
    x = _x() * 10.0  # raw activations
    c_norm = jsdl.encode(p, x * s, spec)
    np.testing.assert_allclose(jsdl.encode(q, x, spec2), c_norm, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(jsdl.decode(q, c_norm, spec2), jsdl.decode(p, c_norm, spec) / s, rtol=1e-5, atol=1e-5)
    # a tied model is untied by the fold (encoder and decoder no longer transposes)
    tspec = _spec(CASES[4])
    tp = _params(tspec)
    state, cfg = E.to_saelens(tp, tspec, input_scale=2.0)
    np.testing.assert_allclose(state["W_enc"], 2.0 * state["W_dec"].T * 2.0, rtol=1e-6)
    assert cfg["metadata"]["jsdl"]["spec"]["method"] == "sae"


# ------------------------------------------------------------------------------------------------
# Run directories and the CLI
# ------------------------------------------------------------------------------------------------


def _train_run(tmp_path, normalize=True):
    from jsdl.data.files import ActivationFiles, write_shards
    from jsdl.train import TrainConfig, fit

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(16, D_IN))
    codes = rng.exponential(size=(2048, 16)) * (rng.random((2048, 16)) < 0.2)
    x = (codes @ feats * 5.0).astype(np.float32)
    write_shards(tmp_path / "acts", x, rows_per_shard=512)
    src = ActivationFiles(tmp_path / "acts", holdout=0.1, chunk_rows=64, shuffle_buffer=512, normalize=normalize)
    spec = jsdl.make_spec("sae", "topk", n_latents=N_Q, k=4)
    cfg = TrainConfig(steps=30, batch_size=64, learning_rate=3e-3, log_every=10, plots=False, progress=False)
    run_dir = tmp_path / "run"
    state, _ = fit(jax.random.PRNGKey(0), spec, src.batches(64, seed=0), cfg, out_dir=str(run_dir),
                   record={"data": src.info()})
    return run_dir, state, spec, src, x


def test_export_run_directory_and_cli(tmp_path):
    run_dir, state, spec, src, x = _train_run(tmp_path)
    out = tmp_path / "sae"
    from jsdl.cli import main

    assert main(["export", "--format", "saelens", str(run_dir), str(out), "--hook-name", "layer3"]) == 0
    assert (out / "sae_weights.safetensors").is_file() and (out / "cfg.json").is_file()
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "layer3"
    s = src.info()["normalization"]["input_scale"]
    assert cfg["metadata"]["jsdl"]["folded_normalization"]["input_scale"] == s
    q, spec2 = E.import_saelens(str(out))
    assert spec2 == spec
    # the exported SAE on raw activations == the trained SAE on normalised activations, rescaled
    p = jax.device_get(state.params)
    xr = jnp.asarray(x[:128])
    c = jsdl.encode(p, xr * s, spec)
    np.testing.assert_allclose(jsdl.encode(q, xr, spec2), c, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(jsdl.decode(q, c, spec2), jsdl.decode(p, c, spec) / s, rtol=1e-4, atol=1e-4)
    assert main(["export", "--check", str(out)]) == 0
    assert main(["export", "--format", "saelens", str(tmp_path / "no-run"), str(tmp_path / "o2")]) == 2


# ------------------------------------------------------------------------------------------------
# Cross-check against SAELens itself (when installed)
# ------------------------------------------------------------------------------------------------

_SAELENS_SCRIPT = r"""
import json, sys, numpy as np, torch
from sae_lens import SAE
d = sys.argv[1]
x = torch.from_numpy(np.load(d + "/x.npy"))
out = {}
for name in json.load(open(d + "/names.json")):
    sae = SAE.load_from_disk(d + "/" + name, device="cpu")
    sae.eval()
    with torch.no_grad():
        acts = sae.encode(x)
        recon = sae.decode(acts)
    np.save(d + "/" + name + "_acts.npy", acts.numpy())
    np.save(d + "/" + name + "_recon.npy", recon.numpy())
    out[name] = type(sae).__name__
print(json.dumps(out))
"""


def _saelens_python():
    try:
        import sae_lens  # noqa: F401

        return sys.executable
    except ImportError:
        pass
    py = os.environ.get("JSDL_SAELENS_PYTHON")
    if py and shutil.which(py) or (py and os.path.isfile(py)):
        return py
    return None


def test_cross_check_with_saelens(tmp_path):
    py = _saelens_python()
    if py is None:
        pytest.skip("sae-lens is not installed (set JSDL_SAELENS_PYTHON to a python that has it)")
    x = np.asarray(_x(n=128))
    np.save(tmp_path / "x.npy", x)
    names, ours = [], {}
    for i, case in enumerate(CASES):
        # tied / bias-free / matryoshka models export as plain SAEs (W_dec = W_E, zero biases, full dictionary)
        spec = _spec(case)
        p = _params(spec, seed=i)
        name = f"m{i}_{case['method']}_{case['activation']}"
        E.export_saelens(p, spec, str(tmp_path / name))
        codes = jsdl.encode(p, jnp.asarray(x), spec, inference=True)
        ours[name] = (np.asarray(codes), np.asarray(jsdl.decode(p, codes, spec)))
        names.append(name)
    (tmp_path / "names.json").write_text(json.dumps(names))
    r = subprocess.run([py, "-c", _SAELENS_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    classes = json.loads(r.stdout.strip().splitlines()[-1])
    for name in names:
        acts = np.load(tmp_path / f"{name}_acts.npy")
        recon = np.load(tmp_path / f"{name}_recon.npy")
        np.testing.assert_array_equal(ours[name][0] != 0, acts != 0, err_msg=name)
        np.testing.assert_allclose(ours[name][0], acts, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(ours[name][1], recon, rtol=1e-5, atol=1e-5, err_msg=name)
    assert classes[names[0]] == "StandardSAE" and classes[names[1]] == "TopKSAE" and classes[names[2]] == "JumpReLUSAE"
