"""Mechanical checks of a sparsity penalty (penalty lab, part 6).

A penalty is ``penalty(codes [B, n_q], params, **hyper) -> scalar`` (see :mod:`jsdl.penalties`).
Before anything is trained, :func:`check_penalty` asks whether it can be trained at all and how it
behaves under the symmetries of the SDL objective:

========================  ==================================================================  =======
check                     what is computed                                                    fatal
========================  ==================================================================  =======
``eager``                 the value on real ReLU/JumpReLU codes is a finite scalar            yes
``zero_codes``            the value at all-zero codes is finite (log/0-division traps)        yes
``jit``                   ``jax.jit`` traces it (no Python control flow on traced values)    yes
                          and gives the eager value
``vmap``                  ``jax.vmap`` over a leading member axis equals a Python loop        no [1]
``gradient``              the gradient of the full objective (eq. 3 + penalty) w.r.t. every   yes
                          parameter is finite, also at codes with exact zeros and at zero
                          codes; a zero gradient is flagged; a declared straight-through
                          estimator is reported as a pseudo-gradient
``permutation``           ``penalty(codes P, params P) = penalty(codes, params)`` for a       no [2]
                          random latent permutation P
``batch_mean``            ``penalty`` of the batch stacked twice equals ``penalty``: the      no
                          documented convention (batch mean of per-sample sums), so
                          coefficients do not depend on the batch size
``rescaling``             degree of homogeneity under codes -> a codes alone, and under the  no
                          objective's rescaling symmetry (w_E^i -> a w_E^i, w_D^i -> w_D^i/a)
``sign``                  penalty(0) = 0 and penalty >= 0                                     no
========================  ==================================================================  =======

[1] a penalty that cannot be vmapped is trained member by member instead of as one population.
[2] every latent is then not equal before the penalty; the report says so, training still runs.

Nothing here raises on a bad penalty: every failure becomes a :class:`Check` with a message a user
can act on (the exception type and first line are quoted).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jsdl import activations as _act
from jsdl import objective as _obj
from jsdl import penalties as _pen
from jsdl.records import to_jsonable

__all__ = ["Check", "PenaltyChecks", "ActivationChecks", "check_penalty", "check_activation", "activation_for"]

_RTOL = 1e-4  # float32 reductions over a few hundred terms, reordered by jit/vmap


@dataclasses.dataclass
class Check:
    """One mechanical check: ``ok`` (True / False / None = not applicable or skipped), a one-line
    ``message``, ``fatal`` (a failure stops the lab from training this penalty) and numbers."""

    name: str
    ok: Optional[bool]
    message: str
    fatal: bool = False
    values: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "ok": self.ok, "message": self.message, "fatal": self.fatal,
                "values": {k: to_jsonable(v) for k, v in self.values.items()}}


class _CheckList:
    """Lookup by name, failures and the markdown table of a list of :class:`Check` s (``self.checks``)."""

    checks: list

    def __getitem__(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check named {name!r}; checks are {[c.name for c in self.checks]}")

    @property
    def failures(self) -> list:
        return [c for c in self.checks if c.ok is False]

    def to_markdown(self) -> str:
        sym = {True: "pass", False: "**FAIL**", None: "n/a"}
        lines = ["| check | result | detail |", "|---|---|---|"]
        for c in self.checks:
            res = sym[c.ok] + (" (fatal)" if c.fatal and c.ok is False else "")
            lines.append(f"| {c.name} | {res} | {c.message.replace('|', '/')} |")
        return "\n".join(lines)


@dataclasses.dataclass
class PenaltyChecks(_CheckList):
    """All mechanical checks of one penalty (``checks`` in the order run)."""

    name: str
    hyper: dict
    straight_through: bool
    checks: list

    @property
    def can_train(self) -> bool:
        """False when a fatal check failed (NaN, not jit-compatible, raising): training would crash
        or diverge, so the lab skips training and the landscape."""
        return not any(c.fatal and c.ok is False for c in self.checks)

    @property
    def can_vmap(self) -> bool:
        return self["vmap"].ok is not False

    @property
    def rescale_invariant(self) -> Optional[bool]:
        """True when the penalty is invariant under the objective's rescaling symmetry (so training
        needs no decoder-norm constraint); None when unknown."""
        c = self["rescaling"]
        return c.values.get("symmetry_invariant")

    def to_dict(self) -> dict:
        return {"name": self.name, "hyper": {k: to_jsonable(v) for k, v in self.hyper.items()},
                "straight_through": self.straight_through, "can_train": self.can_train,
                "can_vmap": self.can_vmap, "rescale_invariant": self.rescale_invariant,
                "checks": [c.to_dict() for c in self.checks]}



@dataclasses.dataclass
class ActivationChecks(_CheckList):
    """All mechanical checks of one activation (``checks`` in the order run)."""

    name: str
    hyper: dict
    checks: list

    @property
    def ok(self) -> bool:
        """True when no check failed: the activation can be used in a spec and trained."""
        return not self.failures

    def to_dict(self) -> dict:
        return {"name": self.name, "hyper": {k: to_jsonable(v) for k, v in self.hyper.items()}, "ok": self.ok,
                "checks": [c.to_dict() for c in self.checks]}


def _err(e: BaseException) -> str:
    msg = str(e).strip().split("\n")[0]
    if len(msg) > 200:
        msg = msg[:197] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def activation_for(name: str) -> str:
    """The activation the lab pairs with penalty ``name``: JumpReLU when the penalty needs a learned
    threshold (L0 via straight-through), ReLU otherwise."""
    return "jumprelu" if _pen.info(name).needs_threshold else "relu"


def _permute(params: _obj.SDLParams, perm) -> _obj.SDLParams:
    return params.replace(
        W_E=params.W_E[perm],
        W_D=None if params.W_D is None else params.W_D[:, perm],
        b_E=None if params.b_E is None else params.b_E[perm],
        threshold=None if params.threshold is None else params.threshold[perm],
    )


def _rescale(params: _obj.SDLParams, a) -> _obj.SDLParams:
    """(``a`` a scalar or per-latent ``[n_q]``.) The rescaling symmetry of the objective (paper 3.3): w_E^i -> a w_E^i, b_E[i] -> a b_E[i],
    theta_i -> a theta_i, w_D^i -> w_D^i / a. Codes scale by a, reconstructions are unchanged."""
    a = jnp.asarray(a)
    a_row = a[:, None] if a.ndim else a
    return params.replace(
        W_E=params.W_E * a_row,
        W_D=None if params.W_D is None else params.W_D / a,
        b_E=None if params.b_E is None else params.b_E * a,
        threshold=None if params.threshold is None else params.threshold * a,
    )


def _close(a, b, rtol=_RTOL, atol=1e-6) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return bool(np.all(np.abs(a - b) <= atol + rtol * np.abs(b)))


def _all_finite(tree) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


def _grad_norm(tree) -> float:
    return float(np.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in jax.tree.leaves(tree))))


def _setup(key, name, hyper, n_latents, d_input, batch):
    act = activation_for(name)
    spec = _obj.make_spec("sae", act, n_latents=n_latents, penalties={name: (1.0, dict(hyper))})
    k_p, k_b, k_t, k_x = jax.random.split(key, 4)
    params = _obj.init_params(k_p, spec, d_input)
    # A non-zero encoder bias so that some codes are exactly 0 and others not, per sample.
    params = params.replace(b_E=0.1 * jax.random.normal(k_b, params.b_E.shape))
    if params.threshold is not None:
        params = params.replace(threshold=jax.random.uniform(k_t, params.threshold.shape, minval=0.05, maxval=0.3))
    x = jax.random.normal(k_x, (batch, d_input))
    return spec, params, x


def _eager_check(f, codes, params, z):
    """``(Check, value, why)``: the value on real codes with exact zeros; ``value`` is None and
    ``why`` says why when the check is fatal (raises, not a scalar, not finite)."""
    try:
        v_arr = np.asarray(f(codes, params, z))
    except Exception as e:  # noqa: BLE001 - user code: report, never crash
        return Check("eager", False, f"raises {_err(e)}", fatal=True), None, "the penalty raises when called"
    if v_arr.shape != ():
        return (Check("eager", False, f"must return a scalar, got an array of shape {v_arr.shape} "
                      "(reduce with a batch mean of per-sample sums)", fatal=True), None,
                "the penalty does not return a scalar")
    value = float(v_arr)
    if not math.isfinite(value):
        return (Check("eager", False, f"returns {value} on ReLU codes with exact zeros (NaN/inf): "
                      "guard logs, divisions and fractional powers at 0", fatal=True, values={"value": value}), None,
                f"the value is {value}")
    return Check("eager", True, f"finite scalar ({value:.4g}) on codes with {float(jnp.mean(codes == 0)):.0%} exact "
                 "zeros", values={"value": value}), value, ""


def _zero_codes_check(f, codes, params, z):
    """``(Check, value at all-zero codes or None)``."""
    try:
        v0 = float(np.asarray(f(jnp.zeros_like(codes), params, jnp.minimum(z, 0.0) - 1.0)))
    except Exception as e:  # noqa: BLE001 - user code
        return Check("zero_codes", False, f"raises at all-zero codes: {_err(e)}", fatal=True), None
    ok0 = math.isfinite(v0)
    return Check("zero_codes", ok0, f"value {v0:.4g} at all-zero codes" if ok0 else
                 f"returns {v0} at all-zero codes (a dead batch would turn the loss into NaN)",
                 fatal=not ok0, values={"value": v0}), v0


def _jit_check(f, args, eager) -> Check:
    """``jax.jit(f)(*args)`` equals the eager value ``eager`` (a scalar or array)."""
    try:
        vj = np.asarray(jax.jit(f)(*args))
    except Exception as e:  # noqa: BLE001 - user code
        return Check("jit", False, f"not jit-compatible: {_err(e)}. Use jnp.where / lax.cond instead of "
                     "Python if/float()/np.asarray on traced values", fatal=True)
    if _close(vj, eager):
        return Check("jit", True, "jit-compatible; equals the eager value")
    return Check("jit", False, f"jit value {_short(vj)} differs from eager {_short(eager)}: the function has Python "
                 "side effects or reads global state", values={"jit": vj, "eager": eager})


def _short(v) -> str:
    v = np.asarray(v)
    return f"{float(v):.6g}" if v.ndim == 0 else f"array {v.shape} (max |diff| shown in values)"


def _vmap_check(f, member_args) -> Check:
    """``jax.vmap(f)`` over a stacked member axis equals a Python loop over ``member_args`` (a list
    of argument tuples, one per member)."""
    P = len(member_args)
    try:
        loop = np.stack([np.asarray(f(*a)) for a in member_args])
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *member_args)
        vm = np.asarray(jax.jit(jax.vmap(f))(*stacked))
    except Exception as e:  # noqa: BLE001 - user code
        return Check("vmap", False, f"not vmap-compatible: {_err(e)}; the population is trained member by member")
    if vm.shape != loop.shape:
        return Check("vmap", False, f"vmap over {P} members returned shape {vm.shape}, expected {loop.shape}")
    if _close(vm, loop):
        return Check("vmap", True, "vmap over a member axis equals a Python loop (trains as one population)")
    return Check("vmap", False, f"vmap values differ from a loop (max |diff| {float(np.max(np.abs(vm - loop))):.3g}); "
                 "the population is trained member by member", values={"vmap": vm, "loop": loop})


def _permutation_check(f, codes, params, z, value, key, n_latents) -> Check:
    try:
        perm = jax.random.permutation(jax.random.fold_in(key, 11), n_latents)
        vp = float(np.asarray(f(codes[:, perm], _permute(params, perm), z[:, perm])))
    except Exception as e:  # noqa: BLE001 - user code
        return Check("permutation", False, f"raises on permuted latents: {_err(e)}")
    if _close(vp, value):
        return Check("permutation", True, "invariant under a random permutation of the latents", values={"value": vp})
    rel = abs(vp - value) / max(abs(value), 1e-12)
    return Check("permutation", False, f"breaks permutation invariance: permuting the latents changes the value from "
                 f"{value:.6g} to {vp:.6g} (relative {rel:.2g}); latents are not treated alike",
                 values={"value": vp, "relative_change": rel})


def _batch_mean_check(f, codes, params, z, value) -> Check:
    try:
        vb = float(np.asarray(f(jnp.concatenate([codes, codes]), params, jnp.concatenate([z, z]))))
    except Exception as e:  # noqa: BLE001 - user code
        return Check("batch_mean", None, f"could not evaluate on a doubled batch: {_err(e)}")
    if _close(vb, value):
        return Check("batch_mean", True, "a batch mean: value independent of the batch size")
    return Check("batch_mean", False, f"the batch stacked twice gives {vb:.6g}, not {value:.6g}: not a batch mean, "
                 "so the coefficient's meaning depends on the batch size", values={"doubled": vb})


def _sign_check(v0, value) -> Check:
    if v0 is None or not math.isfinite(v0):
        return Check("sign", None, "skipped (no finite value at zero codes)")
    nonneg = value >= -1e-7
    zero_at_0 = abs(v0) <= 1e-6 * max(1.0, abs(value))
    ok = nonneg and zero_at_0
    msg = ("penalty(0) = 0 and penalty >= 0" if ok else
           "; ".join(([] if zero_at_0 else [f"penalty(0) = {v0:.4g} != 0 (a constant offset: harmless for "
                                            "gradients, shifts reported losses)"]) +
                     ([] if nonneg else [f"negative value {value:.4g}: the objective is unbounded below "
                                         "if codes can grow"])))
    return Check("sign", ok, msg, values={"at_zero": v0, "value": value})


def check_penalty(name: str, hyper: Optional[dict] = None, *, key: Optional[jax.Array] = None,
                  n_latents: int = 24, d_input: int = 12, batch: int = 32) -> PenaltyChecks:
    """Run the mechanical checks on the registered penalty ``name`` bound to ``hyper``.

    Inputs are real codes of a small random SAE (``n_latents`` latents, ``d_input`` wide, ``batch``
    samples; ReLU, or JumpReLU when the penalty needs a threshold), so they contain exact zeros as
    training codes do. Unknown names and hyperparameters raise ValueError (a user error, not a
    property of the penalty); everything else is reported in the returned :class:`PenaltyChecks`:
    eager value, all-zero codes, jit, vmap over members, gradients of the whole objective,
    permutation invariance, batch-mean convention, rescaling degree and sign."""
    hyper = dict(hyper or {})
    pen = _pen.get(name, **hyper)  # raises ValueError on unknown name / hyperparameters
    pinfo = _pen.info(name)
    key = jax.random.PRNGKey(0) if key is None else key
    spec, params, x = _setup(key, name, hyper, n_latents, d_input, batch)
    z = _obj.pre_activations(params, x, spec)
    codes = spec.activation(z, params)

    def f(c, p, zz):
        return pen(c, p, pre_acts=zz, n_sources=1)

    checks: list[Check] = []
    res = PenaltyChecks(name=name, hyper=dict(pen.hyper), straight_through=pinfo.straight_through, checks=checks)
    eager, value, why = _eager_check(f, codes, params, z)
    checks.append(eager)
    if value is None:
        return _skip_rest(res, why)
    zero, v0 = _zero_codes_check(f, codes, params, z)
    members = []
    for k in jax.random.split(jax.random.fold_in(key, 7), 3):
        _, p_m, x_m = _setup(k, name, hyper, n_latents, d_input, batch)
        z_m = _obj.pre_activations(p_m, x_m, spec)
        members.append((spec.activation(z_m, p_m), p_m, z_m))
    checks.extend([
        zero,
        _jit_check(f, (codes, params, z), value),
        _vmap_check(f, members),
        _gradient_check(spec, params, x, f, codes, z, pinfo.straight_through),
        _permutation_check(f, codes, params, z, value, key, n_latents),
        _batch_mean_check(f, codes, params, z, value),
        _rescaling_check(f, codes, params, z, value),
        _sign_check(v0, value),
    ])
    return res


def _skip_rest(res: PenaltyChecks, why: str) -> PenaltyChecks:
    for nm in ("zero_codes", "jit", "vmap", "gradient", "permutation", "batch_mean", "rescaling", "sign"):
        res.checks.append(Check(nm, None, f"skipped: {why}"))
    return res


def _gradient_check(spec, params, x, f, codes, z, straight_through: bool) -> Check:
    """Gradient of the full objective (mse + 1.0 * penalty) w.r.t. all parameters, at the random
    point and at a point where every code is 0 (encoder bias pushed negative), plus the gradient of
    the penalty alone w.r.t. the codes."""
    batch = _obj.Batch(x_p=x)

    def total(p):
        return _obj.sdl_loss(p, batch, spec)[0]

    def pen_only(p):
        zz = _obj.pre_activations(p, x, spec)
        return f(spec.activation(zz, p), p, zz)

    vals: dict[str, Any] = {}
    try:
        grad_total = jax.jit(jax.grad(total))
        g = grad_total(params)
        g_dead = grad_total(params.replace(b_E=params.b_E - 100.0))
        gc = jax.jit(jax.grad(lambda c: f(c, params, z)))(codes)
        gp = jax.jit(jax.grad(pen_only))(params)
    except Exception as e:
        return Check("gradient", False, f"cannot be differentiated: {_err(e)}", fatal=True)
    vals["objective_grad_norm"] = _grad_norm(g)
    vals["penalty_grad_norm_params"] = _grad_norm(gp)
    vals["penalty_grad_norm_codes"] = _grad_norm(gc)
    bad = [nm for nm, t in (("objective", g), ("objective at all-zero codes", g_dead),
                            ("penalty w.r.t. codes", gc)) if not _all_finite(t)]
    if bad:
        return Check("gradient", False, f"non-finite gradient ({', '.join(bad)}): typically d/dc of log(c), "
                     "sqrt(c) or c**p with p < 1 at c = 0; add an eps or declare a straight-through estimator",
                     fatal=True, values=vals)
    st = " (pseudo-gradient: straight-through estimator declared)" if straight_through else ""
    if vals["penalty_grad_norm_params"] == 0.0:
        if straight_through:
            return Check("gradient", True, "finite; the straight-through pseudo-gradient is 0 at this point" + st,
                         values=vals)
        return Check("gradient", False, "the penalty's gradient w.r.t. the parameters is identically 0 here: "
                     "training cannot reduce it (a step function needs a straight-through estimator; register it "
                     "with straight_through=True)", values=vals)
    return Check("gradient", True, f"finite gradients of the objective and the penalty{st}", values=vals)


def _rescaling_check(f, codes, params, z, value) -> Check:
    """Degree of homogeneity d = log(pen(a) / pen(1)) / log(a) for a in {1/2, 2}, (i) scaling the codes
    alone, (ii) along the rescaling symmetry (codes x a, decoder / a): d = 0 in (ii) means the
    penalty cannot be lowered by shrinking codes and growing the decoder."""
    vals: dict[str, Any] = {}
    try:
        for a in (0.5, 2.0):
            vc = float(np.asarray(f(a * codes, params, a * z)))
            ps = _rescale(params, a)
            vs = float(np.asarray(f(a * codes, ps, a * z)))
            vals[f"codes_x{a:g}"] = vc
            vals[f"symmetry_x{a:g}"] = vs
        # the symmetry acts per latent: a different factor a_i for every latent
        a_i = jnp.exp(jnp.linspace(-0.7, 0.7, codes.shape[-1]))[::-1]
        vals["symmetry_per_latent"] = float(np.asarray(f(codes * a_i, _rescale(params, a_i), z * a_i)))
    except Exception as e:
        return Check("rescaling", None, f"could not evaluate on rescaled codes: {_err(e)}")

    def degree(v_a, a):
        if value == 0 or not (v_a > 0 and value > 0):
            return None
        return math.log(v_a / value) / math.log(a)

    dc = [degree(vals[f"codes_x{a:g}"], a) for a in (0.5, 2.0)]
    ds = [degree(vals[f"symmetry_x{a:g}"], a) for a in (0.5, 2.0)]
    inv = all(_close(vals[f"symmetry_x{a:g}"], value, rtol=1e-3) for a in (0.5, 2.0)) and _close(
        vals["symmetry_per_latent"], value, rtol=1e-3)
    vals["symmetry_invariant"] = inv
    vals["degree_codes"] = dc
    vals["degree_symmetry"] = ds

    def fmt(d):
        return "/".join("?" if x is None else f"{x:.2f}" for x in d)

    if inv:
        msg = (f"codes x a alone: degree {fmt(dc)} (a = 1/2, 2); invariant under the rescaling symmetry "
               "(codes x a, decoder / a): no decoder-norm constraint needed")
    else:
        per = "" if not all(_close(vals[f"symmetry_x{a:g}"], value, rtol=1e-3) for a in (0.5, 2.0)) else (
            f"invariant under a common factor but not per latent ({value:.4g} -> {vals['symmetry_per_latent']:.4g}); ")
        msg = (f"codes x a alone: degree {fmt(dc)} (a = 1/2, 2); along the rescaling symmetry (codes x a, decoder / a) "
               f"degree {fmt(ds)}; {per}the penalty can be changed by rescaling latents against their decoder "
               "columns, so train with unit-norm decoder columns")
    return Check("rescaling", True, msg, values=vals)


# ------------------------------------------------------------------------------------------------
# Activations
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Unregistered:
    """An activation function not (yet) in the registry, called like a bound
    :class:`jsdl.activations.Activation`: ``fn(z, params, inference=..., **hyper)``."""

    fn: Any
    hyper: tuple
    info: Any

    def __call__(self, z, params=None, *, inference=False):
        return self.fn(z, params, inference=inference, **dict(self.hyper))


def _activation_setup(key, sigma, n_latents, d_input, batch):
    """A random SAE for ``sigma`` and its pre-activations ``z [batch, n_latents]`` (half negative),
    with random thresholds when the activation reads them from the parameters."""
    if isinstance(sigma, _Unregistered):  # parameters with a threshold when it declares one
        spec = _obj.make_spec("sae", "jumprelu" if sigma.info.needs_threshold or sigma.info.inference_threshold
                              else "relu", n_latents=n_latents)
    else:
        spec = _obj.make_spec("sae", sigma.name, n_latents=n_latents, **sigma.hyper_dict())
    k_p, k_t, k_x = jax.random.split(key, 3)
    params = _obj.init_params(k_p, spec, d_input)
    if params.threshold is not None:
        params = params.replace(threshold=jax.random.uniform(k_t, params.threshold.shape, minval=0.05, maxval=0.3))
    z = _obj.pre_activations(params, jax.random.normal(k_x, (batch, d_input)), spec)
    return spec, params, z


def _key_property_check(sigma, z, params) -> Check:
    """Eq. 10: ``sigma(z)_i in {0, z_i}`` for every entry, in training and inference mode."""
    worst = 0.0
    for inference in (False, True):
        out = np.asarray(sigma(z, params, inference=inference), np.float64)
        zz = np.asarray(z, np.float64)
        dev = np.minimum(np.abs(out), np.abs(out - zz))  # 0 iff out is 0 or z
        worst = max(worst, float(dev.max()))
    scale = float(np.abs(np.asarray(z)).max())
    if worst <= 1e-6 * max(scale, 1.0):
        return Check("key_property", True, "sigma(z)_i in {0, z_i} for every entry (eq. 10), training and inference "
                     "mode", values={"max_deviation": worst})
    return Check("key_property", False, f"sigma(z)_i is neither 0 nor z_i (max deviation {worst:.3g}): the theory "
                 "(eq. 10: a 0/1 mask on the pre-activations) and the landscape tools do not apply; scale the kept "
                 "values outside the activation (e.g. in the decoder) instead", fatal=True,
                 values={"max_deviation": worst})


def _activation_gradient_check(sigma, z, params, key) -> Check:
    """Finite gradients w.r.t. ``z`` and the parameters; where sigma keeps z_i the derivative is the
    pass-through mask (``d sigma_i / d z_i = 1`` on kept entries, 0 on the rest for the loss's
    purposes)."""
    c = jax.random.normal(jax.random.fold_in(key, 3), z.shape)
    try:
        gz = np.asarray(jax.jit(jax.grad(lambda zz: jnp.sum(c * sigma(zz, params))))(z))
        gp = jax.jit(jax.grad(lambda p: jnp.sum(c * sigma(z, p))))(params)
    except Exception as e:  # noqa: BLE001 - user code
        return Check("gradient", False, f"cannot be differentiated: {_err(e)}", fatal=True)
    if not (np.all(np.isfinite(gz)) and _all_finite(gp)):
        return Check("gradient", False, "non-finite gradient w.r.t. the pre-activations or the parameters", fatal=True)
    kept = np.asarray(sigma(z, params)) != 0
    cn = np.asarray(c)
    on_kept = float(np.max(np.abs(gz[kept] - cn[kept]))) if kept.any() else 0.0
    vals = {"grad_norm_z": float(np.linalg.norm(gz)), "grad_norm_params": _grad_norm(gp), "max_dev_on_kept": on_kept}
    if not kept.any():
        return Check("gradient", False, "every code is 0 on random pre-activations: no gradient reaches the encoder",
                     values=vals)
    if on_kept > 1e-5 * max(1.0, float(np.abs(cn).max())):
        return Check("gradient", False, f"d sigma_i / d z_i != 1 on kept entries (max deviation {on_kept:.3g}): "
                     "the kept codes are not z_i", values=vals)
    return Check("gradient", True, "finite; d sigma_i / d z_i = 1 on kept entries", values=vals)


def _declared_info_checks(sigma, z, params) -> list:
    """What the registration declares: ``homogeneous`` (sigma(a z) = a sigma(z), a > 0) and not
    ``batch_coupled`` (one sample's codes do not depend on the rest of the batch)."""
    info = sigma.info
    out = []
    try:
        a = 2.5
        same = _close(np.asarray(sigma(a * z, params)), a * np.asarray(sigma(z, params)))
        ok = same if info.homogeneous else None
        msg = ("sigma(a z) = a sigma(z) (declared homogeneous)" if same else
               "sigma(a z) != a sigma(z): register it with homogeneous=False (Thm 3.1 and the rescaling symmetry "
               "need homogeneity)")
        out.append(Check("homogeneous", ok if info.homogeneous else None,
                         msg if info.homogeneous else "declared not homogeneous (not checked)"))
    except Exception as e:  # noqa: BLE001 - user code
        out.append(Check("homogeneous", False, f"raises on scaled inputs: {_err(e)}"))
    if info.batch_coupled:
        out.append(Check("per_sample", None, "declared batch-coupled (not checked)"))
        return out
    try:
        alone = np.asarray(sigma(z[:3], params))
        ok = _close(alone, np.asarray(sigma(z, params))[:3])
        out.append(Check("per_sample", ok, "codes of a sample do not depend on the rest of the batch" if ok else
                         "codes of a sample change with the rest of the batch: register it with batch_coupled=True"))
    except Exception as e:  # noqa: BLE001 - user code
        out.append(Check("per_sample", False, f"raises on a smaller batch: {_err(e)}"))
    return out


def check_activation(name, hyper: Optional[dict] = None, *, key: Optional[jax.Array] = None,
                     n_latents: int = 64, d_input: int = 12, batch: int = 32, **info: Any) -> ActivationChecks:
    """Run the mechanical checks on the registered activation ``name`` bound to ``hyper`` (or on an
    activation function ``fn(z, params=None, *, inference=False, **hyper)`` not registered yet, with
    the facts ``info`` it would be registered with, e.g. ``homogeneous=False``), on the
    pre-activations of a small random SAE (about half of them negative):

    eager call (an array of z's shape, finite), the key property ``sigma(z)_i in {0, z_i}`` (eq. 10,
    training and inference mode), jit and vmap equality with the eager / looped values, gradients
    (finite, pass-through on kept entries) and the declared ``homogeneous`` / ``batch_coupled``
    facts. Unknown names and hyperparameters raise ValueError; everything else is reported."""
    hyper = dict(hyper or {})
    if callable(name) and not isinstance(name, str):
        sigma = _Unregistered(name, tuple(sorted(hyper.items())), _act.ActivationInfo(**info))
        name = getattr(name, "__name__", "activation")
    elif info:
        raise TypeError(f"info {sorted(info)} is only for an unregistered function; {name!r} is registered")
    else:
        sigma = _act.get(name, **hyper)  # raises ValueError on unknown name / hyperparameters
    key = jax.random.PRNGKey(0) if key is None else key
    spec, params, z = _activation_setup(key, sigma, n_latents, d_input, batch)
    res = ActivationChecks(name=name, hyper=dict(sigma.hyper), checks=[])
    try:
        out = np.asarray(sigma(z, params))
        ok = out.shape == z.shape and bool(np.all(np.isfinite(out)))
        res.checks.append(Check("eager", ok, f"finite codes of shape {out.shape}, {np.mean(out == 0):.0%} zeros" if ok
                                else f"returned shape {out.shape} (expected {z.shape}) or non-finite values",
                                fatal=not ok))
    except Exception as e:  # noqa: BLE001 - user code: report, never crash
        res.checks.append(Check("eager", False, f"raises {_err(e)}", fatal=True))
    if res.failures:
        for nm in ("key_property", "jit", "vmap", "gradient", "homogeneous", "per_sample"):
            res.checks.append(Check(nm, None, "skipped: the eager call failed"))
        return res
    members = [_activation_setup(k, sigma, n_latents, d_input, batch)[1:]
               for k in jax.random.split(jax.random.fold_in(key, 7), 3)]
    members = [(zz, p) for p, zz in members]
    res.checks.extend([
        _key_property_check(sigma, z, params),
        _jit_check(lambda zz, p: sigma(zz, p), (z, params), out),
        _vmap_check(lambda zz, p: sigma(zz, p), members),
        _activation_gradient_check(sigma, z, params, key),
        *_declared_info_checks(sigma, z, params),
    ])
    return res
