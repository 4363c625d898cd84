"""Per-device parameter + optimiser bytes of the compiled training step for 1/2/4/8-way "model"
sharding of a 2^20-latent, d = 768 TopK dictionary, from XLA's memory analysis (compiled, not run).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python benchmarks/mesh_memory.py [--no-write]

Writes the section "## Sharding the dictionary over a "model" mesh axis" of benchmarks/RESULTS.md.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import jsdl  # noqa: E402
from jsdl.train import Stepper, TrainConfig, init_state  # noqa: E402

N, D, K, B = 2 ** 20, 768, 32, 256


def main():
    n_dev = jax.device_count()
    spec = jsdl.make_spec(activation="topk", n_latents=N, k=K)
    rows = []
    for m in (1, 2, 4, 8):
        if m > n_dev:
            break
        cfg = TrainConfig(steps=10, batch_size=B, progress=False, plots=False, mesh={"data": 1, "model": m})
        st = Stepper(spec, cfg, data_mode="batch", devices=jax.devices()[:m])
        abstract = jax.eval_shape(lambda k: init_state(k, spec, cfg, D), jax.random.PRNGKey(0))
        sh = st.state_shardings(abstract)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sh)
        batch = jsdl.Batch(jax.ShapeDtypeStruct((B, D), jnp.float32, sharding=st.batch_sharding))
        mem = st.step.lower(abstract, batch, None).compile().memory_analysis()
        po = [abstract.stored, abstract.opt_state]
        total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(po))
        per_dev = sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
                      for x, s in zip(jax.tree.leaves(po), jax.tree.leaves(jax.tree.map(lambda a: a.sharding, po))))
        rows.append({"model": m, "argument_bytes": mem.argument_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
                     "params_opt_total": total, "params_opt_per_device": per_dev,
                     "ratio_args_to_ideal": mem.argument_size_in_bytes / (total / m)})
        print(json.dumps(rows[-1]), flush=True)
    g = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    lines = [
        f"Per-device bytes of the compiled TopK training step (k = {K}, B = {B}, Adam) from XLA's memory analysis, "
        f"n_q = 2^{N.bit_length() - 1} latents, d = {D}, the latent axis split over 1/2/4/8 forced CPU devices "
        "(`train.mesh = {data: 1, model: m}`); compiled, not executed. \"Arguments\" is what XLA allocates per "
        "device for the step's inputs (params + Adam moments + dead statistics + batch + scalars); params + Adam is "
        "the sum of the shard shapes. Command: `XLA_FLAGS=--xla_force_host_platform_device_count=8 "
        f"JAX_PLATFORMS=cpu python benchmarks/mesh_memory.py` (jax {jax.__version__}, CPU).",
        "",
        "| model-way | per-device arguments (XLA) | params+Adam per device (shard shapes) | total / model | "
        "arguments / (total / model) | temporaries |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {g(r['argument_bytes'])} | {g(r['params_opt_per_device'])} | "
                     f"{g(r['params_opt_total'] / r['model'])} | {r['ratio_args_to_ideal']:.3f} | {g(r['temp_bytes'])} |")
    worst = max(r["ratio_args_to_ideal"] for r in rows)
    lines += ["", f"Per-device argument bytes are within {worst:.3f}x of total / model at every width. These are XLA's "
              "CPU numbers; a GPU/TPU compile may fuse differently (run `make accel-check` there)."]
    text = "\n".join(lines)
    print(text)
    if "--no-write" not in sys.argv:
        common.write_section('Sharding the dictionary over a "model" mesh axis (2^20 latents, d = 768)', text)


if __name__ == "__main__":
    sys.exit(main())
