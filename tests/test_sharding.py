"""Sharding over a (data, fsdp, tensor) mesh of 8 CPU devices: logits, greedy generation, one
training step and sharded init equal the single-device results; params bytes per device
fall as 1/(fsdp x tensor); bad meshes give clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import transformers

import jaxaccel
from jaxaccel import cli, sharding
from conftest import TINY, make_hf_model, random_hf_model
from gguf_util import write_tiny_gguf
from mesh_util import run_python
from train_util import tokenizer_into

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharding")
    # vocab 128 and 2 layers: every param dimension divides every mesh axis of MESHES
    cfg = transformers.LlamaConfig(**{**TINY, "vocab_size": 128, "num_hidden_layers": 2})
    hf = random_hf_model(cfg)
    hf.save_pretrained(tmp / "f128")
    tokenizer_into(tmp / "f128")  # for generate's text path and the CLI
    write_tiny_gguf(hf, tmp / "f128.gguf", tokenizer=False)
    make_hf_model("llama3").save_pretrained(tmp / "f97")  # vocab 97: indivisible by tensor=8
    proc = run_python(HERE / "sharding_worker.py", tmp / "f128", tmp / "f128.gguf", tmp / "f97", tmp / "out.npz",
                      env={"JAXACCEL_CACHE": str(tmp / "cache")})
    print(proc.stdout)  # per-device params bytes per mesh (pytest -s shows it)
    return dict(np.load(tmp / "out.npz"))


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "mesh%d%d%d" % s)
def test_sharded_equals_single_device(results, shape):
    r, tag = results, "mesh%d%d%d" % shape
    np.testing.assert_allclose(r[f"{tag}/logits"], r["single/logits"], atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(r[f"{tag}/tokens"], r["single/tokens"])  # greedy generation
    np.testing.assert_array_equal(r[f"{tag}/tokens_streamed"], r["single/tokens"])  # token by token, cache reused
    np.testing.assert_allclose(r[f"{tag}/loss"], r["single/loss"], rtol=1e-6)
    assert int(r[f"{tag}/state_devices"]) == 8  # params, optimizer state and counters all on the mesh
    params = [k for k in r if k.startswith(f"{tag}/param")]
    assert len(params) == len([k for k in r if k.startswith("single/param")]) > 10
    for k in params:
        np.testing.assert_allclose(r[k], r[k.replace(tag, "single")], atol=2e-6, rtol=1e-5, err_msg=k)


def test_one_kv_head_on_a_tensor_axis_generates_token_by_token(results):
    single, sharded = results["kv1_tokens"]
    np.testing.assert_array_equal(sharded, single)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "mesh%d%d%d" % s)
def test_params_bytes_fall_with_fsdp_times_tensor(results, shape):
    _, fsdp, tensor = shape
    per_device, total = results["mesh%d%d%d/bytes" % shape], int(results["total_bytes"])
    assert len(per_device) == 8
    ideal = total / (fsdp * tensor)
    # only the norm scales stay replicated (< 5% of the tiny model's 1/8 share)
    assert ideal <= per_device.max() <= 1.05 * ideal, (per_device, ideal)
    # the SGD momentum is one params-shaped tree: sharded like the params after the step
    assert ideal <= int(results["mesh%d%d%d/opt_bytes" % shape]) <= 1.05 * ideal


def test_gguf_sharded_load_and_reshard_of_a_loaded_model(results):
    np.testing.assert_allclose(results["gguf_logits"], results["single/logits"], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(results["shard_logits"], results["single/logits"], atol=2e-5, rtol=1e-5)
    assert int(results["shard_devices"]) == 8
    np.testing.assert_allclose(results["serving_logits"], results["single/logits"], atol=2e-5, rtol=1e-5)
    assert int(results["serving_devices"]) == 8


def test_sharded_init_equals_single_device_init(results):
    assert float(results["init_max_diff"]) == 0.0
    assert int(results["init_sharded"]) == 8  # the MLP kernel really lives on all 8 devices


def test_bad_mesh_errors_name_the_problem(results):
    assert "needs 3 devices but 8 are available" in str(results["err_product"])
    msg = str(results["err_indivisible"])
    assert "embed_tokens/embedding" in msg and "'vocab', size 97" in msg and "tensor=8" in msg


@pytest.mark.parametrize("bad, needle", [
    ("data=2,fsdp=x", "bad mesh size 'x' for fsdp"),
    ("data=2,pipe=2", "bad mesh entry 'pipe=2'"),
    ("", "empty mesh"),
])
def test_parse_mesh_errors(bad, needle):
    with pytest.raises(ValueError, match=needle):
        sharding.parse_mesh(bad)


def test_mesh_config_resolution_and_errors():
    assert sharding.parse_mesh("data=2,fsdp=2,tensor=2") == jaxaccel.MeshConfig(2, 2, 2)
    assert sharding.parse_mesh("tensor=2") == jaxaccel.MeshConfig(-1, 1, 2)
    assert sharding.parse_mesh("fsdp=-1") == jaxaccel.MeshConfig(1, -1, 1)
    assert sharding.parse_mesh("tensor=2").shape(8) == (4, 1, 2)
    assert jaxaccel.MeshConfig(fsdp=2).shape(8) == (4, 2, 1)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        jaxaccel.MeshConfig(-1, -1, 1).shape(8)
    with pytest.raises(ValueError, match="do not divide the 8 available devices"):
        jaxaccel.MeshConfig(-1, 3, 1).shape(8)
    with pytest.raises(ValueError, match="positive integer"):
        jaxaccel.MeshConfig(0, 1, 1).shape(8)
    with pytest.raises(ValueError, match="needs 4 devices but 1 are available"):
        sharding.build_mesh(jaxaccel.MeshConfig(2, 2, 1))  # this process has one CPU device


def test_cli_generate_with_mesh_flag(results):
    rc, cli_text, api_text = results["cli"].tolist()
    assert rc == "0" and cli_text == api_text and len(api_text.split()) >= 3


def test_quantizing_a_sharded_model_equals_one_device(results):
    np.testing.assert_allclose(results["quant_mesh"], results["quant_single"], atol=2e-5)


def test_cli_finetune_with_mesh_equals_single_device(results):
    np.testing.assert_allclose(results["ft_mesh/loss"], results["ft_single/loss"], rtol=1e-5)
    assert len(results["ft_single/loss"]) == 3
    np.testing.assert_allclose(results["ft_mesh/lm_head"], results["ft_single/lm_head"], atol=1e-5)
    for tag in ("ft_single", "ft_mesh"):  # rerunning the identical command resumes, mesh or not
        rc, err = results[f"{tag}/rerun"]
        assert rc == "0" and "resuming from step 3" in err, (tag, err[-2000:])


def test_cli_mesh_flag_parsing(capsys):
    args = cli.parser().parse_args(["generate", "hi", "--mesh", "data=2,fsdp=2,tensor=2"])
    assert args.mesh == jaxaccel.MeshConfig(2, 2, 2)
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["generate", "hi", "--mesh", "data=two"])
    assert "bad mesh size 'two' for data" in capsys.readouterr().err
