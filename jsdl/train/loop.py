"""``fit`` and ``fit_population``: the host loop around the compiled step.

The loop only dispatches: the step runs asynchronously, metrics are summed on device and fetched
every ``log_every`` steps (the only host syncs, plus checkpoints). At each log the progress bar, the
history and ``metrics.jsonl`` are updated and a non-finite loss is turned into
:class:`NonFiniteLossError` naming the step (the last good checkpoint is kept: nothing is saved
after a non-finite step).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import sys
import time
import warnings
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jsdl.objective import Anchors, Batch, SDLParams, SDLSpec
from jsdl.train.anchors import anchors_from_ground_truth
from jsdl.train.checkpoint import CheckpointError, Checkpointer, read_run_record, to_jsonable
from jsdl.train.config import TrainConfig, to_dict
from jsdl.train.state import METRIC_NAMES, TrainState, init_state, lr_multiplier, raw_key, spec_from_dict, spec_to_dict
from jsdl.train.mesh import process_batch_rows, to_host
from jsdl.train.step import Stepper, get_stepper, step_config, step_spec

__all__ = ["fit", "fit_population", "Grid", "load_run", "member", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss (the message names the step and the last checkpoint)."""


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


def _rows(metrics: dict, step: int, lr: float, elapsed: float, population: bool) -> list[dict]:
    m = jax.device_get(metrics)
    count = np.atleast_1d(m["count"])
    P = count.shape[0]
    out = []
    for i in range(P):
        c = max(int(count[i]), 1)
        row = {"step": step}
        for k in METRIC_NAMES:
            row[k] = float(np.atleast_1d(m[k])[i]) / c
        row["lr"] = float(np.atleast_1d(lr)[i]) if np.ndim(lr) else float(lr)
        row["time"] = elapsed
        out.append(row)
    bad = np.atleast_1d(m["bad_step"])
    return out, bad


def _progress_enabled(progress, config):
    if progress is not None:
        return bool(progress)
    if config.progress is not None:
        return bool(config.progress)
    return sys.stderr.isatty()


def _postfix(rows):
    def agg(k):
        v = [r[k] for r in rows]
        return float(np.mean(v))

    return {"loss": f"{agg('loss'):.4g}", "L0": f"{agg('l0'):.3g}", "FVU": f"{agg('fvu'):.3g}",
            "dead": f"{agg('dead_frac'):.2%}"}


def _new_history():
    return {k: [] for k in ("step", *METRIC_NAMES, "lr", "time")}


# ----------------------------------------------------------------------------------------------
# the loop shared by fit and fit_population
# ----------------------------------------------------------------------------------------------


def _loop(stepper: Stepper, state: TrainState, data, data_mode: str, anchors, config: TrainConfig, *,
          histories: list, out_dir: Optional[str], ckpt: Optional[Checkpointer], meta: dict,
          progress: bool, stop_at: Optional[int], callback: Optional[Callable], population: bool):
    start = int(np.atleast_1d(jax.device_get(state.step))[0])
    end = config.steps if stop_at is None else min(int(stop_at), config.steps)
    it = None
    if data_mode == "batch":
        it = iter(data)
        if start:  # a resumed run skips the batches already consumed (pass the same fresh iterator)
            it = itertools.islice(it, start, None)
    data_arg = stepper.place_data(data) if data_mode == "bench" else None
    metrics_path = os.path.join(out_dir, "metrics.jsonl") if out_dir and jax.process_index() == 0 else None
    lr_host = np.asarray(jax.device_get(state.hyper["lr"]), np.float64)
    diverged: dict[int, int] = {}

    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=start, disable=not progress, desc="jsdl train", dynamic_ncols=True)
    t0 = time.perf_counter()
    t_first = None
    compile_s = None
    last_saved = None
    if ckpt is not None and ckpt.latest_step() is not None:
        last_saved = ckpt.latest_step()
    t = start
    exhausted = False
    try:
        while t < end:
            if data_mode == "batch":
                try:
                    b = next(it)
                except StopIteration:
                    exhausted = True
                    warnings.warn(f"the data iterator ran out after {t} steps (train.steps={config.steps})")
                    break
                _check_batch(b, config)
                data_arg = stepper.place_data(b)
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
            do_ckpt = ckpt is not None and ((config.checkpoint_every and t % config.checkpoint_every == 0) or last)
            if t % config.log_every == 0 or last or do_ckpt:
                lr_now = lr_host * float(lr_multiplier(t - 1, config, xp=np))
                rows, bad = _rows(state.metrics, t, lr_now, time.perf_counter() - t0, population)
                state = state.replace(metrics=stepper.reset_metrics(state.metrics))
                for i, row in enumerate(rows):
                    if bad[i] >= 0 and i not in diverged:
                        diverged[i] = int(bad[i])
                    if row["step"] is not None:
                        for k, v in row.items():
                            histories[i][k].append(v)
                if metrics_path:
                    with open(metrics_path, "a") as f:
                        for i, row in enumerate(rows):
                            f.write(json.dumps({**({"member": i} if population else {}), **row}) + "\n")
                bar.set_postfix(_postfix(rows), refresh=False)
                bar.update(t - bar.n)
                if diverged and not population:
                    where = (f"the last good checkpoint is step {last_saved} in {ckpt.dir}" if last_saved is not None
                             else "no checkpoint was written" if ckpt is not None else "no out_dir was given")
                    raise NonFiniteLossError(
                        f"non-finite loss at step {diverged[0]} (training stopped at step {t}; {where}). "
                        "Lower the learning rate, enable grad_clip, or check the data for NaN/inf."
                    )
                if callback is not None:
                    callback(t, state, rows if population else rows[0])
            if do_ckpt:
                ckpt.save(t, state, {**meta, "step": t, "history": histories, "diverged": diverged})
                last_saved = t
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


def _exclude_kw(exclude):
    # Anchored runs: leave the anchored features and the anchored latents (0..k-1) out of the metrics.
    if exclude is None:
        return {}
    return {"exclude": np.asarray(exclude), "exclude_latents": np.arange(len(exclude))}


def _recovery(params, data, exclude=None) -> Optional[dict]:
    """``jsdl.metrics.feature_recovery`` at tau = 0.95 (keys m_gt, m_ip, m_gt_dec, m_ip_dec) plus
    M_GT at tau = 0.9 (``m_gt@0.9``, ``m_gt_dec@0.9``), when the data has ground truth."""
    if not (hasattr(data, "W_p") and hasattr(data, "W_r")):
        return None
    try:
        from jsdl import metrics as _metrics
    except ImportError:
        return None
    fr = getattr(_metrics, "feature_recovery", None)
    if fr is None:
        return None
    try:
        out = fr(params, data, **_exclude_kw(exclude))
        out = {k: float(v) for k, v in out.items() if np.ndim(v) == 0}
        r9 = fr(params, data, threshold=0.9, **_exclude_kw(exclude))
        out["m_gt@0.9"], out["m_gt_dec@0.9"] = float(r9["m_gt"]), float(r9["m_gt_dec"])
        return out
    except Exception as e:  # metrics are a report, not a reason to lose a trained run
        warnings.warn(f"feature_recovery failed: {type(e).__name__}: {e}")
        return None


def _recovery_curve(params, data, exclude=None):
    try:
        from jsdl import metrics as _metrics

        fn = getattr(_metrics, "m_gt_curve", None)
        if fn is None or not hasattr(data, "W_p"):
            return None
        return fn(params, data, **_exclude_kw(exclude))
    except Exception:
        return None


def _plots(out_dir: str, histories: list, params_list, data, exclude, labels):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for h, lab in zip(histories, labels):
        if not h["step"]:
            continue
        ax[0].plot(h["step"], h["loss"], label=f"loss {lab}".strip())
        ax[0].plot(h["step"], h["mse"], "--", label=f"mse {lab}".strip())
        ax[1].plot(h["step"], h["l0"], label=lab or "L0")
        ax[2].plot(h["step"], h["fvu"], label=lab or "FVU")
    ax[0].set_yscale("log")
    ax[0].set_title("loss")
    ax[1].set_title("L0 (mean active latents)")
    ax[2].set_title("FVU")
    ax[2].set_yscale("log")
    for a in ax:
        a.set_xlabel("step")
    if len(histories) <= 8:
        for a in ax:
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "training.png"), dpi=100)
    plt.close(fig)
    curves = [(_recovery_curve(p, data, exclude), lab) for p, lab in zip(params_list, labels)]
    curves = [(c, lab) for c, lab in curves if c is not None]
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for c, lab in curves:
            if isinstance(c, dict) and "thresholds" in c:
                xs, ys = c["thresholds"], c.get("m_gt", c.get("values"))
            elif isinstance(c, (tuple, list)) and len(c) == 2:
                xs, ys = c
            else:
                continue
            ax.plot(np.asarray(xs), np.asarray(ys), label=lab or None)
        ax.set_xlabel("cosine threshold tau")
        ax.set_ylabel("M_GT(tau)")
        ax.set_title("feature recovery")
        if any(lab for _, lab in curves) and len(curves) <= 8:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "recovery.png"), dpi=100)
        plt.close(fig)


# ----------------------------------------------------------------------------------------------
# fit
# ----------------------------------------------------------------------------------------------


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


def _prepare_run_dir(out_dir, resume, record):
    if out_dir is None:
        if resume:
            raise ValueError("resume=True needs out_dir (the run directory to resume)")
        return None, None
    out_dir = os.path.abspath(os.fspath(out_dir))
    if resume:
        if not os.path.isdir(out_dir):
            raise CheckpointError(f"cannot resume: run directory {out_dir!r} does not exist")
        ckpt = Checkpointer(out_dir, keep=record["config"]["keep_checkpoints"], create=False)
        if ckpt.latest_step() is None:
            raise CheckpointError(f"cannot resume: no checkpoint found in {ckpt.dir!r}")
        return out_dir, ckpt
    os.makedirs(out_dir, exist_ok=True)
    if os.path.isdir(os.path.join(out_dir, "checkpoints")) and os.listdir(os.path.join(out_dir, "checkpoints")):
        raise ValueError(
            f"{out_dir!r} already holds checkpoints; pass resume=True (CLI: --resume) to continue, or use a new out_dir"
        )
    with open(os.path.join(out_dir, "run.json"), "w") as f:
        json.dump(to_jsonable(record), f, indent=2)
    open(os.path.join(out_dir, "metrics.jsonl"), "w").close()
    return out_dir, Checkpointer(out_dir, keep=record["config"]["keep_checkpoints"], create=True)


def _restore(ckpt: Checkpointer, abstract, spec_record: dict):
    state, meta = ckpt.restore(abstract)
    if meta.get("spec") != to_jsonable(spec_record):
        raise ValueError(
            f"cannot resume {ckpt.run_dir!r}: its spec {meta.get('spec')} differs from the given spec {spec_record}"
        )
    return state, meta


def _truncate_metrics(out_dir, step):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError):
                pass
    with open(path, "w") as f:
        f.writelines(keep)


@functools.lru_cache(maxsize=32)
def _jit_init_cached(spec, config, d_in, d_t, dtype, population):
    def one(k, data_key, lr, coefs, kv):
        return init_state(k, spec, config, d_in, d_t, data_key=data_key, learning_rate=lr, coefs=coefs, k=kv,
                          dtype=dtype)

    if population:
        return jax.jit(jax.vmap(one, in_axes=(0, None, 0, 0, 0)))
    return jax.jit(one)


def _jit_init(spec, config, d_in, d_t, dtype, population):
    """A cached, jitted ``init_state`` (one compile instead of many small eager ones; repeated fits
    with the same static setting reuse it)."""
    return _jit_init_cached(step_spec(spec), step_config(config), d_in, d_t, dtype, population)


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
    out_dir: run directory for ``run.json``, ``metrics.jsonl``, orbax checkpoints, summary and plots.
    resume: continue from the latest checkpoint in ``out_dir`` (an iterator is then advanced past the
        batches already consumed, so pass the same fresh iterator).
    anchors: explicit :class:`jsdl.Anchors` (e.g. :func:`anchors_from_class_means`); otherwise
        ``config.anchors > 0`` draws ground-truth anchors from the bench.
    devices: devices to run data-parallel on (default: all; the batch is sharded over them).
    data_key: override the data-stream key (a population shares one; see :func:`fit_population`).
    stop_at: stop after this many steps (schedules still use ``config.steps``); with ``out_dir`` a
        checkpoint is written there, so ``resume=True`` continues the same run.
    callback: ``callback(step, state, row)`` at every log (copy what you keep: the state is donated to the
        next step unless ``config.donate`` is False).
    record: extra JSON-able information stored in ``run.json`` (the CLI stores its whole config).

    ``history`` maps ``step, loss, mse, fvu, l0, dead_frac, auxk, anchor, ghost, lr, time`` to lists
    (one entry per log interval, metrics averaged over the interval) and ``summary`` to a dict
    (final metrics, timing, feature recovery when the data has ground truth).
    Raises :class:`NonFiniteLossError` on a non-finite loss (naming the step)."""
    config = _check_common(spec, config)
    mode, data, d_in, d_t, data_rec = _prepare_data(spec, data, config)
    anchors, anchor_feats = _setup_anchors(key, data, config, anchors)
    spec_rec = spec_to_dict(spec)
    run_rec = {"kind": "single", "spec": spec_rec, "config": to_dict(config), "data": data_rec,
               "d_input": d_in, "d_target": d_t,
               "anchor_features": None if anchor_feats is None else anchor_feats.tolist(),
               "record": record or {}}
    out_dir, ckpt = _prepare_run_dir(out_dir, resume, run_rec)

    init = _jit_init(spec, config, d_in, d_t, dtype, False)
    coefs = {n: jnp.asarray(c) for n, c in spec.penalty_coefs.items()}
    make = lambda: init(raw_key(key), data_key, jnp.asarray(config.learning_rate), coefs, None)  # noqa: E731
    history = _new_history()
    if resume:
        state, meta = _restore(ckpt, jax.eval_shape(make), spec_rec)
        history = {k: list(v) for k, v in meta["history"][0].items()}
        _truncate_metrics(out_dir, int(meta["step"]))
    else:
        state = make()
    stepper = get_stepper(spec, config, data_mode=mode, devices=devices, bench=data if mode == "bench" else None)
    state = stepper.place_state(state)
    meta = {"spec": spec_rec, "config": to_dict(config)}
    state, timing, _ = _loop(stepper, state, data, mode, anchors, config, histories=[history], out_dir=out_dir,
                             ckpt=ckpt, meta=meta, progress=_progress_enabled(progress, config), stop_at=stop_at,
                             callback=callback, population=False)
    final = {k: history[k][-1] for k in history if history[k]}
    summary = {"spec": spec.describe(), "final": final, **timing, "n_devices": stepper.mesh.size}
    excl = None if anchor_feats is None else anchor_feats
    if mode == "bench" and not timing["stopped_early"]:
        rec = _recovery(to_host(state.params), data, excl)
        if rec is not None:
            summary["recovery"] = rec
    if out_dir:
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(to_jsonable(summary), f, indent=2)
        if config.plots and not timing["stopped_early"] and jax.process_index() == 0:
            _plots(out_dir, [history], [to_host(state.params)], data if mode == "bench" else None, excl, [""])
        ckpt.close()
    history["summary"] = summary
    if anchor_feats is not None:
        history["summary"]["anchor_features"] = anchor_feats.tolist()
    return state, history


# ----------------------------------------------------------------------------------------------
# populations
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Grid:
    """A population as a Cartesian product: ``seeds x coefs x k x learning_rate``.

    spec: the base spec. seeds: ints; member keys are ``fold_in(key, seed)``. coefs: penalty name ->
    list of coefficients (each combination is a member). k: TopK/BatchTopK k values (run with
    ``k_max`` and a mask). learning_rate: values (default: the config's)."""

    spec: SDLSpec
    seeds: Sequence[int] = (0,)
    coefs: Mapping[str, Sequence[float]] = dataclasses.field(default_factory=dict)
    k: Sequence[int] = ()
    learning_rate: Sequence[float] = ()

    def members(self, config: TrainConfig) -> list[dict]:
        names = list(self.coefs)
        for n in names:
            if n not in self.spec.penalty_coefs:
                raise ValueError(f"Grid.coefs names penalty {n!r}, not in the spec ({sorted(self.spec.penalty_coefs)})")
        coef_combos = list(itertools.product(*[list(self.coefs[n]) for n in names])) or [()]
        ks = list(self.k) or [None]
        lrs = list(self.learning_rate) or [config.learning_rate]
        out = []
        for s, cc, k, lr in itertools.product(list(self.seeds), coef_combos, ks, lrs):
            out.append({"seed": int(s), "coefs": dict(zip(names, map(float, cc))), "k": k, "learning_rate": float(lr)})
        return out


def _member_spec(spec: SDLSpec, m: dict) -> SDLSpec:
    d = spec_to_dict(spec)
    for n, c in m["coefs"].items():
        d["penalties"][n]["coef"] = c
    if m.get("k") is not None:
        d["activation_hyper"]["k"] = int(m["k"])
    return spec_from_dict(d)


def _static_signature(spec: SDLSpec) -> dict:
    d = spec_to_dict(spec)
    for p in d["penalties"].values():
        p["coef"] = None
    d["activation_hyper"].pop("k", None)
    return d


def member(states: TrainState, i: int) -> TrainState:
    """Member ``i`` of a population state (a plain single-model TrainState)."""
    return jax.tree.map(lambda x: x[i], states)


def _members_from(key, specs_or_grid, config):
    if isinstance(specs_or_grid, Mapping):
        specs_or_grid = Grid(**specs_or_grid)
    if isinstance(specs_or_grid, Grid):
        ms = specs_or_grid.members(config)
        base = specs_or_grid.spec
        specs = [_member_spec(base, m) for m in ms]
    elif isinstance(specs_or_grid, (list, tuple)) and specs_or_grid and all(isinstance(s, SDLSpec) for s in specs_or_grid):
        specs = list(specs_or_grid)
        ms = []
        for i, s in enumerate(specs):
            ms.append({"seed": i, "coefs": dict(s.penalty_coefs), "k": s.activation.hyper_dict().get("k"),
                       "learning_rate": config.learning_rate})
    else:
        raise TypeError(
            "specs_or_grid must be a non-empty list of SDLSpec, a jsdl.train.Grid or a dict of Grid fields, "
            f"got {type(specs_or_grid).__name__}"
        )
    sig0 = _static_signature(specs[0])
    for i, s in enumerate(specs[1:], 1):
        if _static_signature(s) != sig0:
            raise ValueError(
                "population members may differ only in penalty coefficients and k; "
                f"member 0 is {specs[0].describe()!r} but member {i} is {s.describe()!r}"
            )
    ks = {s.activation.hyper_dict().get("k") for s in specs}
    vary_k = len(ks) > 1
    run_spec = specs[0]
    if vary_k:
        d = spec_to_dict(specs[0])
        d["activation_hyper"]["k"] = max(ks)
        run_spec = spec_from_dict(d)
        if run_spec.activation.name not in ("topk", "batchtopk"):
            raise ValueError(f"varying k needs activation topk or batchtopk, got {run_spec.activation.name!r}")
    key = raw_key(key)
    for m, s in zip(ms, specs):
        m["key"] = np.asarray(jax.random.fold_in(key, m["seed"])).tolist()
        m["spec"] = s.describe()
        m["k"] = s.activation.hyper_dict().get("k")
    return specs, ms, run_spec, vary_k


def population_data_key(key) -> jax.Array:
    """The data-stream key every member of ``fit_population(key, ...)`` shares."""
    return jax.random.fold_in(raw_key(key), 0x5EED)


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
    when the population size is a multiple of the device count, otherwise the batch is.

    Returns ``(states, histories)``: ``states`` is a TrainState with a leading member axis
    (:func:`member` extracts one), ``histories[i]`` the history of member i (with ``member`` info and
    ``summary``). A member whose loss becomes non-finite is reported in its summary (``diverged_at``)
    and frozen at its last finite parameters; the others keep training."""
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a jsdl.train.TrainConfig, got {type(config).__name__}")
    specs, ms, run_spec, vary_k = _members_from(key, specs_or_grid, config)
    mode, data, d_in, d_t, data_rec = _prepare_data(run_spec, data, config)
    anchors, anchor_feats = _setup_anchors(key, data, config, anchors)
    P = len(ms)
    dkey = population_data_key(key)
    spec_rec = spec_to_dict(run_spec)
    run_rec = {"kind": "population", "spec": spec_rec, "config": to_dict(config), "data": data_rec,
               "d_input": d_in, "d_target": d_t, "members": ms, "vary_k": vary_k,
               "anchor_features": None if anchor_feats is None else anchor_feats.tolist(), "record": record or {}}
    out_dir, ckpt = _prepare_run_dir(out_dir, resume, run_rec)

    keys = jnp.stack([jnp.asarray(m["key"], jnp.uint32) for m in ms])
    lrs = jnp.asarray([m["learning_rate"] for m in ms])
    coef_arrays = {n: jnp.asarray([s.penalty_coefs[n] for s in specs]) for n in run_spec.penalty_coefs}
    kk = jnp.asarray([m["k"] for m in ms], jnp.int32) if vary_k else None

    init = _jit_init(run_spec, config, d_in, d_t, dtype, True)
    make = lambda: init(keys, dkey, lrs, coef_arrays, kk)  # noqa: E731

    histories = [_new_history() for _ in ms]
    if resume:
        state, meta = _restore(ckpt, jax.eval_shape(make), spec_rec)
        histories = [{k: list(v) for k, v in h.items()} for h in meta["history"]]
        _truncate_metrics(out_dir, int(meta["step"]))
    else:
        state = make()
    stepper = get_stepper(run_spec, config, data_mode=mode, n_members=P, devices=devices,
                          bench=data if mode == "bench" else None)
    state = stepper.place_state(state)
    meta = {"spec": spec_rec, "config": to_dict(config)}
    state, timing, diverged = _loop(stepper, state, data, mode, anchors, config, histories=histories,
                                    out_dir=out_dir, ckpt=ckpt, meta=meta,
                                    progress=_progress_enabled(progress, config), stop_at=stop_at,
                                    callback=callback, population=True)
    params_all = to_host(state.params)
    plist = [jax.tree.map(lambda x: x[i], params_all) for i in range(P)]
    for i, (h, m) in enumerate(zip(histories, ms)):
        final = {k: h[k][-1] for k in h if h[k]}
        s = {"spec": m["spec"], "final": final, **timing, "n_devices": stepper.mesh.size,
             "diverged_at": diverged.get(i)}
        if mode == "bench" and not timing["stopped_early"]:
            rec = _recovery(plist[i], data, anchor_feats)
            if rec is not None:
                s["recovery"] = rec
        h["member"] = m
        h["summary"] = s
    if diverged:
        warnings.warn(f"non-finite loss in population members {sorted(diverged)} at steps "
                      f"{[diverged[i] for i in sorted(diverged)]}; they were frozen at their last finite state")
    if out_dir:
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(to_jsonable([h["summary"] | {"member": h["member"]} for h in histories]), f, indent=2)
        if config.plots and not timing["stopped_early"] and jax.process_index() == 0:
            _plots(out_dir, histories, plist, data if mode == "bench" else None, anchor_feats,
                   [f"#{i}" for i in range(P)])
        ckpt.close()
    return state, histories


# ----------------------------------------------------------------------------------------------
# loading a run
# ----------------------------------------------------------------------------------------------


def load_run(run_dir: str, step: Optional[int] = None) -> tuple[SDLParams, SDLSpec, dict]:
    """Load a run directory written by :func:`fit` / :func:`fit_population` / ``jsdl train``
    without the spec or config: ``(params, spec, info)``. ``info`` holds ``step``, ``config``
    (a TrainConfig), ``history``, ``summary`` (if the run finished), ``data`` (record), ``state``
    (the full TrainState) and, for populations, ``members`` (params then carry a leading member
    axis). Missing or corrupt directories raise :class:`CheckpointError` with a clear message."""
    rec = read_run_record(run_dir)
    try:
        spec = spec_from_dict(rec["spec"])
        config = TrainConfig(**rec["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{run_dir!r}/run.json does not describe a valid run: {e}") from None
    ckpt = Checkpointer(run_dir, keep=config.keep_checkpoints, create=False)
    d_in, d_t = rec["d_input"], rec["d_target"]
    if rec.get("kind") == "population":
        ms = rec["members"]
        P = len(ms)
        vary = rec.get("vary_k", False)

        def make():
            def one(k, lr, coefs, kv):
                return init_state(k, spec, config, d_in, d_t, learning_rate=lr, coefs=coefs, k=kv)

            return jax.vmap(one)(jnp.zeros((P, 2), jnp.uint32), jnp.zeros((P,)),
                                 {n: jnp.zeros((P,)) for n in spec.penalty_coefs},
                                 jnp.zeros((P,), jnp.int32) if vary else None)
    else:
        def make():
            return init_state(jax.random.PRNGKey(0), spec, config, d_in, d_t)

    state, meta = ckpt.restore(jax.eval_shape(make), step)
    info = {"step": int(meta["step"]), "config": config, "history": meta.get("history"), "data": rec.get("data"),
            "state": state, "run_dir": os.path.abspath(run_dir), "record": rec.get("record", {}),
            "anchor_features": rec.get("anchor_features")}
    if rec.get("kind") == "population":
        info["members"] = rec["members"]
    summ = os.path.join(run_dir, "summary.json")
    if os.path.isfile(summ):
        with open(summ) as f:
            info["summary"] = json.load(f)
    ckpt.close()
    return state.params, spec, info
