"""The sharded step on 8 forced CPU devices equals the 1-device run.

Runs in a subprocess because ``--xla_force_host_platform_device_count`` must be set before jax
initialises."""
import json

import pytest

from conftest import run_multidevice

CODE = r'''
import dataclasses, json
import jax, jax.numpy as jnp, numpy as np
from flax import struct
import jsdl
from jsdl.train import fit, fit_population, Grid, TrainConfig, Stepper, init_state

assert jax.device_count() == 8, jax.devices()

@struct.dataclass
class ToyBench:
    W_p: jax.Array
    W_r: jax.Array
    def sample(self, key, batch_size):
        k1, k2 = jax.random.split(key)
        n = self.W_p.shape[1]
        f = (jax.random.uniform(k1, (batch_size, n)) > 0.9) * jax.random.uniform(k2, (batch_size, n))
        return jsdl.Batch(f @ self.W_p.T, f @ self.W_r.T, f)

W = jax.random.normal(jax.random.PRNGKey(1), (16, 24)); W = W / jnp.linalg.norm(W, axis=0)
b = ToyBench(W, W)
cfg = TrainConfig(steps=30, batch_size=64, learning_rate=3e-3, log_every=10, progress=False, plots=False,
                  dead_window=5, resample_every=12)
key = jax.random.PRNGKey(0)
one = jax.devices()[:1]
out = {}

def diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))

# the step's batch really is sharded over 8 devices and the state replicated
spec = jsdl.make_spec(activation="topk", n_latents=32, k=3, aux_k=8, aux_coef=0.1)
st = Stepper(spec, cfg, data_mode="bench", bench=b)
out["mesh"] = st.mesh.size
out["batch_spec"] = str(st.batch_sharding.spec)
s = st.place_state(init_state(key, spec, cfg, 16))
s = st.step(s, st.place_data(b), None)
out["state_sharding_replicated"] = all(x.sharding.is_fully_replicated for x in jax.tree.leaves(s))

for name, sp in {
    "topk_auxk": spec,
    "relu_l1": jsdl.make_spec(activation="relu", n_latents=32, penalties={"l1": 1e-2}),
    "batchtopk": jsdl.make_spec(activation="batchtopk", n_latents=32, k=3),
}.items():
    s8, h8 = fit(key, sp, b, cfg)
    s1, h1 = fit(key, sp, b, cfg, devices=one)
    out[name] = {"params": diff(s8.params, s1.params), "dead": diff(s8.dead, s1.dead),
                 "loss": float(np.max(np.abs(np.asarray(h8["loss"]) - np.asarray(h1["loss"])))),
                 "moved": diff(s8.params, jsdl.init_params(jax.random.split(key, 3)[0], sp, 16)),
                 "n_devices": [h8["summary"]["n_devices"], h1["summary"]["n_devices"]]}

# iterator data (host batches placed sharded)
batches = [b.sample(jax.random.PRNGKey(i), 64) for i in range(30)]
s8, _ = fit(key, spec, iter(batches), cfg)
s1, _ = fit(key, spec, iter(batches), cfg, devices=one)
out["iterator"] = diff(s8.params, s1.params)

# populations: 8 members sharded over the member axis; 3 members -> batch sharded
for P in (8, 3):
    g = Grid(jsdl.make_spec(activation="relu", n_latents=32, penalties={"l1": 1e-3}), seeds=list(range(P)))
    p8, _ = fit_population(key, g, b, cfg)
    p1, _ = fit_population(key, g, b, cfg, devices=one)
    out[f"population_{P}"] = diff(p8.params, p1.params)
print("RESULT" + json.dumps(out))
'''


@pytest.mark.multidevice
def test_eight_devices_equal_one_device():
    stdout = run_multidevice(CODE, n_devices=8, timeout=1200)
    line = [l for l in stdout.splitlines() if l.startswith("RESULT")][-1]
    out = json.loads(line[len("RESULT"):])
    print(out)
    assert out["mesh"] == 8 and out["batch_spec"] in ("PartitionSpec('data',)", "P('data',)")
    assert out["state_sharding_replicated"]
    for name in ("topk_auxk", "relu_l1", "batchtopk"):
        r = out[name]
        assert r["n_devices"] == [8, 1]
        assert r["moved"] > 1e-2, (name, r)  # training happened, so equality is not vacuous
        assert r["params"] < 1e-4, (name, r)
        assert r["dead"] < 1e-4, (name, r)
        assert r["loss"] < 1e-4, (name, r)
    assert out["iterator"] < 1e-4
    assert out["population_8"] < 1e-4 and out["population_3"] < 1e-4
