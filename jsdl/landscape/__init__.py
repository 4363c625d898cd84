"""Landscape analysis of the SDL objective (paper section 3): the approximate per-feature loss and
activation regions (:mod:`~jsdl.landscape.approx`), Hessians, HVPs, Lanczos and symmetry
projection (:mod:`~jsdl.landscape.hessian`), stationary points (:mod:`~jsdl.landscape.stationary`),
the paper's constructions (:mod:`~jsdl.landscape.constructions`), the numeric checks of its claims
(:mod:`~jsdl.landscape.checks`) and their record type and registry (:mod:`~jsdl.landscape.claims`;
:mod:`~jsdl.landscape.theory` gathers all three); ``jsdl theory-check``
(:mod:`~jsdl.landscape.report`) runs every registered check."""
from jsdl.landscape.approx import (
    FeatureProblem,
    SparseLaw,
    activation_pattern,
    approx_loss,
    approx_loss_frozen,
    codes_per_feature,
    feature_weights,
    frozen_codes,
    in_region,
    make_problem,
    mc_loss,
    multi_feature_gap,
    pattern_summary,
    spec_for,
    theorem_3_1_bound,
    theory_params,
)
from jsdl.landscape.hessian import (
    Hessian,
    complement_eigvalsh,
    decoder_block_closed_form,
    encoder_block_closed_form,
    finite_difference_hvp,
    flatten,
    full_hessian,
    hvp,
    lanczos,
    lanczos_extremes,
    make_hvp,
    project_out,
    rescaling_tangents,
    spectral_density,
)
from jsdl.landscape.theory import (
    CHECKS,
    CONDITIONAL,
    DEFERRED,
    FAILS,
    HOLDS,
    Record,
    eigen_partial_optimum,
    example_3_5,
    point_with_margin,
    random_params,
    register,
    run_all,
    theorem_3_3_bounds,
    theorem_3_3_solution,
    theorem_3_6_literal,
    theorem_3_8_absorption,
    zero_loss_solution,
)
