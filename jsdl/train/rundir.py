"""Run directories: one writer, explicit resume rules, data fingerprints, metrics and summaries.

A run directory holds::

    run.lock            host and pid of the one process writing it (held while it runs)
    run.json            spec, train config, data record and fingerprint, input widths, plug-ins,
                        ``resumes`` (step and changed settings of each resume), ``finished``
    metrics.jsonl       one JSON line per log interval (``n_nonfinite``: non-finite steps in it)
    checkpoints/<step>/ orbax step folders (:mod:`jsdl.train.checkpoint`)
    summary.json, *.png at the end

Resume rules. A resumed run may change the settings in :data:`CHANGEABLE` (how long and how fast it
trains, logging and checkpointing); a change is applied and recorded in ``run.json["resumes"]``.
Everything else is frozen: the spec, the input widths, the data (its fingerprint), the seed (the
key) and the other ``train`` fields (optimiser, batch size, dead-latent and anchor settings). A
frozen change is refused before anything is restored, naming the field, the old and the new value.
"""
from __future__ import annotations

import errno
import json
import math
import os
import socket
import time
import warnings
from typing import Any, Callable, Optional


__all__ = ["CHANGEABLE", "RunLockedError", "ResumeError", "RunLock", "read_run_record", "write_json",
           "check_resume", "restore_latest", "append_metrics", "truncate_metrics", "bench_fingerprint",
           "files_fingerprint", "load_run", "LOCK_NAME"]

LOCK_NAME = "run.lock"

#: ``train`` fields a resumed run may change (applied and recorded in run.json["resumes"]).
CHANGEABLE = frozenset({
    "steps", "learning_rate", "warmup_steps", "decay", "decay_start", "min_lr_ratio", "grad_clip",
    "weight_decay", "coef_warmup_steps", "resample_every", "resample_until", "resample_scale",
    "log_every", "checkpoint_every", "keep_checkpoints", "progress", "plots", "donate",
})


class RunLockedError(ValueError):
    """Another process is writing the run directory."""


class ResumeError(ValueError):
    """A resume would change a frozen setting (the message names the field, old and new value)."""


def _checkpoint_error():
    from jsdl.train.checkpoint import CheckpointError

    return CheckpointError


# ----------------------------------------------------------------------------------------------
# the one-writer lock
# ----------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


class RunLock:
    """An exclusive lock on a run directory: ``run.lock`` holds ``{host, pid, since}`` and an
    ``flock`` is held on it while the run is written (the kernel drops the flock when the process
    dies, even by SIGKILL, so a lock left by a dead process is recognised as stale and taken over
    with a warning). A second writer raises :class:`RunLockedError` in one line."""

    def __init__(self, run_dir: str):
        import fcntl

        self.path = os.path.join(run_dir, LOCK_NAME)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise _locked(run_dir, self.path) from None
            # The file may have been unlinked by a releasing writer between open and flock: retry.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        old = _read_lock(self.path)
        if old.get("pid") is not None and (old.get("pid") != os.getpid() or old.get("host") != socket.gethostname()):
            alive = old.get("host") == socket.gethostname() and _pid_alive(int(old["pid"]))
            warnings.warn(
                f"{self.path}: taking over a stale lock of pid {old['pid']} on host {old.get('host')} "
                f"(since {old.get('since')}; that process ended without releasing it"
                + (", and its pid is now used by another process" if alive else "") + ")",
                RuntimeWarning, stacklevel=3,
            )
        info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        os.fsync(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _locked(run_dir: str, path: str) -> RunLockedError:
    holder = _read_lock(path)
    return RunLockedError(
        f"run directory {run_dir!r} is being written by pid {holder.get('pid', '?')} on host "
        f"{holder.get('host', '?')} (since {holder.get('since', '?')}); wait for it to finish or stop it "
        f"(if no such process exists, e.g. on a network filesystem without locks, delete {path})"
    )


def check_unlocked(run_dir: str) -> None:
    """Raise :class:`RunLockedError` now if another process holds the run directory's lock (an early,
    cheap check; the lock itself is taken when the run starts)."""
    import fcntl

    path = os.path.join(run_dir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        raise _locked(run_dir, path) from None
    finally:
        os.close(fd)


def _read_lock(path: str) -> dict:
    try:
        with open(path) as f:
            return json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------------------------
# run.json
# ----------------------------------------------------------------------------------------------


def write_json(path: str, obj: Any) -> None:
    """Write JSON atomically (temporary file + rename): a kill never leaves half a file."""
    from jsdl.train.checkpoint import to_jsonable

    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(to_jsonable(obj), f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_run_record(run_dir: str) -> dict:
    """The ``run.json`` record of a run directory (clear errors when missing or unreadable)."""
    from jsdl.train.checkpoint import read_run_record as _read

    return _read(run_dir)


# ----------------------------------------------------------------------------------------------
# resume rules
# ----------------------------------------------------------------------------------------------


def _diff(old: Any, new: Any, path: str, out: dict) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(old) + [k for k in new if k not in old]:
            _diff(old.get(k), new.get(k), f"{path}.{k}" if path else str(k), out)
        return
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)) and len(old) == len(new) and \
            any(isinstance(v, (dict, list)) for v in old):
        for i, (a, b) in enumerate(zip(old, new)):
            _diff(a, b, f"{path}[{i}]", out)
        return
    if _norm(old) != _norm(new):
        out[path] = [old, new]


def _norm(v):
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, tuple):
        return [_norm(x) for x in v]
    if isinstance(v, list):
        return [_norm(x) for x in v]
    return v


def changes(old: dict, new: dict) -> dict:
    """``{dotted.field: [old, new]}`` for every leaf that differs between two JSON records."""
    out: dict = {}
    _diff(old, new, "", out)
    return out


def _changeable(path: str) -> bool:
    if path.startswith("train."):
        return path[len("train."):] in CHANGEABLE
    if path.startswith("members[") and path.endswith(".learning_rate"):
        return True
    return path in ("out_dir",)


def split_changes(diff: dict) -> tuple[dict, dict]:
    """``(allowed, frozen)`` parts of a :func:`changes` dict under the resume rules."""
    allowed = {k: v for k, v in diff.items() if _changeable(k)}
    frozen = {k: v for k, v in diff.items() if not _changeable(k)}
    return allowed, frozen


def refuse(run_dir: str, frozen: dict) -> None:
    if not frozen:
        return
    parts = "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, (a, b) in list(frozen.items())[:6])
    more = f" (and {len(frozen) - 6} more)" if len(frozen) > 6 else ""
    raise ResumeError(
        f"cannot resume {run_dir!r}: frozen setting(s) would change: {parts}{more}. A resumed run may change only "
        f"train.{{{', '.join(sorted(CHANGEABLE))}}}; start a new run directory to change the others"
    )


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 80 else s[:77] + "..."


_COMPARED = ("kind", "spec", "d_input", "d_target", "key", "data_fingerprint", "vary_k", "members", "config")


def check_resume(run_dir: str, old: dict, new: dict) -> dict:
    """Compare the recorded run (``old`` run.json) with the run about to resume (``new``): return
    the allowed changes, raise :class:`ResumeError` on a frozen one (before anything is restored).
    A field missing from an older record is not compared."""
    from jsdl.train.checkpoint import to_jsonable

    new = to_jsonable(new)
    name = lambda k: "train" if k == "config" else k  # noqa: E731  (reported as train.FIELD)
    a = {name(k): old[k] for k in _COMPARED if k in old and k in new}
    b = {name(k): new[k] for k in _COMPARED if k in old and k in new}
    if "train" in a:
        # Fields added to TrainConfig after the run was written are not compared.
        a["train"] = {k: v for k, v in a["train"].items() if k in b["train"]}
        b["train"] = {k: v for k, v in b["train"].items() if k in a["train"]}
    allowed, frozen = split_changes(changes(a, b))
    refuse(run_dir, frozen)
    return allowed


def record_resume(run_dir: str, old: dict, new: dict, step: int, allowed: dict) -> dict:
    """run.json after a resume: the new config and record, ``resumes`` += {step, changed}."""
    rec = {**old, **{k: v for k, v in new.items() if k not in ("resumes",)}}
    rec["resumes"] = list(old.get("resumes", [])) + [{"step": int(step), "changed": allowed}]
    rec["finished"] = False
    write_json(os.path.join(run_dir, "run.json"), rec)
    return rec


def record_fields(run_dir: str, **fields: Any) -> None:
    """Add ``fields`` to run.json (read, update, atomic write)."""
    path = os.path.join(run_dir, "run.json")
    with open(path) as f:
        rec = json.load(f)
    rec.update(fields)
    write_json(path, rec)


def mark_finished(run_dir: str, step: int, finished: bool) -> None:
    record_fields(run_dir, finished=bool(finished), final_step=int(step))


# ----------------------------------------------------------------------------------------------
# restore, with fallback past a corrupt latest checkpoint
# ----------------------------------------------------------------------------------------------


def restore_latest(ckpt, abstract_for: Callable[[dict], Any], step: Optional[int] = None):
    """``(state, meta)`` of ``step`` (default: the latest readable checkpoint). ``abstract_for(meta)``
    gives the abstract target from the checkpoint's own meta (its config decides the optimiser
    state's structure). A corrupt latest checkpoint is moved to ``corrupt_checkpoints/`` and the
    previous one is used, with a warning naming both steps."""
    CheckpointError = _checkpoint_error()
    if step is not None:
        return ckpt.restore(abstract_for(ckpt.meta(step)), step)
    steps = ckpt.steps()
    if not steps:
        raise CheckpointError(f"no checkpoint found in {ckpt.dir!r} (the folder has no complete step folders)")
    first_err = None
    for s in reversed(steps):
        try:
            out = ckpt.restore(abstract_for(ckpt.meta(s)), s)
        except CheckpointError as e:
            first_err = first_err or e
            continue
        bad = [b for b in steps if b > s]
        if bad:
            moved = ckpt.quarantine(bad)
            cause = first_err.__cause__ or first_err
            warnings.warn(
                f"checkpoint step {bad[-1]} in {ckpt.dir} is unreadable or corrupt ({type(cause).__name__}: "
                f"{str(cause)[:160]}); using step {s} instead (the unreadable step folder(s) {bad} moved to {moved})",
                RuntimeWarning, stacklevel=2,
            )
        return out
    raise first_err


def adapt_state(restored, abstract, run_dir: str, allowed: dict):
    """The restored state in the structure of ``abstract`` (the resumed config's). A changeable
    setting such as ``grad_clip`` adds or removes leafless optimiser states; the array leaves must
    agree one to one."""
    import jax

    if jax.tree.structure(restored) == jax.tree.structure(abstract):
        return restored
    old_leaves, new_leaves = jax.tree.leaves(restored), jax.tree.leaves(abstract)
    if len(old_leaves) != len(new_leaves) or any(
            tuple(a.shape) != tuple(b.shape) for a, b in zip(old_leaves, new_leaves)):
        raise ResumeError(
            f"cannot resume {run_dir!r}: the changed setting(s) {sorted(allowed) or '(none)'} change the optimiser "
            "state's arrays; start a new run directory"
        )
    return jax.tree.unflatten(jax.tree.structure(abstract), old_leaves)


# ----------------------------------------------------------------------------------------------
# metrics.jsonl and summary.json
# ----------------------------------------------------------------------------------------------


def _json_row(row: dict) -> str:
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    return json.dumps(clean)


def append_metrics(run_dir: Optional[str], rows: list[dict]) -> None:
    """Append rows (non-finite values written as null) and flush to disk."""
    if not run_dir:
        return
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write("".join(_json_row(r) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def truncate_metrics(run_dir: str, step: int) -> None:
    """Keep the rows up to ``step`` (a resumed run logs the rest again); a torn last line goes too."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if line.endswith("\n") and json.loads(line)["step"] <= step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                pass
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def write_summary(run_dir: str, summary: Any) -> None:
    write_json(os.path.join(run_dir, "summary.json"), summary)


# ----------------------------------------------------------------------------------------------
# data fingerprints
# ----------------------------------------------------------------------------------------------


def _sha(*arrays) -> str:
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def bench_fingerprint(data) -> Optional[dict]:
    """What identifies a bench: its scalar settings, the shapes and a hash of ``W_p``/``W_r``."""
    import jax
    import numpy as np

    rec: dict = {"kind": "bench", "type": type(data).__name__}
    for k in ("sparsity", "c_min", "beta", "method", "n_sources", "max_interference"):
        v = getattr(data, k, None)
        if isinstance(v, (int, float, str, bool)):
            rec[k] = v
    mats = [np.asarray(jax.device_get(getattr(data, k))) for k in ("W_p", "W_r") if hasattr(data, k)]
    for k, m in zip(("W_p", "W_r"), mats):
        rec[k + "_shape"] = list(m.shape)
    if mats:
        rec["sha256"] = _sha(*mats)
    return rec


def files_fingerprint(src, head_bytes: int = 65536) -> dict:
    """What identifies activation files (:class:`jsdl.data.files.ActivationFiles`): per stream the
    shard names and byte sizes, a hash of each shard's first ``head_bytes`` (header and first rows),
    and the normalisation scales."""
    import hashlib

    streams = []
    for s in src.inputs + ([src.target] if src.target is not None else []):
        shards = []
        for sh in s.shards:
            path = getattr(sh, "path", "")
            ent = {"name": sh.name, "rows": int(sh.n_rows), "d": int(sh.d)}
            if path and os.path.isfile(path):
                ent["bytes"] = os.path.getsize(path)
                with open(path, "rb") as f:
                    ent["head_sha256"] = hashlib.sha256(f.read(head_bytes)).hexdigest()[:16]
            shards.append(ent)
        streams.append({"label": s.label, "shards": shards})
    return {"kind": "files", "streams": streams, "holdout": src.holdout, "split_seed": src.split_seed,
            "chunk_rows": src.chunk_rows, "scales": dict(src.scales) if src.scales else None}


# ----------------------------------------------------------------------------------------------
# loading a run
# ----------------------------------------------------------------------------------------------


def abstract_state_factory(rec: dict):
    """``abstract_for(meta)``: the abstract TrainState of a recorded run for a checkpoint's meta
    (its config decides the optimiser state's structure)."""
    import jax
    import jax.numpy as jnp

    import dataclasses

    from jsdl.train.config import TrainConfig
    from jsdl.train.state import init_state, spec_from_dict

    spec = spec_from_dict(rec["spec"])
    d_in, d_t = rec["d_input"], rec["d_target"]
    population = rec.get("kind") == "population"
    P = len(rec.get("members") or [])
    vary = rec.get("vary_k", False)

    def abstract_for(meta: dict):
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        saved = {**rec["config"], **((meta or {}).get("config") or {})}
        cfg = TrainConfig(**{k: v for k, v in saved.items() if k in known})
        if population:
            def make():
                def one(k, lr, coefs, kv):
                    return init_state(k, spec, cfg, d_in, d_t, learning_rate=lr, coefs=coefs, k=kv)

                return jax.vmap(one)(jnp.zeros((P, 2), jnp.uint32), jnp.zeros((P,)),
                                     {n: jnp.zeros((P,)) for n in spec.penalty_coefs},
                                     jnp.zeros((P,), jnp.int32) if vary else None)
        else:
            def make():
                return init_state(jax.random.PRNGKey(0), spec, cfg, d_in, d_t)
        return jax.eval_shape(make)

    return spec, abstract_for


def load_run(run_dir: str, step: Optional[int] = None):
    """Load a run directory written by ``fit`` / ``fit_population`` / ``jsdl train`` without the
    spec or config: ``(params, spec, info)``. ``info`` holds ``step``, ``config`` (a TrainConfig),
    ``history``, ``summary`` (if the run finished), ``finished``, ``data`` (record), ``state`` (the
    full TrainState), ``plugins`` and, for populations, ``members`` (params then carry a leading
    member axis). Plug-ins recorded by ``--import`` are imported first. Missing or corrupt
    directories raise :class:`CheckpointError`; a corrupt latest checkpoint falls back to the
    previous one with a warning."""
    import dataclasses

    from jsdl import plugins
    from jsdl.train.checkpoint import Checkpointer, CheckpointError
    from jsdl.train.config import TrainConfig

    rec = read_run_record(run_dir)
    plugins.load_recorded(rec.get("plugins") or (rec.get("record") or {}).get("plugins") or [])
    try:
        spec, abstract_for = abstract_state_factory(rec)
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        config = TrainConfig(**{k: v for k, v in rec["config"].items() if k in known})
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{run_dir!r}/run.json does not describe a valid run: {e}") from None
    ckpt = Checkpointer(run_dir, keep=config.keep_checkpoints, create=False)
    try:
        state, meta = restore_latest(ckpt, abstract_for, step)
    finally:
        ckpt.close()
    info = {"step": int(meta["step"]), "config": config, "history": meta.get("history"), "data": rec.get("data"),
            "state": state, "run_dir": os.path.abspath(run_dir), "record": rec.get("record", {}),
            "anchor_features": rec.get("anchor_features"), "plugins": rec.get("plugins", []),
            "finished": bool(rec.get("finished")) and int(meta["step"]) == rec.get("final_step", -1)
            and int(meta["step"]) >= config.steps}
    if rec.get("kind") == "population":
        info["members"] = rec["members"]
    summ = os.path.join(run_dir, "summary.json")
    if os.path.isfile(summ):
        with open(summ) as f:
            info["summary"] = json.load(f)
    return state.params, spec, info
