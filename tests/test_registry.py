"""The plug-in registry: signatures checked at registration, hyperparameters validated against the
signature and the declared ranges, names registered once unless overwriting is asked for."""
import jax.numpy as jnp
import pytest

import jsdl
from jsdl import activations as A
from jsdl import penalties as P
from jsdl.registry import Range


@pytest.fixture
def cleanup():
    made = []
    yield made
    for reg, name in made:
        if name in reg:
            reg.unregister(name)


def test_overwrite_refused_then_allowed(cleanup):
    cleanup.append((P.REGISTRY, "_reg_a"))

    @P.register("_reg_a")
    def first(codes, params):
        return jnp.sum(jnp.abs(codes), -1).mean()

    def second(codes, params):
        return 2.0 * jnp.sum(jnp.abs(codes), -1).mean()

    with pytest.raises(ValueError, match=r"'_reg_a' is already registered .*overwrite=True"):
        P.register("_reg_a")(second)
    assert P.REGISTRY.entry("_reg_a").fn is first
    P.register("_reg_a", overwrite=True)(second)
    assert P.REGISTRY.entry("_reg_a").fn is second
    codes = jnp.ones((2, 3))
    assert float(P.get("_reg_a")(codes, None)) == 6.0


def test_builtin_names_are_protected():
    with pytest.raises(ValueError, match="'l1' is already registered"):
        @P.register("l1")
        def l1(codes, params):
            return jnp.zeros(())

    with pytest.raises(ValueError, match="'topk' is already registered"):
        @A.register("topk")
        def topk(z, params=None, *, inference=False):
            return z


def test_same_definition_registers_again(cleanup):
    # A plug-in file imported twice (train, then resume in one process) is not a conflict.
    cleanup.append((P.REGISTRY, "_reg_same"))
    src = "import jsdl\n@jsdl.penalties.register('_reg_same')\ndef pen(codes, params, *, eps=1.0):\n    return codes.sum()\n"
    code = compile(src, "/virtual/plugin.py", "exec")
    exec(code, {"__name__": "plugin"})
    exec(code, {"__name__": "plugin"})
    assert "_reg_same" in P.names()


@pytest.mark.parametrize(
    "fn,match",
    [
        (lambda codes: codes, r"must be fn\(codes, params, \*\*hyper\)"),
        (lambda codes, params, alpha: codes, "hyperparameter 'alpha' needs a default"),
        (lambda codes, params, **kw: codes, r"\*\*kw is not allowed"),
        (lambda codes, params, *rest: codes, r"\*rest is not allowed"),
    ],
)
def test_bad_penalty_signature_rejected(fn, match):
    with pytest.raises(TypeError, match=match):
        P.register("_reg_bad")(fn)
    assert "_reg_bad" not in P.names()


def test_bad_activation_signature_rejected():
    with pytest.raises(TypeError, match="does not declare inference"):
        A.register("_reg_act_bad")(lambda z, params=None: z)
    with pytest.raises(ValueError, match="without '|'"):
        A.register("a|b")
    assert "_reg_act_bad" not in A.names()


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown penalty 'nope'; known penalties: .*l1.*weighted_l1"):
        P.get("nope")
    with pytest.raises(ValueError, match=r"unknown activation 'nope'; known activations: .*relu.*topk"):
        A.get("relu|nope")


def test_unknown_hyperparameter_named():
    with pytest.raises(ValueError, match=r"penalty 'lp' does not take \['q'\]; it accepts \['eps', 'p'\]"):
        P.get("lp", q=0.5)
    with pytest.raises(ValueError, match=r"does not take \['kk'\]"):
        A.get("topk", kk=3)
    with pytest.raises(ValueError, match="does not take"):
        jsdl.make_spec(activation="relu", penalties={"l1": (0.1, {"eps": 1.0})})


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: P.get("lp", p=1.5), ValueError, r"p must be in \(0, 1\], got 1.5"),
        (lambda: P.get("lp", p=0.0), ValueError, r"p must be in \(0, 1\]"),
        (lambda: P.get("log", eps=0.0), ValueError, "eps must be > 0"),
        (lambda: P.get("tanh", scale=-1.0), ValueError, "scale must be > 0"),
        (lambda: P.get("tanh", scale="1e-3"), TypeError, "scale must be float.*YAML"),
        (lambda: P.get("l0", bandwidth=float("nan")), ValueError, "bandwidth must be > 0"),
        (lambda: A.get("topk", k=0), ValueError, "k must be >= 1"),
        (lambda: A.get("batchtopk", k=2.0), TypeError, "k must be int"),
        (lambda: A.get("topk", relu=1), TypeError, "relu must be bool"),
        (lambda: A.get("jumprelu", threshold=-0.1), ValueError, "threshold must be >= 0"),
        (lambda: A.get("relu|topk", k=-3), ValueError, "k must be >= 1"),
    ],
)
def test_builtin_hyperparameters_validated(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_ints_accepted_for_float_hyperparameters():
    pen = P.get("lp", p=1)
    assert dict(pen.hyper)["p"] == 1.0 and isinstance(dict(pen.hyper)["p"], float)


def test_user_ranges_declared_at_registration(cleanup):
    cleanup.append((A.REGISTRY, "_reg_gate"))

    @A.register("_reg_gate", hyper={"cut": "[0, 2)"})
    def gate(z, params=None, *, inference=False, cut=1.0):
        return jnp.where(z > cut, z, 0.0)

    assert A.get("_reg_gate", cut=0.0).hyper_dict() == {"cut": 0.0}
    with pytest.raises(ValueError, match=r"cut must be in \[0, 2\), got 2.0"):
        A.get("_reg_gate", cut=2.0)
    with pytest.raises(ValueError, match="not hyperparameters"):
        A.register("_reg_gate2", hyper={"alpha": "> 0"})(gate)
    with pytest.raises(ValueError, match="expected an interval"):
        A.register("_reg_gate3", hyper={"cut": "positive"})(gate)
    with pytest.raises(ValueError, match=r"\(default\): cut must be > 5"):
        A.register("_reg_gate4", hyper={"cut": "> 5"})(gate)


def test_range_parse_and_membership():
    r = Range.parse("(0, 1]")
    assert 0.5 in r and 1.0 in r and 0.0 not in r and 1.1 not in r
    assert str(r) == "in (0, 1]"
    r = Range.parse("[1, inf)")
    assert 1 in r and 1e9 in r and 0.99 not in r and str(r) == ">= 1"
    assert -5 in Range.parse("< 0") and 0 not in Range.parse("< 0")


def test_injected_arguments_are_not_hyperparameters():
    assert P.wants("l0") == {"pre_acts"}
    assert P.wants("weighted_l1") == {"n_sources"}
    assert "pre_acts" not in P.hyper_defaults("l0") and "bandwidth" in P.hyper_defaults("l0")
    with pytest.raises(ValueError, match="does not take"):
        P.get("weighted_l1", n_sources=2)


def test_penalty_info_records_doc_and_flags():
    assert P.info("l0").straight_through and P.info("l0").needs_threshold
    assert P.info("l1").doc.startswith("L1")
    with pytest.raises(TypeError, match="unknown registration option"):
        P.REGISTRY.register("_reg_x", homogeneous=True)


# -- activation hyperparameters from a YAML config ----------------------------------------------


def test_yaml_spec_passes_any_declared_activation_hyperparameter(cleanup):
    from jsdl.train.cli import config_from_dict

    cleanup.append((A.REGISTRY, "_reg_yaml_gate"))

    @A.register("_reg_yaml_gate", hyper={"cut": ">= 0"})
    def gate(z, params=None, *, inference=False, cut=1.0):
        return jnp.where(z > cut, z, 0.0)

    cfg = config_from_dict({"spec": {"activation": "_reg_yaml_gate", "n_latents": 8}}, ["spec.cut=0.25"])
    assert cfg.spec.build().activation.hyper_dict() == {"cut": 0.25}
    # The run record (to_dict) loads back to the same spec (what resume does).
    again = config_from_dict(cfg.to_dict())
    assert again.spec == cfg.spec and again.spec.build() == cfg.spec.build()
    with pytest.raises(ValueError, match=r"spec.k; .*hyperparameters of activation '_reg_yaml_gate': cut"):
        config_from_dict({"spec": {"activation": "_reg_yaml_gate", "k": 3}})
    with pytest.raises(ValueError, match=r"spec: activation '_reg_yaml_gate': cut must be >= 0"):
        config_from_dict({"spec": {"activation": "_reg_yaml_gate", "cut": -1.0}})


def test_yaml_spec_builtin_hyperparameters():
    from jsdl.train.cli import config_from_dict

    spec = config_from_dict({"spec": {"activation": "jumprelu", "threshold": 0.2, "bandwidth": 0.01,
                                      "penalties": {"l0": 0.1}}}).spec.build()
    assert spec.activation.hyper_dict() == {"threshold": 0.2, "bandwidth": 0.01}
    with pytest.raises(TypeError, match="spec: activation 'topk': k must be int"):
        config_from_dict({"spec": {"activation": "topk", "k": 2.5}})
    # A record written before hyperparameters moved to `hyper` (k/threshold/bandwidth/relu at the
    # top level, None = default) still loads.
    old = {"activation": "topk", "n_latents": 16, "k": 4, "threshold": None, "bandwidth": None, "relu": None}
    assert config_from_dict({"spec": old}).spec.build().activation.hyper_dict() == {"k": 4, "relu": True}


def test_list_hyperparameters_become_tuples_so_specs_stay_hashable(cleanup):
    cleanup.append((P.REGISTRY, "_reg_weights"))

    @P.register("_reg_weights")
    def weighted(codes, params, *, weights=(1.0,)):
        return jnp.sum(jnp.abs(codes), -1).mean() * weights[0]

    spec = jsdl.make_spec(activation="relu", n_latents=4, penalties={"_reg_weights": (0.1, {"weights": [2.0, 3.0]})})
    hash(spec)
    assert dict(P.get("_reg_weights", weights=[2.0]).hyper)["weights"] == (2.0,)
