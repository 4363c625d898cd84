"""``jsdl train CONFIG.yaml [--set key=value ...]`` and ``jsdl train --resume DIR``.

A config is YAML with the sections below (every key optional except what the data needs); each
section is a typed dataclass, unknown keys fail naming the valid ones and wrong types fail before
anything is compiled::

    seed: 0
    out_dir: runs/topk            # default runs/<config file name>
    spec:  {method: sae, activation: topk, n_latents: 400, k: 8}       # jsdl.make_spec arguments
    data:  {n_features: 100, d_input: 64, sparsity: 0.99, max_interference: 0.1}   # make_bench
           or {bench: default}                                           # the default bench, said so
           or {files: {path: acts/, holdout: 0.05, normalize: true}}     # activation shards
           or {synth: {preset: cpu, n_features: 2048}}                  # jsdl.data.make_synth
    train: {steps: 2000, batch_size: 512, learning_rate: 0.003}         # jsdl.train.TrainConfig
    population: {seeds: [0, 1], coefs: {l1: [0.001, 0.01]}, k: [], learning_rate: []}  # optional

``--set train.steps=100`` overrides one key (the value is parsed as YAML; ``1e-3`` is a float, in
the file too). The ``data:`` section is required (``data: {bench: default}`` for the default bench).

``jsdl train --resume DIR [--set train.KEY=VALUE ...]`` continues a run; only the settings in
:data:`jsdl.train.rundir.CHANGEABLE` may change (recorded in run.json ``resumes``), anything else is
refused naming the field. Plug-ins given by ``jsdl --import FILE`` are recorded and re-imported.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Optional, Union

from jsdl.train.config import TrainConfig, check_types, from_dict, parse_set, to_dict, yaml_load

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
    pre_bias: bool = False
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
    streamed from disk instead, and the bench keys are ignored. With ``synth`` (a mapping of
    :class:`jsdl.data.synth.SynthConfig` keys, optionally ``preset: 16k|cpu|tiny`` and ``sampler:
    auto|jax|native``) the data are the SynthSAEBench recipe generated on device
    (:func:`jsdl.data.make_synth`, keyed by ``seed``)."""

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
    bench: Optional[str] = None
    synth: Optional[dict] = None

    def __post_init__(self):
        check_types(self, "data")
        if self.bench not in (None, "default"):
            raise ValueError(f"data.bench must be 'default' (the bench keys of data:, with their defaults), "
                             f"got {self.bench!r}")
        if self.synth is not None:
            if self.files is not None or self.bench is not None:
                raise ValueError("data: give one of files, bench or synth")
            from jsdl.data.bench import SAMPLERS
            from jsdl.data.synth import SynthConfig

            syn = dict(self.synth)
            if syn.pop("sampler", "auto") not in SAMPLERS:
                raise ValueError(f"data.synth.sampler must be auto, jax or native, not {self.synth['sampler']!r}")
            SynthConfig.from_dict(syn)  # validate before anything compiles

    def build_files(self):
        """The :class:`jsdl.data.files.ActivationFiles` of ``files`` (validated, nothing read yet)."""
        from jsdl.data import files as _files

        return _files.from_config(self.files)

    def build(self, spec_method: str):
        """The Linear Representation Bench of these settings (``files`` is built by ``build_files``)."""
        import jax

        if self.synth is not None:
            from jsdl.data.synth import make_synth

            syn = dict(self.synth)
            sampler = syn.pop("sampler", "auto")
            return make_synth(jax.random.PRNGKey(self.seed), syn, sampler=sampler)
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


def config_from_dict(raw: dict, overrides: Optional[list[str]] = None) -> RunConfig:
    """Build a :class:`RunConfig` from a dict (parsed YAML) and ``--set`` overrides."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise TypeError(f"a training config must be a YAML mapping, got {type(raw).__name__}")
    raw = json.loads(json.dumps(raw))  # deep copy
    valid = list(TOP) + list(SECTIONS)
    for path, val in parse_set(overrides or []):
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


NO_DATA = ("{where} has no data: section; say what to train on: data: {{bench: default}} (the default "
           "1000-feature, 768-wide Linear Representation Bench), bench keys such as data: {{n_features: 100, "
           "d_input: 64}}, data: {{files: DIR}}, or data: {{synth: {{preset: cpu}}}} (the SynthSAEBench recipe)")


def load_config(path: str, overrides: Optional[list[str]] = None) -> RunConfig:
    """A :class:`RunConfig` from a YAML file and ``--set`` overrides; the ``data:`` section is required."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    with open(path) as f:
        try:
            raw = yaml_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}") from None
    cfg = config_from_dict(raw, overrides)
    data = (raw or {}).get("data") if isinstance(raw, dict) else None
    set_data = any(p[0] == "data" for p, _ in parse_set(overrides or []))
    if not data and not set_data:
        raise ValueError(NO_DATA.format(where=f"config {path}"))
    return cfg


def add_arguments(p) -> None:
    p.add_argument("config", nargs="?", help="YAML config (sections spec/data/train, optional population)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key, e.g. --set train.learning_rate=1e-3 (repeatable)")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR from its latest checkpoint (only train.steps, learning rate and "
                        "schedule, grad_clip, logging/checkpoint intervals... may change with --set)")
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


def _resume_config(args):
    """The resumed run's config (recorded config + ``--set``), its plug-ins imported; a frozen change
    is refused here, before jax starts, naming the config field (the library checks again)."""
    from jsdl import plugins
    from jsdl.train import rundir

    rec = rundir.read_run_record(args.resume)
    raw = (rec.get("record") or {}).get("config")
    if raw is None:
        raise ValueError(f"{args.resume!r} was not written by `jsdl train` (its run.json has no config record)")
    recorded = plugins.load_recorded(rec.get("plugins") or [], where=os.path.join(args.resume, "run.json"))
    old = config_from_dict(raw)
    cfg = config_from_dict(raw, args.set)
    _, frozen = rundir.split_changes(rundir.changes(old.to_dict(), cfg.to_dict()))
    rundir.refuse(args.resume, frozen)
    return cfg, recorded


def _files_data(cfg, spec, record):
    """The batches of ``data.files``, checked against the spec and the batch size."""
    from jsdl.train import rundir

    src = cfg.data.build_files()
    B = cfg.train.batch_size
    if spec.method == "crosscoder" and src.n_sources != spec.n_sources:
        raise ValueError(
            f"spec: method crosscoder with n_sources={spec.n_sources} needs {spec.n_sources} source streams of one "
            f"width d (data.files: {{sources: [DIR_1, ..., DIR_{spec.n_sources}]}}, batches [B, {spec.n_sources}, d]); "
            f"data.files gives {src.n_sources} stream(s) of width {src.d_input}"
        )
    if src.n_train < B:
        raise ValueError(
            f"data.files holds {src.n_train} training rows, fewer than one batch (train.batch_size={B}); "
            "lower train.batch_size or add data"
        )
    record["data"] = src.info()  # the normalisation scales travel with the run (jsdl export folds them)
    record["data_fingerprint"] = rundir.files_fingerprint(src)
    # Each process reads only its own rows of every global batch (jsdl.data.files).
    from jsdl.train.mesh import process_batch_rows

    return src.batches(B, seed=src.seed, rows=process_batch_rows(B, cfg.train.mesh))


def _members(cfg: RunConfig) -> int:
    """How many models the run trains at once (the size of its population grid)."""
    p = cfg.population
    if p is None:
        return 1
    n = max(len(p.seeds), 1) * max(len(p.k), 1) * max(len(p.learning_rate), 1)
    for values in p.coefs.values():
        n *= max(len(values), 1)
    return n


def run(args) -> int:
    if bool(args.config) == bool(args.resume):
        raise ValueError("give either CONFIG.yaml or --resume DIR (not both, not neither)")
    plugin_recs = list(getattr(args, "plugins", None) or [])
    if args.resume:
        cfg, recorded = _resume_config(args)
        plugin_recs = recorded + [p for p in plugin_recs if p not in recorded]
        out_dir = args.resume
    else:
        cfg = load_config(args.config, args.set)
        out_dir = args.out or cfg.out_dir or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    # Everything above is validated before jax is touched or anything compiles.
    from jsdl.train.rundir import check_unlocked

    check_unlocked(out_dir)
    spec = cfg.spec.build()
    # Before JAX creates its CPU client (the distributed start-up's config check creates it): a
    # large step reuses its host temporaries (jsdl.hosttune).
    from jsdl import hosttune

    host = hosttune.tune_host() if hosttune.wants_tuning(cfg.train.batch_size, spec.n_latents, _members(cfg)) else None
    if args.distributed:
        _distributed(args, cfg)
    import jax

    from jsdl.train.loop import Grid, NonFiniteLossError, TrainingInterrupted, fit, fit_population

    key = jax.random.PRNGKey(cfg.seed)
    record = {"config": cfg.to_dict(), "plugins": plugin_recs, "host_tuning": host}
    if jax.default_backend() == "cpu":  # the CPU's top-k: jsdl's native kernel or XLA's (jsdl.native)
        from jsdl import native

        record["native"] = native.status()
        from jsdl import cpudot  # whether a large sparse step may hand its encoder product to oneDNN

        record["cpu_dot"] = cpudot.mode()
    if cfg.data.files is not None:
        data = _files_data(cfg, spec, record)
    else:
        data = cfg.data.build(spec.method)
        if hasattr(data, "uses_native"):  # a bench with a native sampler: its random stream depends on it
            record["data_sampler"] = "native" if data.uses_native() else "jax"
    progress = False if args.no_progress else None
    kw = dict(out_dir=out_dir, resume=bool(args.resume), progress=progress, record=record)
    try:
        if cfg.population is not None:
            grid = Grid(spec, seeds=cfg.population.seeds, coefs=cfg.population.coefs, k=cfg.population.k,
                        learning_rate=cfg.population.learning_rate)
            _, hists = fit_population(key, grid, data, cfg.train, **kw)
            for i, h in enumerate(hists):
                print(_summary_line(f"member {i} ({h['member']['spec']}, lr={h['member']['learning_rate']:g})",
                                    h["summary"]))
        else:
            _, hist = fit(key, spec, data, cfg.train, **kw)
            print(_summary_line(spec.describe(), hist["summary"]))
    except NonFiniteLossError as e:
        print(f"jsdl train: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(f"jsdl train: {e}", file=sys.stderr)
        return 130
    print(f"run directory: {out_dir}")
    return 0


def _summary_line(name: str, s: dict) -> str:
    f = {k: (float("nan") if v is None else v) for k, v in s.get("final", {}).items()}
    parts = [name, f"step {f.get('step')}", f"loss {f.get('loss', float('nan')):.4g}",
             f"FVU {f.get('fvu', float('nan')):.3g}", f"L0 {f.get('l0', float('nan')):.3g}",
             f"dead {f.get('dead_frac', float('nan')):.1%}", f"{s.get('steps_per_s', float('nan')):.0f} steps/s"]
    if s.get("init_threshold") is not None:
        # train.init_threshold_l0 replaced the activation's threshold hyperparameter shown in the spec.
        parts.insert(1, f"initial threshold {s['init_threshold']:.4g} (train.init_threshold_l0)")
    rec = s.get("recovery")
    if rec and "m_gt" in rec:
        parts.append(f"M_GT {rec['m_gt']:.3f}")
    return " | ".join(parts)
