"""jsdl: sparse dictionary learning in JAX, as one optimisation problem (arXiv 2512.05534).

Public API (see DESIGN.md "Public contract")::

    spec   = jsdl.make_spec(method="sae", activation="topk", n_latents=4096, k=32)
    params = jsdl.init_params(key, spec, d_input=768)
    loss, aux = jsdl.sdl_loss(params, jsdl.Batch(x_p, x_r), spec)
"""
from jsdl import activations, methods, penalties
from jsdl.objective import (
    Anchors,
    Batch,
    SDLParams,
    SDLSpec,
    decode,
    encode,
    init_params,
    make_spec,
    param_count,
    pre_activations,
    sdl_loss,
    spec_from_dict,
    spec_to_dict,
)

__version__ = "0.1.0"

__all__ = [
    "Anchors",
    "Batch",
    "SDLParams",
    "SDLSpec",
    "activations",
    "decode",
    "encode",
    "init_params",
    "make_spec",
    "methods",
    "param_count",
    "penalties",
    "pre_activations",
    "sdl_loss",
    "spec_from_dict",
    "spec_to_dict",
]


def __getattr__(name):
    # Heavier subpackages load on first use so `import jsdl` stays fast.
    import importlib

    if name in ("data", "metrics", "train", "landscape", "cli", "export"):
        return importlib.import_module(f"jsdl.{name}")
    raise AttributeError(f"module 'jsdl' has no attribute {name!r}")
