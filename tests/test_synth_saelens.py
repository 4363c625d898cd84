"""jsdl's SynthSAEBench generator and metrics against SAELens's ``sae_lens.synthetic``.

Needs a Python with sae-lens: the running one, or ``JSDL_SAELENS_PYTHON`` (e.g. the bench
environment, ``make .venv-bench/.jsdl-bench-installed`` then
``JSDL_SAELENS_PYTHON=.venv-bench/bin/python pytest tests/test_synth_saelens.py``). Skipped
otherwise. SAELens runs in a subprocess on files this test writes, so jsdl's side is the tested
code, unchanged.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsdl
from jsdl import export as E
from jsdl import metrics
from jsdl.data import make_synth
from jsdl.objective import Batch


def _saelens_python():
    try:
        import sae_lens  # noqa: F401

        return sys.executable
    except ImportError:
        py = os.environ.get("JSDL_SAELENS_PYTHON")
        return py if py and os.path.isfile(py) else None


@pytest.fixture(scope="module")
def py():
    p = _saelens_python()
    if p is None:
        pytest.skip("sae-lens is not installed (set JSDL_SAELENS_PYTHON to a python that has it)")
    return p


def _run(py, script, *args):
    r = subprocess.run([py, "-c", script, *map(str, args)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# Metrics: equal to eval_sae_on_synthetic_data on the same SAE and the same samples
# --------------------------------------------------------------------------------------------------

_EVAL_SCRIPT = r"""
import json, sys, numpy as np, torch
from sae_lens import SAE
from sae_lens.synthetic import FeatureDictionary, eval_sae_on_synthetic_data
d = sys.argv[1]
x = torch.from_numpy(np.load(d + "/x.npy")); f = torch.from_numpy(np.load(d + "/f.npy"))
E = torch.from_numpy(np.load(d + "/E.npy")); bsz = int(sys.argv[2])

class Feeds:  # hands out the stored feature activations in order
    def __init__(self): self.i = 0
    def sample(self, n):
        out = f[self.i:self.i + n]; self.i += n; return out

class Dict(FeatureDictionary):  # the stored inputs for those activations (bitwise jsdl's x)
    def forward(self, acts):
        self.i = getattr(self, "i", 0); out = x[self.i:self.i + acts.shape[0]]; self.i += acts.shape[0]; return out

out = {}
for name in json.load(open(d + "/names.json")):
    fd = Dict(E.shape[0], E.shape[1], bias=False, initializer=None)
    fd.feature_vectors.data = E
    sae = SAE.load_from_disk(d + "/" + name, device="cpu")
    r = eval_sae_on_synthetic_data(sae, fd, Feeds(), num_samples=x.shape[0], batch_size=bsz)
    out[name] = dict(r.to_dict(), cls=type(sae).__name__)
print(json.dumps(out))
"""


def _near_gt_params(spec, bench, key, noise):
    """An SAE whose first latents are noisy copies of ground-truth features (non-trivial metrics)."""
    p = jsdl.init_params(key, spec, bench.d_input)
    n_q = spec.n_latents
    Ef = np.asarray(bench.W_p).T[:n_q]
    W = Ef + noise * np.asarray(jax.random.normal(jax.random.fold_in(key, 1), Ef.shape))
    W[n_q // 2:] = np.asarray(p.W_E)[n_q // 2:]  # half of the latents stay random
    th = None if p.threshold is None else jnp.full((n_q,), 1.0, p.W_E.dtype)
    return p.replace(W_E=jnp.asarray(W, p.W_E.dtype), W_D=jnp.asarray(W.T, p.W_E.dtype),
                     b_E=jnp.full((n_q,), -0.5, p.W_E.dtype), threshold=th)


CASES = [("topk", dict(k=6)), ("relu", {}), ("jumprelu", dict(threshold=1.0, bandwidth=0.1)), ("batchtopk", dict(k=6))]


def test_metrics_equal_saelens_eval(py, tmp_path):
    bench = make_synth(jax.random.PRNGKey(0), "tiny", n_features=256, d_input=32, n_roots=4, depth=2,
                       correlation_rank=4, orthogonalize_steps=10)
    bsz, nb = 1500, 3
    batches = [bench.sample(jax.random.PRNGKey(10 + i), bsz) for i in range(nb)]
    x = np.concatenate([np.asarray(b.x_p) for b in batches])
    f = np.concatenate([np.asarray(b.features) for b in batches])
    Ef = np.asarray(bench.W_p).T.copy()
    for name, arr in (("x", x), ("f", f), ("E", Ef)):
        np.save(tmp_path / f"{name}.npy", np.ascontiguousarray(arr, np.float32))
    ours, names = {}, []
    for i, (act, hyper) in enumerate(CASES):
        spec = jsdl.make_spec("sae", act, n_latents=96, **hyper)
        p = _near_gt_params(spec, bench, jax.random.PRNGKey(i), noise=0.05 * (i + 1))
        name = f"m{i}_{act}"
        E.export_saelens(p, spec, str(tmp_path / name))
        ours[name] = metrics.synth_eval(p, spec, [Batch(x_p=b.x_p, features=b.features) for b in batches], features=Ef)
        names.append(name)
    (tmp_path / "names.json").write_text(json.dumps(names))
    theirs = _run(py, _EVAL_SCRIPT, tmp_path, bsz)
    for name in names:
        a, b = ours[name], theirs[name]
        cl = b["classification"]
        assert a["n_samples"] == x.shape[0]
        assert a["dead_latents"] == b["dead_latents"], name
        for k_ours, v in [("true_l0", b["true_l0"]), ("sae_l0", b["sae_l0"]), ("mcc", b["mcc"]),
                          ("uniqueness", b["uniqueness"]), ("precision", cl["precision"]), ("recall", cl["recall"]),
                          ("f1", cl["f1_score"]), ("accuracy", cl["accuracy"]), ("shrinkage", b["shrinkage"]),
                          ("explained_variance", b["explained_variance"])]:
            # float32 encoders on both sides; counts are exact unless a code sits on a threshold
            assert a[k_ours] == pytest.approx(v, rel=2e-5, abs=2e-6), (name, k_ours, a[k_ours], v)
        assert 0.05 < a["f1"] < 0.99 and 0.3 < a["mcc"] < 0.99, (name, a)  # non-trivial operating point


# --------------------------------------------------------------------------------------------------
# Generator statistics: same config -> same distribution as sae_lens.synthetic.SyntheticModel
# --------------------------------------------------------------------------------------------------

_GEN_SCRIPT = r"""
import json, sys, numpy as np, torch
from sae_lens.synthetic import (SyntheticModel, SyntheticModelConfig, ZipfianFiringProbabilityConfig, HierarchyConfig,
    LowRankCorrelationConfig, LinearMagnitudeConfig, FoldedNormalMagnitudeConfig, OrthogonalizationConfig)
c = json.loads(sys.argv[1]); N = int(sys.argv[2]); out = sys.argv[3]
cfg = SyntheticModelConfig(
    num_features=c["n_features"], hidden_dim=c["d_input"],
    firing_probability=ZipfianFiringProbabilityConfig(exponent=c["zipf_exponent"], max_prob=c["max_prob"], min_prob=c["min_prob"]),
    hierarchy=HierarchyConfig(total_root_nodes=c["n_roots"], branching_factor=c["branching"], max_depth=c["depth"],
        mutually_exclusive_portion=c["mutually_exclusive_portion"], mutually_exclusive_min_depth=c["mutually_exclusive_min_depth"],
        compensate_probabilities=c["compensate_probabilities"], scale_children_by_parent=c["scale_children_by_parent"]),
    orthogonalization=OrthogonalizationConfig(num_steps=c["orthogonalize_steps"], lr=c["orthogonalize_lr"]),
    correlation=LowRankCorrelationConfig(rank=c["correlation_rank"], correlation_scale=c["correlation_scale"]) if c["correlation_rank"] else None,
    mean_firing_magnitudes=LinearMagnitudeConfig(start=c["magnitude_mean_start"], end=c["magnitude_mean_end"]),
    std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=c["magnitude_std_mean"], std=c["magnitude_std_std"]),
    bias=c["bias"], seed=int(sys.argv[4]))
torch.manual_seed(int(sys.argv[4]))
m = SyntheticModel(cfg)
f = torch.cat([m.activation_generator.sample(5000) for _ in range(N // 5000)]).numpy()
np.save(out + "/f.npy", f)
np.save(out + "/probs.npy", m.activation_generator.firing_probabilities.numpy())
np.save(out + "/std.npy", m.activation_generator.std_firing_magnitudes.numpy())
h = m.hierarchy
par = -np.ones(c["n_features"], np.int64)
def walk(node):
    for ch in node.children:
        par[ch.feature_index] = node.feature_index; walk(ch)
for r in h.roots: walk(r)
np.save(out + "/parent_of.npy", par)
print(json.dumps({"ok": True}))
"""


def _stats(f, parent_of):
    act = f > 0
    rate = act.mean(0)
    mean_mag = np.where(act.sum(0) > 0, (f * act).sum(0) / np.maximum(act.sum(0), 1), np.nan)
    c = np.flatnonzero(parent_of >= 0)
    orphan = int((act[:, c] & ~act[:, parent_of[c]]).sum())
    max_sib = max(int(act[:, parent_of == p].sum(1).max()) for p in np.unique(parent_of[c]))
    return act, rate, mean_mag, orphan, max_sib


@pytest.mark.parametrize("sampler", ["jax", "native"])
@pytest.mark.parametrize("correlated", [False, True])
def test_generator_statistics_agree_with_saelens(py, tmp_path, correlated, sampler):
    """Both of jsdl's samplers (SynthBench.sampler) against SAELens's generator."""
    from jsdl.data.synth import synth_config

    cfg = synth_config("tiny", n_features=512, d_input=32, n_roots=8, depth=2, orthogonalize_steps=5,
                       correlation_rank=8 if correlated else 0, correlation_scale=0.15)
    N = 100_000
    c = cfg.to_dict()
    _run(py, _GEN_SCRIPT, json.dumps(c), N, tmp_path, 3)
    f_s = np.load(tmp_path / "f.npy")
    po_s = np.load(tmp_path / "parent_of.npy")
    if sampler == "native":
        from jsdl import native

        if not native.supports_synth(np.float32):
            pytest.skip(f"native sampler unavailable ({native.status()})")
    bench = make_synth(jax.random.PRNGKey(3), cfg, sampler=sampler)
    f_j = np.concatenate([np.asarray(jax.jit(bench.sample_features, static_argnums=1)(jax.random.PRNGKey(i), 5000))
                          for i in range(N // 5000)])
    po_j = np.asarray(bench.parent_of)
    # Same structure: the same forest numbering and the same (compensated) base probabilities.
    np.testing.assert_array_equal(po_j, po_s)
    np.testing.assert_allclose(np.asarray(bench.probs), np.load(tmp_path / "probs.npy"), rtol=1e-5)

    act_j, r_j, m_j, orphan_j, sib_j = _stats(f_j, po_j)
    act_s, r_s, m_s, orphan_s, sib_s = _stats(f_s, po_s)
    # Hierarchy exclusivity: children never fire without their parent, exclusive siblings never co-fire.
    assert orphan_j == orphan_s == 0 and sib_j == sib_s == 1
    # True L0 per sample: means within 2% (each has standard error < 0.1%).
    l0_j, l0_s = act_j.sum(1).mean(), act_s.sum(1).mean()
    assert abs(l0_j - l0_s) < 0.02 * l0_s, (l0_j, l0_s)
    # Firing rate per feature: binomial z-scores of the difference. Independent firing: the
    # distributions are equal, so |z| < 5 for all 512 features. Correlated firing: the factor F is
    # drawn differently, which moves the rates of children (their parent-child firing correlation
    # differs) but not of roots and free features (the copula keeps marginals).
    se = np.sqrt(r_j * (1 - r_j) / N + r_s * (1 - r_s) / N) + 1e-12
    z = (r_j - r_s) / se
    marg = po_j < 0
    assert np.abs(z[marg]).max() < 5.0, np.abs(z[marg]).max()
    if not correlated:
        assert np.abs(z).max() < 5.0, np.abs(z).max()
    else:
        assert np.median(np.abs(z[~marg])) < 3.0 and np.abs(r_j - r_s)[~marg].max() < 0.25 * r_s[~marg].max()
    # Magnitudes given firing: free/root features have E = mu (mu/sigma >= 2 here, up to the folded
    # tail); children are scaled by parent / mean_parent, which averages ~1. The per-feature stds are
    # drawn independently on each side, so compare the means over feature groups: within 1%.
    for grp in (marg, ~marg):
        a, b = np.nanmean(m_j[grp]), np.nanmean(m_s[grp])
        assert abs(a - b) < 0.01 * b, (a, b)
    # Correlation of firings among the 40 most frequent free features: the spread of pairwise
    # correlations (set by rank x scale^2, not by the particular F) agrees within 25%; without
    # correlation both are sampling noise ~1/sqrt(N).
    free = np.flatnonzero(po_j < 0)
    free = free[np.argsort(-r_s[free])][:40]
    iu = np.triu_indices(40, 1)
    cj = np.corrcoef(act_j[:, free].T)[iu].std()
    cs = np.corrcoef(act_s[:, free].T)[iu].std()
    if correlated:
        assert 0.75 < cj / cs < 1.33, (cj, cs)
        assert cj > 2.5 / np.sqrt(N)  # well above the noise level 1/sqrt(N) of independent firing
    else:
        assert cj < 2 / np.sqrt(N) and cs < 2 / np.sqrt(N), (cj, cs)
