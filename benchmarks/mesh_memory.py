"""Per-device parameter + optimiser bytes of the compiled training step for 1/2/4/8-way "model"
sharding of a 2^20-latent, d = 768 TopK dictionary, from XLA's memory analysis (compiled, not run).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python benchmarks/mesh_memory.py
"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jsdl
from jsdl.train import Stepper, TrainConfig, init_state

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
        po = [abstract.params, abstract.opt_state]
        total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(po))
        per_dev = sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
                      for x, s in zip(jax.tree.leaves(po), jax.tree.leaves(jax.tree.map(lambda a: a.sharding, po))))
        rows.append({"model": m, "argument_bytes": mem.argument_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
                     "params_opt_total": total, "params_opt_per_device": per_dev,
                     "ratio_args_to_ideal": mem.argument_size_in_bytes / (total / m)})
        print(json.dumps(rows[-1]), flush=True)
    print("| model-way | per-device arguments (XLA) | params+Adam per device (shard shapes) | total / model | arguments / (total / model) | temporaries |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        g = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
        print(f"| {r['model']} | {g(r['argument_bytes'])} | {g(r['params_opt_per_device'])} | "
              f"{g(r['params_opt_total'] / r['model'])} | {r['ratio_args_to_ideal']:.3f} | {g(r['temp_bytes'])} |")


if __name__ == "__main__":
    sys.exit(main())
