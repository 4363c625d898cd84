"""Landscape analysis of the SDL objective (paper section 3): the approximate per-feature loss and
activation regions (:mod:`~jsdl.landscape.approx`), Hessians, HVPs, Lanczos and symmetry
projection (:mod:`~jsdl.landscape.hessian`), stationary points (:mod:`~jsdl.landscape.stationary`)
and the paper's constructions with numeric checks (:mod:`~jsdl.landscape.theory`); ``jsdl
theory-check`` (:mod:`~jsdl.landscape.report`) runs them all."""
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
