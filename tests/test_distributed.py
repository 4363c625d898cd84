"""Several JAX processes on one machine training one run with ``jax.distributed`` (CPU
collectives over gloo, each process with its own forced CPU devices): the result equals the
single-process run on the same global mesh; checkpoints are written and restored by every
process; a missing coordinator and mismatched configs fail clearly and in bounded time."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r'''
import json, os, sys
import numpy as np
pid, n_proc, port, out, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
from jsdl import launch
if n_proc > 1:
    launch.initialize(f"127.0.0.1:{port}", n_proc, pid, timeout=60)
import jax, jax.numpy as jnp
from flax import struct
import jsdl
from jsdl.train import fit, TrainConfig
from jsdl.train.mesh import to_host

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
bench = ToyBench(W, W)
mesh = json.loads(os.environ["JSDL_TEST_MESH"])
cfg = TrainConfig(steps=40, batch_size=64, learning_rate=3e-3, log_every=10, progress=False, plots=False,
                  dead_window=5, checkpoint_every=20, mesh=mesh)
spec = jsdl.make_spec(activation="topk", n_latents=32, k=4, aux_k=8, aux_coef=0.1)
key = jax.random.PRNGKey(0)
launch.check_same_config({"cfg": str(cfg), "spec": spec.describe()})
run_dir = os.path.join(out, "run")
if mode == "resume":
    state, hist = fit(key, spec, bench, cfg, out_dir=run_dir, resume=True)
elif mode == "stop":
    state, hist = fit(key, spec, bench, cfg, out_dir=run_dir, stop_at=20)
else:
    state, hist = fit(key, spec, bench, cfg, out_dir=run_dir if mode == "ckpt" else None)
params = to_host(state.params)
if pid == 0:
    np.savez(os.path.join(out, "params.npz"), **{k: v for k, v in params.__dict__.items() if v is not None})
    with open(os.path.join(out, "info.json"), "w") as f:
        json.dump({"n_processes": jax.process_count(), "n_devices": jax.device_count(),
                   "local": jax.local_device_count(), "loss": hist["loss"],
                   "W_E_spec": str(state.params.W_E.sharding.spec)}, f)
if n_proc > 1:
    jax.distributed.shutdown()
'''


def _spawn(n_proc: int, devices_per_proc: int, out: str, mode: str = "plain", mesh=None, timeout=240):
    from jsdl.launch import free_port

    os.makedirs(out, exist_ok=True)
    port = str(free_port())
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_proc}",
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JSDL_TEST_MESH=json.dumps(mesh))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i), str(n_proc), port, out, mode], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(n_proc)]
    outs = []
    try:
        for p in procs:
            o, _ = p.communicate(timeout=timeout)
            outs.append(o)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, o in zip(procs, outs):
        assert p.returncode == 0, f"worker failed (rc {p.returncode}):\n{o[-4000:]}"
    with open(os.path.join(out, "info.json")) as f:
        info = json.load(f)
    return dict(np.load(os.path.join(out, "params.npz"))), info


def _max_rel(a, b):
    return max(float(np.max(np.abs(a[k] - b[k])) / np.max(np.abs(b[k]))) for k in b)


@pytest.mark.multidevice
def test_two_processes_equal_one_process(tmp_path):
    mesh = {"data": 2, "model": 2}
    t0 = time.perf_counter()
    p2, i2 = _spawn(2, 2, str(tmp_path / "two"), "ckpt", mesh)
    t2 = time.perf_counter() - t0
    t0 = time.perf_counter()
    p1, i1 = _spawn(1, 4, str(tmp_path / "one"), "plain", mesh)
    t1 = time.perf_counter() - t0
    print({"two_processes_s": t2, "one_process_s": t1, "rel": _max_rel(p2, p1)})
    assert i2["n_processes"] == 2 and i2["n_devices"] == 4 and i2["local"] == 2
    assert i1["n_processes"] == 1 and i1["n_devices"] == 4
    assert "model" in i2["W_E_spec"]
    assert _max_rel(p2, p1) <= 1e-5
    assert np.allclose(i2["loss"], i1["loss"], rtol=1e-5)
    # the checkpoint every process wrote is complete (orbax step folders 20 and 40)
    steps = sorted(os.listdir(tmp_path / "two" / "run" / "checkpoints"))
    assert [s for s in steps if s.isdigit()] == ["20", "40"], steps


def test_unreachable_coordinator_fails_fast():
    from jsdl.launch import free_port

    port = free_port()  # nothing listens there
    code = ("from jsdl import launch\n"
            f"launch.initialize('127.0.0.1:{port}', 2, 1, timeout=3)\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    took = time.perf_counter() - t0
    assert r.returncode != 0
    assert f"coordinator 127.0.0.1:{port} was not reachable within 3 s" in r.stderr, r.stderr[-2000:]
    assert took < 45, took


def test_config_hash_names_field_changes():
    from jsdl.launch import config_hash

    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


@pytest.mark.multidevice
def test_different_configs_are_refused(tmp_path):
    from jsdl.launch import free_port

    port = free_port()
    code = ("import sys\nfrom jsdl import launch\n"
            f"launch.initialize('127.0.0.1:{port}', 2, int(sys.argv[1]), timeout=30)\n"
            "launch.check_same_config({'steps': 100 + int(sys.argv[1])})\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode != 0 for p in procs), outs
    assert any("processes [1] were started with a config different from process 0's" in o for o in outs), outs
