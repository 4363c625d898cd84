"""Synthetic superposition data with known ground truth (and, later, real activation files).

* :mod:`jsdl.data.bench`: the Linear Representation Bench of the paper (App. C), :func:`make_bench`.
* :mod:`jsdl.data.structured`: hierarchy, correlated firing, per-feature rates and importance,
  noise, and the toy model of superposition (Elhage et al. 2022).
* :mod:`jsdl.data.synth`: the SynthSAEBench recipe (Zipfian rates, exclusive hierarchy, low-rank
  correlated firing), :func:`make_synth`.
* :mod:`jsdl.data.files`: activation files (loaded lazily, on first use).

Every data source exposes ``sample(key, batch_size) -> jsdl.Batch`` and ``W_p`` / ``W_r``.
"""
from jsdl.data.bench import (
    Bench,
    InfeasibleInterferenceError,
    SparseLaw,
    generate_feature_matrix,
    interference_lower_bound_check,
    make_bench,
    max_interference,
)
from jsdl.data.structured import (
    StructuredBench,
    ToyModel,
    build_hierarchy,
    make_hierarchical_bench,
    make_structured_bench,
    make_toy_model_bench,
    train_toy_model,
    validate_hierarchy,
)
from jsdl.data.synth import SYNTH_16K, SynthBench, SynthConfig, make_synth

__all__ = [
    "Bench",
    "InfeasibleInterferenceError",
    "SparseLaw",
    "StructuredBench",
    "ToyModel",
    "build_hierarchy",
    "generate_feature_matrix",
    "interference_lower_bound_check",
    "make_bench",
    "make_hierarchical_bench",
    "make_structured_bench",
    "make_toy_model_bench",
    "max_interference",
    "train_toy_model",
    "validate_hierarchy",
    "SYNTH_16K", "SynthBench", "SynthConfig", "make_synth",
]

# Submodules (and their public names) loaded on first use, so `import jsdl.data` stays light (files.py
# pulls in the file formats). Add a name here to re-export it.
_LAZY_SUBMODULES = ("files",)
_LAZY_NAMES: dict[str, str] = {}  # e.g. {"ActivationFiles": "files"}


def __getattr__(name):
    import importlib

    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"jsdl.data.{name}")
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f"jsdl.data.{_LAZY_NAMES[name]}"), name)
    raise AttributeError(f"module 'jsdl.data' has no attribute {name!r}")
