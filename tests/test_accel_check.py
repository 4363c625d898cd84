"""benchmarks/accel_check.py --quick: the accelerator check runs end to end on CPU (tiny shapes,
2 forced devices so the sharded sections run), so it cannot rot before an accelerator is at hand."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # ~35-65 s on 2 cores; `make test-slow`
def test_accel_check_quick(tmp_path):
    out = tmp_path / "ACCEL.md"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "accel_check.py"), "--quick", "--out",
                        str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = out.read_text()
    assert "skipped" not in text
    for act in ("relu", "topk", "batchtopk", "jumprelu"):
        for cd in ("float32", "bfloat16"):
            assert f"| {act} | {cd} |" in text, (act, cd)
    assert "| (2, 1) |" in text and "| (1, 2) |" in text
    assert "4096-latent TopK dictionary" in text and "failed" not in text
    assert "M_GT encoder" in text
    assert "MFU" in text and "unknown" in text  # CPU has no peak in the table


def test_peak_table():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from accel_check import peak_flops

    assert peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert peak_flops("TPU v5 lite", "bfloat16") == 197e12
    assert peak_flops("cpu", "float32") is None
