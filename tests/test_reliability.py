"""The run lifecycle loses nothing: real ``jsdl`` processes on tiny configs.

Each test reproduces one way a run used to lose work or results and checks the behaviour now:
one writer per run directory, explicit resume rules, data fingerprints, safe export, honest
metrics, YAML floats, no silent data defaults, a one-line Ctrl-C. Concurrency, signals and plug-ins
run ``jsdl`` in real subprocesses; the other cases call the same entry point (``jsdl.cli.main``)
in-process to keep the suite fast. The soak test (SIGKILL at random moments, resumed each time,
bit-identical end state) is marked slow."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PENALTY = os.path.join(ROOT, "examples", "my_penalty.py")

BENCH = "data: {n_features: 12, d_input: 8, sparsity: 0.9, max_interference: 0.5}\n"


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JSDL_DEBUG", None)
    return env


def _cmd(*args):
    return [sys.executable, "-c", "import sys; from jsdl.cli import main; sys.exit(main())", *map(str, args)]


def jsdl(*args, timeout=240):
    """Run ``jsdl ARGS`` in a fresh process: (returncode, stdout, stderr)."""
    r = subprocess.run(_cmd(*args), env=_env(), capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def start(*args):
    return subprocess.Popen(_cmd(*args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def config(tmp_path, name="c.yaml", *, spec="{method: sae, activation: topk, n_latents: 16, k: 2}", data=BENCH,
           train="", extra=""):
    p = tmp_path / name
    p.write_text(f"seed: 1\nspec: {spec}\n{data}"
                 f"train: {{steps: 20, batch_size: 32, log_every: 5, checkpoint_every: 10, learning_rate: 3e-3, "
                 f"plots: false{', ' + train if train else ''}}}\n{extra}")
    return p


def rows(run):
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


def run_json(run):
    with open(os.path.join(run, "run.json")) as f:
        return json.load(f)


def one_line(err):
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def wait_for(cond, timeout=120.0, what="condition"):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def ckpt_steps(run):
    d = os.path.join(run, "checkpoints")
    return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def main(*args):
    """``jsdl ARGS`` in this process (the same entry point, no interpreter start-up)."""
    from jsdl.cli import main as _main

    return _main([str(a) for a in args])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished 20-step run (checkpoints at 10 and 20)."""
    tmp = tmp_path_factory.mktemp("base")
    cfg = config(tmp, spec="{method: sae, activation: relu, n_latents: 16, penalties: {l1: 3e-3}}")
    run = str(tmp / "run")
    assert main("train", cfg, "--out", run, "--no-progress") == 0
    return tmp, run


def toy(seed, n=12, d=8):
    """A tiny bench (the interface of jsdl.data.Bench: W_p [d, n], W_r, sample(key, B))."""
    import jax
    import jax.numpy as jnp
    from flax import struct

    import jsdl

    @struct.dataclass
    class Toy:
        W_p: jax.Array
        W_r: jax.Array

        def sample(self, key, batch_size):
            k1, k2 = jax.random.split(key)
            f = (jax.random.uniform(k1, (batch_size, n)) > 0.8) * jax.random.uniform(k2, (batch_size, n))
            return jsdl.Batch(f @ self.W_p.T, f @ self.W_r.T, f)

    W = jax.random.normal(jax.random.PRNGKey(seed), (d, n))
    W = W / jnp.linalg.norm(W, axis=0)
    return Toy(W, W)


def copy_run(base_run, dst):
    import shutil

    shutil.copytree(base_run, dst)
    return str(dst)


# ----------------------------------------------------------------------------------------------
# 1 (and 9): one writer; Ctrl-C is one line and leaves a resumable run
# ----------------------------------------------------------------------------------------------


def test_second_writer_is_refused_and_ctrl_c_is_one_line(tmp_path):
    cfg = config(tmp_path, train="steps: 100000, checkpoint_every: 5, keep_checkpoints: 2")
    run = str(tmp_path / "run")
    a = start("train", cfg, "--out", run, "--no-progress")
    try:
        wait_for(lambda: len(ckpt_steps(run)) >= 1, what="the first checkpoint")
        b = start("train", cfg, "--out", run, "--no-progress")  # a second fresh writer
        c = start("train", "--resume", run, "--no-progress")  # --resume while the first still runs
        for p in (b, c):
            out, err = p.communicate(timeout=240)
            assert p.returncode == 2
            line = one_line(err)
            assert f"is being written by pid {a.pid}" in line and "run.lock" in line
        assert a.poll() is None  # the first writer was not disturbed
        time.sleep(0.5)
        a.send_signal(signal.SIGINT)  # checkpoints every 5 steps: the interrupt often lands in a save
        out, err = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            a.kill()
    assert a.returncode == 130
    line = one_line(err)
    assert line.startswith("jsdl train: interrupted at step ") and f"resume with `jsdl train --resume {run}`" in line
    last = int(line.split("the last checkpoint is step ")[1].split(";")[0])
    assert last == max(ckpt_steps(run))
    steps = [r["step"] for r in rows(run)]
    assert steps == sorted(set(steps))  # one writer: every logged step once, in order
    assert not os.path.exists(os.path.join(run, "run.lock"))  # released on exit
    # still resumable: the last checkpoint is complete and loads
    from jsdl.train import load_run

    assert load_run(run)[2]["step"] == last


@pytest.mark.slow
def test_stale_lock_of_a_dead_process_is_reported_and_taken_over(base, tmp_path):
    import socket

    run = copy_run(base[1], tmp_path / "run")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(os.path.join(run, "run.lock"), "w") as f:
        json.dump({"host": socket.gethostname(), "pid": dead.pid, "since": "earlier"}, f)
    rc, _, err = jsdl("train", "--resume", run, "--no-progress", "--set", "train.steps=25")
    assert rc == 0, err
    assert f"taking over a stale lock of pid {dead.pid}" in err
    assert not os.path.exists(os.path.join(run, "run.lock"))


# ----------------------------------------------------------------------------------------------
# 2 and 3: what may change on resume is applied and recorded; the rest is refused by name
# ----------------------------------------------------------------------------------------------


def test_resume_applies_and_records_changeable_settings(base, tmp_path):
    run = copy_run(base[1], tmp_path / "run")
    assert main("train", "--resume", run, "--no-progress", "--set", "train.learning_rate=1e-2",
                "--set", "train.steps=30", "--set", "train.grad_clip=1.0") == 0
    r = rows(run)
    assert [x["step"] for x in r] == [5, 10, 15, 20, 25, 30]
    np.testing.assert_allclose([x["lr"] for x in r], [3e-3] * 4 + [1e-2] * 2, rtol=1e-6)  # applied
    rec = run_json(run)
    assert rec["resumes"] == [{"step": 20, "changed": {"train.learning_rate": [0.003, 0.01],
                                                       "train.steps": [20, 30], "train.grad_clip": [0.0, 1.0]}}]
    assert rec["config"]["learning_rate"] == 0.01 and rec["record"]["config"]["train"]["learning_rate"] == 0.01
    assert rec["finished"] is True


FROZEN = [("spec.n_latents=32", "spec.n_latents: 16 -> 32"), ("data.d_input=12", "data.d_input: 8 -> 12"),
          ("data.seed=7", "data.seed: 0 -> 7"), ("train.batch_size=64", "train.batch_size: 32 -> 64"),
          ("spec.penalties.l1=0.1", "")]


def test_resume_refuses_frozen_changes_by_name(base, capsys):
    before = os.listdir(os.path.join(base[1], "checkpoints"))
    rc, _, err = jsdl("train", "--resume", base[1], "--set", "seed=7")  # a real process: one line, exit 2
    assert rc == 2
    line = one_line(err)
    assert "cannot resume" in line and "seed: 1 -> 7" in line and "corrupt" not in line
    for change, field in FROZEN:
        capsys.readouterr()
        assert main("train", "--resume", base[1], "--set", change) == 2
        err = capsys.readouterr().err
        if field:
            assert "cannot resume" in err and field in err and "corrupt" not in err, err
        else:
            assert "keys are section.key" in err  # one syntax: section.key=value
    assert os.listdir(os.path.join(base[1], "checkpoints")) == before  # nothing touched


def test_library_resume_refuses_frozen_change_before_restore(tmp_path):
    """The library enforces the same rules (a changed bench is a changed data fingerprint)."""
    import dataclasses

    import jax

    import jsdl
    from jsdl.train import TrainConfig, fit
    from jsdl.train.rundir import ResumeError

    spec = jsdl.make_spec(activation="topk", n_latents=16, k=2)
    cfg = TrainConfig(steps=10, batch_size=32, log_every=5, progress=False, plots=False)
    b0, b7 = toy(0), toy(7)
    d = str(tmp_path / "run")
    fit(jax.random.PRNGKey(0), spec, b0, cfg, out_dir=d)
    with pytest.raises(ResumeError, match=r"data_fingerprint.sha256"):
        fit(jax.random.PRNGKey(0), spec, b7, dataclasses.replace(cfg, steps=20), out_dir=d, resume=True)
    with pytest.raises(ResumeError, match=r"key: \[0, 0\] -> \[0, 3\]"):
        fit(jax.random.PRNGKey(3), spec, b0, dataclasses.replace(cfg, steps=20), out_dir=d, resume=True)
    with pytest.raises(ResumeError, match=r"train.optimizer: \"adam\" -> \"sgd\""):
        fit(jax.random.PRNGKey(0), spec, b0, dataclasses.replace(cfg, steps=20, optimizer="sgd"), out_dir=d,
            resume=True)


def _truncate_arrays(run, step):
    for root, _, files in os.walk(os.path.join(run, "checkpoints", str(step), "state")):
        for f in files:
            if os.path.basename(root) == "d":
                with open(os.path.join(root, f), "r+b") as fh:
                    fh.truncate(10)


def test_corrupt_latest_checkpoint_falls_back_quietly(base, tmp_path, capfd):
    from jsdl.train import load_run

    run = copy_run(base[1], tmp_path / "run")
    _truncate_arrays(run, 20)
    capfd.readouterr()
    with pytest.warns(RuntimeWarning, match=r"checkpoint step 20 .* unreadable or corrupt .* using step 10 instead"):
        _, _, info = load_run(run)
    assert info["step"] == 10 and not info["finished"]
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "Event loop" not in err, err  # no TensorStore / orbax noise
    assert os.path.isdir(os.path.join(run, "corrupt_checkpoints", "20"))


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_with_a_warning(base, tmp_path):
    run = copy_run(base[1], tmp_path / "run")
    _truncate_arrays(run, 20)
    rc, _, err = jsdl("train", "--resume", run, "--no-progress", "--set", "train.steps=25")
    assert rc == 0, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err  # no TensorStore / orbax tracebacks
    assert "checkpoint step 20" in lines[0] and "using step 10 instead" in lines[0]
    assert [x["step"] for x in rows(run)] == [5, 10, 15, 20, 25]
    assert os.path.isdir(os.path.join(run, "corrupt_checkpoints", "20"))


# ----------------------------------------------------------------------------------------------
# 4: resume checks the data fingerprint (activation files)
# ----------------------------------------------------------------------------------------------


def test_resume_refuses_changed_activation_files(tmp_path, capsys):
    from jsdl.data.files import write_shards

    x = np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32)
    write_shards(str(tmp_path / "acts"), x, rows_per_shard=128)
    data = "data: {files: {path: %s, normalize: true, chunk_rows: 32, shuffle_buffer: 64}}\n" % (tmp_path / "acts")
    cfg = config(tmp_path, data=data, train="steps: 10")
    run = str(tmp_path / "run")
    assert main("train", cfg, "--out", run, "--no-progress") == 0
    fp = run_json(run)["data_fingerprint"]
    assert [s["name"] for s in fp["streams"][0]["shards"]] and fp["scales"]["x_p"] > 0
    write_shards(str(tmp_path / "more"), x[:128] * 3, rows_per_shard=128)
    os.replace(os.path.join(tmp_path / "more", os.listdir(tmp_path / "more")[0]), tmp_path / "acts" / "zz_added.npy")
    capsys.readouterr()
    assert main("train", "--resume", run, "--set", "train.steps=20") == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "data_fingerprint.streams[0].shards" in err, err


# ----------------------------------------------------------------------------------------------
# 5: safe export
# ----------------------------------------------------------------------------------------------


def test_export_is_safe_and_records_what_it_exported(base, tmp_path, capsys):
    from jsdl import export as E

    tmp, run = base
    out = tmp_path / "sae"
    assert main("export", run, out) == 0  # the plug-in penalty is re-imported from run.json
    meta = json.loads((out / "cfg.json").read_text())["metadata"]["jsdl_run"]
    assert meta["step"] == 20 and meta["finished"] is True and meta["train_steps"] == 20
    assert "normalization" in meta
    before = (out / "cfg.json").read_text()
    (out / "cfg.json").write_text(before.replace('"d_in"', '"d_in_edited"'))
    assert main("export", run, out) == 2  # non-empty: refused, nothing overwritten
    assert "d_in_edited" in (out / "cfg.json").read_text()
    assert main("export", run, out, "--force") == 0
    assert (out / "cfg.json").read_text() == before
    f = tmp_path / "a_file"
    f.write_text("x")
    rc, _, err = jsdl("export", run, f)  # a real process: one line, no FileExistsError traceback
    assert rc == 2 and "is a file" in one_line(err)
    # an unfinished run: refused unless a step is named or --allow-unfinished
    unf = copy_run(run, tmp_path / "unfinished")
    rec = run_json(unf)
    rec["finished"] = False
    with open(os.path.join(unf, "run.json"), "w") as fh:
        json.dump(rec, fh)
    capsys.readouterr()
    assert main("export", unf, tmp_path / "u1") == 2
    err = capsys.readouterr().err
    assert "did not finish" in err and "--step 20" in err
    assert main("export", unf, tmp_path / "u2", "--step", "10") == 0
    m2 = json.loads((tmp_path / "u2" / "cfg.json").read_text())["metadata"]["jsdl_run"]
    assert m2["step"] == 10 and m2["finished"] is False
    assert main("export", unf, tmp_path / "u3", "--allow-unfinished") == 0
    assert "--from-saelens" not in E.__doc__ and "--check" in E.__doc__


# ----------------------------------------------------------------------------------------------
# 6: honest metrics
# ----------------------------------------------------------------------------------------------


def test_divergence_is_counted_not_averaged_away(tmp_path, capsys):
    import jax

    import jsdl
    from jsdl.train import Grid, TrainConfig, fit_population

    spec = jsdl.make_spec(activation="relu", n_latents=16, penalties={"l1": 1e-3})
    cfg = TrainConfig(steps=20, batch_size=32, log_every=5, progress=False, plots=False)
    run = str(tmp_path / "pop")
    with pytest.warns(UserWarning, match=r"non-finite loss in population members \[1\]"):
        _, hists = fit_population(jax.random.PRNGKey(0), Grid(spec, learning_rate=[1e-3, 1e9]), toy(0), cfg,
                                  out_dir=run)
    r = rows(run)
    good = [x for x in r if x["member"] == 0]
    bad = [x for x in r if x["member"] == 1]
    assert all(x["n_nonfinite"] == 0 and x["loss"] is not None for x in good)
    assert sum(x["n_nonfinite"] for x in bad) > 0
    for x in bad:  # an interval without a finite step logs null, never 0
        assert (x["loss"] is None) == (x["n_nonfinite"] == 5) and (x["l0"] is None) == (x["loss"] is None)
    assert [x["n_nonfinite"] for x in bad] == hists[1]["n_nonfinite"]


# ----------------------------------------------------------------------------------------------
# 7 and 8: numbers as written; no silent defaults
# ----------------------------------------------------------------------------------------------


def test_yaml_and_set_floats():
    from jsdl.train.cli import config_from_dict
    from jsdl.train.config import yaml_load

    raw = yaml_load("train: {learning_rate: 3e-3, weight_decay: 1E-5, grad_clip: 1e0}\n")
    cfg = config_from_dict(raw, ["train.eps=1e-10", "spec.aux_coef=3.125e-2"])
    assert cfg.train.learning_rate == 3e-3 and cfg.train.weight_decay == 1e-5 and cfg.train.grad_clip == 1.0
    assert cfg.train.eps == 1e-10 and cfg.spec.aux_coef == 0.03125
    assert yaml_load("a: 1e3x\nb: '3e-3'\nc: 7\n") == {"a": "1e3x", "b": "3e-3", "c": 7}  # strings stay strings


def test_one_set_syntax():
    from jsdl.train.cli import config_from_dict

    with pytest.raises(ValueError, match=r"--set expects section.key=value"):
        config_from_dict({}, ["train.steps"])
    with pytest.raises(ValueError, match=r"keys are section.key"):
        config_from_dict({}, ["train.x.y=1"])
    # the penalty lab and the experiments take the same form (the lab's old --hyper is a clear error)
    from jsdl import experiments
    from jsdl.lab import _parse_hyper

    assert _parse_hyper(["penalty.eps=1e-3"]) == {"eps": 1e-3}
    with pytest.raises(ValueError, match=r"--hyper is gone: write --set penalty.eps=1e-3"):
        _parse_hyper([], ["eps=1e-3"])
    with pytest.raises(ValueError, match=r"--set penalty.NAME=VALUE"):
        _parse_hyper(["eps=1e-3"])
    assert experiments._parse_override("train.learning_rate=3e-3") == ("train.learning_rate", 3e-3)


def test_silent_data_defaults_are_errors(tmp_path, capsys):
    from jsdl.data.files import write_shards

    p = tmp_path / "nodata.yaml"
    p.write_text("spec: {activation: topk, n_latents: 16, k: 2}\n")
    rc, _, err = jsdl("train", p)  # a real process: one line, exit 2
    assert rc == 2 and "has no data: section" in one_line(err) and "data: {bench: default}" in err
    (tmp_path / "empty.yaml").write_text("")
    capsys.readouterr()
    assert main("train", tmp_path / "empty.yaml") == 2
    assert "has no data: section" in capsys.readouterr().err
    explicit = config(tmp_path, "explicit.yaml", data="data: {bench: default, n_features: 12, d_input: 8}\n")
    from jsdl.train.cli import load_config

    assert load_config(str(explicit)).data.bench == "default"
    # a crosscoder on one 12-wide stream
    x = np.random.default_rng(0).normal(size=(64, 12)).astype(np.float32)
    write_shards(str(tmp_path / "one"), x, rows_per_shard=64)
    cc = config(tmp_path, "cc.yaml", spec="{method: crosscoder, n_sources: 2, activation: topk, n_latents: 16, k: 2}",
                data="data: {files: %s}\n" % (tmp_path / "one"))
    assert main("train", cc, "--out", tmp_path / "r2") == 2
    err = capsys.readouterr().err
    assert "needs 2 source streams" in err and "[B, 2, d]" in err and "1 stream(s) of width 12" in err


def test_fewer_rows_than_a_batch_message(tmp_path, capsys):
    from jsdl.data.files import write_shards

    x = np.random.default_rng(0).normal(size=(20, 12)).astype(np.float32)
    write_shards(str(tmp_path / "few"), x, rows_per_shard=20)
    few = config(tmp_path, "few.yaml", data="data: {files: %s}\n" % (tmp_path / "few"))
    assert main("train", few, "--out", tmp_path / "r1") == 2
    err = capsys.readouterr().err
    assert "holds 20 training rows, fewer than one batch (train.batch_size=32)" in err


# ----------------------------------------------------------------------------------------------
# plug-ins end to end: a penalty from a file trains, resumes and exports with no further step
# ----------------------------------------------------------------------------------------------


def test_plugin_penalty_trains_resumes_and_exports(tmp_path):
    """A penalty defined in a file trains via YAML + --import (given after the subcommand), and the
    run resumes and exports with no further step (real processes: the plug-in stays out of this one)."""
    cfg = config(tmp_path, spec="{method: sae, activation: relu, n_latents: 16, penalties: {hoyer: 3e-3}}",
                 train="steps: 10")
    run = str(tmp_path / "run")
    rc, _, err = jsdl("train", cfg, "--import", PENALTY, "--out", run, "--no-progress")
    assert rc == 0, err
    rec = run_json(run)
    assert rec["plugins"] == [{"file": os.path.abspath(PENALTY)}] and "hoyer" in rec["spec"]["penalties"]
    rc, _, err = jsdl("train", "--resume", run, "--no-progress", "--set", "train.steps=15")  # no --import
    assert rc == 0, err
    assert run_json(run)["plugins"] == rec["plugins"]
    rc, out, err = jsdl("export", run, tmp_path / "sae")  # no --import
    assert rc == 0, err
    cfg_json = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert "hoyer" in cfg_json["metadata"]["jsdl"]["spec"]["penalties"] and cfg_json["metadata"]["jsdl_run"]["step"] == 15
    # before the subcommand too; a missing file is one clear line
    rc, _, err = jsdl("--import", tmp_path / "missing.py", "export", run, tmp_path / "sae2")
    assert rc == 2 and "missing.py" in one_line(err)


def test_recorded_plugin_that_is_gone_is_a_clear_error(base, tmp_path, capsys):
    run = copy_run(base[1], tmp_path / "run")
    rec = run_json(run)
    rec["plugins"] = [{"file": str(tmp_path / "gone.py")}]
    with open(os.path.join(run, "run.json"), "w") as f:
        json.dump(rec, f)
    for argv in (("export", run, tmp_path / "sae"), ("train", "--resume", run)):
        capsys.readouterr()
        assert main(*argv) == 2
        err = capsys.readouterr().err
        assert "gone.py" in err and "no longer exists" in err


# ----------------------------------------------------------------------------------------------
# the soak test
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_soak_sigkill_at_random_moments(tmp_path):
    """A 3,000-step run SIGKILLed at 20 random moments (saves every 50 steps, so many kills land in
    or next to a save) and resumed each time ends bit-identical to the uninterrupted run, with a
    metrics.jsonl holding every logged step exactly once."""
    import jax

    from jsdl.train import load_run

    cfg = config(tmp_path, train="steps: 3000, log_every: 25, checkpoint_every: 50, keep_checkpoints: 2")
    ref = str(tmp_path / "ref")
    rc, _, err = jsdl("train", cfg, "--out", ref, "--no-progress", timeout=900)
    assert rc == 0, err
    run = str(tmp_path / "run")
    metrics = os.path.join(run, "metrics.jsonl")

    def last_step():
        try:
            with open(metrics, "rb") as f:
                lines = [x for x in f.read().splitlines() if x.strip()]
            return json.loads(lines[-1])["step"] if lines else 0
        except (OSError, ValueError, KeyError):  # not there yet, or a row being written
            return 0

    # Kill points are training steps, not wall-clock delays, so a fast machine (where the whole run
    # takes seconds) still sees all 20 kills: each target is reached only after a resume has
    # restored and trained past it. A random extra delay spreads the kills over compute and saves.
    rng = random.Random(0)
    targets = sorted(rng.sample(range(100, 2800, 25), 20))
    kills = in_save = 0
    p = start("train", cfg, "--out", run, "--no-progress")
    for target in targets:
        wait_for(lambda: p.poll() is not None or (last_step() >= target and ckpt_steps(run)), timeout=300,
                 what=f"step {target}")
        time.sleep(rng.uniform(0.0, 0.1))
        if p.poll() is not None:
            break
        p.send_signal(signal.SIGKILL)
        p.communicate()
        kills += 1
        cdir = os.path.join(run, "checkpoints")
        in_save += any(not n.isdigit() for n in os.listdir(cdir))  # orbax's temporary folder of a save
        p = start("train", "--resume", run, "--no-progress")
    _, err = p.communicate(timeout=900)
    print(f"soak: {kills} SIGKILLs, {in_save} of them during a checkpoint save")
    assert p.returncode == 0, err
    assert kills == 20
    steps = [r["step"] for r in rows(run)]
    assert steps == list(range(25, 3001, 25))
    a, _, ia = load_run(ref)
    b, _, ib = load_run(run)
    for x, y in zip(jax.tree.leaves(ia["state"]), jax.tree.leaves(ib["state"])):
        np.testing.assert_array_equal(np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x),
                                      np.asarray(jax.random.key_data(y) if jax.dtypes.issubdtype(y.dtype, jax.dtypes.prng_key) else y))
