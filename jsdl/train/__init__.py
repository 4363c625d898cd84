"""Training engine: jit, data-parallel over every device, vmapped populations, dead latents,
anchoring, orbax checkpoints.

    state, history = jsdl.train.fit(key, spec, bench, jsdl.train.TrainConfig(steps=2000, batch_size=512))
    states, histories = jsdl.train.fit_population(key, jsdl.train.Grid(spec, seeds=[0, 1], coefs={"l1": [1e-3, 3e-3]}),
                                                  bench, config)
    params, spec, info = jsdl.train.load_run("runs/my_run")

The names below load on first use (PEP 562), so ``jsdl train --help`` and config validation do not
pay for importing JAX.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

_WHERE = {
    "anchors_from_class_means": "anchors",
    "anchors_from_ground_truth": "anchors",
    "CheckpointError": "checkpoint",
    "TrainConfig": "config",
    "dead_mask": "dead",
    "resample_dead": "dead",
    "Grid": "loop",
    "NonFiniteLossError": "loop",
    "TrainingInterrupted": "loop",
    "fit": "loop",
    "fit_population": "loop",
    "load_run": "loop",
    "member": "loop",
    "population_data_key": "loop",
    "ResumeError": "rundir",
    "RunLockedError": "rundir",
    "DeadStats": "state",
    "TrainState": "state",
    "init_state": "state",
    "spec_from_dict": "state",
    "spec_to_dict": "state",
    "threshold_for_l0": "state",
    "RowParams": "state",
    "Stepper": "step",
    "make_mesh": "step",
    "model_step": "step",
}

__all__ = [
    "CheckpointError",
    "DeadStats",
    "Grid",
    "NonFiniteLossError",
    "ResumeError",
    "RowParams",
    "RunLockedError",
    "Stepper",
    "TrainConfig",
    "TrainState",
    "TrainingInterrupted",
    "anchors_from_class_means",
    "anchors_from_ground_truth",
    "dead_mask",
    "fit",
    "fit_population",
    "init_state",
    "load_run",
    "make_mesh",
    "member",
    "model_step",
    "population_data_key",
    "resample_dead",
    "spec_from_dict",
    "spec_to_dict",
    "threshold_for_l0",
]


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is not None:
        value = getattr(importlib.import_module(f"jsdl.train.{mod}"), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"jsdl.train.{name}") is not None:
        value = importlib.import_module(f"jsdl.train.{name}")  # a submodule, e.g. jsdl.train.mesh
    else:
        raise AttributeError(f"module 'jsdl.train' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


if TYPE_CHECKING:  # static analysers and the API docs see the names
    from jsdl.train.anchors import anchors_from_class_means, anchors_from_ground_truth  # noqa: F401
    from jsdl.train.checkpoint import CheckpointError  # noqa: F401
    from jsdl.train.config import TrainConfig  # noqa: F401
    from jsdl.train.dead import dead_mask, resample_dead  # noqa: F401
    from jsdl.train.loop import (Grid, NonFiniteLossError, TrainingInterrupted, fit, fit_population,  # noqa: F401
                                 load_run, member, population_data_key)
    from jsdl.train.rundir import ResumeError, RunLockedError  # noqa: F401
    from jsdl.train.state import (DeadStats, RowParams, TrainState, init_state, spec_from_dict,  # noqa: F401
                                  spec_to_dict)
    from jsdl.train.step import Stepper, make_mesh, model_step  # noqa: F401
