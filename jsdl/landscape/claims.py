"""Checked claims: the :class:`Record` of one claim, its verdicts, and the registry of checks that
``jsdl theory-check`` runs (:data:`CHECKS`, :func:`register`, :func:`run_all`).

A check is a function ``check(key) -> list[Record]`` that runs at a size that takes seconds on a
laptop CPU. Register one with :func:`register`, as a decorator or in one line::

    from jsdl.landscape.claims import register
    register("P15", check_my_claim)            # or @register("P15") above its definition

Checks run in registration order; each gets its own key, ``fold_in(key, crc32(name))``, so adding
or removing a check does not change the numbers of the others.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jsdl.records import to_jsonable

__all__ = ["Record", "HOLDS", "FAILS", "CONDITIONAL", "DEFERRED", "CHECKS", "register", "run_all", "zero_tol",
           "as_float"]

HOLDS = "holds"
FAILS = "fails"
CONDITIONAL = "holds only under a stated extra condition"
DEFERRED = "deferred to experiments"


@dataclasses.dataclass
class Record:
    """One checked claim. ``data`` carries arrays for plots and is not written to JSON."""

    id: str
    claim: str
    setting: dict
    measured: dict
    tolerance: str
    verdict: str
    condition: str = ""
    note: str = ""
    data: dict = dataclasses.field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "claim": self.claim,
            "setting": to_jsonable(self.setting),
            "measured": to_jsonable(self.measured),
            "tolerance": self.tolerance,
            "verdict": self.verdict,
            "condition": self.condition,
            "note": self.note,
        }


def zero_tol(scale: float = 1.0) -> float:
    """Tolerance for a quantity that is zero in exact arithmetic: ~1e-9 relative under float64,
    ~1e-3 under float32."""
    eps = float(jnp.finfo(jnp.zeros(()).dtype).eps)
    return (1e-9 if eps < 1e-10 else 2e-3) * max(1.0, scale)


def as_float(x) -> float:
    """``x`` (a scalar array or number) as a Python float."""
    return float(np.asarray(x))



# ------------------------------------------------------------------------------------------------
# The registry
# ------------------------------------------------------------------------------------------------

Check = Callable[[jax.Array], "list[Record]"]

# name -> check, in the order run_all and `jsdl theory-check` run them (registration order)
CHECKS: dict[str, Check] = {}


def register(name: str, fn: Optional[Check] = None, *, replace: bool = False):
    """Register ``fn(key) -> list[Record]`` as check ``name``; use as ``register(name, fn)`` or as a
    decorator ``@register(name)``. A name already registered raises ValueError unless ``replace``
    (then the check keeps its place in the order). Returns ``fn``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"check name must be a non-empty str, got {name!r}")

    def add(f: Check) -> Check:
        if not callable(f):
            raise TypeError(f"check {name!r} must be callable as check(key) -> list[Record], got {type(f).__name__}")
        if name in CHECKS and not replace:
            raise ValueError(f"check {name!r} is already registered (to {CHECKS[name].__name__}); pass replace=True")
        CHECKS[name] = f
        return f

    return add if fn is None else add(fn)


def run_all(key, *, only=None, progress=None) -> list[Record]:
    """Run every check in :data:`CHECKS` (or those named in ``only``), in order, and return the
    records. ``progress(name)`` is called before each check."""
    out = []
    for name, fn in CHECKS.items():
        if only and name not in only:
            continue
        if progress:
            progress(name)
        out.extend(fn(jax.random.fold_in(key, zlib.crc32(name.encode()) % (2**31))))
    return out
