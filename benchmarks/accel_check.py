"""One accelerator check: what jsdl does on the GPU/TPU host it runs on, in a few minutes.

    python benchmarks/accel_check.py            # full shapes; writes benchmarks/ACCEL.md
    python benchmarks/accel_check.py --quick    # the same code on tiny shapes (CPU is fine)
    make accel-check [ARGS=--quick]

Sections (each timed; the script stops adding sections when ``--budget-s`` is spent):

1. the devices (kind, platform, count, processes);
2. the training step at (d, n_q, k, B) = (768, 16384, 32, 4096) for relu, topk, batchtopk and
   jumprelu in float32 and bf16 compute: seconds per step, achieved model FLOP/s
   (12 B d n_q per step: encoder and decoder matmuls, forward and backward) as a fraction of the
   device's peak (MFU; "unknown" for device kinds not in :data:`PEAK_FLOPS`), peak device memory;
3. the sharded step over all local devices: data parallel (n, 1) and latent-sharded (1, n);
4. one step of a 2^20-latent TopK dictionary with its latent axis sharded over the local devices
   (per-device parameter + optimiser bytes from XLA's memory analysis);
5. 2,000 steps of the paper's Table 1 TopK setting (n = 1000, d = 768, n_q = 16000, S = 0.99,
   M = 0.1) and its feature recovery (M_GT at tau = 0.95 on encoder rows and decoder columns).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time


# Dense bf16 and float32 (TF32 tensor-core on NVIDIA, where XLA's default precision uses it)
# matmul peaks in FLOP/s, from the vendors' data sheets (dense, no sparsity). Matched as a
# substring of ``device.device_kind``; the first match wins.
PEAK_FLOPS = [
    ("H200", {"bfloat16": 989e12, "float32": 494e12}),
    ("H100", {"bfloat16": 989e12, "float32": 494e12}),
    ("A100", {"bfloat16": 312e12, "float32": 156e12}),
    ("L40S", {"bfloat16": 362e12, "float32": 183e12}),
    ("L4", {"bfloat16": 121e12, "float32": 60e12}),
    ("A10G", {"bfloat16": 70e12, "float32": 35e12}),
    ("TPU v6", {"bfloat16": 918e12}),
    ("TPU v5p", {"bfloat16": 459e12}),
    ("TPU v5", {"bfloat16": 197e12}),  # v5e / "TPU v5 lite"
    ("TPU v4", {"bfloat16": 275e12}),
]

FULL = dict(d=768, n=16384, k=32, B=4096, big_n=2 ** 20, big_B=1024, t1_steps=2000, t1_B=1024,
            t1=dict(n_features=1000, d_input=768, n_q=16000, k=32), timed_steps=10)
QUICK = dict(d=32, n=256, k=4, B=64, big_n=2 ** 12, big_B=64, t1_steps=50, t1_B=128,
             t1=dict(n_features=40, d_input=24, n_q=160, k=3), timed_steps=3)


def peak_flops(kind: str, dtype: str):
    for key, peaks in PEAK_FLOPS:
        if key.lower() in kind.lower():
            return peaks.get(dtype)
    return None


def _spec(jsdl, act, n, k):
    if act == "relu":
        return jsdl.make_spec(activation="relu", n_latents=n, penalties={"l1": 1e-3})
    if act == "jumprelu":
        return jsdl.make_spec(activation="jumprelu", n_latents=n, penalties={"l0": 1e-3}, threshold=0.01,
                              bandwidth=0.01)
    return jsdl.make_spec(activation=act, n_latents=n, k=k)


def _peak_mem(devices) -> float | None:
    vals = []
    for dv in devices:
        try:
            st = dv.memory_stats() or {}
        except Exception:
            st = {}
        if "peak_bytes_in_use" in st:
            vals.append(st["peak_bytes_in_use"])
    return max(vals) if vals else None


def time_step(spec, d, B, *, compute_dtype="float32", mesh=None, devices=None, steps=10, run=True):
    """Compile and time the real training step (jsdl.train.Stepper) on a fixed random batch.
    Returns seconds per step (None when ``run`` is False), compile seconds and the compiled step's
    memory analysis."""
    import jax

    import jsdl
    from jsdl.train import Stepper, TrainConfig, init_state

    cfg = TrainConfig(steps=1000, batch_size=B, log_every=1000, progress=False, plots=False,
                      compute_dtype=compute_dtype, mesh=mesh)
    st = Stepper(spec, cfg, data_mode="batch", devices=devices)
    state = st.place_state(jax.jit(lambda k: init_state(k, spec, cfg, d))(jax.random.PRNGKey(0)))
    x = jax.random.normal(jax.random.PRNGKey(1), (B, d), jax.numpy.float32)
    batch = st.place_data(jsdl.Batch(x))
    t0 = time.perf_counter()
    compiled = st.step.lower(state, batch, None).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    if not run:
        return None, compile_s, mem
    with jax.set_mesh(st.mesh):
        state = compiled(state, batch, None)
        jax.block_until_ready(state.step)
        t0 = time.perf_counter()
        for _ in range(steps):
            state = compiled(state, batch, None)
        jax.block_until_ready(state.step)
    return (time.perf_counter() - t0) / steps, compile_s, mem


def _fmt_bytes(b):
    if b is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{int(b)} B"
        b /= 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (runs on CPU in seconds)")
    ap.add_argument("--out", help="markdown output (default: benchmarks/ACCEL.md; none with --quick)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop adding sections after this many seconds")
    args = ap.parse_args(argv)
    S = QUICK if args.quick else FULL
    out_path = args.out or (None if args.quick else os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                  "ACCEL.md"))
    import jax

    import jsdl
    from jsdl.train import TrainConfig, fit

    t_start = time.perf_counter()
    lines: list[str] = []

    def emit(s=""):
        print(s, flush=True)
        lines.append(s)

    def over_budget(section):
        if time.perf_counter() - t_start > args.budget_s:
            emit(f"\n(skipped: {section}; the {args.budget_s:.0f} s budget is spent)")
            return True
        return False

    devs = jax.local_devices()
    kind = devs[0].device_kind
    emit(f"# jsdl accelerator check{' (--quick)' if args.quick else ''}")
    emit()
    emit(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, jax {jax.__version__}, "
         f"python {platform.python_version()}. Command: `python benchmarks/accel_check.py"
         f"{' --quick' if args.quick else ''}`.")
    emit()
    emit("## Devices")
    emit()
    emit(f"- platform {devs[0].platform}, kind `{kind}`, {len(devs)} local device(s), "
         f"{jax.device_count()} in all, {jax.process_count()} process(es)")
    pk = {dt: peak_flops(kind, dt) for dt in ("float32", "bfloat16")}
    emit(f"- peak matmul FLOP/s used for MFU: float32 {pk['float32'] or 'unknown'}, "
         f"bfloat16 {pk['bfloat16'] or 'unknown'}")

    d, n, k, B = S["d"], S["n"], S["k"], S["B"]
    flops = 12.0 * B * d * n
    emit()
    emit(f"## Training step (d, n_q, k, B) = ({d}, {n}, {k}, {B}), one device")
    emit()
    emit("| activation | compute | s/step | model TFLOP/s | MFU | peak memory | compile s |")
    emit("|---|---|---|---|---|---|---|")
    for act in ("relu", "topk", "batchtopk", "jumprelu"):
        for cd in ("float32", "bfloat16"):
            if over_budget(f"step {act} {cd}"):
                break
            spec = _spec(jsdl, act, n, k)
            sps, comp, mem = time_step(spec, d, B, compute_dtype=cd, devices=devs[:1], steps=S["timed_steps"])
            fl = flops / sps
            p = pk[cd]
            mfu = f"{fl / p:.1%}" if p else "unknown"
            pm = _peak_mem(devs[:1])
            if pm is None and mem is not None:
                pm = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
            emit(f"| {act} | {cd} | {sps:.4g} | {fl / 1e12:.3g} | {mfu} | {_fmt_bytes(pm)} | {comp:.1f} |")

    n_loc = len(devs)
    emit()
    emit(f"## Sharded step over the {n_loc} local device(s): topk, float32")
    emit()
    emit("| mesh (data, model) | s/step | per-device argument bytes |")
    emit("|---|---|---|")
    meshes = [(n_loc, 1)] + ([(1, n_loc)] if n_loc > 1 else [])
    for dd, mm in meshes:
        if over_budget(f"sharded step {dd}x{mm}"):
            break
        spec = _spec(jsdl, "topk", n, k)
        sps, _, mem = time_step(spec, d, B, mesh={"data": dd, "model": mm}, devices=devs, steps=S["timed_steps"])
        emit(f"| ({dd}, {mm}) | {sps:.4g} | {_fmt_bytes(mem.argument_size_in_bytes if mem else None)} |")

    big_n = S["big_n"]
    emit()
    emit(f"## One step of a {big_n}-latent TopK dictionary (d = {d}, B = {S['big_B']}), latents over "
         f"{n_loc} device(s)")
    emit()
    if not over_budget("big dictionary"):
        spec = _spec(jsdl, "topk", big_n, k)
        try:
            sps, comp, mem = time_step(spec, d, S["big_B"], mesh={"data": 1, "model": n_loc}, devices=devs, steps=1)
            pm = _peak_mem(devs)
            emit(f"- {sps:.4g} s/step (compile {comp:.1f} s); per-device arguments "
                 f"{_fmt_bytes(mem.argument_size_in_bytes if mem else None)}, temporaries "
                 f"{_fmt_bytes(mem.temp_size_in_bytes if mem else None)}, peak device memory {_fmt_bytes(pm)}")
        except Exception as e:  # out of memory on a small device is a result, not a crash
            emit(f"- failed: {type(e).__name__}: {str(e)[:300]}")

    t1 = S["t1"]
    emit()
    emit(f"## Table 1 TopK: n = {t1['n_features']}, d = {t1['d_input']}, n_q = {t1['n_q']}, k = {t1['k']}, "
         f"S = 0.99, M = 0.1, {S['t1_steps']} steps x {S['t1_B']}")
    emit()
    if not over_budget("Table 1"):
        bench = jsdl.data.make_bench(jax.random.PRNGKey(0), n_features=t1["n_features"], d_input=t1["d_input"],
                                     max_interference=0.1, sparsity=0.99)
        spec = jsdl.make_spec(activation="topk", n_latents=t1["n_q"], k=t1["k"])
        cfg = TrainConfig(steps=S["t1_steps"], batch_size=S["t1_B"], learning_rate=1e-3, log_every=max(1, S["t1_steps"] // 4),
                          progress=False, plots=False)
        t0 = time.perf_counter()
        _, h = fit(jax.random.PRNGKey(0), spec, bench, cfg, devices=devs[:1])
        wall = time.perf_counter() - t0
        r = h["summary"].get("recovery", {})
        emit(f"- {wall:.1f} s wall ({h['summary']['steps_per_s']:.1f} steps/s after compile); final FVU "
             f"{h['fvu'][-1]:.3g}, L0 {h['l0'][-1]:.3g}; M_GT encoder {r.get('m_gt', float('nan')):.3f}, "
             f"decoder {r.get('m_gt_dec', float('nan')):.3f}; M_IP encoder {r.get('m_ip', float('nan')):.3f}")

    emit()
    emit(f"Total {time.perf_counter() - t_start:.0f} s.")
    if out_path:
        with open(out_path, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
