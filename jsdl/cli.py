"""The ``jsdl`` command (also ``python -m jsdl``).

Each subcommand lives in the module that owns its feature; that module defines
``add_arguments(parser)`` and ``run(args) -> int``. This file only wires them together: adding a
command is one line in :data:`COMMANDS`. A subcommand's module is imported only when that command
is dispatched (or its ``--help`` is asked for), so ``jsdl --help`` does not import JAX.

Exit codes (:data:`EXIT_CODES`): 0 success; 1 the command ran and its result is a failure
(training diverged, a theory check or a penalty's mechanical checks failed); 2 usage or
configuration error (bad argument, invalid config, unknown name, missing file), one line on stderr,
no traceback (``JSDL_DEBUG=1`` shows it); 130 interrupted (Ctrl-C). Any other error is a bug: it
prints its traceback and exits 1.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

__all__ = ["COMMANDS", "EXIT_CODES", "build_parser", "main"]

# name -> (module defining add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("jsdl.demo", "train a few SDL variants on a small Linear Representation Bench and report"),
    "launch": ("jsdl.launch", "run N local processes of `jsdl train` as one multi-process run (jsdl launch -n 2 CONFIG.yaml)"),
    "train": ("jsdl.train.cli", "train from a YAML config (jsdl train CONFIG.yaml [--set k=v ...] | --resume DIR)"),
    "theory-check": ("jsdl.landscape.report", "numerically check the claims of arXiv 2512.05534"),
    "experiment": ("jsdl.experiments", "run an experiment from experiments/ (jsdl experiment NAME)"),
    "bench": ("jsdl.benchcli", "run the throughput benchmarks in benchmarks/"),
    "export": ("jsdl.export", "export a trained run (e.g. --format saelens RUN_DIR OUT_DIR)"),
    "penalty-lab": ("jsdl.lab", "report what a sparsity penalty does (frontier, recovery, landscape)"),
}
"""The subcommands: name -> (module defining ``add_arguments(parser)`` and ``run(args) -> int``,
one-line help). The module is imported only when its command is parsed."""

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_FAILED: "the command ran and its result is a failure (training diverged, a theory check or a "
                 "penalty's mechanical checks failed), or an unexpected error (traceback printed)",
    EXIT_USAGE: "usage or configuration error (bad argument, invalid config, unknown name, missing file)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}
"""Exit code -> meaning, as printed in ``jsdl --help``."""

# Errors a user can act on: one line, no traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def _epilog() -> str:
    import textwrap

    codes = "\n".join(textwrap.fill(text, 88, initial_indent=f"  {code:<4} ", subsequent_indent=" " * 7)
                      for code, text in EXIT_CODES.items())
    return (f"exit codes:\n{codes}\n\n'jsdl COMMAND --help' describes a command. "
            "Set JSDL_DEBUG=1 for tracebacks of configuration errors.")


class _LazySubcommands(argparse._SubParsersAction):
    """Subparsers whose arguments are added by the command's module when the command is chosen."""

    def __call__(self, parser, namespace, values, option_string=None):
        sub = self._name_parser_map.get(values[0])
        if sub is not None:
            _attach(sub)
        super().__call__(parser, namespace, values, option_string)


class _Version(argparse.Action):
    """``--version``; the version is read (from the package metadata) only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        import jsdl

        print(f"jsdl {jsdl.__version__}")
        parser.exit()


def _attach(sub: argparse.ArgumentParser) -> None:
    if getattr(sub, "_jsdl_attached", False):
        return
    mod = importlib.import_module(sub.get_default("_module"))
    if hasattr(mod, "add_arguments"):
        mod.add_arguments(sub)
    if "--import" not in sub._option_string_actions:  # `jsdl CMD ... --import FILE` works too
        sub.add_argument(*IMPORT_FLAG, **{**IMPORT_KW, "dest": "imports_after", "default": argparse.SUPPRESS})
    sub._jsdl_attached = True


def build_parser() -> argparse.ArgumentParser:
    """The ``jsdl`` parser; each subcommand's arguments load when it is parsed."""
    parser = argparse.ArgumentParser(
        prog="jsdl",
        description="jsdl: sparse dictionary learning in JAX (SAEs, transcoders, crosscoders) with landscape analysis.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version, help="print the version of jsdl and exit")
    parser.add_argument(*IMPORT_FLAG, **IMPORT_KW)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", action=_LazySubcommands)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
    return parser


# ``jsdl --import FILE_OR_MODULE CMD ...`` or ``jsdl CMD ... --import FILE_OR_MODULE`` (repeatable):
# imported before the command runs (see jsdl.plugins); `jsdl train` records it in run.json.
IMPORT_FLAG = ("--import",)
IMPORT_KW = dict(dest="imports_before", action="append", default=[], metavar="FILE_OR_MODULE",
                 help="import a Python file or module first (it may register penalties/activations); repeatable")


def main(argv: list[str] | None = None) -> int:
    """Run ``jsdl`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)  # --help, --version and usage errors exit here (0, 0, 2)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    mod = importlib.import_module(args._module)
    try:
        from jsdl import plugins
        from jsdl.train.checkpoint import quiet_async_teardown  # TensorStore's late noise, for the whole command

        with warnings.catch_warnings(), quiet_async_teardown():
            # A warning is one line on the terminal ("jsdl train: warning: ..."), not file:line + source.
            warnings.showwarning = lambda msg, *a, **k: print(f"jsdl {args.command}: warning: {msg}", file=sys.stderr)
            args.plugins = plugins.load_all(list(args.imports_before) + list(getattr(args, "imports_after", [])))
            return int(mod.run(args) or 0)
    except USER_ERRORS as e:
        if os.environ.get("JSDL_DEBUG"):
            raise
        print(f"jsdl {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:  # jsdl train says where it stopped and how to resume
        print(f"jsdl {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
