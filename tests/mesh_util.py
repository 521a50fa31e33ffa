"""Subprocesses with N simulated CPU devices (XLA_FLAGS must be set before jax is imported)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def device_env(n: int, **extra) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]), **extra}


def run_python(*args, devices: int = 8, env: dict | None = None, timeout: int = 600, cwd=None):
    """`python ARGS...` with `devices` CPU devices; asserts success and returns the result."""
    proc = subprocess.run([sys.executable, *map(str, args)], env=device_env(devices, **(env or {})),
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc
