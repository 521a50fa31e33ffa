"""Crash test: `jaxaccel finetune` subprocesses killed with SIGKILL at random steps (one of
them while a checkpoint is being written) and resumed; every resumed run's loss curve and
final params are bit-identical to an uninterrupted run's, and every checkpoint on disk stays
readable after each kill. Subprocesses share XLA's persistent compilation cache."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from train_util import llama_folder, sft_rows, write_jsonl
from jaxaccel.checkpoints import store

STEPS, SAVE_EVERY, TRIALS = 24, 3, 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = llama_folder(root / "model", layers=1)
    data = write_jsonl(root / "train.jsonl", sft_rows(12))
    env = {**os.environ, "JAXACCEL_CACHE": str(root / "cache"), "JAX_PLATFORMS": "cpu"}
    return root, model, data, env


def command(model, data, out):
    return [sys.executable, "-m", "jaxaccel.cli", "finetune", "--model", str(model), "--data", str(data),
            "--out", str(out), "--steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--keep", "2",
            "--batch-size", "4", "--lr", "3e-3", "--no-pack", "--seed", "7", "--no-tensorboard"]


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def final_params(out: Path) -> dict:
    return load_file(str(out / "model.safetensors"))


def steps_written(out: Path) -> int:
    try:
        return len((out / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def saving(out: Path) -> bool:
    try:
        return any("tmp" in p.name for p in (out / "checkpoints").iterdir())
    except FileNotFoundError:
        return False


def test_sigkill_resume_is_bit_identical(setup):
    """The 5 trials run concurrently (wall time); trial 0 dies mid-save."""
    root, model, data, env = setup
    rnd = random.Random(0)
    outs = [root / f"trial{i}" for i in range(TRIALS)]
    kill_at = [None] + [rnd.randrange(2, STEPS - 2) for _ in range(TRIALS - 1)]
    # the reference runs first, alone: it fills the compilation cache the trials then share
    ref = subprocess.run(command(model, data, root / "reference"), env=env, capture_output=True, text=True,
                         timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    procs = [subprocess.Popen(command(model, data, out), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for out in outs]
    killed = [False] * TRIALS
    t = time.monotonic()
    while any(p.poll() is None for p in procs) and time.monotonic() - t < 240:
        for i, (p, out) in enumerate(zip(procs, outs)):
            ready = saving(out) if kill_at[i] is None else steps_written(out) >= kill_at[i]
            if p.poll() is None and ready:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
                killed[i] = True
        time.sleep(0.002)
    assert all(killed), f"runs finished before they could be killed: {killed}"
    resumed_from = []
    for out in outs:  # every committed checkpoint is readable after the kill
        committed = _committed(out)
        for step in committed:
            assert int(store.restore(out / "checkpoints", step)["step"]) == step
        resumed_from.append(max(committed, default=0))
    assert sum(s > 0 for s in resumed_from) >= 3, f"too few trials had a checkpoint to resume: {resumed_from}"
    resumes = [subprocess.Popen(command(model, data, out), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for out in outs]
    for p in resumes:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    want_losses, want_params = losses(root / "reference"), final_params(root / "reference")
    assert [s for s, _ in want_losses] == list(range(1, STEPS + 1))
    for trial, out in enumerate(outs):
        assert losses(out) == want_losses, f"trial {trial} (resumed from {resumed_from[trial]}): loss curve differs"
        got = final_params(out)
        assert got.keys() == want_params.keys()
        for name, value in want_params.items():
            assert np.array_equal(got[name].view(np.uint32), value.view(np.uint32)), f"trial {trial}: {name}"


def _committed(out: Path) -> list[int]:
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def test_store_keeps_last_k_and_best_and_restores_onto_target(tmp_path):
    import jax
    import jax.numpy as jnp

    s = store.Store(tmp_path / "ck", {"model": {"a": 1}}, save_every=1, keep=2, best=True)
    for step, eval_loss in zip(range(1, 6), [3.0, 1.0, 2.0, 4.0, 5.0]):
        s.save(step, {"w": jnp.full((4,), float(step)), "step": jnp.int32(step)}, eval_loss)
    s.wait()
    assert s.all_steps() == [2, 4, 5] and s.best_step() == 2  # last 2 + the best eval loss
    assert s.save(6, {"w": jnp.zeros(4), "step": jnp.int32(6)}) and not store.Store(
        tmp_path / "ck2", {}, save_every=4).save(3, {"w": jnp.zeros(4)})  # off-interval steps are skipped
    s.close()
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=one_device),
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
    got = store.restore(tmp_path / "ck", step=2, target=target)
    np.testing.assert_array_equal(np.asarray(got["w"]), np.full((4,), 2.0))
    with pytest.raises(store.CheckpointError, match=r"different model \(step 6; differs in a\)"):
        store.Store(tmp_path / "ck", {"model": {"a": 2}})
    # a config field added since (None: the old checkpoint's meaning) resumes; a real change does not
    store.Store(tmp_path / "ck", {"model": {"a": 1, "problem_type": None}}).close()
    with pytest.raises(store.CheckpointError, match="differs in problem_type"):
        store.Store(tmp_path / "ck", {"model": {"a": 1, "problem_type": "regression"}})
    with pytest.raises(store.CheckpointError, match="no checkpoint of step 3"):
        store.restore(tmp_path / "ck", step=3)
