"""``jsdl train CONFIG.yaml [--set key=value ...]`` and ``jsdl train --resume DIR``.

A config is YAML with the sections below (every key optional except what the data needs); each
section is a typed dataclass, unknown keys fail naming the valid ones and wrong types fail before
anything is compiled::

    seed: 0
    out_dir: runs/topk            # default runs/<config file name>
    spec:  {method: sae, activation: topk, n_latents: 400, k: 8}       # jsdl.make_spec arguments
    data:  {n_features: 100, d_input: 64, sparsity: 0.99, max_interference: 0.1}   # make_bench
           or {files: {path: acts/, holdout: 0.05, normalize: true}}     # activation shards
    train: {steps: 2000, batch_size: 512, learning_rate: 0.003}         # jsdl.train.TrainConfig
    population: {seeds: [0, 1], coefs: {l1: [0.001, 0.01]}, k: [], learning_rate: []}  # optional

``--set train.steps=100`` overrides one key (the value is parsed as YAML).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Optional, Union

from jsdl.train.config import TrainConfig, check_types, from_dict, to_dict

__all__ = ["SpecConfig", "DataConfig", "PopulationConfig", "RunConfig", "load_config", "add_arguments", "run"]


@dataclasses.dataclass
class SpecConfig:
    """Arguments of :func:`jsdl.make_spec`. Keys that are not fields below are hyperparameters of
    the chosen activation (``k: 8`` for topk, ``threshold``/``bandwidth`` for jumprelu, or whatever
    a registered activation declares), validated by the activation registry; they are kept in
    ``hyper``. A ``None`` value means the activation's default."""

    method: str = "sae"
    activation: str = "topk"
    n_latents: int = 512
    penalties: dict = dataclasses.field(default_factory=dict)
    tied: bool = False
    bias: bool = True
    n_sources: Optional[int] = None
    prefixes: Optional[list] = None
    prefix_weights: Optional[list] = None
    aux_k: int = 0
    aux_coef: float = 0.0
    hyper: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        check_types(self, "spec")
        from jsdl import activations

        self.hyper = {k: v for k, v in self.hyper.items() if v is not None}
        try:
            activations.get(self.activation, **self.hyper)
        except (ValueError, TypeError) as e:
            raise type(e)(f"spec: {e}") from None

    @classmethod
    def from_dict(cls, d: Any, section: str = "spec") -> "SpecConfig":
        """Build from a mapping: keys that are not fields go to ``hyper`` when the activation
        declares them; any other key fails naming the valid ones."""
        from jsdl import activations

        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise TypeError(f"config section {section!r} must be a mapping of keys to values, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        d = dict(d)
        extra = {k: d.pop(k) for k in list(d) if k not in names}
        extra = {k: v for k, v in extra.items() if v is not None}  # None = the activation's default
        act = d.get("activation", cls.activation)
        accepted = activations.hyper_names(act) if isinstance(act, str) else set()
        unknown = sorted(set(extra) - accepted)
        if unknown:
            raise ValueError(
                f"unknown key(s) {', '.join(section + '.' + str(u) for u in unknown)}; valid keys of {section!r}: "
                f"{', '.join(n for n in names if n != 'hyper')}, and the hyperparameters of activation {act!r}: "
                f"{', '.join(sorted(accepted)) or 'none'}"
            )
        hyper = d.pop("hyper", None) or {}
        if not isinstance(hyper, dict):
            raise TypeError(f"{section}.hyper must be a mapping, got {hyper!r}")
        return cls(**d, hyper={**hyper, **extra})

    def build(self):
        import jsdl

        kw = {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "hyper"}
        for k in ("prefixes", "prefix_weights"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return jsdl.make_spec(**kw, **self.hyper)


@dataclasses.dataclass
class DataConfig:
    """Arguments of :func:`jsdl.data.make_bench` (``options`` holds any further keyword arguments,
    e.g. ``c_min``/``beta``). ``seed`` picks the bench (W_p, W_r); the stream comes from the run
    seed. With ``files`` (a shard directory, or a mapping of :func:`jsdl.data.files.from_config`
    keys such as ``{path: acts/, holdout: 0.05, normalize: true}``) the data are real activations
    streamed from disk instead, and the bench keys are ignored."""

    n_features: int = 1000
    d_input: int = 768
    max_interference: float = 0.1
    sparsity: float = 0.99
    method: Optional[str] = None
    d_target: Optional[int] = None
    n_sources: Optional[int] = None
    seed: int = 0
    options: dict = dataclasses.field(default_factory=dict)
    files: Optional[Union[str, dict]] = None

    def __post_init__(self):
        check_types(self, "data")

    def build_files(self):
        """The :class:`jsdl.data.files.ActivationFiles` of ``files`` (validated, nothing read yet)."""
        from jsdl.data import files as _files

        return _files.from_config(self.files)

    def build(self, spec_method: str):
        """The Linear Representation Bench of these settings (``files`` is built by ``build_files``)."""
        import jax

        try:
            from jsdl.data import make_bench
        except ImportError as e:
            raise ValueError(f"the data: section needs jsdl.data.make_bench, which is not available ({e})") from None
        kw = dict(n_features=self.n_features, d_input=self.d_input, max_interference=self.max_interference,
                  sparsity=self.sparsity)
        method = self.method or _bench_method(spec_method)
        kw["method"] = method
        if self.d_target is not None:
            kw["d_target"] = self.d_target
        if self.n_sources is not None:
            kw["n_sources"] = self.n_sources
        kw.update(self.options)
        return make_bench(jax.random.PRNGKey(self.seed), **kw)


def _bench_method(spec_method: str) -> str:
    return {"transcoder": "transcoder", "skip_transcoder": "transcoder", "crosscoder": "crosscoder"}.get(
        spec_method, "sae")


@dataclasses.dataclass
class PopulationConfig:
    """A :class:`jsdl.train.Grid`: seeds x coefs x k x learning_rate."""

    seeds: list = dataclasses.field(default_factory=lambda: [0])
    coefs: dict = dataclasses.field(default_factory=dict)
    k: list = dataclasses.field(default_factory=list)
    learning_rate: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        check_types(self, "population")


@dataclasses.dataclass
class RunConfig:
    seed: int = 0
    out_dir: Optional[str] = None
    spec: SpecConfig = dataclasses.field(default_factory=SpecConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    population: Optional[PopulationConfig] = None

    def to_dict(self) -> dict:
        d = {"seed": self.seed, "out_dir": self.out_dir, "spec": dataclasses.asdict(self.spec),
             "data": dataclasses.asdict(self.data), "train": to_dict(self.train)}
        if self.population is not None:
            d["population"] = dataclasses.asdict(self.population)
        return d


SECTIONS = {"spec": SpecConfig, "data": DataConfig, "train": TrainConfig, "population": PopulationConfig}
TOP = ("seed", "out_dir")


def _parse_set(items: list[str]) -> list[tuple[list[str], Any]]:
    import yaml

    out = []
    for it in items or []:
        if "=" not in it:
            raise ValueError(f"--set expects key=value (e.g. train.steps=100), got {it!r}")
        k, v = it.split("=", 1)
        out.append((k.strip().split("."), yaml.safe_load(v)))
    return out


def config_from_dict(raw: dict, overrides: Optional[list[str]] = None) -> RunConfig:
    """Build a :class:`RunConfig` from a dict (parsed YAML) and ``--set`` overrides."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise TypeError(f"a training config must be a YAML mapping, got {type(raw).__name__}")
    raw = json.loads(json.dumps(raw))  # deep copy
    valid = list(TOP) + list(SECTIONS)
    for path, val in _parse_set(overrides or []):
        if path[0] not in valid:
            raise ValueError(f"--set {'.'.join(path)}: unknown section or key {path[0]!r}; valid: {', '.join(valid)}")
        if len(path) == 1:
            raw[path[0]] = val
        elif len(path) == 2:
            sec = raw.setdefault(path[0], {})
            if sec is None:
                sec = raw[path[0]] = {}
            sec[path[1]] = val
        else:
            raise ValueError(f"--set {'.'.join(path)}: keys are section.key (e.g. train.steps)")
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise ValueError(f"unknown top-level key(s) {unknown}; valid keys: {', '.join(valid)}")
    for k, tp in (("seed", int), ("out_dir", (str, type(None)))):
        if k in raw and not (isinstance(raw[k], tp) and not isinstance(raw[k], bool)):
            raise TypeError(f"{k} must be {'an int' if tp is int else 'a string'}, got {raw[k]!r}")
    kw = {k: raw[k] for k in TOP if k in raw}
    for name, cls in SECTIONS.items():
        if name in raw:
            kw[name] = from_dict(cls, raw[name], name)
    return RunConfig(**kw)


def load_config(path: str, overrides: Optional[list[str]] = None) -> RunConfig:
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}") from None
    return config_from_dict(raw, overrides)


def add_arguments(p) -> None:
    p.add_argument("config", nargs="?", help="YAML config (sections spec/data/train, optional population)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint")
    p.add_argument("--out", help="run directory (default: out_dir of the config, else runs/<config name>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (multi-host; auto-detects TPU/SLURM/...)")
    p.add_argument("--coordinator", help="coordinator address host:port for --distributed")
    p.add_argument("--num-processes", type=int, help="number of processes for --distributed")
    p.add_argument("--process-id", type=int, help="this process's id for --distributed")
    p.add_argument("--distributed-timeout", type=int, default=60,
                   help="seconds to wait for the coordinator with --distributed (default 60)")


def _distributed(args, cfg):
    from jsdl import launch

    launch.initialize(args.coordinator, args.num_processes, args.process_id,
                      timeout=getattr(args, "distributed_timeout", 60))
    launch.check_same_config(cfg)  # processes started with different configs are refused


def run(args) -> int:
    from jsdl.train.checkpoint import read_run_record

    if bool(args.config) == bool(args.resume):
        raise ValueError("give either CONFIG.yaml or --resume DIR (not both, not neither)")
    if args.resume:
        rec = read_run_record(args.resume)
        raw = (rec.get("record") or {}).get("config")
        if raw is None:
            raise ValueError(f"{args.resume!r} was not written by `jsdl train` (its run.json has no config record)")
        cfg = config_from_dict(raw, args.set)
        out_dir = args.resume
    else:
        cfg = load_config(args.config, args.set)
        out_dir = args.out or cfg.out_dir or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    # Everything above is validated before jax is touched or anything compiles.
    spec = cfg.spec.build()
    if args.distributed:
        _distributed(args, cfg)
    import jax

    from jsdl.train.loop import Grid, NonFiniteLossError, fit, fit_population

    key = jax.random.PRNGKey(cfg.seed)
    record = {"config": cfg.to_dict()}
    if cfg.data.files is not None:
        src = cfg.data.build_files()
        # Each process reads only its own rows of every global batch (jsdl.data.files).
        from jsdl.train.mesh import process_batch_rows

        data = src.batches(cfg.train.batch_size, seed=src.seed,
                           rows=process_batch_rows(cfg.train.batch_size, cfg.train.mesh))
        record["data"] = src.info()  # the normalisation scales travel with the run (jsdl export folds them)
    else:
        data = cfg.data.build(spec.method)
    progress = False if args.no_progress else None
    try:
        if cfg.population is not None:
            grid = Grid(spec, seeds=cfg.population.seeds, coefs=cfg.population.coefs, k=cfg.population.k,
                        learning_rate=cfg.population.learning_rate)
            _, hists = fit_population(key, grid, data, cfg.train, out_dir=out_dir, resume=bool(args.resume),
                                      progress=progress, record=record)
            for i, h in enumerate(hists):
                print(_summary_line(f"member {i} ({h['member']['spec']}, lr={h['member']['learning_rate']:g})",
                                    h["summary"]))
        else:
            _, hist = fit(key, spec, data, cfg.train, out_dir=out_dir, resume=bool(args.resume), progress=progress,
                          record=record)
            print(_summary_line(spec.describe(), hist["summary"]))
    except NonFiniteLossError as e:
        print(f"jsdl train: {e}", file=sys.stderr)
        return 1
    print(f"run directory: {out_dir}")
    return 0


def _summary_line(name: str, s: dict) -> str:
    f = s.get("final", {})
    parts = [name, f"step {f.get('step')}", f"loss {f.get('loss', float('nan')):.4g}",
             f"FVU {f.get('fvu', float('nan')):.3g}", f"L0 {f.get('l0', float('nan')):.3g}",
             f"dead {f.get('dead_frac', float('nan')):.1%}", f"{s.get('steps_per_s', float('nan')):.0f} steps/s"]
    rec = s.get("recovery")
    if rec and "m_gt" in rec:
        parts.append(f"M_GT {rec['m_gt']:.3f}")
    return " | ".join(parts)
