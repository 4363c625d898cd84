"""Training-step throughput: jsdl vs SAELens on the same data and shapes.

For each architecture (ReLU+L1, TopK, BatchTopK, JumpReLU) and shape (d, n_q, k, B) it times, in
one process and alternating round-robin:

* ``jsdl``: the real compiled training step of :mod:`jsdl.train` (``Stepper.step``: loss, grads,
  Adam, grad-norm clipping, dead-latent statistics, on-device metrics), sparse path where the spec
  allows it (``sparse="auto"``); for TopK/BatchTopK also ``jsdl dense`` (``sparse=False``);
* ``saelens``: SAELens's own training SAE ``training_forward_pass`` + backward + Adam step with the
  same bookkeeping its trainer does per step (firing statistics, ``clip_grad_norm_(1.0)``); for TopK
  also with ``use_sparse_activations=True`` (SAELens's sparse decode);
* the dense matmul ``[B, d] x [d, n_q]`` in JAX and in torch, to turn step times into achieved
  FLOP/s: a dense SAE step is 5 such products (encoder forward, decoder forward, decoder weight
  gradient, code gradient, encoder weight gradient) = 10 B d n_q flops.

Peak memory: XLA's compiled memory analysis of the jsdl step (arguments + temporaries, exact), and
for the TopK rows the peak RSS of a child process that runs 2 steps of one variant.

Usage: python benchmarks/bench_step.py [--shapes small,medium,large] [--reps 3] [--archs ...]
       python benchmarks/bench_step.py --shapes large --profile topk   (where the jsdl step goes, per XLA op)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from unittest import mock

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SHAPES = {
    "small": (64, 512, 8, 1024),
    "medium": (512, 4096, 32, 4096),
    "large": (768, 16384, 32, 4096),
}
ARCHS = ("relu", "topk", "batchtopk", "jumprelu")
LR = 1e-4
L1 = 1e-3  # coefficients only change the loss value, not the work
L0 = 1e-3


# ----------------------------------------------------------------------------------------------
# jsdl
# ----------------------------------------------------------------------------------------------


def jsdl_spec(arch, n_q, k, sparse="auto"):
    import jsdl

    if arch == "relu":
        # SAELens's "standard" SAE penalises sum_i |f_i| ||W_dec,i||: jsdl's weighted_l1.
        return jsdl.make_spec("sae", "relu", n_q, penalties={"weighted_l1": L1})
    if arch in ("topk", "batchtopk"):
        return jsdl.make_spec("sae", arch, n_q, k=k, sparse=sparse)
    if arch == "jumprelu":
        return jsdl.make_spec("sae", "jumprelu", n_q, penalties={"l0": L0}, threshold=0.01, bandwidth=0.05)
    raise ValueError(arch)


def jsdl_step(arch, x, n_q, k, sparse="auto", cpu_dot=None):
    """(run_once, memory_bytes, info) for the real jsdl.train step on the fixed batch x.
    ``cpu_dot``: ``JSDL_CPU_DOT`` while the step is compiled (None: the process's)."""
    import jax

    import jsdl
    from jsdl import cpudot
    from jsdl.train import Stepper, TrainConfig, init_state

    B, d = x.shape
    spec = jsdl_spec(arch, n_q, k, sparse)
    config = TrainConfig(steps=10**9, batch_size=B, learning_rate=LR, grad_clip=1.0, log_every=10**9, progress=False)
    stepper = Stepper(spec, config, data_mode="batch", devices=jax.devices()[:1])
    state = stepper.place_state(init_state(jax.random.PRNGKey(0), spec, config, d))
    data = stepper.place_data(jsdl.Batch(x_p=x))
    with mock.patch.dict(os.environ, {} if cpu_dot is None else {cpudot.ENV: cpu_dot}):
        compiled = stepper.step.lower(state, data, None).compile()  # the options are chosen here
    mem = compiled.memory_analysis()
    mem_bytes = None
    if mem is not None:
        mem_bytes = int(mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                        - mem.alias_size_in_bytes)
    box = {"state": state}

    def run():
        box["state"] = compiled(box["state"], data, None)
        jax.block_until_ready(box["state"])

    use_sparse = jsdl.kernels.use_sparse(spec, state.params.W_E.dtype)
    return run, mem_bytes, {"sparse": use_sparse, "compiled": compiled, "box": box,
                            "onednn": "__onednn_fusion" in compiled.as_text()}


def jsdl_matmul(x, n_q):
    import jax
    import jax.numpy as jnp

    W = jax.random.normal(jax.random.PRNGKey(1), (n_q, x.shape[1]), jnp.float32)
    xj = jnp.asarray(x)
    f = jax.jit(lambda a, w: a @ w.T).lower(xj, W).compile()
    return lambda: jax.block_until_ready(f(xj, W))


def floor_parts(arch, x, n_q, k):
    """The pieces of the *floor* of a training step, each jitted on its own: what no implementation
    of the step can skip. ``matmul`` = the encoder forward ``x W_E^T + b_E`` ([B, d] x [d, n_q]);
    ``top-k`` = the selection on a fixed ``z [B, n_q]`` (row top-k for TopK, the flat top-(k B)
    for BatchTopK), by the fastest exact method jsdl has (``jsdl.shardops.local_top_k``); ``adam`` = one optax Adam update of the SAE's parameters (W_E, W_D, b_E, b_D;
    donated, in place). The floor is ``matmul + top-k + adam`` for the TopK family (exact selection
    needs every pre-activation, nothing else needs a dictionary-size product) and ``5 matmul +
    adam`` for ReLU/JumpReLU (forward, decoder, and three gradient products are dense). The
    product is timed with XLA's GEMM and, where the step uses it (:mod:`jsdl.cpudot`: a large
    sparse step on CPU), with oneDNN's; the floor takes the faster of the two medians."""
    import jax
    import jax.numpy as jnp
    import optax

    B, d = x.shape
    key = jax.random.PRNGKey(3)
    W = jax.random.normal(key, (n_q, d), jnp.float32) / d**0.5
    b = jnp.zeros((n_q,), jnp.float32)
    xj = jnp.asarray(x)
    # The product as the step computes it: with oneDNN's GEMM where jsdl.cpudot hands the step to it.
    import jsdl
    from jsdl import cpudot

    options = cpudot.compiler_options(jax.devices()[0].platform, sparse=jsdl.kernels.use_sparse(jsdl_spec(arch, n_q, k)),
                                      batch_size=B, d_in=d, n_latents=n_q)
    enc = jax.jit(lambda a, w, c: a @ w.T + c).lower(xj, W, b).compile()
    parts = {"floor: matmul": lambda: jax.block_until_ready(enc(xj, W, b))}
    if options:
        enc_o = jax.jit(lambda a, w, c: a @ w.T + c, compiler_options=options).lower(xj, W, b).compile()
        parts["floor: matmul (oneDNN)"] = lambda: jax.block_until_ready(enc_o(xj, W, b))
    if arch in ("topk", "batchtopk"):
        z = enc(xj, W, b)
        from jsdl.shardops import local_top_k  # the fastest exact selection jsdl has on this backend

        if arch == "topk":
            sel = jax.jit(lambda z: local_top_k(z, k)).lower(z).compile()
        else:
            sel = jax.jit(lambda z: local_top_k(z.reshape(-1), k * B)).lower(z).compile()
        parts["floor: top-k"] = lambda: jax.block_until_ready(sel(z))
    params = {"W_E": W + 0.0, "W_D": W.T + 0.0, "b_E": b + 0.0, "b_D": jnp.zeros((d,), jnp.float32)}  # copies: donated
    tx = optax.adam(1e-4)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)

    def adam(p, o, g):
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    adam_c = jax.jit(adam, donate_argnums=(0, 1)).lower(params, tx.init(params), grads).compile()
    box = {"p": params, "o": tx.init(params)}
    params = None

    def run_adam():
        box["p"], box["o"] = adam_c(box["p"], box["o"], grads)
        jax.block_until_ready(box["p"])

    parts["floor: adam"] = run_adam
    return parts


def floor_time(arch, times) -> float:
    """The floor (see :func:`floor_parts`) from the medians of its parts."""
    mm = min(common.med(times[n]) for n in ("floor: matmul", "floor: matmul (oneDNN)") if n in times)
    adam = common.med(times["floor: adam"])
    if arch in ("topk", "batchtopk"):
        return mm + common.med(times["floor: top-k"]) + adam
    return 5 * mm + adam


# ----------------------------------------------------------------------------------------------
# SAELens
# ----------------------------------------------------------------------------------------------


def saelens_step(arch, x, n_q, k, sparse_acts=False):
    import torch
    from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput

    B, d = x.shape
    common_kw = dict(d_in=d, d_sae=n_q, dtype="float32", device="cpu")
    if arch == "relu":
        from sae_lens.saes.standard_sae import StandardTrainingSAE as C, StandardTrainingSAEConfig as Cfg

        cfg = Cfg(l1_coefficient=L1, **common_kw)
    elif arch == "topk":
        from sae_lens.saes.topk_sae import TopKTrainingSAE as C, TopKTrainingSAEConfig as Cfg

        cfg = Cfg(k=k, use_sparse_activations=sparse_acts, **common_kw)
    elif arch == "batchtopk":
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE as C, BatchTopKTrainingSAEConfig as Cfg

        cfg = Cfg(k=k, **common_kw)
    elif arch == "jumprelu":
        from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE as C, JumpReLUTrainingSAEConfig as Cfg

        cfg = Cfg(l0_coefficient=L0, **common_kw)
    else:
        raise ValueError(arch)
    torch.manual_seed(0)
    sae = C(cfg)
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), lr=LR, betas=(0.9, 0.999))
    coefs = {n: (v.value if isinstance(v, TrainCoefficientConfig) else v) for n, v in sae.get_coefficients().items()}
    xt = torch.from_numpy(x)
    act_freq = torch.zeros(n_q)
    since_fired = torch.zeros(n_q)

    def run():
        out = sae.training_forward_pass(TrainStepInput(sae_in=xt, coefficients=coefs, dead_neuron_mask=None,
                                                       n_training_steps=0, is_logging_step=False))
        with torch.no_grad():  # the per-step bookkeeping of SAELens's SAETrainer._train_step
            fire = out.feature_acts.bool().float()
            did = fire.sum(-2).bool()
            if did.is_sparse:
                did = did.to_dense()
            since_fired.add_(1)
            since_fired[did] = 0
            s = fire.sum(0)
            act_freq.add_(s.to_dense() if s.is_sparse else s)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    return run


def calibrate_torch_threads(run, reps=2):
    """The torch intra-op thread count (1 or all cores) that runs ``run`` fastest, and set it.

    On this shared 2-core machine, 2 OpenMP threads made SAELens's small step 14x *slower* than 1
    thread (spin-waiting under oversubscription), so SAELens gets whichever is faster here."""
    import torch

    best = None
    for n in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(n)
        run()
        t = common.med(common.timeit(run, reps))
        common.log(f"[bench_step] torch threads={n}: {t:.3f} s")
        if best is None or t < best[1]:
            best = (n, t)
    torch.set_num_threads(best[0])
    return best[0]


def torch_matmul(x, n_q):
    import torch

    W = torch.randn(n_q, x.shape[1])
    xt = torch.from_numpy(x)
    return lambda: xt @ W.T


# ----------------------------------------------------------------------------------------------
# child process: peak RSS of one variant
# ----------------------------------------------------------------------------------------------


def child(variant, arch, shape):
    d, n_q, k, B = SHAPES[shape]
    x = np.random.default_rng(0).standard_normal((B, d), dtype=np.float32)
    base = _vm_hwm_mb()
    if variant.startswith("jsdl"):
        run, _, _ = jsdl_step(arch, x, n_q, k, sparse=False if variant == "jsdl-dense" else "auto")
    else:
        import torch

        torch.set_num_threads(int(os.environ.get("JSDL_BENCH_TORCH_THREADS", "1")))
        run = saelens_step(arch, x, n_q, k, sparse_acts=variant == "saelens-sparse")
    for _ in range(2):
        run()
    print(json.dumps({"peak_rss_mb": _vm_hwm_mb(), "base_rss_mb": base}))


def _vm_hwm_mb() -> float:
    """Peak resident set of this process (VmHWM, MB). Not ru_maxrss: Linux carries that across
    fork/exec, so a child reports its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def peak_rss(variant, arch, shape, python=sys.executable):
    out = subprocess.run([python, __file__, "--child", variant, arch, shape], capture_output=True, text=True,
                         timeout=1800)
    if out.returncode != 0:
        common.log(out.stderr[-2000:])
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def bench_shape(shape, archs, reps, have_saelens):
    d, n_q, k, B = SHAPES[shape]
    x = np.random.default_rng(0).standard_normal((B, d), dtype=np.float32)
    flops_mm = 2.0 * B * d * n_q
    mm = {"jax matmul": jsdl_matmul(x, n_q)}
    if have_saelens:
        mm["torch matmul"] = torch_matmul(x, n_q)
    rows = []
    threads = None
    for arch in archs:
        common.log(f"[bench_step] {shape} {arch}: compiling")
        fns = dict(mm)
        fns.update(floor_parts(arch, x, n_q, k))
        mems = {}
        run, mem, info = jsdl_step(arch, x, n_q, k)
        name = "jsdl" + (" (sparse)" if info["sparse"] else "")
        fns[name] = run
        mems[name] = mem
        if info["onednn"]:  # the same step with XLA's own GEMM (JSDL_CPU_DOT=off)
            fns["jsdl (XLA dot)"], mems["jsdl (XLA dot)"], _ = jsdl_step(arch, x, n_q, k, cpu_dot="off")
        if arch in ("topk", "batchtopk"):
            run_d, mem_d, _ = jsdl_step(arch, x, n_q, k, sparse=False)
            fns["jsdl dense"] = run_d
            mems["jsdl dense"] = mem_d
        if have_saelens:
            fns["saelens"] = saelens_step(arch, x, n_q, k)
            if threads is None:
                threads = calibrate_torch_threads(fns["saelens"])
            if arch == "topk":
                fns["saelens sparse"] = saelens_step(arch, x, n_q, k, sparse_acts=True)
        failed = {}
        for n in list(fns):  # warm-up (compilation, allocators); a variant that cannot train is reported
            try:
                fns[n]()
            except Exception as e:  # noqa: BLE001
                failed[n] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                del fns[n]
                common.log(f"[bench_step] {shape} {arch}: {n} failed: {failed[n]}")
        common.log(f"[bench_step] {shape} {arch}: timing {list(fns)} x {reps}")
        times = common.alternate(fns, reps, warmup=0)
        rows.append({"shape": shape, "arch": arch, "dims": (d, n_q, k, B), "times": times, "mem": mems,
                     "jsdl": name, "flops_mm": flops_mm, "failed": failed, "torch_threads": threads})
        common.log(f"[bench_step] {shape} {arch}: " + ", ".join(f"{n}={common.med(t):.3f}s" for n, t in times.items()))
    return rows


def format_rows(rows) -> str:
    out = []
    out.append("| shape (d, n_q, k, B) | arch | jsdl step | SAELens step | speed-up vs SAELens | floor (parts) | "
               "jsdl step / floor | jsdl dense step | jsdl FLOP/s (dense-equivalent) | matmul FLOP/s jax / torch | "
               "jsdl XLA memory |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["times"]
        js = r["jsdl"]
        tj = common.med(t[js])
        sl = [n for n in ("saelens", "saelens sparse") if n in t]
        best_sl = min(sl, key=lambda n: common.med(t[n])) if sl else None
        sl_txt = "; ".join(f"{n.replace('saelens', 'SAELens')}: {common.spread(t[n])}" for n in sl) or "n/a"
        ratio = f"**{common.med(t[best_sl]) / tj:.2f}x** (vs {best_sl.replace('saelens', 'SAELens')})" if best_sl else "n/a"
        if best_sl and len(sl) > 1:
            ratio += "; " + ", ".join(f"{common.med(t[n]) / tj:.2f}x vs {n.replace('saelens', 'SAELens')}" for n in sl)
        dense = common.spread(t["jsdl dense"]) + f" ({common.med(t['jsdl dense']) / tj:.2f}x slower)" if "jsdl dense" in t else "-"
        fmm = r["flops_mm"]
        jmm = fmm / common.med(t["jax matmul"])
        tmm = fmm / common.med(t["torch matmul"]) if "torch matmul" in t else float("nan")
        ach = 5 * fmm / tj
        mem = r["mem"].get(js)
        memd = r["mem"].get("jsdl dense")
        mem_txt = f"{mem / 2**20:.0f} MiB" if mem else "?"
        if memd:
            mem_txt += f" (dense {memd / 2**20:.0f} MiB)"
        step_txt = common.spread(t[js])
        if "jsdl (XLA dot)" in t:  # the step compiled to oneDNN's GEMM; the same with XLA's
            step_txt += f" (oneDNN dot; XLA's dot: {common.spread(t['jsdl (XLA dot)'])})"
        fl = floor_time(r["arch"], t)
        parts = ", ".join(f"{n.removeprefix('floor: ')} {common.fmt(common.med(t[n]))}" for n in t if n.startswith("floor: "))
        out.append(
            f"| {r['dims']} | {r['arch']} | {step_txt} | {sl_txt} | {ratio} | {common.fmt(fl)} ({parts}) | "
            f"**{tj / fl:.2f}x** | {dense} | "
            f"{ach / 1e9:.1f} GFLOP/s = {100 * ach / jmm:.0f}% of jax matmul | {jmm / 1e9:.1f} / {tmm / 1e9:.1f} GFLOP/s"
            f" (torch threads {r.get('torch_threads')}) | {mem_txt} |"
        )
    fails = sorted({(n, msg) for r in rows for n, msg in r.get("failed", {}).items()})
    for n, msg in fails:
        out.append(f"\n{n} could not train on this stack and was left out: `{msg}`")
    return "\n".join(out)


def profile_step(arch: str, shape: str, calls: int = 3, top: int = 24) -> str:
    """Where the jsdl step of ``arch`` at ``shape`` goes: its XLA ops from a profiler trace (the
    largest ``top``), each with the JAX operation it came from; markdown."""
    d, n_q, k, B = SHAPES[shape]
    x = np.random.default_rng(0).standard_normal((B, d)).astype(np.float32)
    run, _, info = jsdl_step(arch, x, n_q, k)
    run()
    run()
    ops, total = common.trace_ops(run, calls, info["compiled"].as_text())
    wall = common.med(common.timeit(run, calls))
    lines = [f"jsdl {arch} step at {SHAPES[shape]}: {common.fmt(wall)} per step (wall, median of {calls}); the ops "
             f"below sum to {total:.0f} ms per step (ops of one step can overlap on the {os.cpu_count()} cores). "
             "`per step` > 1: the op runs inside a loop body, times summed. Origin: the op's `op_name` in the "
             "compiled HLO (`jvp()` = forward, `transpose(jvp())` = backward).", "",
             "| XLA op | ms per step | share | runs per step | origin (JAX op) |", "|---|---|---|---|---|"]
    for n, (t, c, o) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"| `{n}` | {t:.1f} | {100 * t / total:.1f}% | {c:g} | `{o or '-'}` |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="small,medium,large")
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes")
    ap.add_argument("--no-write", action="store_true", help="print the table instead of updating RESULTS.md")
    ap.add_argument("--profile", metavar="ARCH", help="only profile jsdl's ARCH step at the last of --shapes "
                    "(per-op times from a JAX profiler trace) and write that section")
    ap.add_argument("--child", nargs=3, metavar=("VARIANT", "ARCH", "SHAPE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    host = common.host_tuning()
    if args.child:
        child(*args.child)
        return 0
    if args.profile:
        shape = [s for s in args.shapes.split(",") if s][-1]
        body = (f"Command: `python benchmarks/bench_step.py --shapes {shape} --profile {args.profile}` ({host}).\n\n"
                + profile_step(args.profile, shape, calls=args.reps))
        print(body)
        if not args.no_write:
            common.write_section(f"Where the training step goes ({args.profile}, {shape})", body)
        return 0
    try:
        import sae_lens  # noqa: F401
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        have_saelens = True
    except ImportError:
        common.log("[bench_step] sae_lens/torch not installed: jsdl only (make bench installs them in .venv-bench)")
        have_saelens = False
    rows = []
    shapes = [s for s in args.shapes.split(",") if s]
    archs = [a for a in args.archs.split(",") if a]
    for shape in shapes:
        rows += bench_shape(shape, archs, args.reps, have_saelens)
    table = format_rows(rows)
    from jsdl import cpudot

    mem_lines = []
    if not args.no_memory and "topk" in archs:
        shape = shapes[-1]
        variants = ["jsdl", "jsdl-dense"] + (["saelens"] if have_saelens else [])
        for v in variants:
            common.log(f"[bench_step] peak RSS {v} topk {shape}")
            r = peak_rss(v, "topk", shape)
            if r:
                mem_lines.append(f"- {v}: peak RSS {r['peak_rss_mb']:.0f} MB (process after imports: "
                                 f"{r['base_rss_mb']:.0f} MB)")
    body = (
        f"Command: `python benchmarks/bench_step.py --shapes {args.shapes} --reps {args.reps}` "
        "(part of `make bench`). Each cell: median (min-max) over the repetitions, all variants of a "
        "row alternating in one process on the same data x ~ N(0, 1). jsdl = the real `jsdl.train` "
        "step (Adam, grad clip 1.0, dead-latent statistics, metrics on device); SAELens = its "
        "`training_forward_pass` + backward + `clip_grad_norm_` + Adam + the trainer's firing "
        "statistics. FLOP/s counts a dense SAE step as 5 matmuls (10 B d n_q flops) for every "
        "variant, so for the sparse path it is the *dense-equivalent* rate. Floor = issue 17's lower "
        "bound, each part jitted alone in the same alternation: TopK/BatchTopK one encoder product "
        "`x W_E^T + b_E` + the top-k selection + one Adam update (an exact sparse step also needs its "
        "k-slot gathers and scatter-adds, which this floor leaves out; benchmarks/NOTES.md, \"Speed round 4\"); "
        "ReLU/JumpReLU five products + Adam (`floor_parts`); the product is the faster of XLA's GEMM and, "
        "where the step uses it, oneDNN's (`jsdl.cpudot`: a sparse step with B d n_q >= 2^30; "
        f"JSDL_CPU_DOT={cpudot.mode()}), while 'jax matmul' is always XLA's. XLA memory = arguments + "
        f"temporaries + outputs of the compiled step. Process: {host} (`jsdl.hosttune`; both frameworks "
        "run in it; `JSDL_HOST_TUNING=off` measures without).\n\n" + table
    )
    if mem_lines:
        body += f"\n\nPeak RSS, TopK at {SHAPES[shapes[-1]]} (child process, 2 steps):\n" + "\n".join(mem_lines)
    if args.no_write:
        print(body)
    else:
        common.write_section(f"Training step: jsdl vs SAELens ({args.shapes}; {args.archs})", body)
        print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
