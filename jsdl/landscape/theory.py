"""The paper's constructions and claims (section 3 of arXiv 2512.05534), checked numerically.

This module gathers the public names of three rooms:

* :mod:`jsdl.landscape.claims`: the :class:`Record` of one checked claim, its verdicts
  (``holds``; ``fails``; ``holds only under a stated extra condition``; ``deferred to
  experiments``) and the registry of checks (:data:`CHECKS`, :func:`register`, :func:`run_all`);
* :mod:`jsdl.landscape.constructions`: the paper's constructions (:func:`theorem_3_3_solution`
  W*, :func:`theorem_3_3_bounds`, :func:`zero_loss_solution` ``W_D = W_r Z^+``,
  :func:`example_3_5`, :func:`theorem_3_6_literal` eq. 55, :func:`eigen_partial_optimum` the
  corrected characterisation, :func:`theorem_3_8_absorption`);
* :mod:`jsdl.landscape.checks`: one ``check_*`` per prediction P1-P14 of
  ``reference/paper-2512.05534.md`` section 8 (ids with a suffix when a prediction has several
  parts), each registered in :data:`CHECKS`.
"""
from __future__ import annotations

from jsdl.landscape.checks import (
    check_activation_property,
    check_dead_latents,
    check_decoder_block,
    check_default_regime,
    check_encoder_block,
    check_example_3_5,
    check_lanczos,
    check_loss_approximation,
    check_non_identifiability,
    check_theorem_3_3,
    check_theorem_3_6,
    check_theorem_3_8,
    check_training_claims,
)
from jsdl.landscape.claims import CHECKS, CONDITIONAL, DEFERRED, FAILS, HOLDS, Record, register, run_all
from jsdl.landscape.constructions import (
    eigen_partial_optimum,
    example_3_5,
    point_with_margin,
    random_params,
    theorem_3_3_bounds,
    theorem_3_3_solution,
    theorem_3_6_literal,
    theorem_3_8_absorption,
    zero_loss_solution,
)

__all__ = [
    "Record",
    "HOLDS",
    "FAILS",
    "CONDITIONAL",
    "DEFERRED",
    "CHECKS",
    "register",
    "run_all",
    "theorem_3_3_solution",
    "theorem_3_3_bounds",
    "zero_loss_solution",
    "example_3_5",
    "theorem_3_6_literal",
    "eigen_partial_optimum",
    "theorem_3_8_absorption",
    "random_params",
    "point_with_margin",
    "check_loss_approximation",
    "check_default_regime",
    "check_decoder_block",
    "check_encoder_block",
    "check_lanczos",
    "check_theorem_3_3",
    "check_non_identifiability",
    "check_example_3_5",
    "check_theorem_3_6",
    "check_dead_latents",
    "check_theorem_3_8",
    "check_training_claims",
    "check_activation_property",
]
