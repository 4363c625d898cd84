"""Penalty lab: the mechanical checks catch broken penalties (NaN, non-jittable, permutation
breaking, zero gradient) with a message and without crashing; the ground-truth analysis sees what
is known of L1; a tiny lab run writes its report; a user file registers through --import."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsdl
from jsdl.lab import checks as lab_checks
from jsdl.lab import critical as lab_critical


# -- penalties that are broken in one way each (registered once for the module) ----------------

@jsdl.penalties.register("_lab_nan")
def _nan_penalty(codes, params):
    """log of the codes: -inf at every exact zero."""
    return jnp.mean(jnp.sum(jnp.log(codes), axis=-1))


@jsdl.penalties.register("_lab_sqrt")
def _sqrt_penalty(codes, params):
    """finite value, infinite gradient at 0."""
    return jnp.mean(jnp.sum(jnp.sqrt(jnp.abs(codes)), axis=-1))


@jsdl.penalties.register("_lab_nojit")
def _nojit_penalty(codes, params):
    """Python control flow on a traced value."""
    if float(jnp.sum(codes)) > 0:
        return jnp.mean(jnp.sum(jnp.abs(codes), axis=-1))
    return jnp.zeros(())


@jsdl.penalties.register("_lab_perm")
def _perm_penalty(codes, params):
    """weights latent i by i + 1: not permutation invariant."""
    w = jnp.arange(1, codes.shape[-1] + 1, dtype=codes.dtype)
    return jnp.mean(jnp.sum(jnp.abs(codes) * w, axis=-1))


@jsdl.penalties.register("_lab_step")
def _step_penalty(codes, params):
    """a count of active codes without a straight-through estimator: zero gradient."""
    return jnp.mean(jnp.sum((codes > 0).astype(codes.dtype), axis=-1))


@jsdl.penalties.register("_lab_sum")
def _sum_penalty(codes, params):
    """sum over the batch instead of the mean."""
    return jnp.sum(jnp.abs(codes))


# -- mechanical checks ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["l1", "weighted_l1", "l0"])
def test_builtin_penalties_pass(name):
    res = lab_checks.check_penalty(name)
    assert res.can_train and res.can_vmap, res.to_markdown()
    assert not res.failures, res.to_markdown()
    assert res["gradient"].ok
    if name == "l0":
        assert res.straight_through and "straight-through" in res["gradient"].message


def test_rescaling_classification():
    """L1 is lowered by the rescaling symmetry (degree 1): unit-norm decoders; decoder-weighted L1
    is invariant (degree 0 along the symmetry, 1 in the codes alone)."""
    l1 = lab_checks.check_penalty("l1")
    w = lab_checks.check_penalty("weighted_l1")
    assert l1.rescale_invariant is False
    assert w.rescale_invariant is True
    np.testing.assert_allclose(l1["rescaling"].values["degree_symmetry"], [1.0, 1.0], atol=1e-4)
    np.testing.assert_allclose(w["rescaling"].values["degree_codes"], [1.0, 1.0], atol=1e-4)
    np.testing.assert_allclose(w["rescaling"].values["degree_symmetry"], [0.0, 0.0], atol=1e-4)


def test_nan_penalty_is_reported_not_raised():
    res = lab_checks.check_penalty("_lab_nan")
    assert not res.can_train
    c = res["eager"]
    assert c.ok is False and c.fatal
    assert "inf" in c.message.lower() or "nan" in c.message.lower()
    assert "skipped" in res["jit"].message  # later checks are not run on a non-finite value


def test_infinite_gradient_is_fatal():
    res = lab_checks.check_penalty("_lab_sqrt")
    assert res["eager"].ok  # the value is finite...
    g = res["gradient"]
    assert g.ok is False and g.fatal and "non-finite gradient" in g.message  # ...its gradient at 0 is not
    assert not res.can_train


def test_non_jittable_penalty_is_reported():
    res = lab_checks.check_penalty("_lab_nojit")
    assert res["eager"].ok  # works eagerly
    j = res["jit"]
    assert j.ok is False and j.fatal
    assert "not jit-compatible" in j.message and "Error" in j.message
    assert res["vmap"].ok is False
    assert not res.can_train


def test_permutation_breaking_penalty_is_reported():
    res = lab_checks.check_penalty("_lab_perm")
    p = res["permutation"]
    assert p.ok is False and not p.fatal
    assert "permutation invariance" in p.message
    assert p.values["relative_change"] > 1e-3
    assert res.can_train  # reported, but it can still be trained


def test_zero_gradient_and_batch_sum_are_flagged():
    step = lab_checks.check_penalty("_lab_step")
    assert step["gradient"].ok is False and "straight_through=True" in step["gradient"].message
    s = lab_checks.check_penalty("_lab_sum")
    assert s["batch_mean"].ok is False
    assert lab_checks.check_penalty("l1")["batch_mean"].ok


def test_unknown_penalty_and_hyper_raise():
    with pytest.raises(ValueError, match="unknown penalty"):
        lab_checks.check_penalty("no_such_penalty")
    with pytest.raises(ValueError, match="does not take"):
        lab_checks.check_penalty("l1", {"bogus": 1})


# -- ground truth as a critical point -----------------------------------------------------------

def _ortho_bench(key, n=8, sparsity=0.8):
    """Orthonormal features (no interference): W* is an exact minimiser of the reconstruction."""
    from jsdl.data import make_bench
    from jsdl.lab.core import orthonormal_twin

    bench = make_bench(key, n_features=n, d_input=n, max_interference=0.3, sparsity=sparsity)
    return orthonormal_twin(bench, jax.random.fold_in(key, 1))


def test_ground_truth_stationary_without_penalty_not_with_l1():
    """Interference-free twin: at lambda -> 0 ground truth is stationary (the gradient vanishes with
    lambda), for lambda > 0 L1 moves it (gradient ~ lambda) and the best gain shrinks below 1."""
    b = _ortho_bench(jax.random.PRNGKey(3))
    spec = jsdl.make_spec("sae", "relu", n_latents=8, penalties={"l1": 1.0})
    r = lab_critical.critical_point_analysis(jax.random.PRNGKey(0), spec, "l1", b, [1e-2, 1e-1],
                                             n_samples=512, lanczos_iters=8)
    assert r["floor"]["grad_norm"] < 1e-8 * r["grad_scale"]
    assert abs(r["floor"]["gain"] - 1.0) < 1e-3
    g1, g2 = (p["grad_norm"] for p in r["points"])
    assert all(p["verdict"] == "not stationary" for p in r["points"])
    assert 5 < g2 / g1 < 20  # roughly linear in lambda
    assert r["points"][1]["gain"] < r["points"][0]["gain"] < 1.0
    assert r["floor"]["hessian"]["min"] > -1e-6 * r["floor"]["hessian"]["max"]  # a local minimum at lambda 0


def test_ground_truth_point_matches_theorem_3_3():
    from jsdl.landscape.theory import theorem_3_3_solution

    key = jax.random.PRNGKey(0)
    W = jax.random.normal(key, (6, 8))
    W = W / jnp.linalg.norm(W, axis=0)
    spec = jsdl.make_spec("sae", "relu", n_latents=8)
    p = lab_critical.ground_truth_point(spec, W, W, 0.7, decoder_norm="unit")
    ref = theorem_3_3_solution(W, W)
    np.testing.assert_allclose(p.W_E, 0.7 * ref.W_E, rtol=1e-6)
    np.testing.assert_allclose(p.W_D, ref.W_D, rtol=1e-6)
    with pytest.raises(ValueError, match="n_latents == n_features"):
        lab_critical.ground_truth_point(jsdl.make_spec("sae", "relu", n_latents=9), W, W)


# -- end to end ------------------------------------------------------------------------------

def test_tiny_lab_writes_report(tmp_path):
    from jsdl.lab.core import Scale, run_lab

    sc = Scale(n=8, d=6, M=0.3, S=0.85, steps=40, batch=64, lr=3e-3, n_coefs=2, seeds=1, eval_samples=512,
               gt_samples=256, lanczos=6, retrain_steps=10, hier_steps=20, hier_children=3)
    run_lab("l1", scale=sc, out_dir=str(tmp_path), parts=("frontier", "critical"), baselines=("topk",),
             log=lambda m: None)
    for f in ("report.md", "report.json", "frontier.png", "recovery.png", "critical.png"):
        assert os.path.isfile(tmp_path / f), f
    j = json.loads((tmp_path / "report.json").read_text())
    assert j["penalty"] == "l1" and j["checks"]["can_train"]
    assert len(j["frontier"]["l1"]["points"]) == 2 and "topk" in j["frontier"]
    for p in j["frontier"]["l1"]["points"]:
        for k in ("l0", "fvu", "m_gt", "m_ip", "mcc", "shrinkage", "dead_fraction"):
            assert k in p
    assert {"bench", "twin"} <= set(j["critical"])
    md = (tmp_path / "report.md").read_text()
    assert "Mechanical checks" in md and "Ground truth as a critical point" in md


def test_broken_penalty_lab_skips_training(tmp_path):
    from jsdl.lab.core import Scale, run_lab

    sc = Scale(n=8, d=6, M=0.3, S=0.85, steps=10, batch=32, lr=1e-3, n_coefs=2, seeds=1, eval_samples=128,
               gt_samples=64, lanczos=4, retrain_steps=5, hier_steps=5)
    rep = run_lab("_lab_nan", scale=sc, out_dir=str(tmp_path), parts=("critical",), baselines=(),
                  log=lambda m: None)
    assert rep["checks"]["can_train"] is False and "critical" not in rep
    assert "cannot be trained" in (tmp_path / "report.md").read_text()


def test_cli_import_user_file_checks_only(tmp_path, capsys):
    from jsdl.cli import main

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "examples", "my_penalty.py")
    assert main(["penalty-lab", "hoyer", "--import", path, "--checks-only"]) == 0
    out = capsys.readouterr().out
    assert "| permutation | pass |" in out
    assert "hoyer" in jsdl.penalties.names()
    assert main(["penalty-lab", "hoyer", "--import", str(tmp_path / "missing.py"), "--checks-only"]) == 2
    assert main(["penalty-lab", "l1", "--coefs", "1e-3,abc", "--out", str(tmp_path)]) == 2


# -- activations ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["relu", "topk", "batchtopk", "jumprelu"])
def test_builtin_activations_pass(name):
    r = lab_checks.check_activation(name)
    assert r.ok, r.to_markdown()
    assert r["key_property"].ok and r["jit"].ok and r["vmap"].ok and r["gradient"].ok


def test_activation_violations_are_reported():
    """Functions not registered (so the registry, which other tests iterate, stays clean)."""

    def scaled(z, params=None, *, inference=False, a=2.0):  # breaks sigma(z)_i in {0, z_i}
        return jnp.where(z > 0, a * z, 0.0)

    def coupled(z, params=None, *, inference=False):  # batch-coupled, not declared
        return jnp.where(z > jnp.mean(z), z, 0.0)

    def shifted(z, params=None, *, inference=False, shift=0.2):  # not homogeneous, not declared
        return jnp.where(z > shift, z, 0.0)

    s = lab_checks.check_activation(scaled)
    assert s["key_property"].ok is False and s["key_property"].fatal and s["gradient"].ok is False
    assert lab_checks.check_activation(scaled, {"a": 1.0}).ok
    c = lab_checks.check_activation(coupled)
    assert c["per_sample"].ok is False and c["key_property"].ok
    assert lab_checks.check_activation(coupled, batch_coupled=True)["per_sample"].ok is None
    h = lab_checks.check_activation(shifted)
    assert h["homogeneous"].ok is False and h["key_property"].ok
    assert lab_checks.check_activation(shifted, homogeneous=False).ok
    with pytest.raises(ValueError):
        lab_checks.check_activation("no_such_activation")


def test_cli_activation_checks(tmp_path, capsys):
    from jsdl.cli import main

    path = tmp_path / "my_act.py"
    path.write_text("import jax.numpy as jnp\nimport jsdl\n\n@jsdl.activations.register('_lab_cli_act')\n"
                    "def act(z, params=None, *, inference=False, shift=0.0):\n    return jnp.where(z > shift, z, 0.0)\n")
    try:
        assert main(["penalty-lab", "_lab_cli_act", "--activation", "--import", str(path)]) == 0
        assert "key_property | pass" in capsys.readouterr().out
        assert main(["penalty-lab", "_lab_cli_act", "--activation", "--hyper", "shift=0.3"]) == 2  # old syntax
        assert "--hyper is gone" in capsys.readouterr().err
        assert main(["penalty-lab", "_lab_cli_act", "--activation", "--set", "activation.shift=0.3"]) == 1  # not homogeneous
    finally:  # the registry is process-wide: test_objective checks that every activation has a case
        if "_lab_cli_act" in jsdl.activations.names():
            jsdl.activations.REGISTRY.unregister("_lab_cli_act")


@pytest.mark.slow  # two tiny lab runs, ~65 s on the loaded 2-core machine
def test_penalty_that_cannot_vmap_trains_member_by_member_like_l1():
    """A jittable penalty that vmap rejects (a host callback) trains member by member; with the L1
    value and gradient it lands where the vmapped L1 population does."""
    import numpy as np_

    from jsdl.lab.core import Scale, run_lab

    @jax.custom_jvp
    def host_l1(codes):
        return jax.pure_callback(lambda c: np_.asarray(np_.abs(c).sum(-1).mean(), np_.float32),
                                 jax.ShapeDtypeStruct((), jnp.float32), codes)

    @host_l1.defjvp
    def _host_l1_jvp(primals, tangents):
        (c,), (t,) = primals, tangents
        return host_l1(c), jnp.mean(jnp.sum(jnp.sign(c) * t, axis=-1))

    jsdl.penalties.register("_lab_host_l1")(lambda codes, params: host_l1(codes))
    checks = lab_checks.check_penalty("_lab_host_l1")
    assert checks.can_train and not checks.can_vmap
    sc = Scale(n=8, d=6, M=0.3, S=0.85, steps=30, batch=64, lr=3e-3, n_coefs=2, seeds=1, eval_samples=512,
               gt_samples=256, lanczos=6, retrain_steps=10, hier_steps=20, hier_children=3)
    kw = dict(scale=sc, coefs=[0.01, 0.1], parts=("frontier",), baselines=(), log=lambda m: None)
    host = run_lab("_lab_host_l1", **kw)["frontier"]["_lab_host_l1"]
    ref = run_lab("l1", **kw)["frontier"]["l1"]
    assert host["vmapped"] is False and ref["vmapped"] is True
    for a, b in zip(host["points"], ref["points"]):
        assert a["coef"] == b["coef"]
        assert a["fvu"] == pytest.approx(b["fvu"], rel=1e-3) and a["l0"] == pytest.approx(b["l0"], rel=1e-3)
