"""jsdl: sparse dictionary learning in JAX, as one optimisation problem (arXiv 2512.05534).

Public API (see docs/design.md, "Public contract")::

    spec   = jsdl.make_spec(method="sae", activation="topk", n_latents=4096, k=32)
    params = jsdl.init_params(key, spec, d_input=768)
    loss, aux = jsdl.sdl_loss(params, jsdl.Batch(x_p, x_r), spec)

Every name loads on first use (PEP 562), so ``import jsdl`` and ``jsdl --help`` do not import JAX.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # static analysers see the eager imports
    __version__: str
    from jsdl import activations, methods, penalties, registry
    from jsdl.objective import (
        Anchors,
        Batch,
        SDLParams,
        SDLSpec,
        decode,
        encode,
        encoder_input,
        init_params,
        make_spec,
        param_count,
        pre_activations,
        sdl_loss,
        spec_from_dict,
        spec_to_dict,
    )


def _version() -> str:
    # The one version source is pyproject.toml; an installed jsdl carries it in its metadata.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jsdl")
    except PackageNotFoundError:  # a source tree on sys.path that was never installed
        return "0+unknown"


_OBJECTIVE = (
    "Anchors",
    "Batch",
    "SDLParams",
    "SDLSpec",
    "decode",
    "encode",
    "init_params",
    "make_spec",
    "param_count",
    "encoder_input",
    "pre_activations",
    "sdl_loss",
    "spec_from_dict",
    "spec_to_dict",
)
_SUBMODULES = ("activations", "methods", "penalties", "registry", "data", "metrics", "train", "landscape", "lab",
               "cli", "export", "kernels", "objective")

__all__ = sorted(_OBJECTIVE + ("activations", "methods", "penalties"))


def __getattr__(name: str):
    if name == "__version__":  # read on first use: importlib.metadata costs ~40 ms
        value = _version()
    elif name in _OBJECTIVE:
        value = getattr(importlib.import_module("jsdl.objective"), name)
    elif name in _SUBMODULES or (not name.startswith("_") and importlib.util.find_spec(f"jsdl.{name}")):
        value = importlib.import_module(f"jsdl.{name}")  # any subpackage, e.g. jsdl.experiments
    else:
        raise AttributeError(f"module 'jsdl' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_OBJECTIVE) | set(_SUBMODULES) | {"__version__"})
