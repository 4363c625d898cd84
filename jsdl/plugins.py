"""Plug-ins: user code (a penalty, an activation) imported by ``jsdl --import FILE_OR_MODULE``.

A plug-in is a Python file or an importable module whose import registers names
(``@jsdl.penalties.register("hoyer")``). ``jsdl train`` records the plug-ins of a run in
``run.json`` (a file by its absolute path), so ``jsdl train --resume DIR``, ``jsdl export`` and
:func:`jsdl.train.load_run` import them again with no further step.

A file is imported once per process under a name derived from its absolute path (importing it a
second time returns the module already loaded, so its registrations do not run twice).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from typing import Iterable

__all__ = ["load", "load_all", "load_recorded"]


def _is_file(spec: str) -> bool:
    return spec.endswith(".py") or os.sep in spec or os.path.isfile(spec)


def _module_name(path: str) -> str:
    stem = "".join(c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(path))[0])
    return f"jsdl_plugin_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def load(spec: str) -> dict:
    """Import the plug-in ``spec`` (a ``.py`` path or a dotted module name on ``sys.path``, the
    current directory included). Returns its record: ``{"file": ABSOLUTE_PATH}`` or
    ``{"module": NAME}``."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"--import expects a Python file or a module name, got {spec!r}")
    if _is_file(spec):
        path = os.path.abspath(spec)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--import {spec!r}: no such file ({path})")
        name = _module_name(path)
        if name not in sys.modules:
            s = importlib.util.spec_from_file_location(name, path)
            if s is None or s.loader is None:
                raise ValueError(f"--import {spec!r}: cannot load it as a Python module")
            mod = importlib.util.module_from_spec(s)
            sys.modules[name] = mod
            try:
                s.loader.exec_module(mod)
            except BaseException:
                del sys.modules[name]
                raise
        return {"file": path}
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        importlib.import_module(spec)
    except ModuleNotFoundError as e:
        if e.name == spec or spec.startswith(f"{e.name}."):
            raise ValueError(
                f"--import {spec!r}: no module of that name (pass a .py file path or a module on sys.path)"
            ) from None
        raise
    return {"module": spec}


def load_all(specs: Iterable[str]) -> list[dict]:
    """:func:`load` each of ``specs`` in order; the records, without duplicates."""
    out: list[dict] = []
    for s in specs or []:
        r = load(s)
        if r not in out:
            out.append(r)
    return out


def load_recorded(records: Iterable[dict], where: str = "run.json") -> list[dict]:
    """Import the plug-ins recorded in a run (``[{"file": path} | {"module": name}]``); a recorded
    file that is gone is a clear error naming it."""
    out = []
    for r in records or []:
        if "file" in r:
            if not os.path.isfile(r["file"]):
                raise FileNotFoundError(
                    f"this run was trained with the plug-in {r['file']} (recorded in {where}), which no longer exists; "
                    "restore the file at that path (or edit the path in run.json)"
                )
            out.append(load(r["file"]))
        elif "module" in r:
            out.append(load(r["module"]))
        else:
            raise ValueError(f"{where}: unknown plug-in record {r!r}")
    return out
