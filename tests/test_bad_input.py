"""Bad input -> a clear, specific error before any device work; nothing half-written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxaccel
from jaxaccel.checkpoints import CheckpointError


@pytest.fixture
def folder(hf_folder, tmp_path):
    src, _ = hf_folder("llama3")
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(folder, fn):
    tensors = load_file(folder / "model.safetensors")
    fn(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _no_device_work(monkeypatch):
    """Fail the test if any tensor reaches a device."""
    import jax

    def boom(*a, **k):
        raise AssertionError("device work started before validation")

    monkeypatch.setattr(jax, "device_put", boom)


def test_missing_tensor_is_named(folder, monkeypatch):
    _edit_tensors(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _no_device_work(monkeypatch)
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        jaxaccel.load(folder)


def test_unexpected_tensor_is_named(folder, monkeypatch):
    _edit_tensors(folder, lambda t: t.__setitem__("model.layers.0.extra.weight", np.zeros(3, np.float32)))
    _no_device_work(monkeypatch)
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.0\.extra\.weight"):
        jaxaccel.load(folder)


def test_misshaped_tensor_names_both_shapes(folder, monkeypatch):
    _edit_tensors(folder, lambda t: t.__setitem__("model.layers.2.self_attn.k_proj.weight",
                                                  np.zeros((16, 64), np.float32)))
    _no_device_work(monkeypatch)
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.self_attn\.k_proj\.weight: checkpoint shape "
                                              r"\(16, 64\).*model expects \(64, 32\)"):
        jaxaccel.load(folder)


def test_config_disagreeing_with_weights(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight: checkpoint shape \(112, 64\)"):
        jaxaccel.load(folder)


def test_unsupported_model_type_lists_supported(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unsupported model_type 'gpt2'; supported: .*gemma3_text.*llama"):
        jaxaccel.load(folder)


def test_unsupported_rope_type(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unsupported rope_scaling type 'yarn'"):
        jaxaccel.load(folder)


def test_malformed_config_json(folder):
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        jaxaccel.load(folder)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_safetensors(folder, keep):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        jaxaccel.load(folder)


def test_garbage_safetensors(folder):
    (folder / "model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        jaxaccel.load(folder)


def test_pickle_weights_are_refused(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match=r"only pickle weights \(pytorch_model\.bin\); jaxaccel never unpickles"):
        jaxaccel.load(folder)
    with pytest.raises(CheckpointError, match="pickle files"):
        jaxaccel.load(folder / "pytorch_model.bin")


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="no model at"):
        jaxaccel.load("/nonexistent/model")


def test_folder_without_tokenizer_loads_with_none(folder):
    assert jaxaccel.load(folder).tokenizer is None


def test_token_ids_outside_vocabulary(folder):
    m = jaxaccel.load(folder)
    ids = np.array([[1, 2, 3], [4, 97, 5]])
    with pytest.raises(ValueError, match=r"token id 97 at \[row 1, position 1\] is outside the vocabulary \[0, 97\)"):
        m.logits(ids)
    with pytest.raises(ValueError, match=r"token id -1"):
        m.logits(np.array([[-1]]))
    with pytest.raises(TypeError, match="integers"):
        m.logits(np.array([[1.5]]))


def test_sequence_longer_than_positions(folder):
    m = jaxaccel.load(folder)
    with pytest.raises(ValueError, match=r"sequence length 129 exceeds the model's max_position_embeddings 128"):
        m.logits(np.zeros((1, 129), np.int64))


def test_export_is_atomic_and_replaces(folder, tmp_path):
    m = jaxaccel.load(folder)
    out = tmp_path / "export"
    m.save_hf(out)
    m.save_hf(out)  # overwrite in place
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]  # no temp leftovers
