"""Populations: a :class:`Grid` of members (seeds x coefs x k x learning_rate) or a list of specs
that differ only in penalty coefficients and TopK k, trained by :func:`jsdl.train.fit_population`
as one vmapped program."""
from __future__ import annotations

import dataclasses
import itertools
from typing import Mapping, Sequence

import jax
import numpy as np

from jsdl.objective import SDLSpec
from jsdl.train.config import TrainConfig
from jsdl.train.state import TrainState, raw_key, spec_from_dict, spec_to_dict

__all__ = ["Grid", "member", "population_data_key", "members_from"]


@dataclasses.dataclass(frozen=True)
class Grid:
    """A population as a Cartesian product: ``seeds x coefs x k x learning_rate``.

    spec: the base spec. seeds: ints; member keys are ``fold_in(key, seed)``. coefs: penalty name ->
    list of coefficients (each combination is a member). k: TopK/BatchTopK k values (run with
    ``k_max`` and a mask). learning_rate: values (default: the config's)."""

    spec: SDLSpec
    seeds: Sequence[int] = (0,)
    coefs: Mapping[str, Sequence[float]] = dataclasses.field(default_factory=dict)
    k: Sequence[int] = ()
    learning_rate: Sequence[float] = ()

    def members(self, config: TrainConfig) -> list[dict]:
        names = list(self.coefs)
        for n in names:
            if n not in self.spec.penalty_coefs:
                raise ValueError(f"Grid.coefs names penalty {n!r}, not in the spec ({sorted(self.spec.penalty_coefs)})")
        coef_combos = list(itertools.product(*[list(self.coefs[n]) for n in names])) or [()]
        ks = list(self.k) or [None]
        lrs = list(self.learning_rate) or [config.learning_rate]
        out = []
        for s, cc, k, lr in itertools.product(list(self.seeds), coef_combos, ks, lrs):
            out.append({"seed": int(s), "coefs": dict(zip(names, map(float, cc))), "k": k, "learning_rate": float(lr)})
        return out


def _member_spec(spec: SDLSpec, m: dict) -> SDLSpec:
    d = spec_to_dict(spec)
    for n, c in m["coefs"].items():
        d["penalties"][n]["coef"] = c
    if m.get("k") is not None:
        d["activation_hyper"]["k"] = int(m["k"])
    return spec_from_dict(d)


def _static_signature(spec: SDLSpec) -> dict:
    d = spec_to_dict(spec)
    for p in d["penalties"].values():
        p["coef"] = None
    d["activation_hyper"].pop("k", None)
    return d


def member(states: TrainState, i: int) -> TrainState:
    """Member ``i`` of a population state (a plain single-model TrainState)."""
    return jax.tree.map(lambda x: x[i], states)


def members_from(key, specs_or_grid, config):
    """``(specs, member records, the spec the step runs, whether k varies)`` of a population."""
    if isinstance(specs_or_grid, Mapping):
        specs_or_grid = Grid(**specs_or_grid)
    if isinstance(specs_or_grid, Grid):
        ms = specs_or_grid.members(config)
        base = specs_or_grid.spec
        specs = [_member_spec(base, m) for m in ms]
    elif isinstance(specs_or_grid, (list, tuple)) and specs_or_grid and all(isinstance(s, SDLSpec) for s in specs_or_grid):
        specs = list(specs_or_grid)
        ms = []
        for i, s in enumerate(specs):
            ms.append({"seed": i, "coefs": dict(s.penalty_coefs), "k": s.activation.hyper_dict().get("k"),
                       "learning_rate": config.learning_rate})
    else:
        raise TypeError(
            "specs_or_grid must be a non-empty list of SDLSpec, a jsdl.train.Grid or a dict of Grid fields, "
            f"got {type(specs_or_grid).__name__}"
        )
    sig0 = _static_signature(specs[0])
    for i, s in enumerate(specs[1:], 1):
        if _static_signature(s) != sig0:
            raise ValueError(
                "population members may differ only in penalty coefficients and k; "
                f"member 0 is {specs[0].describe()!r} but member {i} is {s.describe()!r}"
            )
    ks = {s.activation.hyper_dict().get("k") for s in specs}
    vary_k = len(ks) > 1
    run_spec = specs[0]
    if vary_k:
        d = spec_to_dict(specs[0])
        d["activation_hyper"]["k"] = max(ks)
        run_spec = spec_from_dict(d)
        if run_spec.activation.name not in ("topk", "batchtopk"):
            raise ValueError(f"varying k needs activation topk or batchtopk, got {run_spec.activation.name!r}")
    key = raw_key(key)
    for m, s in zip(ms, specs):
        m["key"] = np.asarray(jax.random.fold_in(key, m["seed"])).tolist()
        m["spec"] = s.describe()
        m["k"] = s.activation.hyper_dict().get("k")
    return specs, ms, run_spec, vary_k


def population_data_key(key) -> jax.Array:
    """The data-stream key every member of ``fit_population(key, ...)`` shares."""
    return jax.random.fold_in(raw_key(key), 0x5EED)

