"""Writing results: the one JSON encoder of jsdl and the one writer of ``RESULTS.md`` sections.

JSON (:func:`to_jsonable`, :func:`dump_json`, :func:`dumps`). Every report, summary, run record
and check record goes through :func:`to_jsonable`, which maps

* mappings to dicts with ``str`` keys, lists / tuples / sets to lists;
* numpy and JAX arrays to (nested) lists, numpy / JAX scalars and 0-d arrays to Python numbers;
* **non-finite floats (nan, +inf, -inf) to ``None``** (JSON ``null``): strict JSON has no NaN, and
  a string such as ``"nan"`` would change the type of a numeric field. Readers treat ``null`` in a
  numeric field as "not a number / not measured";
* objects with a ``to_json()`` method to its result, dataclass instances to their fields;
* anything else to ``str(obj)`` (a report must not fail on an exotic value).

The output of :func:`dump_json` / :func:`dumps` is therefore strict JSON (``allow_nan=False``).

RESULTS.md (:func:`write_section`). A results file is a header followed by sections that start at
a ``## title`` line and run to the next one. :func:`write_section` replaces the section with the
given title (or appends it), keeping every other section, under an exclusive ``fcntl.flock`` on
``<path>.lock`` so that concurrent writers (benchmark scripts, experiments) never lose each
other's sections.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import re
from typing import Any, Iterator, Optional

import numpy as np

__all__ = ["to_jsonable", "dumps", "dump_json", "read_sections", "write_sections", "locked", "write_section"]


def to_jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON data (module docstring: non-finite floats become ``None``)."""
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):  # also np.float64, a float subclass
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.ndarray, np.generic)) or type(obj).__module__.startswith(("jax", "jaxlib")):
        try:
            a = np.asarray(obj)
        except Exception:  # noqa: BLE001 - e.g. a jax object that is not an array
            return str(obj)
        if a.dtype.kind in "biuf":
            return to_jsonable(a.tolist())
        return str(obj)
    if hasattr(obj, "to_json") and callable(obj.to_json):
        return to_jsonable(obj.to_json())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    return str(obj)


def dumps(obj: Any, *, indent: Optional[int] = 2) -> str:
    """Strict JSON text of :func:`to_jsonable` ``(obj)``."""
    return json.dumps(to_jsonable(obj), indent=indent, allow_nan=False)


def dump_json(obj: Any, path: str, *, indent: Optional[int] = 2) -> str:
    """Write :func:`dumps` ``(obj)`` to ``path`` (parent directories created); returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = dumps(obj, indent=indent)
    with open(path, "w") as f:
        f.write(text + "\n")
    return path


# --------------------------------------------------------------------------------------------------
# RESULTS.md sections
# --------------------------------------------------------------------------------------------------


def read_sections(path: str) -> tuple[str, list[tuple[str, str]]]:
    """``(header, [(title, body), ...])`` of a results file (``("", [])`` when it does not exist)."""
    if not os.path.exists(path):
        return "", []
    with open(path) as f:
        parts = re.split(r"(?m)^## ", f.read())
    secs = []
    for p in parts[1:]:
        title, _, body = p.partition("\n")
        secs.append((title.strip(), body))
    return parts[0], secs


def write_sections(header: str, secs: list[tuple[str, str]], path: str) -> None:
    """Write ``header`` and the sections, each as ``## title``, a blank line, the body. Call it
    under :func:`locked` when others may write the same file."""
    out = header.rstrip() + "\n\n"
    for title, body in secs:
        out += f"## {title}\n\n{body.strip()}\n\n"
    with open(path, "w") as f:
        f.write(out.rstrip() + "\n")


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """An exclusive ``fcntl.flock`` on ``<path>.lock`` for the duration of the block."""
    with open(path + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_section(path: str, title: str, body: str, *, header: str = "# Results\n") -> None:
    """Replace (or append) the section ``## title`` of the results file ``path``, keeping all
    others, under :func:`locked`. ``header`` is used when the file has none yet."""
    if not title or "\n" in title:
        raise ValueError(f"title must be one non-empty line, got {title!r}")
    with locked(path):
        old_header, secs = read_sections(path)
        for i, (t, _) in enumerate(secs):
            if t == title:
                secs[i] = (title, body)
                break
        else:
            secs.append((title, body))
        write_sections(old_header if old_header.strip() else header, secs, path)
