"""One registry type for the named plug-ins of the objective (activations, penalties).

A :class:`Registry` maps a name to a callable plus a small frozen *info* record. Registration checks
the callable's signature against the registry's calling convention, so a wrong signature fails when
it is registered, not deep inside a jitted step:

* the leading positional parameters (``(z, params)`` for an activation, ``(codes, params)`` for a
  penalty) must be accepted positionally;
* ``required`` keywords (``inference`` for an activation) must be declared;
* ``injected`` keywords (``pre_acts``, ``n_sources`` for a penalty) are supplied by the caller, not
  the user;
* every other parameter is a **hyperparameter**: a keyword argument with a default. Its default (or
  its annotation, when that is ``int``, ``float``, ``bool`` or ``str``) gives its type, and an
  optional range is declared at registration: ``@register("lp", hyper={"p": "(0, 1]"})``. Ranges
  are intervals (``"(0, 1]"``, ``"[1, inf)"``) or comparisons (``"> 0"``, ``">= 1"``).

:meth:`Registry.bind` turns ``(name, **hyper)`` into the full, validated hyperparameter mapping; an
unknown hyperparameter, a wrong type or an out-of-range value raises naming the plug-in, the
argument, the value and what is allowed. An unknown name lists the known ones.

A name is registered once: registering a *different* function under a taken name raises unless
``overwrite=True``. Registering the same definition again (the same function, or a plug-in file
imported a second time: same module, qualified name and source file) replaces it silently.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import re
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar, Union

__all__ = ["Registry", "Entry", "HyperParam", "Range", "bind_hyper"]

InfoT = TypeVar("InfoT")

_P = inspect.Parameter
_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


# ----------------------------------------------------------------------------------------------
# Hyperparameter ranges
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Range:
    """A closed, open or half-open interval ``lo < v <= hi`` etc.; ``None`` bounds are infinite."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v: float) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return False
        return True

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}" if self.lo is not None else "any value"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"

    @classmethod
    def parse(cls, text: str) -> "Range":
        """``"(0, 1]"``, ``"[1, inf)"``, ``"> 0"``, ``">= 0"``, ``"< 1"``, ``"<= 1"``."""
        s = text.strip()
        m = re.fullmatch(r"([\[(])\s*([^,]+?)\s*,\s*([^,]+?)\s*([\])])", s)
        if m:
            lo, hi = _bound(m.group(2), text), _bound(m.group(3), text)
            return cls(lo=lo, hi=hi, lo_open=m.group(1) == "(", hi_open=m.group(4) == ")")
        m = re.fullmatch(r"(>=|<=|>|<)\s*(\S+)", s)
        if m:
            v = _bound(m.group(2), text)
            op = m.group(1)
            return cls(lo=v, lo_open=op == ">") if op.startswith(">") else cls(hi=v, hi_open=op == "<")
        raise ValueError(
            f"range {text!r}: expected an interval such as '(0, 1]' or '[1, inf)', or a comparison such as '> 0'"
        )


def _bound(s: str, text: str) -> float | None:
    s = s.strip()
    if s in ("inf", "+inf", "-inf"):
        return None
    try:
        return float(s)
    except ValueError:
        raise ValueError(f"range {text!r}: {s!r} is not a number") from None


# ----------------------------------------------------------------------------------------------
# Entries
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HyperParam:
    """One hyperparameter of a plug-in: its name, default, type (``None`` = unchecked) and range."""

    name: str
    default: Any
    type: type | None = None
    range: Range | None = None

    def check(self, value: Any, where: str) -> Any:
        """``value`` validated (ints are accepted, and converted, for a float hyperparameter; a list,
        as YAML gives, becomes a tuple so the bound plug-in stays hashable, i.e. jit-static)."""
        if isinstance(value, list):
            value = tuple(value)
        tp = self.type
        if tp is not None:
            ok = (
                isinstance(value, bool) if tp is bool
                else isinstance(value, (int, float)) and not isinstance(value, bool) if tp is float
                else isinstance(value, int) and not isinstance(value, bool) if tp is int
                else isinstance(value, tp)
            )
            if not ok:
                yaml_hint = " (YAML reads 1e-3 as a string: write 1.0e-3)" if tp is float and isinstance(value, str) else ""
                raise TypeError(
                    f"{where}: {self.name} must be {tp.__name__}, got {value!r} ({type(value).__name__}){yaml_hint}"
                )
            if tp is float:
                value = float(value)
        if self.range is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
                    or value not in self.range:
                raise ValueError(f"{where}: {self.name} must be {self.range}, got {value!r}")
        return value


@dataclasses.dataclass(frozen=True)
class Entry(Generic[InfoT]):
    """A registered plug-in: the callable, its info record and its hyperparameters."""

    name: str
    fn: Callable
    info: InfoT
    hyper: tuple[HyperParam, ...]
    injected: frozenset[str] = frozenset()

    def defaults(self) -> dict[str, Any]:
        return {h.name: h.default for h in self.hyper}


def _same_definition(a: Callable, b: Callable) -> bool:
    if a is b:
        return True
    ca, cb = getattr(a, "__code__", None), getattr(b, "__code__", None)
    return (
        ca is not None and cb is not None
        and getattr(a, "__qualname__", None) == getattr(b, "__qualname__", None)
        and getattr(a, "__module__", None) == getattr(b, "__module__", None)
        and ca.co_filename == cb.co_filename
    )


# ----------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------


class Registry(Generic[InfoT]):
    """Name -> :class:`Entry`. ``kind`` names the plug-in in messages ("activation", "penalty");
    ``positional`` are the leading positional parameters every plug-in takes; ``required`` keyword
    parameters every plug-in must declare (passed by the caller); ``injected`` keyword parameters a
    plug-in may declare (supplied by the caller when declared); ``info_type`` the frozen dataclass
    of registration facts; ``forbidden`` characters a name may not contain."""

    def __init__(
        self,
        kind: str,
        *,
        positional: tuple[str, ...],
        info_type: type,
        required: tuple[str, ...] = (),
        injected: tuple[str, ...] = (),
        forbidden: str = "",
        hint: str = "",
        plural: str = "",
    ):
        self.kind = kind
        self.plural = plural or kind + "s"
        self.positional = positional
        self.required = required
        self.injected = injected
        self.info_type = info_type
        self.forbidden = forbidden
        self.hint = hint
        self._entries: dict[str, Entry] = {}

    # -- registration ----------------------------------------------------------------------------

    def register(
        self,
        name: str,
        *,
        overwrite: bool = False,
        hyper: Mapping[str, Union[str, Range]] | None = None,
        **info: Any,
    ) -> Callable[[Callable], Callable]:
        """Decorator: register ``fn`` under ``name`` (see :meth:`add`); returns ``fn`` unchanged."""
        self._check_name(name)
        meta = self._make_info(name, info)

        def deco(fn: Callable) -> Callable:
            self._add(name, fn, meta, hyper, overwrite)
            return fn

        return deco

    def add(self, name: str, fn: Callable, *, overwrite: bool = False,
            hyper: Mapping[str, Union[str, Range]] | None = None, **info: Any) -> Callable:
        """Register ``fn`` under ``name``. ``hyper`` maps hyperparameter names to ranges; ``info``
        are fields of the registry's info record. Raises TypeError for a signature that does not
        follow the calling convention and ValueError for a taken name (unless ``overwrite``)."""
        return self.register(name, overwrite=overwrite, hyper=hyper, **info)(fn)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests, notebooks); an unknown name raises ValueError listing the known ones."""
        self.entry(name)
        del self._entries[name]

    def _check_name(self, name: Any) -> None:
        if not isinstance(name, str) or not name.strip() or any(c in name for c in self.forbidden):
            extra = f" without {', '.join(repr(c) for c in self.forbidden)}" if self.forbidden else ""
            raise ValueError(f"{self.kind} name must be a non-empty string{extra}, got {name!r}")

    def _make_info(self, name: str, info: dict) -> Any:
        fields = {f.name for f in dataclasses.fields(self.info_type)}
        unknown = sorted(set(info) - fields)
        if unknown:
            raise TypeError(f"{self.kind} {name!r}: unknown registration option(s) {unknown}; "
                            f"valid: overwrite, hyper, {', '.join(sorted(fields))}")
        return self.info_type(**info)

    def _add(self, name, fn, meta, ranges, overwrite) -> None:
        if not callable(fn):
            raise TypeError(f"{self.kind} {name!r}: expected a function, got {type(fn).__name__}")
        hyper, injected = self._signature(name, fn, dict(ranges or {}))
        if "doc" in {f.name for f in dataclasses.fields(self.info_type)} and not getattr(meta, "doc", ""):
            meta = dataclasses.replace(meta, doc=(fn.__doc__ or "").strip().split("\n")[0])
        old = self._entries.get(name)
        if old is not None and not overwrite and not _same_definition(old.fn, fn):
            raise ValueError(
                f"{self.kind} {name!r} is already registered (by {_where(old.fn)}); pick another name or "
                f"pass overwrite=True to replace it"
            )
        self._entries[name] = Entry(name, fn, meta, hyper, frozenset(injected))

    def _signature(self, name: str, fn: Callable, ranges: dict) -> tuple[tuple[HyperParam, ...], set[str]]:
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            raise TypeError(f"{self.kind} {name!r}: cannot read the signature of {fn!r}") from None
        convention = f"{self.kind} signature must be fn({self._convention()})"
        params = list(sig.parameters.values())
        lead = params[: len(self.positional)]
        if len(lead) < len(self.positional) or any(p.kind not in (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)
                                                   for p in lead):
            raise TypeError(f"{self.kind} {name!r}: {convention}, got {name}{sig}")
        rest = params[len(self.positional):]
        names = {p.name for p in rest}
        missing = [r for r in self.required if r not in names]
        if missing:
            raise TypeError(f"{self.kind} {name!r}: {convention}; it does not declare {', '.join(missing)} "
                            f"(got {name}{sig})")
        hyper: list[HyperParam] = []
        injected: set[str] = set()
        hints = fn.__annotations__ if isinstance(getattr(fn, "__annotations__", None), dict) else {}
        for p in rest:
            if p.kind in (_P.VAR_POSITIONAL, _P.VAR_KEYWORD):
                raise TypeError(
                    f"{self.kind} {name!r}: {'*' if p.kind is _P.VAR_POSITIONAL else '**'}{p.name} is not allowed; "
                    f"declare each hyperparameter as a keyword argument with a default ({convention}, got {name}{sig})"
                )
            if p.kind is _P.POSITIONAL_ONLY:
                raise TypeError(f"{self.kind} {name!r}: parameter {p.name!r} is positional-only; {convention}")
            if p.name in self.required or p.name in self.injected:
                if p.name in self.injected:
                    injected.add(p.name)
                continue
            if p.default is _P.empty:
                raise TypeError(
                    f"{self.kind} {name!r}: hyperparameter {p.name!r} needs a default value "
                    f"(hyperparameters are keyword arguments with defaults; {convention}, got {name}{sig})"
                )
            hyper.append(HyperParam(p.name, p.default, _hyper_type(p, hints), None))
        by_name = {h.name: h for h in hyper}
        unknown = sorted(set(ranges) - set(by_name))
        if unknown:
            raise ValueError(f"{self.kind} {name!r}: hyper ranges for {unknown}, which are not hyperparameters of "
                             f"{name}{sig} (hyperparameters: {sorted(by_name) or 'none'})")
        for k, r in ranges.items():
            rng = Range.parse(r) if isinstance(r, str) else r
            if not isinstance(rng, Range):
                raise TypeError(f"{self.kind} {name!r}: range of {k!r} must be a string such as '(0, 1]' or a "
                                f"jsdl.registry.Range, got {r!r}")
            h = dataclasses.replace(by_name[k], range=rng)
            h.check(h.default, f"{self.kind} {name!r} (default)")
            by_name[k] = h
        return tuple(by_name[h.name] for h in hyper), injected

    def _convention(self) -> str:
        kw = ["*", *(f"{r}=..." for r in self.required)] if self.required else []
        return ", ".join([*self.positional, *kw, "**hyper"])

    # -- lookup ----------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, name: str) -> Entry:
        """The :class:`Entry` of ``name``; an unknown name raises ValueError listing the known ones."""
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} must be a name (str), got {type(name).__name__}")
        e = self._entries.get(name)
        if e is None:
            raise ValueError(f"unknown {self.kind} {name!r}; known {self.plural}: {', '.join(self.names())}{self.hint}")
        return e

    def bind(self, name: str, hyper: Mapping[str, Any], *, where: str | None = None) -> dict[str, Any]:
        """The defaults of ``name`` updated with ``hyper``, every value validated against the
        signature (name, type) and the declared range."""
        e = self.entry(name)
        return bind_hyper([e], hyper, where or f"{self.kind} {name!r}")


def bind_hyper(entries: list[Entry], hyper: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Defaults of ``entries`` updated with ``hyper``, validated: several entries share one mapping
    (a composition such as ``relu|topk``); every entry declaring a name validates its value."""
    decl: dict[str, HyperParam] = {}
    full: dict[str, Any] = {}
    for e in entries:
        for h in e.hyper:
            decl.setdefault(h.name, h)
            full.setdefault(h.name, h.default)
    unknown = sorted(set(hyper) - set(decl))
    if unknown:
        raise ValueError(f"{where} does not take {unknown}; it accepts {sorted(decl) or 'no hyperparameters'}")
    for k, v in hyper.items():
        for e in entries:  # every member that declares k validates it
            for h in e.hyper:
                if h.name == k:
                    v = h.check(v, where)
        full[k] = v
    return full


def _hyper_type(p: inspect.Parameter, hints: dict) -> type | None:
    ann = hints.get(p.name, _P.empty)
    if isinstance(ann, str):
        ann = _TYPES.get(ann.strip(), _P.empty)
    if ann in (int, float, bool, str):
        return ann
    d = p.default
    if isinstance(d, bool):
        return bool
    if isinstance(d, int):
        return int
    if isinstance(d, float):
        return float
    if isinstance(d, str):
        return str
    return None


def _where(fn: Callable) -> str:
    code = getattr(fn, "__code__", None)
    mod = getattr(fn, "__module__", "?")
    qual = getattr(fn, "__qualname__", repr(fn))
    return f"{mod}.{qual}" + (f" at {code.co_filename}:{code.co_firstlineno}" if code else "")
