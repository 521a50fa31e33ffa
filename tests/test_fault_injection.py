"""Fault injection: every cached artifact jaxaccel writes (models/, kernels/, programs/, xla/) is
truncated, bit-flipped or emptied, and the cache folder made read-only or replaced by a file. Each
time: no traceback, no wrong output with exit 0, and the next run heals (no warning left)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxaccel
from jaxaccel import default_models
from jaxaccel.checkpoints import serving

PROMPT = "hello world"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from conftest import make_hf_model
    from gguf_util import write_tiny_gguf

    return write_tiny_gguf(make_hf_model("gemma3"), tmp_path_factory.mktemp("fi") / "tiny.gguf", qtype="Q8_0")


def generate(cache: Path, model: Path, wrapper: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [*wrapper, sys.executable, "-m", "jaxaccel.cli", "generate", PROMPT, "--model", str(model),
           "--max-new-tokens", "6"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAXACCEL_CACHE": str(cache)})


def assert_clean(proc, reference: str, warnings: int | None = 0) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout == reference  # never a different answer with exit 0
    if warnings is not None:
        lines = [ln for ln in proc.stderr.splitlines() if "warning" in ln.lower() or "Error" in ln]
        assert len(lines) == warnings, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def warm(tiny_gguf, tmp_path_factory):
    """A cache the CLI filled (kernels, saved traces, XLA executables) and its output."""
    cache = tmp_path_factory.mktemp("warm") / "cache"
    first = generate(cache, tiny_gguf)
    assert first.returncode == 0 and first.stdout.strip(), first.stderr
    again = generate(cache, tiny_gguf)
    assert_clean(again, first.stdout)
    return cache, first.stdout


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:  # bit flips spread over the file, same size
        b = bytearray(data)
        for i in range(len(b) // 7, len(b), max(len(b) // 5, 1)):
            b[i] ^= 0x5A
        path.write_bytes(bytes(b))


# each damage to the kernel library rebuilds it (tens of seconds): the default run damages it one
# way, CI's slow run the other two
CASES = [pytest.param(how, artifact, marks=[pytest.mark.slow] if artifact.startswith("kernels") and how != "truncate"
                      else [], id=f"{how}-{artifact}")
         for artifact in ["kernels/cpu-*.so", "programs/*.jaxexport", "xla/*-cache"]
         for how in ["truncate", "bitflip", "empty"]]


@pytest.mark.parametrize("how,artifact", CASES)
def test_damaged_cache_files_give_the_same_output_and_heal(warm, tiny_gguf, tmp_path, artifact, how):
    src, reference = warm
    cache = tmp_path / "cache"
    shutil.copytree(src, cache)
    files = sorted(cache.glob(artifact))
    assert files, f"the CLI wrote no {artifact}"
    for f in files:
        damage(f, how)
    hurt = generate(cache, tiny_gguf)
    assert_clean(hurt, reference, warnings=None)  # a notice about the damage may be printed
    healed = generate(cache, tiny_gguf)
    assert_clean(healed, reference)


@pytest.mark.parametrize("state", ["warm", "cold"])
def test_read_only_cache_runs_with_one_warning(warm, tiny_gguf, tmp_path, state):
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to make a read-only folder that root cannot write")
    src, reference = warm
    cache = tmp_path / "cache"
    shutil.copytree(src, cache) if state == "warm" else cache.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {cache} {cache} && "
                            f"mount -o remount,bind,ro {cache} && ! touch {cache}/x"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"this machine cannot make a read-only bind mount: {probe.stderr.strip()}")
    script = (f"mount --bind {cache} {cache} && mount -o remount,bind,ro {cache} && exec \"$@\"")
    proc = generate(cache, tiny_gguf, wrapper=("unshare", "-m", "sh", "-c", script, "sh"))
    assert_clean(proc, reference, warnings=1)
    assert "cannot write the jaxaccel cache folder" in proc.stderr and "Read-only file system" in proc.stderr


def test_a_file_where_the_cache_folder_should_be_runs_with_one_warning(warm, tiny_gguf, tmp_path):
    _, reference = warm
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    proc = generate(cache, tiny_gguf)
    assert_clean(proc, reference, warnings=1)
    assert cache.read_text() == "not a folder"


# --- the embedded model's converted cache (models/) ------------------------------------------------
@pytest.mark.parametrize("target,how", [("model.safetensors", "truncate"), ("model.safetensors", "bitflip"),
                                        ("model.safetensors", "overwrite"), ("config.json", "bitflip"),
                                        ("tokenizer.json", "truncate"), ("quant_config.json", "empty")])
def test_damaged_converted_model_is_rebuilt_with_a_notice(tiny_gguf, tmp_path, monkeypatch, target, how):
    monkeypatch.setenv("JAXACCEL_CACHE", str(tmp_path / "cache"))
    folder = default_models.convert_once(tiny_gguf, "tiny", log=lambda _: None)
    ids = np.random.default_rng(0).integers(0, 97, size=(2, 10))
    want = np.asarray(jaxaccel.load(tiny_gguf).logits(ids))
    path = folder / target
    if how == "overwrite":  # the case: a same-size overwrite in the middle (mtime changes)
        data = bytearray(path.read_bytes())
        data[len(data) // 3: len(data) // 3 + 4096] = os.urandom(min(4096, len(data) // 3))
        path.write_bytes(bytes(data))
    else:
        damage(path, how)
    logs = []
    assert default_models.convert_once(tiny_gguf, "tiny", log=logs.append) == folder
    assert any("is unusable" in s and "rebuilding" in s for s in logs), logs
    np.testing.assert_array_equal(np.asarray(jaxaccel.load(folder).logits(ids)), want)
    logs.clear()
    assert default_models.convert_once(None, "tiny", log=logs.append) == folder and logs == []  # healed


def test_a_same_size_change_is_caught_by_the_checksum_not_only_the_size(tiny_gguf, tmp_path):
    """Loading a serving folder whose weights were overwritten in place (same size) is refused
    by its sha256; an unchanged folder is not hashed again (the stamp)."""
    folder = serving.save(jaxaccel.load(tiny_gguf).quantize(jaxaccel.QuantConfig(mode="float32")), tmp_path / "s")
    jaxaccel.load(folder)
    assert (folder / serving.STAMP).is_file()
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(serving.DamagedCheckpoint, match="does not hold the bytes that were written"):
        jaxaccel.load(folder)
