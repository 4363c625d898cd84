"""Process-wide switches read from the environment (``JSDL_HOST_TUNING``, ``JSDL_NATIVE``)."""
from __future__ import annotations

import os


def policy(var: str, environ=os.environ) -> str:
    """``auto`` (unset or empty), ``on`` (on/1/true/yes) or ``off`` (off/0/false/no), any case;
    anything else is a ``ValueError`` naming the variable."""
    v = environ.get(var, "auto").strip().lower()
    if v in ("on", "1", "true", "yes"):
        return "on"
    if v in ("off", "0", "false", "no"):
        return "off"
    if v in ("auto", ""):
        return "auto"
    raise ValueError(f"{var}={environ.get(var)!r}: use auto, on or off")
