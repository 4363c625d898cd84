"""Typed training configuration.

:class:`TrainConfig` is a frozen (hashable) dataclass: it is closed over by the jitted step, so every
field is a static Python value. Values that vary across a population (learning rate, penalty
coefficients, TopK ``k``) are *not* read from here inside the step but from the traced
``TrainState.hyper``, which :func:`jsdl.train.fit` fills from this config and the spec.

Configs load from plain dicts (YAML) through :func:`from_dict`, which rejects unknown keys (naming
the valid ones) and wrong types (naming the field, the value and the expected type) before anything
is compiled.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Optional, Union

__all__ = ["TrainConfig", "from_dict", "to_dict", "check_types", "yaml_load", "parse_set"]

OPTIMIZERS = ("adam", "adamw", "sgd")
DECAYS = ("constant", "linear", "cosine")
DECODER_NORMS = ("none", "unit")
ANCHOR_SOURCES = ("ground_truth", "class_means")
ENCODER_INITS = ("unit", "transpose")  # jsdl.objective.ENCODER_INITS (not imported: no JAX here)
COMPUTE_DTYPES = ("float32", "bfloat16")


class _FrozenDict(dict):
    """A dict that hashes (TrainConfig is hashable: the compiled step is cached on it)."""

    def __hash__(self):
        return hash(tuple(sorted(self.items())))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training hyperparameters (all static).

    Optimisation
        steps, batch_size: number of optimiser steps and the *global* batch size (split over devices).
        learning_rate: peak learning rate eta.
        optimizer: ``adam`` | ``adamw`` | ``sgd`` (``momentum`` for sgd); ``b1``, ``b2``, ``eps``.
        weight_decay: decoupled weight decay (adamw; thresholds are never decayed).
        grad_clip: global-norm gradient clipping (0 = off).
        warmup_steps: linear learning-rate warm-up eta_t = eta * min(1, (t+1)/warmup_steps).
        decay: ``constant`` | ``linear`` | ``cosine`` from ``decay_start * steps`` to the end, down
            to ``min_lr_ratio * eta``.
        coef_warmup_steps: penalty coefficients lambda_j ramp linearly from 0 to their value
            (SAELens / dictionary_learning "sparsity warm-up").
    Initialisation (:func:`jsdl.init_params`)
        init_decoder_norm: norm of the initial decoder columns (default 1).
        init_encoder: ``unit`` (encoder rows of unit norm, the decoder's transpose rescaled) or
            ``transpose`` (the decoder's transpose exactly). SAELens's init is
            ``init_decoder_norm=0.1, init_encoder=transpose``.
    Decoder norm
        decoder_norm: ``none`` or ``unit``: before the update the gradient component parallel to each
            decoder column is removed; after it the columns are projected back to unit norm
            (``ConstrainedAdam`` of dictionary_learning; sparsify/openai do the same). For a
            crosscoder the whole stacked column (all sources) is normalised; tied models
            normalise the rows of W_E.
    Thresholds
        init_threshold_l0: start every JumpReLU threshold where the initial parameters fire this many
            latents per sample on average (:func:`jsdl.train.threshold_for_l0` on a probe batch of
            4096 samples of the data, drawn with a key of its own), instead of at the
            activation's ``threshold``. None (default): the activation's ``threshold``. The L0
            falls during training, so this is a starting point to calibrate, not the target
            (docs/training.md).
        min_threshold: JumpReLU thresholds are clipped to ``>= min_threshold`` (> 0) after each step.
        threshold_rate: BatchTopK inference threshold running average rate
            theta <- (1 - r) theta + r * min positive code (first step: theta = that value).
    Dead latents
        dead_window: a latent is dead when it has not fired for ``dead_window`` steps, or when its
            firing frequency over the last completed window of ``dead_window`` steps is below
            ``dead_threshold`` (0 = only the "never fired" rule).
        resample_every: Anthropic resampling of dead latents every this many steps (0 = off), up to
            step ``resample_until`` (0 = no limit); ``resample_scale`` scales the new encoder rows
            relative to the mean alive encoder-row norm (0.2 in Bricken et al. 2023).
        ghost_grads: add the ghost-grads loss (Anthropic, Jan 2024) for dead latents.
    Anchoring (paper section 5, eqs. 25-26)
        anchors: number k of anchored latents (0 = off); ``anchor_coef`` = lambda_anchor;
            ``anchor_source``: ``ground_truth`` (k random bench features; needs data with W_p/W_r)
            or ``class_means`` (pass ``anchors=anchors_from_class_means(...)`` to ``fit``).
    Logging / checkpoints
        log_every: metrics are reduced on device and fetched every this many steps.
        checkpoint_every: checkpoint interval (0 = only at the end when ``out_dir`` is given).
        keep_checkpoints: keep the last N checkpoints.
        progress: show a tqdm progress bar (None = only when stderr is a terminal).
        plots: write matplotlib plots at the end when ``out_dir`` is given.
    Devices (see :mod:`jsdl.train.mesh`)
        mesh: ``{data: D, model: M}``: the batch is split over D devices and everything indexed
            by latent (encoder rows, decoder columns, b_E, thresholds, Adam moments, dead
            statistics) over M; D x M must be the device count and M must divide n_latents.
            ``None`` (default): every device on "data".
        compute_dtype: ``float32`` | ``bfloat16``: the dtype of the forward/backward matmuls.
            Parameters and optimiser state stay float32 (bf16 casts of the weights are made
            inside the step; their gradients come back float32).
    Performance
        donate: donate the training state's buffers to the jitted step (params and optimiser state
            are updated in place, no second copy). A ``fit`` callback that keeps the state beyond
            the call must copy it (``jax.device_get``); set ``donate=False`` to keep references.
    """

    steps: int = 1000
    batch_size: int = 256
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    warmup_steps: int = 0
    decay: str = "constant"
    decay_start: float = 0.8
    min_lr_ratio: float = 0.0
    coef_warmup_steps: int = 0
    decoder_norm: str = "none"
    init_decoder_norm: float = 1.0
    init_encoder: str = "unit"
    init_threshold_l0: Optional[float] = None
    min_threshold: float = 1e-6
    threshold_rate: float = 0.01
    dead_window: int = 200
    dead_threshold: float = 0.0
    resample_every: int = 0
    resample_until: int = 0
    resample_scale: float = 0.2
    ghost_grads: bool = False
    anchors: int = 0
    anchor_coef: float = 0.1
    anchor_source: str = "ground_truth"
    log_every: int = 50
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    progress: Optional[bool] = None
    plots: bool = True
    donate: bool = True
    mesh: Optional[dict] = None
    compute_dtype: str = "float32"

    def __post_init__(self):
        check_types(self, "train")
        if self.mesh is not None:
            from jsdl.train.mesh import mesh_shape

            mesh_shape(self.mesh, (self.mesh.get("data") or 1) * (self.mesh.get("model") or 1))  # names, ints
            object.__setattr__(self, "mesh", _FrozenDict(self.mesh))
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"train.compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}; got {self.compute_dtype!r}")
        pos = ("steps", "batch_size", "log_every", "dead_window", "keep_checkpoints")
        for name in pos:
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)!r}")
        nonneg = ("warmup_steps", "coef_warmup_steps", "resample_every", "resample_until", "checkpoint_every",
                  "anchors", "weight_decay", "grad_clip", "momentum", "dead_threshold", "anchor_coef",
                  "min_lr_ratio", "resample_scale")
        for name in nonneg:
            v = getattr(self, name)
            if not v >= 0:
                raise ValueError(f"train.{name} must be >= 0, got {v!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"train.learning_rate must be > 0, got {self.learning_rate!r}")
        if not self.init_decoder_norm > 0:
            raise ValueError(f"train.init_decoder_norm must be > 0, got {self.init_decoder_norm!r}")
        if self.init_threshold_l0 is not None and not self.init_threshold_l0 > 0:
            raise ValueError(f"train.init_threshold_l0 must be > 0 (latents per sample), got {self.init_threshold_l0!r}")
        if not self.min_threshold > 0:
            raise ValueError(f"train.min_threshold must be > 0 (JumpReLU thresholds stay positive), got {self.min_threshold!r}")
        if not 0 < self.threshold_rate <= 1:
            raise ValueError(f"train.threshold_rate must be in (0, 1], got {self.threshold_rate!r}")
        if not 0 <= self.decay_start <= 1:
            raise ValueError(f"train.decay_start must be in [0, 1] (a fraction of steps), got {self.decay_start!r}")
        for name, allowed in (("optimizer", OPTIMIZERS), ("decay", DECAYS), ("decoder_norm", DECODER_NORMS),
                              ("anchor_source", ANCHOR_SOURCES), ("init_encoder", ENCODER_INITS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"train.{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")


# ----------------------------------------------------------------------------------------------
# dict <-> dataclass with type checking
# ----------------------------------------------------------------------------------------------


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (dict, typing.Mapping) or tp is dict:
        return isinstance(value, dict)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(tp)
        if args and args[-1] is not Ellipsis and len(args) == 1:
            return all(_type_ok(v, args[0]) for v in value)
        if args and args[-1] is Ellipsis:
            return all(_type_ok(v, args[0]) for v in value)
        return True
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _type_name(tp: Any) -> str:
    s = str(tp).replace("typing.", "")
    return s if not isinstance(tp, type) else tp.__name__


def check_types(obj: Any, section: str) -> None:
    """Raise TypeError naming ``section.field`` when a field's value does not match its annotation.
    Ints are accepted for float fields (and converted)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        tp = hints[f.name]
        if not _type_ok(v, tp):
            raise TypeError(
                f"{section}.{f.name} must be of type {_type_name(tp)}, got {v!r} ({type(v).__name__})"
            )
        if tp is float and isinstance(v, int):
            object.__setattr__(obj, f.name, float(v))


def from_dict(cls, d: Any, section: str):
    """Build the dataclass ``cls`` from the mapping ``d``; unknown keys fail naming the valid ones."""
    if "from_dict" in vars(cls):  # a section with open keys (spec: activation hyperparameters)
        return cls.from_dict(d, section)
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise TypeError(f"config section {section!r} must be a mapping of keys to values, got {type(d).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(section + '.' + str(u) for u in unknown)}; valid keys of {section!r}: "
            f"{', '.join(names)}"
        )
    return cls(**d)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


# ----------------------------------------------------------------------------------------------
# YAML with numbers as people write them, and the one KEY=VALUE syntax
# ----------------------------------------------------------------------------------------------

# YAML 1.1 (PyYAML) reads 3e-3 and 1e6 as strings (it wants a dot: 3.0e-3); YAML 1.2 and every
# user read them as floats.
_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X)


def _loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    return Loader


def yaml_load(stream) -> Any:
    """``yaml.safe_load`` that reads ``3e-3`` / ``1e6`` as floats (PyYAML's YAML 1.1 reads them as strings)."""
    import yaml

    return yaml.load(stream, Loader=_loader())


def parse_set(items, option: str = "--set") -> list[tuple[list[str], Any]]:
    """``--set section.key=value`` items as ``(["section", "key"], value)``; values are parsed as YAML
    (:func:`yaml_load`: ``1e-3`` is a float). Any other form is refused, naming the one syntax."""
    out = []
    for it in items or []:
        if not isinstance(it, str) or "=" not in it or not it.split("=", 1)[0].strip():
            raise ValueError(f"{option} expects section.key=value (e.g. train.learning_rate=1e-3), got {it!r}")
        k, v = it.split("=", 1)
        if any(c.isspace() for c in k.strip()):
            raise ValueError(f"{option} {it!r}: the key may not contain spaces (write section.key=value)")
        out.append((k.strip().split("."), yaml_load(v) if v.strip() else None))
    return out
