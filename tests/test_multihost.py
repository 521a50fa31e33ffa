"""Multi-process on 127.0.0.1: 2 processes x 4 CPU devices (jax.distributed, gloo) train 3 steps
and save with orbax from both; the checkpoint restores onto 1 process x 8 devices and onto
2 x 4 with a different layout, and the restored state and the next step's loss are equal."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mesh_util import device_env

WORKER = Path(__file__).parent / "multihost_worker.py"


def start(nproc: int, local_devices: int, *args) -> list[subprocess.Popen]:
    """Start `nproc` worker processes (one per simulated host) on a free local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    coord = f"127.0.0.1:{port}" if nproc > 1 else "-"
    env = device_env(local_devices)
    return [subprocess.Popen([sys.executable, str(WORKER), args[0], coord, str(nproc), str(i), *map(str, args[1:])],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(nproc)]


def finish(procs: list[subprocess.Popen]) -> str:
    """Wait for all; fail with the logs if any fails or hangs; return process 0's summary line."""
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("multi-process worker timed out:\n" + "\n".join(logs))
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-5000:]
    return "\n".join(line for line in logs[0].splitlines() if line.startswith(("train:", "restore:")))


@pytest.mark.slow
def test_two_processes_train_save_restore_elsewhere(tmp_path):
    ckpt = tmp_path / "ckpt"
    print(finish(start(2, 4, "train", ckpt, tmp_path / "train.npz")))
    assert (ckpt / "3" / "state").is_dir()
    # both restores only read the checkpoint: run them side by side
    one = start(1, 8, "restore", ckpt, tmp_path / "r18.npz", "fsdp=8")
    two = start(2, 4, "restore", ckpt, tmp_path / "r24.npz", "fsdp=2,tensor=4")
    print(finish(one))
    print(finish(two))
    want = dict(np.load(tmp_path / "train.npz"))
    assert len(want) > 20 and int(want["['step']"]) == 3
    for name in ("r18", "r24"):
        got = dict(np.load(tmp_path / f"{name}.npz"))
        assert got.keys() == want.keys()
        for k in want:
            if k not in ("loss4", "generated"):
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name}: {k}")
        np.testing.assert_allclose(got["loss4"], want["loss4"], rtol=1e-6, err_msg=name)
        np.testing.assert_array_equal(got["generated"], want["generated"], err_msg=f"{name}: greedy tokens")
    assert want["generated"].shape == (4, 6)


def test_two_process_finetune_writes_once_and_equals_one_process(tmp_path):
    import json

    import jax

    import jaxaccel
    from multihost_worker import FINETUNE
    from train_util import llama_folder, sft_rows

    folder = llama_folder(tmp_path / "m", layers=1)
    finish(start(2, 4, "finetune", folder, tmp_path / "run", "data=1,fsdp=8"))  # params span both processes
    jaxaccel.finetune(jaxaccel.load(folder), sft_rows(8), out=tmp_path / "one", **FINETUNE)
    curve = lambda run: [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert len(curve("run")) == FINETUNE["steps"]  # written by process 0 alone
    np.testing.assert_allclose(curve("run"), curve("one"), rtol=1e-5)
    got, want = jaxaccel.load(tmp_path / "run").params, jaxaccel.load(tmp_path / "one").params
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(coordinator_address="127.0.0.1:1234"), "together"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2), "process_id 2 must be in [0, 2)"),
])
def test_initialize_bad_input(kwargs, needle):
    from jaxaccel import distributed

    with pytest.raises(ValueError, match=re.escape(needle)):
        distributed.initialize(**kwargs)


def test_cli_finetune_on_two_processes_equals_one_process(tmp_path):
    """`jaxaccel finetune --mesh ...` run on every host joins the cluster itself (here named by
    JAXACCEL_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID): 2 processes x 4 devices give the loss
    curve and weights of 1 process x 8 devices."""
    import json

    import jax

    import jaxaccel
    from mesh_util import run_python
    from train_util import llama_folder, sft_rows

    folder = llama_folder(tmp_path / "m", layers=1)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sft_rows(8)))
    args = ["-m", "jaxaccel.cli", "finetune", "--model", folder, "--data", data, "--steps", "3", "--batch-size", "4",
            "--optimizer", "sgd", "--lr", "0.5", "--schedule", "constant", "--save-every", "2", "--no-tensorboard",
            "--mesh", "data=1,fsdp=8"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, *map(str, args), "--out", str(tmp_path / "two")],
                              env=device_env(4, JAXACCEL_COORDINATOR=f"127.0.0.1:{port}", JAXACCEL_NUM_PROCESSES="2",
                                             JAXACCEL_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    finish(procs)
    run_python(*args, "--out", tmp_path / "one", devices=8)
    curve = lambda run: [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert len(curve("two")) == 3  # written by process 0 alone
    np.testing.assert_allclose(curve("two"), curve("one"), rtol=1e-5)
    got, want = jaxaccel.load(tmp_path / "two").params, jaxaccel.load(tmp_path / "one").params
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_initialize_without_a_cluster_after_devices_are_in_use_stays_one_process():
    """The CLI joins a cluster when given --mesh; called in-process after jax has started (a
    notebook, a test), with no cluster named, it must leave the process as it is."""
    import jax

    from jaxaccel import distributed

    jax.devices()
    assert distributed.initialize()["processes"] == 1
