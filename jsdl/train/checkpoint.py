"""Checkpoints with orbax-checkpoint.

A run directory holds::

    run.json            spec, train config, data record, input widths (written at the start)
    metrics.jsonl       one JSON line per log interval
    checkpoints/<step>/ orbax step folders: item "state" (the full TrainState) and item "meta"
                        (JSON: step, spec, config, data record, history so far, state_format)
    summary.json, *.png at the end

Saves are atomic (orbax writes to a temporary folder and renames it), the last
``keep_checkpoints`` are kept, and a restore returns everything a resumed run needs (params,
optimiser state, step, dead statistics, RNG keys, metric sums, history). Restores use an abstract
target built from the recorded spec and config, so NamedTuple optimiser states come back as
NamedTuples (orbax without a target would turn them into lists). Checkpoints of an older state
format (``meta["state_format"]``, :data:`jsdl.train.state.STATE_FORMAT`) are read and converted.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import signal
import threading
import time
from typing import Optional

from jsdl.records import to_jsonable

__all__ = ["CheckpointError", "Checkpointer", "quiet_async_teardown", "read_run_record", "to_jsonable"]


class CheckpointError(ValueError):
    """A checkpoint directory is missing, empty or unreadable."""


def read_run_record(run_dir: str) -> dict:
    """The ``run.json`` record of a run directory (clear errors when missing or unreadable)."""
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"run directory {run_dir!r} does not exist")
    path = os.path.join(run_dir, "run.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{run_dir!r} is not a jsdl run directory: {path} is missing")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable or corrupt: {e}") from None


class Checkpointer:
    """Thin wrapper around ``orbax.checkpoint.CheckpointManager`` for a run directory."""

    def __init__(self, run_dir: str, *, keep: int = 3, create: bool = True):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.run_dir = os.path.abspath(os.fspath(run_dir))
        self.dir = os.path.join(self.run_dir, "checkpoints")
        if not create and not os.path.isdir(self.dir):
            raise CheckpointError(
                f"no checkpoints in {self.run_dir!r}: {self.dir} does not exist (was the run given out_dir?)"
            )
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.dir, options=opts, item_names=("state", "meta"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """Save synchronously. Ctrl-C during the save is held until the save is complete (then
        raised), so an interrupt never leaves orbax half-way through its threads."""
        from jsdl.train.state import STATE_FORMAT

        ocp = self._ocp
        meta = {**meta, "state_format": STATE_FORMAT}
        with _sigint_deferred():
            if int(step) in self.manager.all_steps():
                self.manager.delete(int(step))
            self.manager.save(
                int(step),
                args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        meta=ocp.args.JsonSave(to_jsonable(meta))),
                force=True,
            )
            self.manager.wait_until_finished()

    def quarantine(self, steps) -> str:
        """Move the step folders ``steps`` out of ``checkpoints/`` into ``corrupt_checkpoints/``
        (kept for inspection, no longer seen by restores)."""
        dest = os.path.join(self.run_dir, "corrupt_checkpoints")
        os.makedirs(dest, exist_ok=True)
        for s in steps:
            src = os.path.join(self.dir, str(s))
            if os.path.isdir(src):
                target = os.path.join(dest, str(s))
                if os.path.exists(target):
                    shutil.rmtree(target)
                os.replace(src, target)
        self.manager.reload()
        return dest

    def restore(self, abstract_state, step: Optional[int] = None):
        """``(state, meta)`` at ``step`` (default: the latest). ``abstract_state`` is a pytree of
        ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``) giving the structure."""
        import jax
        import numpy as np

        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint found in {self.dir!r} (the folder has no complete step folders)")
        if step not in self.steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.dir!r}; available: {self.steps()}")
        from jsdl.train import state as _state

        fmt = int(self.meta(step).get("state_format", 1))
        if fmt > _state.STATE_FORMAT:
            raise CheckpointError(f"checkpoint step {step} in {self.dir!r} has state format {fmt}, newer than this "
                                  f"jsdl reads ({_state.STATE_FORMAT}); upgrade jsdl")
        target = abstract_state
        if fmt == 1:  # field "params", SDLParams everywhere (written before RowParams)
            abstract_state = _state.state_to_v1(abstract_state)
        # A checkpoint written on another device layout (a sharded or multi-process run) needs a
        # target placement: leaves without one go to the first local device (one process) or are
        # replicated over all devices (several processes; the training step then reshards them).
        if jax.process_count() == 1:
            dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        else:
            dev = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()), ("all",)),
                                             jax.sharding.PartitionSpec())
        abstract_state = jax.tree.map(
            lambda x: x if getattr(x, "sharding", None) is not None else
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), abstract_state)
        err = None
        with quiet_async_teardown():
            try:
                out = self.manager.restore(
                    step,
                    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                            meta=ocp.args.JsonRestore()),
                )
            except Exception as e:  # orbax raises many types for truncated / edited folders
                err = e
                # TensorStore's abandoned callbacks report a little later: let them do so while filtered.
                gc.collect()
                time.sleep(0.5)
        if err is not None:
            raise CheckpointError(
                f"checkpoint {os.path.join(self.dir, str(step))!r} is unreadable or corrupt "
                f"({type(err).__name__}: {str(err)[:300]}; available steps: {self.steps()})"
            ) from err
        state = out["state"]
        if fmt == 1:
            state = _state.state_from_v1(state, isinstance(target.stored, _state.RowParams))
        return state, out["meta"]

    def meta(self, step: Optional[int] = None) -> dict:
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint found in {self.dir!r}")
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:
            raise CheckpointError(f"checkpoint metadata of step {step} in {self.dir!r} is unreadable: {e}") from e

    def close(self):
        with _sigint_deferred():
            self.manager.close()


@contextlib.contextmanager
def quiet_async_teardown():
    """Drop the "Event loop is closed" / "coroutine ... was never awaited" reports that TensorStore's
    callbacks raise when orbax abandons a failed read (dozens of tracebacks burying the one error
    that matters); any other unraisable exception is reported as usual."""
    import sys

    prev = sys.unraisablehook

    def hook(u):
        text = f"{u.exc_type.__name__ if u.exc_type else ''}: {u.exc_value} {u.err_msg or ''} {u.object!r}"
        if "Event loop is closed" in text or "coroutine" in text:
            return
        prev(u)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = prev


@contextlib.contextmanager
def _sigint_deferred():
    """Hold SIGINT (Ctrl-C) for the duration of the block and raise KeyboardInterrupt after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    prev = signal.signal(signal.SIGINT, lambda *a: got.append(1))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, prev)
    if got:
        raise KeyboardInterrupt
