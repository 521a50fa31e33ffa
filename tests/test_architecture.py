"""The import graph stays in layers and without cycles (the contracts in pyproject.toml, checked
by import-linter), and `jaxaccel --help` answers without importing jax."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is missing: pip install -e '.[test]' installs import-linter")
    proc = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_a_cycle_breaks_the_contracts(tmp_path):
    """The contracts can fail: a copy of the package where the kernels import the engine
    (upward, and a cycle through the models) is refused by both."""
    shutil.copytree(ROOT / "jaxaccel", tmp_path / "jaxaccel", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    kernels = tmp_path / "jaxaccel" / "kernels" / "__init__.py"
    kernels.write_text(kernels.read_text() + "\nfrom .. import engine  # noqa: E402\n")
    proc = subprocess.run([shutil.which("lint-imports") or "lint-imports"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "jaxaccel.kernels is not allowed to import jaxaccel.engine" in proc.stdout
    assert "No cycles are allowed in jaxaccel" in proc.stdout


def test_help_does_not_import_jax():
    code = ("import sys\nfrom jaxaccel import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'jax' not in sys.modules, 'jaxaccel --help imported jax'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
