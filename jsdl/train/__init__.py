"""Training engine: jit, data-parallel over every device, vmapped populations, dead latents,
anchoring, orbax checkpoints.

    state, history = jsdl.train.fit(key, spec, bench, jsdl.train.TrainConfig(steps=2000, batch_size=512))
    states, histories = jsdl.train.fit_population(key, jsdl.train.Grid(spec, seeds=[0, 1], coefs={"l1": [1e-3, 3e-3]}),
                                                  bench, config)
    params, spec, info = jsdl.train.load_run("runs/my_run")
"""
from jsdl.train.anchors import anchors_from_class_means, anchors_from_ground_truth
from jsdl.train.checkpoint import CheckpointError
from jsdl.train.config import TrainConfig
from jsdl.train.dead import dead_mask, resample_dead
from jsdl.train.loop import (Grid, NonFiniteLossError, TrainingInterrupted, fit, fit_population, load_run, member,
                             population_data_key)
from jsdl.train.rundir import ResumeError, RunLockedError
from jsdl.train.state import DeadStats, TrainState, init_state, spec_from_dict, spec_to_dict
from jsdl.train.step import Stepper, make_mesh, model_step

__all__ = [
    "CheckpointError",
    "DeadStats",
    "Grid",
    "NonFiniteLossError",
    "ResumeError",
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
]
