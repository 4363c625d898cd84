"""Many processes: ``jax.distributed`` start-up with a bounded wait, a config check across
processes, and ``jsdl launch -n N CONFIG.yaml``, which runs N local ``jsdl train`` processes that
train one run together (each with its own forced CPU devices, CPU collectives over gloo).

On a real cluster every host runs ``jsdl train CONFIG.yaml --distributed`` itself (TPU pods and
SLURM are auto-detected by ``jax.distributed.initialize``; elsewhere pass ``--coordinator``,
``--num-processes``, ``--process-id``); see the README section "Many hosts".
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Optional, Sequence

__all__ = ["initialize", "config_hash", "check_same_config", "free_port", "launch_local", "add_arguments", "run"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _reachable(address: str, timeout: float) -> bool:
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=1.0):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, timeout: int = 60) -> None:
    """``jax.distributed.initialize`` with CPU collectives (gloo) when the platform is CPU, and a
    bounded wait: a process other than the coordinator's that cannot reach ``coordinator`` within
    ``timeout`` seconds raises ValueError naming the address (instead of JAX's default 5-minute
    wait). With no arguments, the cluster (TPU pod, SLURM, ...) is auto-detected."""
    import jax

    if coordinator is not None:
        host, sep, port = coordinator.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"--coordinator must be host:port, got {coordinator!r}")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id must be in [0, {num_processes}), got {process_id}")
    # CPU collectives across processes (only the CPU backend reads this; GPU/TPU use their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator is not None and process_id not in (None, 0) and not _reachable(coordinator, timeout):
        raise ValueError(f"--distributed: the coordinator {coordinator} was not reachable within {timeout} s "
                         "(is process 0 running, and is the address/port right?)")
    kw: dict[str, Any] = {"initialization_timeout": int(timeout)}
    if coordinator is not None:
        kw["coordinator_address"] = coordinator
    if num_processes is not None:
        kw["num_processes"] = num_processes
    if process_id is not None:
        kw["process_id"] = process_id
    try:
        jax.distributed.initialize(**kw)
    except Exception as e:  # JAX raises RuntimeError/XlaRuntimeError with long gRPC messages
        raise ValueError(f"--distributed: jax.distributed.initialize failed within {timeout} s "
                         f"({type(e).__name__}: {str(e)[:300]})") from e


def config_hash(config: Any) -> str:
    """SHA-256 of the canonical JSON of ``config`` (a dict, or anything with ``to_dict()``)."""
    d = config.to_dict() if hasattr(config, "to_dict") else config
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def check_same_config(config: Any) -> str:
    """Compare :func:`config_hash` across all processes (an all-gather); ValueError naming the
    processes whose config differs from process 0's. Returns the hash."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    h = config_hash(config)
    if jax.process_count() == 1:
        return h
    mine = np.frombuffer(bytes.fromhex(h), dtype=np.uint32)
    every = np.asarray(multihost_utils.process_allgather(mine))  # [processes, 8]
    differ = [i for i in range(every.shape[0]) if not np.array_equal(every[i], every[0])]
    if differ:
        raise ValueError(f"processes {differ} were started with a config different from process 0's "
                         f"(config hashes differ); every process must get the same config and --set overrides")
    return h


# ----------------------------------------------------------------------------------------------
# jsdl launch
# ----------------------------------------------------------------------------------------------


def _pump(stream, prefix: str, out):
    for line in iter(stream.readline, ""):
        out.write(f"{prefix}{line}")
        out.flush()


def launch_local(n: int, argv: Sequence[str], *, devices_per_process: int = 1, port: Optional[int] = None,
                 timeout: int = 60, env: Optional[dict] = None) -> int:
    """Run ``n`` local processes of ``jsdl train ARGV --distributed ...`` on CPU, each with
    ``devices_per_process`` forced devices; output is prefixed ``[i]``. Returns the first non-zero
    exit code (the others are then terminated), else 0."""
    if n < 1:
        raise ValueError(f"launch: -n must be >= 1, got {n}")
    if devices_per_process < 1:
        raise ValueError(f"launch: --devices-per-process must be >= 1, got {devices_per_process}")
    port = port or free_port()
    base = dict(os.environ if env is None else env)
    base["XLA_FLAGS"] = (base.get("XLA_FLAGS", "") +
                         f" --xla_force_host_platform_device_count={devices_per_process}").strip()
    base["JAX_PLATFORMS"] = "cpu"
    procs = []
    for i in range(n):
        cmd = [sys.executable, "-m", "jsdl.cli", "train", *argv, "--distributed", "--coordinator",
               f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i),
               "--distributed-timeout", str(timeout)]
        p = subprocess.Popen(cmd, env=base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        threading.Thread(target=_pump, args=(p.stdout, f"[{i}] ", sys.stdout), daemon=True).start()
        procs.append(p)
    rc = 0
    try:
        pending = set(range(n))
        while pending:
            for i in list(pending):
                r = procs[i].poll()
                if r is None:
                    continue
                pending.discard(i)
                if r != 0 and rc == 0:
                    rc = r
                    for j in pending:  # one process failed: the others would wait forever
                        procs[j].terminate()
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return rc


def add_arguments(p) -> None:
    p.add_argument("-n", "--num-processes", type=int, default=2, help="number of local processes (default 2)")
    p.add_argument("--devices-per-process", type=int, default=1, help="forced CPU devices per process (default 1)")
    p.add_argument("--port", type=int, help="coordinator port (default: a free one)")
    p.add_argument("--timeout", type=int, default=60, help="seconds to wait for the coordinator (default 60)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, metavar="CONFIG.yaml [train options]",
                   help="what `jsdl train` gets, e.g. CONFIG.yaml --set train.steps=100")


def run(args) -> int:
    train_args = list(args.train_args)
    if train_args and train_args[0] == "--":
        train_args = train_args[1:]
    if not train_args:
        raise ValueError("launch: give the `jsdl train` arguments, e.g. jsdl launch -n 2 CONFIG.yaml")
    return launch_local(args.num_processes, train_args, devices_per_process=args.devices_per_process,
                        port=args.port, timeout=args.timeout)
