"""``jsdl experiment NAME [--scale tiny|small|paper] [--out DIR]``: run an experiment folder.

An experiment is a folder ``experiments/NAME/`` with

* ``config.yaml``: a ``common`` mapping and one mapping per scale (``tiny``: seconds, used by the
  tests; ``small``: minutes on a 2-core CPU; ``paper``: the paper's sizes for a GPU/TPU), merged
  (the scale wins). Every experiment speaks one dialect, the section names of ``jsdl train``:

  - ``data``: the bench, in :func:`jsdl.data.make_bench`'s argument names (``n_features``,
    ``d_input``, ``max_interference``, ``sparsity``, ``n_sources``, ...);
  - ``train``: :class:`jsdl.train.TrainConfig` fields (``steps``, ``batch_size``,
    ``learning_rate``, ``log_every``, ``decay``, ``dead_window``, ...);
  - ``n_latents`` (the dictionary size), ``k``, penalty coefficients, and the experiment's own
    settings at the top level.

  ``data`` and ``train`` merge key by key; unknown keys in them are errors before anything runs;
* ``run.py`` defining ``run(config: dict, out_dir: str, *, key) -> dict`` which writes its JSON and
  PNG outputs into ``out_dir`` and returns a summary dict; an optional ``results_row(summary) -> str``
  gives the one-line markdown summary recorded in ``experiments/RESULTS.md``;
* ``README.md``: the question, the setting, the result and the plot.

The shared vocabulary of the experiments (benches and specs per method, scoring, JSON and plot
helpers) is :mod:`jsdl.experiments.common`.

The runner loads the config for the scale, merges ``--set key=value`` overrides (``--set
train.steps=100`` for a section key), calls ``run``,
writes ``summary.json`` and ``config.json`` into the run directory and (for ``--record``) updates
the experiment's row in ``experiments/RESULTS.md``.
"""
from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

from jsdl.records import dump_json, dumps, write_section

SCALES = ("tiny", "small", "paper")


def experiments_dir() -> Path:
    """``$JSDL_EXPERIMENTS_DIR`` or the ``experiments/`` folder next to the jsdl package."""
    env = os.environ.get("JSDL_EXPERIMENTS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "experiments"


def available() -> list[str]:
    d = experiments_dir()
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if (p / "run.py").is_file() and (p / "config.yaml").is_file())


SECTIONS = ("data", "train")


def section_keys(section: str) -> set:
    """The keys allowed in config section ``section`` (``data``: make_bench arguments; ``train``:
    TrainConfig fields)."""
    import dataclasses
    import inspect

    from jsdl.data import make_bench
    from jsdl.train import TrainConfig

    if section == "train":
        return {f.name for f in dataclasses.fields(TrainConfig)}
    return set(inspect.signature(make_bench).parameters) - {"key"}


def _check_sections(cfg: dict, where: str) -> None:
    for sec in SECTIONS:
        val = cfg.get(sec, {})
        if not isinstance(val, dict):
            raise ValueError(f"{where}: {sec!r} must be a mapping, got {type(val).__name__}")
        unknown = set(val) - section_keys(sec)
        if unknown:
            raise ValueError(f"{where}: unknown {sec} settings {sorted(unknown)}; allowed: {sorted(section_keys(sec))}")


def load_config(name: str, scale: str) -> dict:
    """The merged config of experiment ``name`` at ``scale`` (module docstring): ``common`` updated by
    the scale's mapping, the ``data`` and ``train`` sections merged key by key and checked."""
    import yaml

    if scale not in SCALES:
        raise ValueError(f"--scale must be one of {SCALES}, got {scale!r}")
    path = experiments_dir() / name / "config.yaml"
    if not path.is_file():
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(available()) or 'none'}")
    cfg = yaml.safe_load(path.read_text()) or {}
    if scale not in cfg:
        raise ValueError(f"experiment {name!r} has no {scale!r} scale in {path}; it has {sorted(cfg)}")
    common, own = dict(cfg.get("common") or {}), dict(cfg[scale] or {})
    base = {**common, **own}
    for sec in SECTIONS:
        base[sec] = {**(common.get(sec) or {}), **(own.get(sec) or {})}
    _check_sections(base, f"{path} ({scale})")
    base["scale"] = scale
    return base


def apply_overrides(config: dict, overrides: dict, where: str = "config") -> dict:
    """``config`` with ``{key: value}`` overrides applied; ``"data.KEY"`` / ``"train.KEY"`` set a
    section key. A key the config does not have (outside the sections) is an error."""
    config = {**config, **{sec: dict(config.get(sec, {})) for sec in SECTIONS}}
    for k, v in (overrides or {}).items():
        sec, dot, sub = k.partition(".")
        if dot and sec in SECTIONS:
            config[sec][sub] = v
        elif k in config:
            config[k] = v
        else:
            raise ValueError(f"{where} has no setting {k!r}; settings: {sorted(config)} "
                             f"(section keys as {'/'.join(SECTIONS)}.KEY)")
    _check_sections(config, where)
    return config


def _load_module(name: str):
    path = experiments_dir() / name / "run.py"
    spec = importlib.util.spec_from_file_location(f"jsdl_experiment_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _parse_override(item: str):
    """``--set key=value`` or ``--set section.key=value`` (the one KEY=VALUE syntax; YAML values)."""
    from jsdl.train.config import parse_set

    (path, value), = parse_set([item])
    return ".".join(path), value


def run_experiment(name: str, scale: str = "small", out_dir: str | None = None, *, overrides: dict | None = None,
                   seed: int = 0, record: bool = False) -> dict:
    """Run experiment ``name`` at ``scale``; returns its summary (also written to out_dir)."""
    import jax

    config = apply_overrides(load_config(name, scale), overrides, f"experiment {name!r} ({scale})")
    out_dir = out_dir or os.path.join("runs", "experiments", name, scale)
    os.makedirs(out_dir, exist_ok=True)
    mod = _load_module(name)
    t0 = time.time()
    summary = mod.run(config, out_dir, key=jax.random.PRNGKey(seed))
    summary = dict(summary or {})
    summary["_seconds"] = round(time.time() - t0, 1)
    dump_json(config, os.path.join(out_dir, "config.json"))
    dump_json(summary, os.path.join(out_dir, "summary.json"))
    if record:
        row = mod.results_row(summary) if hasattr(mod, "results_row") else dumps(summary, indent=None)[:300]
        record_result(name, scale, row, summary["_seconds"])
    return summary


RESULTS_HEADER = "# Experiment results\n\nRegenerate a section with `jsdl experiment NAME --scale small --record`.\n"


def record_result(name: str, scale: str, row: str, seconds: float) -> None:
    """Replace (or add) the experiment's section ``## NAME (SCALE)`` in ``experiments/RESULTS.md``
    (:func:`jsdl.records.write_section`, locked)."""
    body = f"Command: `jsdl experiment {name} --scale {scale} --record` ({seconds:.0f} s on this machine)\n\n{row.strip()}\n"
    write_section(str(experiments_dir() / "RESULTS.md"), f"{name} ({scale})", body, header=RESULTS_HEADER)


def add_arguments(p):
    p.add_argument("name", nargs="?", help="experiment name (folder under experiments/); omit to list")
    p.add_argument("--scale", default="small", choices=SCALES, help="tiny (seconds), small (CPU minutes), paper (GPU/TPU)")
    p.add_argument("--out", default=None, help="run directory (default runs/experiments/NAME/SCALE)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record", action="store_true", help="write the result row into experiments/RESULTS.md")


def run(args) -> int:
    if not args.name:
        print("available experiments:", ", ".join(available()) or "none")
        return 0
    overrides = dict(_parse_override(s) for s in args.set)
    summary = run_experiment(args.name, args.scale, args.out, overrides=overrides, seed=args.seed, record=args.record)
    print(dumps({k: v for k, v in summary.items() if not isinstance(v, (list, dict))}))
    return 0
