"""``fit`` and ``fit_population``: the host loop around the compiled step.

Both are thin wrappers over one :func:`_run` (the same steps for one model and for a population):
prepare the data, draw anchors, open the run directory (lock, resume checks), initialise or
restore the state, place it, loop, summarise, write the summary and plots. Run-directory I/O lives
in :mod:`jsdl.train.rundir`, plots in :mod:`jsdl.train.plots`.

The loop only dispatches: the step runs asynchronously, metrics are summed on device and fetched
every ``log_every`` steps (the only host syncs, plus checkpoints). At each log the progress bar, the
history and ``metrics.jsonl`` are updated (each row says how many of its interval's steps were
non-finite, ``n_nonfinite``; an interval without a finite step logs null metrics) and a non-finite
loss is turned into :class:`NonFiniteLossError` naming the step (the last good checkpoint is kept:
nothing is saved after a non-finite step). Ctrl-C stops with :class:`TrainingInterrupted` naming
the step and the last checkpoint.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import shutil
import sys
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jsdl import metrics as _metrics
from jsdl.objective import Anchors, Batch, SDLSpec
from jsdl.train import rundir
from jsdl.train.anchors import anchors_from_ground_truth
from jsdl.train.checkpoint import CheckpointError, Checkpointer, to_jsonable
from jsdl.train.config import TrainConfig, to_dict
from jsdl.train.mesh import process_batch_rows, to_host
from jsdl.train.rundir import load_run
from jsdl.train.state import METRIC_NAMES, TrainState, as_params, init_state, lr_multiplier, raw_key, spec_to_dict
from jsdl.train.population import Grid, member, members_from, population_data_key
from jsdl.train.step import Stepper, get_stepper, step_config, step_spec

__all__ = ["fit", "fit_population", "Grid", "load_run", "member", "NonFiniteLossError", "TrainingInterrupted"]


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss (the message names the step and the last checkpoint)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training (the message names the step, the last checkpoint and how to resume)."""


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


def _data_mode(data) -> str:
    if isinstance(data, Batch):
        raise TypeError(
            "data is a single jsdl.Batch; pass a Bench (anything with .sample(key, batch_size)) or an iterator "
            "of Batch, e.g. itertools.repeat(batch)"
        )
    if callable(getattr(data, "sample", None)):
        return "bench"
    try:
        iter(data)
    except TypeError:
        raise TypeError(
            f"data must be a Bench (with .sample(key, batch_size)) or an iterable of jsdl.Batch, got {type(data).__name__}"
        ) from None
    return "batch"


def _widths(spec: SDLSpec, x_p_shape, x_r_shape) -> tuple[int, Optional[int]]:
    def per_source(shape, what):
        if len(shape) == 3:
            return int(shape[-1])
        if len(shape) != 2:
            raise ValueError(f"{what} must have shape [B, d] (or [B, L, d] for a crosscoder), got {tuple(shape)}")
        n = int(shape[-1])
        if spec.n_sources > 1:
            if n % spec.n_sources:
                raise ValueError(f"{what} width {n} is not divisible by n_sources={spec.n_sources}")
            return n // spec.n_sources
        return n

    d_in = per_source(x_p_shape, "x_p")
    d_t = None if x_r_shape is None else per_source(x_r_shape, "x_r")
    return d_in, d_t


def _probe_bench(bench, batch_size):
    b = jax.eval_shape(lambda k: bench.sample(k, batch_size), jax.random.PRNGKey(0))
    if not isinstance(b, Batch):
        raise TypeError(f"data.sample(key, batch_size) must return a jsdl.Batch, got {type(b).__name__}")
    return b


def _check_batch(b, config: TrainConfig):
    if not isinstance(b, Batch):
        raise TypeError(f"the data iterator must yield jsdl.Batch, got {type(b).__name__}")
    r0, r1 = process_batch_rows(config.batch_size, config.mesh)  # several processes: this process's rows
    if b.x_p.shape[0] != r1 - r0:
        raise ValueError(
            f"a batch from the data iterator has {b.x_p.shape[0]} rows but train.batch_size={config.batch_size}"
            + (f" needs rows [{r0}, {r1}) in process {jax.process_index()} (jsdl.train.mesh.process_batch_rows)"
               if jax.process_count() > 1 else "")
        )


def _bench_record(data) -> dict:
    rec = {"kind": "bench", "type": type(data).__name__}
    for k in ("sparsity", "c_min", "beta", "method", "n_sources", "max_interference"):
        v = getattr(data, k, None)
        if isinstance(v, (int, float, str, bool)):
            rec[k] = v
    for k in ("W_p", "W_r"):
        if hasattr(data, k):
            rec[k + "_shape"] = list(np.shape(getattr(data, k)))
    return rec


# ----------------------------------------------------------------------------------------------
# host-side logging
# ----------------------------------------------------------------------------------------------


def _rows(metrics: dict, step: int, n_steps: int, lr, elapsed: float) -> tuple[list[dict], np.ndarray]:
    """One row per model for a log interval of ``n_steps`` steps: metrics averaged over its finite
    steps, ``n_nonfinite`` = steps whose loss or gradient was not finite (all metrics None when no
    step of the interval was finite)."""
    m = jax.device_get(metrics)
    count = np.atleast_1d(m["count"])
    out = []
    for i in range(count.shape[0]):
        c = int(count[i])
        row = {"step": step}
        for k in METRIC_NAMES:
            row[k] = float(np.atleast_1d(m[k])[i]) / c if c else None
        row["n_nonfinite"] = int(n_steps - c)
        row["lr"] = float(np.atleast_1d(lr)[i]) if np.ndim(lr) else float(lr)
        row["time"] = elapsed
        out.append(row)
    return out, np.atleast_1d(m["bad_step"])


def _progress_enabled(progress, config):
    if progress is not None:
        return bool(progress)
    if config.progress is not None:
        return bool(config.progress)
    return sys.stderr.isatty()


def _postfix(rows):
    def agg(k):
        v = [r[k] for r in rows if r[k] is not None]
        return float(np.mean(v)) if v else float("nan")

    return {"loss": f"{agg('loss'):.4g}", "L0": f"{agg('l0'):.3g}", "FVU": f"{agg('fvu'):.3g}",
            "dead": f"{agg('dead_frac'):.2%}"}


def _new_history():
    return {k: [] for k in ("step", *METRIC_NAMES, "n_nonfinite", "lr", "time")}


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _LoopIO:
    """Where the loop reports: histories (one per model), the run directory, the checkpointer."""

    histories: list
    out_dir: Optional[str]
    ckpt: Optional[Checkpointer]
    meta: dict
    population: bool
    callback: Optional[Callable]
    last_saved: Optional[int] = None


def _next_batch(it, t, config, stepper):
    try:
        b = next(it)
    except StopIteration:
        warnings.warn(f"the data iterator ran out after {t} steps (train.steps={config.steps})")
        return None
    _check_batch(b, config)
    return stepper.place_data(b)


def _log(io: _LoopIO, stepper, state, t, n_steps, lr_host, config, t0, diverged, bar):
    """Fetch and reset the metric sums, record one row per model, stop a diverged single run."""
    lr_now = lr_host * float(lr_multiplier(t - 1, config, xp=np))
    rows, bad = _rows(state.metrics, t, n_steps, lr_now, time.perf_counter() - t0)
    state = state.replace(metrics=stepper.reset_metrics(state.metrics))
    for i, row in enumerate(rows):
        if bad[i] >= 0 and i not in diverged:
            diverged[i] = int(bad[i])
        for k, v in row.items():
            io.histories[i][k].append(v)
    rundir.append_metrics(io.out_dir if jax.process_index() == 0 else None, [{**({"member": i} if io.population else {}), **r} for i, r in enumerate(rows)])
    bar.set_postfix(_postfix(rows), refresh=False)
    bar.update(t - bar.n)
    if diverged and not io.population:
        where = (f"the last good checkpoint is step {io.last_saved} in {io.ckpt.dir}" if io.last_saved is not None
                 else "no checkpoint was written" if io.ckpt is not None else "no out_dir was given")
        raise NonFiniteLossError(
            f"non-finite loss at step {diverged[0]} (training stopped at step {t}; {where}). "
            "Lower the learning rate, enable grad_clip, or check the data for NaN/inf."
        )
    if io.callback is not None:
        io.callback(t, state, rows if io.population else rows[0])
    return state


def _interrupted(io: _LoopIO, t: int) -> TrainingInterrupted:
    if io.ckpt is None:
        return TrainingInterrupted(f"interrupted at step {t}; no out_dir was given, so nothing was saved")
    saved = io.ckpt.latest_step()  # a save that Ctrl-C interrupted was completed first (see Checkpointer.save)
    last = "no checkpoint was written yet" if saved is None else f"the last checkpoint is step {saved}"
    return TrainingInterrupted(f"interrupted at step {t}; {last}; resume with `jsdl train --resume {io.out_dir}` "
                               "(Python: the same fit call with resume=True)")


def _loop(stepper: Stepper, state: TrainState, data, data_mode: str, anchors, config: TrainConfig, io: _LoopIO, *,
          progress: bool, stop_at: Optional[int]):
    start = int(np.atleast_1d(jax.device_get(state.step))[0])
    end = config.steps if stop_at is None else min(int(stop_at), config.steps)
    it = None
    if data_mode == "batch":
        it = iter(data)
        if start:  # a resumed run skips the batches already consumed (pass the same fresh iterator)
            it = itertools.islice(it, start, None)
    data_arg = stepper.place_data(data) if data_mode == "bench" else None
    lr_host = np.asarray(jax.device_get(state.hyper["lr"]), np.float64)
    diverged: dict[int, int] = {}

    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=start, disable=not progress, desc="jsdl train", dynamic_ncols=True)
    t0 = time.perf_counter()
    t_first = compile_s = None
    io.last_saved = io.ckpt.latest_step() if io.ckpt is not None else None
    t = last_log = start
    exhausted = False
    try:
        while t < end:
            if data_mode == "batch":
                data_arg = _next_batch(it, t, config, stepper)
                if data_arg is None:
                    exhausted = True
                    break
            if config.resample_every and t > 0 and t % config.resample_every == 0 and (
                    config.resample_until == 0 or t <= config.resample_until):
                state = stepper.resample(state, data_arg)
            state = stepper.step(state, data_arg, anchors)
            t += 1
            if t_first is None:
                jax.block_until_ready(state.step)
                t_first = time.perf_counter()
                compile_s = t_first - t0
            last = t == end
            do_ckpt = io.ckpt is not None and ((config.checkpoint_every and t % config.checkpoint_every == 0) or last)
            if t % config.log_every == 0 or last or do_ckpt:
                state = _log(io, stepper, state, t, t - last_log, lr_host, config, t0, diverged, bar)
                last_log = t
            if do_ckpt:
                io.ckpt.save(t, state, {**io.meta, "step": t, "history": io.histories, "diverged": diverged})
                io.last_saved = t
    except KeyboardInterrupt:
        raise _interrupted(io, t) from None
    finally:
        bar.close()
    jax.block_until_ready(state.step)
    wall = time.perf_counter() - t0
    run_steps = t - start
    timed = max(run_steps - 1, 0)
    sps = timed / (time.perf_counter() - t_first) if t_first and timed else float("nan")
    timing = {"steps_run": run_steps, "wall_s": wall, "compile_s": compile_s, "steps_per_s": sps,
              "stopped_early": exhausted or t < config.steps}
    return state, timing, diverged


# ----------------------------------------------------------------------------------------------
# recovery and setup
# ----------------------------------------------------------------------------------------------


def _exclude_kw(exclude):
    # Anchored runs: leave the anchored features and the anchored latents (0..k-1) out of the metrics.
    if exclude is None:
        return {}
    return {"exclude": np.asarray(exclude), "exclude_latents": np.arange(len(exclude))}


@jax.jit
def _best_matches(params, W_p, W_r, keep_latents):
    """Best matches ``(s_enc [n], s_dec [n])`` of encoder rows vs ``W_p`` and decoder columns vs
    ``W_r`` (:func:`jsdl.metrics.best_match`), jitted: one compile instead of the dozens of eager
    ones of :func:`jsdl.metrics.feature_recovery`. Population members go through it one at a time
    (a vmap would hold every member's ``[n_q, n]`` similarity matrix at once)."""

    def best(learned, true):
        S = _metrics.similarity(learned, true)
        return jnp.max(jnp.where(keep_latents[:, None], S, -jnp.inf), axis=0)

    return best(_metrics._directions(params, "encoder"), W_p), best(_metrics._directions(params, "decoder"), W_r)


def _recovery(params, data, exclude=None, *, population: bool = False) -> Optional[list]:
    """Per model, :func:`jsdl.metrics.feature_recovery` at tau = 0.95 (keys m_gt, m_ip, m_gt_dec,
    m_ip_dec, n_evaluated) plus M_GT at tau = 0.9 (``m_gt@0.9``, ``m_gt_dec@0.9``), when the data has
    ground truth; ``params`` has a leading member axis when ``population``. None without ground truth."""
    if not (hasattr(data, "W_p") and hasattr(data, "W_r")):
        return None
    W_p, W_r = _metrics._gt(data)
    ex = _exclude_kw(exclude)
    keep = _metrics._keep_mask(ex.get("exclude"), W_p.shape[1], "exclude")
    keep_latents = _metrics._keep_mask(ex.get("exclude_latents"), params.W_E.shape[-2], "exclude_latents")
    members = [jax.tree.map(lambda x: x[i], params) for i in range(params.W_E.shape[0])] if population else [params]
    kl = jnp.asarray(keep_latents)
    out = []
    for p in members:
        e, dd = (np.asarray(a)[keep] for a in jax.device_get(_best_matches(p, W_p, W_r, kl)))
        out.append({"n_evaluated": float(keep.sum()),
                    "m_gt": float(np.mean(e > 0.95)), "m_ip": float(np.mean(e)),
                    "m_gt_dec": float(np.mean(dd > 0.95)), "m_ip_dec": float(np.mean(dd)),
                    "m_gt@0.9": float(np.mean(e > 0.9)), "m_gt_dec@0.9": float(np.mean(dd > 0.9))})
    return out


def _setup_anchors(key, data, config, anchors):
    feats = None
    if anchors is None and config.anchors > 0:
        if config.anchor_source == "class_means":
            raise ValueError(
                "train.anchor_source='class_means' needs fit(..., anchors=jsdl.train.anchors_from_class_means(x, labels))"
            )
        anchors, feats = anchors_from_ground_truth(jax.random.fold_in(raw_key(key), 0xA7C), data, config.anchors,
                                                   config.anchor_coef)
    if anchors is not None and not isinstance(anchors, Anchors):
        raise TypeError(f"anchors must be a jsdl.Anchors, got {type(anchors).__name__}")
    if anchors is not None:
        anchors = jax.tree.map(jnp.asarray, anchors)
    return anchors, feats


def _check_common(spec, config):
    if not isinstance(spec, SDLSpec):
        raise TypeError(f"spec must be a jsdl.SDLSpec (from jsdl.make_spec), got {type(spec).__name__}")
    if config is None:
        config = TrainConfig()
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a jsdl.train.TrainConfig, got {type(config).__name__}")
    return config


def _prepare_data(spec, data, config):
    mode = _data_mode(data)
    if mode == "bench":
        probe = _probe_bench(data, config.batch_size)
        x_p_shape, x_r_shape = probe.x_p.shape, None if probe.x_r is None else probe.x_r.shape
        record = _bench_record(data)
    else:
        it = iter(data)
        try:
            first = next(it)
        except StopIteration:
            raise ValueError("the data iterator is empty") from None
        _check_batch(first, config)
        data = itertools.chain([first], it)
        x_p_shape, x_r_shape = first.x_p.shape, None if first.x_r is None else first.x_r.shape
        record = {"kind": "iterator", "type": type(first).__name__}
    d_in, d_t = _widths(spec, x_p_shape, x_r_shape)
    return mode, data, d_in, d_t, record


@functools.lru_cache(maxsize=32)
def _jit_init_cached(spec, config, d_in, d_t, dtype, population):
    def one(k, data_key, lr, coefs, kv):
        return init_state(k, spec, config, d_in, d_t, data_key=data_key, learning_rate=lr, coefs=coefs, k=kv,
                          dtype=dtype)

    one_jit = jax.jit(one)
    if not population:
        return one_jit
    stack = jax.jit(lambda states: jax.tree.map(lambda *xs: jnp.stack(xs), *states))
    vmapped = jax.jit(jax.vmap(one, in_axes=(0, None, 0, 0, 0)))

    def members(keys, data_key, lrs, coefs, kv):
        # The single-model init once per member, stacked: exactly each member's separate-run init
        # (a vmapped init agrees to float32 rounding), and a population reuses the one-model
        # compile (a vmapped init compiled ~2x slower on CPU; a sweep of fits and populations
        # shares it). Arguments go to the host first so that
        # indexing them compiles nothing. Stacking holds the members twice for a moment, so a
        # population state above _STACK_INIT_MAX_BYTES is initialised by the vmapped init instead.
        keys, lrs, kv = np.asarray(keys), np.asarray(lrs), None if kv is None else np.asarray(kv)
        coefs = {n: np.asarray(c) for n, c in coefs.items()}
        args = [(keys[i], data_key, lrs[i], {n: c[i] for n, c in coefs.items()}, None if kv is None else kv[i])
                for i in range(len(keys))]
        one_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(one, *args[0])))
        if one_bytes * len(args) > _STACK_INIT_MAX_BYTES:
            return vmapped(keys, data_key, lrs, coefs, kv)
        return stack([one_jit(*a) for a in args])

    return members


_STACK_INIT_MAX_BYTES = 1 << 28  # 256 MiB


def _jit_init(spec, config, d_in, d_t, dtype, population):
    """A cached, jitted ``init_state`` (one compile instead of many small eager ones; repeated fits
    with the same static setting reuse it)."""
    return _jit_init_cached(step_spec(spec), step_config(config), d_in, d_t, dtype, population)


# ----------------------------------------------------------------------------------------------
# the run shared by fit and fit_population
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Plan:
    """What differs between one model and a population: the spec the step runs, the members, and
    the arguments of the jitted ``init_state`` (``init_args(config)``: key(s), data key, learning
    rate(s), penalty coefficients, k)."""

    spec: SDLSpec
    init_args: Callable[[TrainConfig], tuple]
    key_record: list
    members: Optional[list] = None
    specs: Optional[list] = None
    vary_k: bool = False

    @property
    def population(self) -> bool:
        return self.members is not None


def _run_record(plan: _Plan, config, mode, data, data_rec, d_in, d_t, anchor_feats, record) -> dict:
    record = dict(record or {})
    fp = record.pop("data_fingerprint", None)
    if fp is None and mode == "bench":
        fp = rundir.bench_fingerprint(data)
    rec = {"kind": "population" if plan.population else "single", "spec": spec_to_dict(plan.spec),
           "config": to_dict(config), "data": data_rec, "data_fingerprint": fp, "d_input": d_in, "d_target": d_t,
           "key": plan.key_record, "plugins": record.get("plugins", []),
           "anchor_features": None if anchor_feats is None else anchor_feats.tolist(), "record": record}
    if plan.population:
        rec.update(members=plan.members, vary_k=plan.vary_k)
    return to_jsonable(rec)


class _NoLock:
    def release(self):
        pass


class _RunDir:
    """An open run directory: the lock, the checkpointer and the recorded run (for a resume)."""

    def __init__(self, out_dir: str, resume: bool, rec: dict):
        self.dir, self.rec, self.old = out_dir, rec, None
        if resume and not os.path.isdir(out_dir):
            raise CheckpointError(f"cannot resume: run directory {out_dir!r} does not exist")
        os.makedirs(out_dir, exist_ok=True)
        # Several processes of one run share the directory: process 0 holds the lock and writes the
        # records; every process opens the checkpointer (orbax saves and restores collectively).
        self.primary = jax.process_index() == 0
        self.lock = rundir.RunLock(out_dir) if self.primary else _NoLock()
        try:
            self.ckpt = self._open(resume)
        except BaseException:
            self.lock.release()
            raise

    def _open(self, resume: bool) -> Checkpointer:
        keep = self.rec["config"]["keep_checkpoints"]
        if resume:
            self.old = rundir.read_run_record(self.dir)
            self.allowed = rundir.check_resume(self.dir, self.old, self.rec)  # before anything is restored
            ckpt = Checkpointer(self.dir, keep=keep, create=False)
            if ckpt.latest_step() is None:
                ckpt.close()
                raise CheckpointError(f"cannot resume: no checkpoint found in {ckpt.dir!r} (the run stopped before its "
                                      "first checkpoint); start it again without resume")
            return ckpt
        cdir = os.path.join(self.dir, "checkpoints")
        if not self.primary:
            return Checkpointer(self.dir, keep=keep, create=True)
        if os.path.isdir(cdir) and any(n.isdigit() for n in os.listdir(cdir)):
            raise ValueError(
                f"{self.dir!r} already holds checkpoints; pass resume=True (CLI: --resume) to continue, or use a new out_dir"
            )
        if os.path.isdir(cdir):  # only the temporary folder of a save that was killed: start afresh
            shutil.rmtree(cdir)
        rundir.write_json(os.path.join(self.dir, "run.json"), {**self.rec, "resumes": [], "finished": False})
        open(os.path.join(self.dir, "metrics.jsonl"), "w").close()
        return Checkpointer(self.dir, keep=keep, create=True)

    def restore(self, abstract, abstract_for):
        state, meta = rundir.restore_latest(self.ckpt, abstract_for)
        state = rundir.adapt_state(state, abstract, self.dir, self.allowed)
        step = int(meta["step"])
        if self.primary:
            rundir.truncate_metrics(self.dir, step)
            rundir.record_resume(self.dir, self.old, self.rec, step, self.allowed)
        return state, meta

    def close(self):
        try:
            self.ckpt.close()
        finally:
            self.lock.release()


def _init_or_restore(plan: _Plan, config, d_in, d_t, dtype, run: Optional[_RunDir], resume: bool):
    """The initial state and histories, or the restored ones (learning rate(s) from ``config``)."""
    args = plan.init_args(config)
    init = _jit_init(plan.spec, config, d_in, d_t, dtype, plan.population)
    n = len(plan.members) if plan.population else 1
    if not resume:
        return init(*args), [_new_history() for _ in range(n)]

    def abstract_for(meta):
        saved = {k: v for k, v in ((meta or {}).get("config") or {}).items() if k in to_dict(config)}
        cfg = TrainConfig(**{**to_dict(config), **saved})
        return jax.eval_shape(lambda: _jit_init(plan.spec, cfg, d_in, d_t, dtype, plan.population)(*args))

    state, meta = run.restore(jax.eval_shape(lambda: init(*args)), abstract_for)
    # Changeable settings are applied: the learning rate lives in the state.
    state = state.replace(hyper={**state.hyper, "lr": jnp.asarray(args[2], state.hyper["lr"].dtype)})
    histories = [{k: list(h.get(k, [])) for k in _new_history()} for h in meta["history"]]
    return state, histories


def _summaries(plan: _Plan, state, histories, timing, diverged, mode, data, anchor_feats, n_devices) -> list[dict]:
    recovery = None
    if mode == "bench" and not timing["stopped_early"]:
        recovery = _recovery(as_params(to_host(state.stored)), data, anchor_feats, population=plan.population)
    out = []
    for i, h in enumerate(histories):
        final = {k: h[k][-1] for k in h if isinstance(h[k], list) and h[k]}
        s = {"spec": plan.members[i]["spec"] if plan.population else plan.spec.describe(), "final": final, **timing,
             "n_devices": n_devices}
        if plan.population:
            s["diverged_at"] = diverged.get(i)
        if recovery is not None:
            s["recovery"] = recovery[i]
        out.append(s)
    return out


def _finish(run: _RunDir, plan, config, state, histories, summaries, timing, diverged, mode, data, anchor_feats):
    if not run.primary:
        return
    if plan.population:
        rundir.write_summary(run.dir, [s | {"member": m} for s, m in zip(summaries, plan.members)])
    else:
        rundir.write_summary(run.dir, summaries[0])
    if config.plots and not timing["stopped_early"]:
        from jsdl.train.plots import write_plots

        params_all = as_params(to_host(state.stored))
        n = len(histories)
        plist = [jax.tree.map(lambda x: x[i], params_all) for i in range(n)] if plan.population else [params_all]
        labels = [f"#{i}" for i in range(n)] if plan.population else [""]
        write_plots(run.dir, histories, plist, data if mode == "bench" else None, anchor_feats, labels)
    step = int(np.atleast_1d(jax.device_get(state.step))[0])
    rundir.mark_finished(run.dir, step, step >= config.steps and (plan.population or not diverged))


_THRESHOLD_PROBE = 4096  # samples of the probe batch of train.init_threshold_l0 (from a bench)


def _check_init_threshold(spec: SDLSpec, config: TrainConfig) -> None:
    if config.init_threshold_l0 is not None and not spec.activation.info.needs_threshold:
        raise ValueError(f"train.init_threshold_l0 sets the initial JumpReLU thresholds, but activation "
                         f"{spec.activation.name!r} has no learned threshold; leave it unset")


def _threshold_probe(key, data, mode: str):
    """The probe inputs ``x_p`` of ``train.init_threshold_l0``: 4096 samples from a bench (a key of
    their own, folded from the run key: not a training batch), or the iterator's first batch
    (put back, so training still starts with it). Returns ``(data, x_p)``."""
    if mode == "bench":
        k = jax.random.fold_in(key, 0x7E5)
        return data, jax.jit(lambda kk: data.sample(kk, _THRESHOLD_PROBE).x_p)(k)
    if jax.process_count() > 1:
        raise ValueError("train.init_threshold_l0 with an iterator of batches on several processes is not "
                         "supported (each process sees other rows); use a bench, or set the activation's threshold")
    it = iter(data)
    first = next(it)
    return itertools.chain([first], it), first.x_p


def _start_thresholds(state: TrainState, plan: _Plan, l0: float, x_p) -> tuple[TrainState, list]:
    """``state`` with every JumpReLU threshold at the value where its (initial) parameters fire ``l0``
    latents per sample on ``x_p`` (:func:`jsdl.train.threshold_for_l0`), per member of a
    population. Returns the state and the thresholds (one per model)."""
    from jsdl.train.state import threshold_for_l0

    params = state.params
    if not plan.population:
        th = threshold_for_l0(params, plan.spec, x_p, l0)
        new = jnp.full_like(params.threshold, th)
        return state.replace(params=params.replace(threshold=new)), [th]
    ths = [threshold_for_l0(jax.tree.map(lambda a, i=i: a[i], params), plan.spec, x_p, l0)
           for i in range(len(plan.members))]
    new = jnp.asarray(ths, params.threshold.dtype)[:, None] * jnp.ones_like(params.threshold)
    return state.replace(params=params.replace(threshold=new)), ths


def _run(key, plan: _Plan, data, config: TrainConfig, *, out_dir, resume, anchors, devices, progress, stop_at,
         callback, record, dtype):
    """The steps shared by :func:`fit` and :func:`fit_population`; returns (state, histories)."""
    _check_init_threshold(plan.spec, config)
    mode, data, d_in, d_t, data_rec = _prepare_data(plan.spec, data, config)
    anchors, anchor_feats = _setup_anchors(key, data, config, anchors)
    rec = _run_record(plan, config, mode, data, data_rec, d_in, d_t, anchor_feats, record)
    if out_dir is None and resume:
        raise ValueError("resume=True needs out_dir (the run directory to resume)")
    run = None if out_dir is None else _RunDir(os.path.abspath(os.fspath(out_dir)), resume, rec)
    try:
        state, histories = _init_or_restore(plan, config, d_in, d_t, dtype, run, resume)
        init_thresholds = None
        if config.init_threshold_l0 is not None and not resume:
            data, probe = _threshold_probe(key, data, mode)
            state, init_thresholds = _start_thresholds(state, plan, config.init_threshold_l0, probe)
            if run is not None and run.primary:
                rundir.record_fields(run.dir, init_thresholds=init_thresholds)
        elif run is not None and resume:
            init_thresholds = run.old.get("init_thresholds")  # what the run started from
        stepper = get_stepper(plan.spec, config, data_mode=mode, n_members=len(plan.members) if plan.population else None,
                              devices=devices, bench=data if mode == "bench" else None)
        _hint_host_tuning(stepper, config, len(plan.members) if plan.population else 1)
        state = stepper.place_state(state)
        io = _LoopIO(histories, None if run is None else run.dir, None if run is None else run.ckpt,
                     {"spec": rec["spec"], "config": rec["config"]}, plan.population, callback)
        state, timing, diverged = _loop(stepper, state, data, mode, anchors, config, io,
                                        progress=_progress_enabled(progress, config), stop_at=stop_at)
        summaries = _summaries(plan, state, histories, timing, diverged, mode, data, anchor_feats, stepper.mesh.size)
        if init_thresholds is not None:
            for s, th in zip(summaries, init_thresholds):
                s["init_threshold"] = th
        if run is not None:
            _finish(run, plan, config, state, histories, summaries, timing, diverged, mode, data, anchor_feats)
    finally:
        if run is not None:
            run.close()
    for h, s in zip(histories, summaries):
        h["summary"] = s
    if plan.population and diverged:
        warnings.warn(f"non-finite loss in population members {sorted(diverged)} at steps "
                      f"{[diverged[i] for i in sorted(diverged)]}; they were frozen at their last finite state")
    if anchor_feats is not None:  # every member of a population shares the anchored features
        for h in histories:
            h["summary"]["anchor_features"] = anchor_feats.tolist()
    return state, histories


# ----------------------------------------------------------------------------------------------
# fit
# ----------------------------------------------------------------------------------------------


_HINTED: set = set()


def _hint_host_tuning(stepper, config: TrainConfig, members: int) -> None:
    """Once per process: a large step on CPU in a process that :func:`jsdl.hosttune.tune_host` did
    not tune (``jsdl train`` tunes it itself) gets a warning saying how to make it faster."""
    from jsdl import hosttune

    if _HINTED or hosttune.status() is not None or hosttune.mode() == "off":
        return
    if stepper.mesh.devices.flat[0].platform != "cpu" or not hosttune.wants_tuning(
            config.batch_size, stepper.spec.n_latents, members):
        return
    _HINTED.add(True)
    warnings.warn("this CPU step is large: it runs ~10% faster when jsdl.hosttune.tune_host() is called at the "
                  "start of the process, before any JAX array (docs/training.md, 'Speed on a CPU host'; "
                  "JSDL_HOST_TUNING=off silences this)", stacklevel=4)


def fit(
    key: jax.Array,
    spec: SDLSpec,
    data,
    config: Optional[TrainConfig] = None,
    *,
    out_dir: Optional[str] = None,
    resume: bool = False,
    anchors: Optional[Anchors] = None,
    devices: Optional[Sequence] = None,
    data_key: Optional[jax.Array] = None,
    progress: Optional[bool] = None,
    stop_at: Optional[int] = None,
    callback: Optional[Callable] = None,
    record: Optional[dict] = None,
    dtype: Any = None,
) -> tuple[TrainState, dict]:
    """Train one SDL model. Returns ``(state, history)``.

    key: PRNG key, split into (init, data, train) keys. spec: from :func:`jsdl.make_spec`.
    data: a Bench (anything with ``.sample(key, batch_size) -> Batch``; batch t is generated on device
        inside the step from ``fold_in(data_key, t)``) or an iterable of :class:`jsdl.Batch` with
        ``batch_size`` rows each.
    config: :class:`TrainConfig` (default ``TrainConfig()``).
    out_dir: run directory for ``run.json``, ``metrics.jsonl``, orbax checkpoints, summary and plots
        (locked while the run writes it: a second writer raises ``RunLockedError``).
    resume: continue from the latest checkpoint in ``out_dir`` (an iterator is then advanced past the
        batches already consumed, so pass the same fresh iterator). Only the settings in
        :data:`jsdl.train.rundir.CHANGEABLE` may differ from the recorded run (they are applied and
        recorded in ``run.json["resumes"]``); any other difference raises ``ResumeError``.
    anchors: explicit :class:`jsdl.Anchors` (e.g. :func:`anchors_from_class_means`); otherwise
        ``config.anchors > 0`` draws ground-truth anchors from the bench.
    devices: devices to run data-parallel on (default: all; the batch is sharded over them).
    data_key: override the data-stream key (a population shares one; see :func:`fit_population`).
    stop_at: stop after this many steps (schedules still use ``config.steps``); with ``out_dir`` a
        checkpoint is written there, so ``resume=True`` continues the same run.
    callback: ``callback(step, state, row)`` at every log (copy what you keep: the state is donated to the
        next step unless ``config.donate`` is False).
    record: extra JSON-able information stored in ``run.json`` (the CLI stores its whole config, the
        data record, ``plugins`` and ``data_fingerprint``).

    ``history`` maps ``step, loss, mse, fvu, l0, dead_frac, auxk, anchor, ghost, n_nonfinite, lr, time``
    to lists (one entry per log interval, metrics averaged over the interval's finite steps, None when
    it had none) and ``summary`` to a dict (final metrics, timing, feature recovery when the data has
    ground truth). Raises :class:`NonFiniteLossError` on a non-finite loss (naming the step) and
    :class:`TrainingInterrupted` on Ctrl-C (naming the step and the last checkpoint)."""
    config = _check_common(spec, config)
    coefs = {n: jnp.asarray(c) for n, c in spec.penalty_coefs.items()}
    rkey = raw_key(key)
    plan = _Plan(spec, lambda cfg: (rkey, data_key, jnp.asarray(cfg.learning_rate), coefs, None),
                 key_record=np.asarray(rkey).tolist()
                 + ([] if data_key is None else [np.asarray(raw_key(data_key)).tolist()]))
    state, (history,) = _run(key, plan, data, config, out_dir=out_dir, resume=resume, anchors=anchors,
                             devices=devices, progress=progress, stop_at=stop_at, callback=callback, record=record,
                             dtype=dtype)
    return state, history


# ----------------------------------------------------------------------------------------------
# populations
# ----------------------------------------------------------------------------------------------


def fit_population(
    key: jax.Array,
    specs_or_grid,
    data,
    config: Optional[TrainConfig] = None,
    *,
    out_dir: Optional[str] = None,
    resume: bool = False,
    anchors: Optional[Anchors] = None,
    devices: Optional[Sequence] = None,
    progress: Optional[bool] = None,
    stop_at: Optional[int] = None,
    callback: Optional[Callable] = None,
    record: Optional[dict] = None,
    dtype: Any = None,
) -> tuple[TrainState, list[dict]]:
    """Train a population of models in one compiled program: the per-model step under ``jax.vmap``
    over a leading member axis, every member fed the same data stream.

    specs_or_grid: a list of specs that differ only in penalty coefficients and TopK k, or a
        :class:`Grid` (or a dict of its fields) ``seeds x coefs x k x learning_rate``.
    Member i equals ``fit(member_key_i, spec_i, data, replace(config, learning_rate=lr_i),
    data_key=population_data_key(key))`` where ``member_key_i = fold_in(key, seed_i)`` (recorded in
    ``histories[i]["member"]["key"]``). With several devices the member axis is sharded over them
    when the population size is a multiple of the device count, otherwise the batch is. The other
    arguments are those of :func:`fit`.

    Returns ``(states, histories)``: ``states`` is a TrainState with a leading member axis
    (:func:`member` extracts one), ``histories[i]`` the history of member i (with ``member`` info and
    ``summary``). A member whose loss becomes non-finite is reported in its summary (``diverged_at``)
    and frozen at its last finite parameters; the others keep training."""
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a jsdl.train.TrainConfig, got {type(config).__name__}")
    specs, ms, run_spec, vary_k = members_from(key, specs_or_grid, config)
    keys = np.stack([np.asarray(m["key"], np.uint32) for m in ms])
    coef_arrays = {n: jnp.asarray([s.penalty_coefs[n] for s in specs]) for n in run_spec.penalty_coefs}
    kk = jnp.asarray([m["k"] for m in ms], jnp.int32) if vary_k else None
    dkey = population_data_key(key)
    lrs = jnp.asarray([m["learning_rate"] for m in ms])
    plan = _Plan(run_spec, lambda cfg: (keys, dkey, lrs, coef_arrays, kk), key_record=np.asarray(raw_key(key)).tolist(),
                 members=ms, specs=specs, vary_k=vary_k)
    state, histories = _run(key, plan, data, config, out_dir=out_dir, resume=resume, anchors=anchors,
                            devices=devices, progress=progress, stop_at=stop_at, callback=callback, record=record,
                            dtype=dtype)
    for h, m in zip(histories, ms):
        h["member"] = m
    return state, histories
