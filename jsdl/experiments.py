"""``jsdl experiment NAME [--scale tiny|small|paper] [--out DIR]``: run an experiment folder.

An experiment is a folder ``experiments/NAME/`` with

* ``config.yaml``: one mapping per scale (``tiny``: seconds, used by the tests; ``small``: minutes
  on a 2-core CPU; ``paper``: the paper's sizes for a GPU/TPU), each a dict of settings;
* ``run.py`` defining ``run(config: dict, out_dir: str, *, key) -> dict`` which writes its JSON and
  PNG outputs into ``out_dir`` and returns a summary dict; an optional ``results_row(summary) -> str``
  gives the one-line markdown summary recorded in ``experiments/RESULTS.md``;
* ``README.md``: the question, the setting, the result and the plot.

The runner loads the config for the scale, merges ``--set key=value`` overrides, calls ``run``,
writes ``summary.json`` and ``config.json`` into the run directory and (for ``--record``) updates
the experiment's row in ``experiments/RESULTS.md``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from pathlib import Path

SCALES = ("tiny", "small", "paper")


def experiments_dir() -> Path:
    """``$JSDL_EXPERIMENTS_DIR`` or the ``experiments/`` folder next to the jsdl package."""
    env = os.environ.get("JSDL_EXPERIMENTS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "experiments"


def available() -> list[str]:
    d = experiments_dir()
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if (p / "run.py").is_file() and (p / "config.yaml").is_file())


def load_config(name: str, scale: str) -> dict:
    import yaml

    if scale not in SCALES:
        raise ValueError(f"--scale must be one of {SCALES}, got {scale!r}")
    path = experiments_dir() / name / "config.yaml"
    if not path.is_file():
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(available()) or 'none'}")
    cfg = yaml.safe_load(path.read_text()) or {}
    if scale not in cfg:
        raise ValueError(f"experiment {name!r} has no {scale!r} scale in {path}; it has {sorted(cfg)}")
    base = dict(cfg.get("common", {}))
    base.update(cfg[scale] or {})
    base["scale"] = scale
    return base


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

    config = load_config(name, scale)
    for k, v in (overrides or {}).items():
        head, _, rest = k.partition(".")
        if head not in config or (rest and not isinstance(config[head], dict)):
            raise ValueError(f"experiment {name!r} ({scale}) has no setting {k!r}; settings: {sorted(config)}")
        if rest:
            config[head] = {**config[head], rest: v}
        else:
            config[head] = v
    out_dir = out_dir or os.path.join("runs", "experiments", name, scale)
    os.makedirs(out_dir, exist_ok=True)
    mod = _load_module(name)
    t0 = time.time()
    summary = mod.run(config, out_dir, key=jax.random.PRNGKey(seed))
    summary = dict(summary or {})
    summary["_seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, default=str)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=_json_default)
    if record:
        row = mod.results_row(summary) if hasattr(mod, "results_row") else json.dumps(summary, default=_json_default)[:300]
        record_result(name, scale, row, summary["_seconds"])
    return summary


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.ndarray) or hasattr(o, "tolist"):
            return o.tolist()
        if isinstance(o, np.generic):
            return o.item()
    except Exception:  # pragma: no cover
        pass
    return str(o)


def record_result(name: str, scale: str, row: str, seconds: float) -> None:
    """Replace (or add) the experiment's section in ``experiments/RESULTS.md``."""
    path = experiments_dir() / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Experiment results\n\nRegenerate a section with `jsdl experiment NAME --scale small --record`.\n"
    header = f"## {name} ({scale})"
    block = f"{header}\n\nCommand: `jsdl experiment {name} --scale {scale} --record` ({seconds:.0f} s on this machine)\n\n{row.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(name)} \({re.escape(scale)}\)\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(block + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + block
    path.write_text(text)


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
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (list, dict))}, indent=2, default=_json_default))
    return 0
