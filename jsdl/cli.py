"""The ``jsdl`` command.

Each subcommand lives in the module that owns its feature; that module defines
``add_arguments(parser)`` and ``run(args) -> int``. This file only wires them together, so adding a
command is one line in ``COMMANDS``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("jsdl.demo", "train a few SDL variants on a small Linear Representation Bench and report"),
    "train": ("jsdl.train.cli", "train from a YAML config (jsdl train CONFIG.yaml [--set k=v ...] | --resume DIR)"),
    "theory-check": ("jsdl.landscape.report", "numerically check the claims of arXiv 2512.05534"),
    "experiment": ("jsdl.experiments", "run an experiment from experiments/ (jsdl experiment NAME)"),
    "bench": ("jsdl.benchcli", "run the throughput benchmarks in benchmarks/"),
    "export": ("jsdl.export", "export a trained run (e.g. --format saelens RUN_DIR OUT_DIR)"),
    "penalty-lab": ("jsdl.lab", "report what a sparsity penalty does (frontier, recovery, landscape)"),
}


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:  # a feature module not present in this build
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    from jsdl import __version__

    parser = argparse.ArgumentParser(
        prog="jsdl",
        description="jsdl: sparse dictionary learning in JAX (SAEs, transcoders, crosscoders) with landscape analysis.",
    )
    parser.add_argument("--version", action="version", version=f"jsdl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        mod = _load(module)
        p = sub.add_parser(name, help=help_ if mod else f"(not available in this build) {help_}", description=help_)
        if mod is not None and hasattr(mod, "add_arguments"):
            mod.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    mod = _load(args._module)
    if mod is None:
        print(f"jsdl {args.command}: not available in this build ({args._module} is missing)", file=sys.stderr)
        return 2
    try:
        return int(mod.run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as e:
        # User-actionable errors: one clear line, no traceback (set JSDL_DEBUG=1 for it).
        import os

        if os.environ.get("JSDL_DEBUG"):
            raise
        print(f"jsdl {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
