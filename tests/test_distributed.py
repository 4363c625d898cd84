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


CONFIG = """seed: 0
spec: {{method: sae, activation: topk, n_latents: 32, k: 4}}
data: {{files: {{path: {acts}, holdout: 0.0, chunk_rows: 64}}}}
train: {{steps: 40, batch_size: 64, learning_rate: 0.003, log_every: 10, checkpoint_every: 10, plots: false,
        progress: false, mesh: {{data: 2, model: 2}}}}
"""


def _train_procs(n, devices, args, port):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    extra = lambda i: (["--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),  # noqa: E731
                        "--process-id", str(i)] if n > 1 else [])
    return [subprocess.Popen([sys.executable, "-m", "jsdl.cli", "train", *args, "--no-progress", *extra(i)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(n)]


@pytest.mark.slow
@pytest.mark.multidevice
def test_four_processes_activation_files_kill_and_resume(tmp_path):
    """4 processes (1 device each) read their own rows of activation files; process 2 is killed
    with SIGKILL after the step-20 checkpoint; all 4 resume from the last complete checkpoint and
    finish with exactly the parameters of an uninterrupted 1-process run on the same 2 x 2 mesh."""
    import signal

    from jsdl.launch import free_port
    from jsdl.train import load_run

    rng = np.random.default_rng(0)
    W = rng.normal(size=(16, 24)); W /= np.linalg.norm(W, axis=0)
    f = (rng.uniform(size=(2048, 24)) > 0.9) * rng.uniform(size=(2048, 24))
    acts = tmp_path / "acts"
    acts.mkdir()
    np.save(acts / "x_000.npy", (f @ W.T).astype(np.float32))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG.format(acts=acts))
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "multi"

    ref = _train_procs(1, 4, [str(cfg), "--out", str(ref_dir)], 0)
    assert ref[0].wait(timeout=600) == 0, ref[0].stdout.read()[-3000:]

    procs = _train_procs(4, 1, [str(cfg), "--out", str(run_dir)], free_port())
    ck = run_dir / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and not (ck.is_dir() and "20" in os.listdir(ck)):
        assert all(p.poll() is None for p in procs), [p.stdout.read()[-2000:] for p in procs if p.poll() is not None]
        time.sleep(0.2)
    os.kill(procs[2].pid, signal.SIGKILL)
    for p in procs:  # the survivors block in collectives with a dead peer: stop them too
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    steps = sorted(int(s) for s in os.listdir(ck) if s.isdigit())
    assert steps and steps[-1] < 40, steps  # really interrupted

    procs = _train_procs(4, 1, ["--resume", str(run_dir)], free_port())
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[-6000:] for o in outs if "Error" in o][:1]

    pr, _, _ = load_run(str(ref_dir))
    pm, _, info = load_run(str(run_dir))
    assert info["step"] == 40
    for name in ("W_E", "W_D", "b_E", "b_D"):
        a, b = np.asarray(getattr(pm, name)), np.asarray(getattr(pr, name))
        assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b)), name
