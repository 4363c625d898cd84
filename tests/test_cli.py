"""The `jsdl` shell: lazy subcommands (no JAX for --help), `python -m jsdl`, documented exit codes,
every command wired, and library plots that leave the matplotlib backend alone."""
import importlib
import json
import os
import subprocess
import sys

import pytest

from jsdl import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(*args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120, **kw)


def test_help_imports_no_subcommand_and_no_jax():
    code = (
        "import sys\n"
        "from jsdl.cli import COMMANDS, main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "heavy = [m for m in ('jax', 'numpy', 'matplotlib', 'yaml') if m in sys.modules]\n"
        "subs = [m for m, _ in COMMANDS.values() if m in sys.modules]\n"
        "print('LOADED', heavy, subs)\n"
    )
    r = _python("-c", code)
    assert r.returncode == 0, r.stderr
    assert "LOADED [] []" in r.stdout, r.stdout


@pytest.mark.parametrize("command", ["train", "experiment", "launch"])
def test_subcommand_help_does_not_import_jax(command):
    code = (
        "import sys\n"
        "from jsdl.cli import main\n"
        f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "print('JAX', 'jax' in sys.modules)\n"
    )
    r = _python("-c", code)
    assert r.returncode == 0, r.stderr
    assert "JAX False" in r.stdout, r.stdout


def test_python_m_jsdl_version_and_help():
    import jsdl

    r = _python("-m", "jsdl", "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"jsdl {jsdl.__version__}", (r.stdout, r.stderr)
    r = _python("-m", "jsdl", "--help")
    assert r.returncode == 0 and "usage: jsdl" in r.stdout and "exit codes:" in r.stdout


def test_version_is_the_package_metadata():
    from importlib.metadata import version

    import jsdl

    assert jsdl.__version__ == version("jsdl")


def test_help_documents_every_exit_code(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for code in cli.EXIT_CODES:
        assert f"  {code} " in out
    for name in cli.COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_module_defines_add_arguments_and_run(name, capsys):
    mod = importlib.import_module(cli.COMMANDS[name][0])
    assert callable(mod.add_arguments) and callable(mod.run)
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    assert f"usage: jsdl {name}" in capsys.readouterr().out


def test_usage_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["no-such-command"])
    assert e.value.code == cli.EXIT_USAGE
    assert cli.main([]) == cli.EXIT_USAGE  # no command: the help, as a usage error
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "jsdl train: error: config file" in err and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: {activation: topk, kk: 3}\n")
    assert cli.main(["train", str(bad)]) == cli.EXIT_USAGE
    assert "spec.kk" in capsys.readouterr().err


def test_debug_env_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("JSDL_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        cli.main(["train", str(tmp_path / "missing.yaml")])


def test_import_jsdl_is_lazy_but_complete():
    r = _python("-c", "import sys, jsdl; assert 'jax' not in sys.modules; s = jsdl.make_spec(n_latents=4); "
                      "from jsdl import Batch, penalties; print(type(s).__name__, sorted(jsdl.__all__) == jsdl.__all__)")
    assert r.returncode == 0 and r.stdout.split() == ["SDLSpec", "True"], r.stderr
    import jsdl

    for name in jsdl.__all__:
        assert getattr(jsdl, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        jsdl.nope  # noqa: B018


def test_demo_plot_leaves_the_backend_alone(tmp_path):
    import jax
    import matplotlib
    import numpy as np

    import jsdl
    from jsdl import demo
    from jsdl.data import make_bench

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a backend no library code would pick, so switching it is visible
    bench = make_bench(jax.random.PRNGKey(0), n_features=6, d_input=4, sparsity=0.5, max_interference=0.5)
    spec = jsdl.make_spec(activation="relu", n_latents=8)
    params = jsdl.init_params(jax.random.PRNGKey(1), spec, 4)
    hist = {"step": np.arange(3), "fvu": np.ones(3), "l0": np.ones(3)}
    try:
        demo._plot(str(tmp_path / "p.png"), {"relu": params}, {"relu": hist}, bench)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"



def test_host_tuning_policy():
    """``JSDL_HOST_TUNING`` (auto, on, off) and the size rule of ``auto``: a step of members x batch
    x latents >= 2^23 entries is tuned, a smaller one is not."""
    from jsdl import hosttune as ht

    assert ht.mode({}) == "auto"
    assert [ht.mode({ht.ENV: v}) for v in ("on", "1", "off", "false", "auto")] == ["on", "on", "off", "off", "auto"]
    with pytest.raises(ValueError, match=ht.ENV):
        ht.mode({ht.ENV: "sometimes"})
    assert not ht.wants_tuning(1024, 512, environ={})  # the small benchmark shape
    assert ht.wants_tuning(4096, 4096, environ={})  # the medium one (64 MiB of pre-activations)
    assert ht.wants_tuning(1024, 512, members=16, environ={})
    assert ht.wants_tuning(8, 8, environ={ht.ENV: "on"})
    assert not ht.wants_tuning(4096, 4096, environ={ht.ENV: "off"})


def _glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


@pytest.mark.slow  # three rounds of a large step in fresh processes: ~45 s on 2 cores
@pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc(), reason="glibc's mallopt and page-fault counts")
def test_tune_host_stops_the_page_faults_of_large_temporaries(tmp_path):
    """In a fresh process, ``tune_host`` switches the CPU client to synchronous dispatch and glibc to
    keeping large blocks: a jitted function with a 64 MiB temporary then faults in no pages per call
    (untuned: one fault per 4 KiB page, every call). After an array exists it says dispatch stayed
    asynchronous. ``jsdl train`` (one process, and two through ``jsdl launch``) records the tuning in
    run.json (forced on for a small run here), and tuned or not it trains the same numbers."""
    code = """
import resource, sys
import jsdl.hosttune as h
if sys.argv[1] == "late":
    import jax.numpy as jnp; jnp.ones(1)
line = h.tune_host() if sys.argv[1] != "off" else "off"
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (x * 2.0).reshape(4096, 4096).T.sum(axis=0))
x = jnp.ones((4096 * 4096,), jnp.float32)
for _ in range(2): f(x).block_until_ready()
rates = []
for _ in range(3):  # the least of 3 rounds: the kernel's own reclaim (e.g. DAMON) can fault pages in once
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4): f(x).block_until_ready()
    rates.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 4)
print(min(rates), jax.config.values["jax_cpu_enable_async_dispatch"])
print(line)
"""
    out = {}
    for arg in ("off", "on", "late"):
        r = _python("-c", code, arg)
        assert r.returncode == 0, r.stderr
        faults, async_on = r.stdout.split("\n")[0].split()
        out[arg] = (float(faults), async_on == "True", r.stdout.split("\n")[1])
    assert out["off"][1] and not out["on"][1], out
    assert out["on"][0] < 100, out
    if out["off"][0] > 1000:  # 64 MiB of 4 KiB pages faulted in every call (fewer where THP is "always")
        assert out["on"][0] < out["off"][0] / 100, out
    assert "synchronous CPU dispatch" in out["on"][2] and "M_MMAP_MAX 0" in out["on"][2]
    assert out["late"][1] and "left on" in out["late"][2]

    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: 0\nspec: {method: sae, activation: topk, n_latents: 8, k: 2}\n"
                   "data: {n_features: 8, d_input: 4, sparsity: 0.9, max_interference: 0.9}\n"
                   "train: {steps: 3, batch_size: 8, log_every: 3, plots: false}\n")
    losses = {}
    for setting, cmd, expect in (("on", ["train"], "synchronous CPU dispatch"), ("auto", ["train"], None),
                                 ("on", ["launch", "-n", "2"], "synchronous CPU dispatch")):
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JSDL_HOST_TUNING=setting)
        run = tmp_path / f"run_{setting}_{cmd[0]}"
        r = subprocess.run([sys.executable, "-m", "jsdl", *cmd, str(cfg), "--out", str(run), "--no-progress"],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        rec = json.load(open(run / "run.json"))["record"]["host_tuning"]  # two processes: tuned before they meet
        assert (rec is None) if expect is None else (expect in rec), rec
        losses[setting, cmd[0]] = [json.loads(line)["loss"] for line in open(run / "metrics.jsonl")]
    assert losses["on", "train"] == losses["auto", "train"]  # the same program, dispatched differently
