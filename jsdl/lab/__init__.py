"""The penalty lab: ``jsdl penalty-lab NAME`` tells a researcher what a sparsity penalty does.

Write a penalty, register it, run the lab, read the report::

    # my_penalty.py
    import jax.numpy as jnp, jsdl

    @jsdl.penalties.register("sqrt")
    def sqrt_penalty(codes, params, *, eps=1e-6):
        return jnp.sum(jnp.sqrt(jnp.abs(codes) + eps) - jnp.sqrt(eps), axis=-1).mean()

    $ jsdl penalty-lab sqrt --import my_penalty.py --scale small --out runs/lab_sqrt
    $ open runs/lab_sqrt/report.md

From Python: ``jsdl.lab.run_lab("l1", scale="small", out_dir="runs/lab_l1")`` returns the report
dict; ``jsdl.lab.check_penalty(name)`` runs only the mechanical checks. A custom activation gets
its own mechanical checks (``jsdl.lab.check_activation(name)``, or ``jsdl penalty-lab NAME
--activation --import my_act.py``): the key property ``sigma(z)_i in {0, z_i}`` (eq. 10), jit and
vmap equality, gradients and the facts declared at registration. See :mod:`jsdl.lab.core`
for what is measured and how.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from jsdl.lab.checks import ActivationChecks, Check, PenaltyChecks, check_activation, check_penalty
from jsdl.lab.core import SCALES, Scale, auto_coefs, run_lab

__all__ = ["ActivationChecks", "Check", "PenaltyChecks", "SCALES", "Scale", "add_arguments", "auto_coefs",
           "check_activation", "check_penalty",
           "run", "run_lab"]


def _parse_coefs(text: str):
    if text is None or text.strip().lower() == "auto":
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(float(part))
        except ValueError:
            raise ValueError(f"--coefs must be comma-separated numbers (e.g. 1e-4,3e-4,1e-3) or 'auto', got {text!r}") \
                from None
    if not out:
        raise ValueError(f"--coefs is empty: {text!r}")
    return out


def _parse_hyper(items, legacy=(), section="penalty"):
    """``--set SECTION.NAME=VALUE`` items -> hyperparameters of the checked penalty (``section="penalty"``)
    or activation (``section="activation"``); values parsed as YAML (1e-3 is a float)."""
    from jsdl.train.config import parse_set

    if legacy:
        raise ValueError(f"--hyper is gone: write --set {section}.{legacy[0]} (one KEY=VALUE syntax: --set section.key=value)")
    hyper = {}
    for path, val in parse_set(items):
        if len(path) != 2 or path[0] != section:
            raise ValueError(f"--set {'.'.join(path)}: the penalty lab takes {section} hyperparameters as "
                             f"--set {section}.NAME=VALUE (e.g. --set {section}.eps=1e-3)")
        hyper[path[1]] = val
    return hyper


def add_arguments(p):
    p.add_argument("name", help="registered penalty name (built in, or registered by --import); with --activation "
                   "a registered activation name")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                   help="a Python file or module that registers the penalty (repeatable)")
    p.add_argument("--coefs", default=None,
                   help="comma-separated coefficient grid (default: auto, scaled to the penalty)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.NAME=VALUE",
                   help="penalty hyperparameter (repeatable), e.g. --set penalty.eps=1e-3")
    p.add_argument("--hyper", action="append", default=[], help=argparse.SUPPRESS)  # old syntax: a clear error
    p.add_argument("--scale", default="small", choices=sorted(SCALES), help="problem size (default small: CPU minutes)")
    p.add_argument("--seeds", type=int, default=None, help="models per grid point (default: the scale's)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of bench, data and initialisation")
    p.add_argument("--out", default=None, help="output directory (default runs/penalty_lab_NAME)")
    p.add_argument("--parts", default="frontier,hierarchy,critical,retrain",
                   help="comma-separated subset of frontier,hierarchy,critical,retrain (checks always run)")
    p.add_argument("--checks-only", action="store_true", help="run only the mechanical checks and print them")
    p.add_argument("--activation", action="store_true",
                   help="NAME is an activation: run its mechanical checks (key property sigma(z)_i in {0, z_i}, "
                        "jit, vmap, gradients, declared facts) and print them; --set activation.NAME=VALUE binds its hyperparameters")


def run(args) -> int:
    from jsdl import plugins

    plugins.load_all(args.imports)  # the same loader as `jsdl --import` (a file is imported once)
    hyper = _parse_hyper(args.set, args.hyper, "activation" if args.activation else "penalty")
    if args.activation:
        res = check_activation(args.name, hyper)
        print(res.to_markdown())
        return 0 if res.ok else 1
    if args.checks_only:
        res = check_penalty(args.name, hyper)
        print(res.to_markdown())
        return 0 if res.can_train else 1
    out = args.out or os.path.join("runs", f"penalty_lab_{args.name}")
    parts = tuple(x.strip() for x in args.parts.split(",") if x.strip())
    rep = run_lab(args.name, hyper=hyper, coefs=_parse_coefs(args.coefs), scale=args.scale, seed=args.seed,
                  seeds=args.seeds, out_dir=out, parts=parts)
    return 0 if rep["checks"]["can_train"] else 1
