"""Sharding over a (data, fsdp, tensor) mesh of 8 CPU devices: logits, greedy generation, one
training step and sharded init equal the single-device results; params bytes per device
fall as 1/(fsdp x tensor); a dimension a mesh axis does not divide (odd vocabulary, one KV head,
fewer heads than the tensor axis) is replicated on that axis, said once, and changes no result;
bad meshes give clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import transformers

import jaxaccel
from jaxaccel import cli, sharding
from conftest import TINY, random_hf_model, tiny_hf_config
from gguf_util import write_tiny_gguf
from mesh_util import run_python
from train_util import tokenizer_into

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
HERE = Path(__file__).parent


def write_odd_models(root: Path) -> dict:
    """HF folders whose dimensions some mesh axes of 8 devices do not divide: a Llama with vocab
    97 and one KV head, a Gemma 3 with one KV head, a BERT masked LM with vocab 101 and 2 token
    types; returns name -> the transformers model (the reference)."""
    gemma = tiny_hf_config("gemma3")
    gemma.num_key_value_heads, gemma.num_hidden_layers, gemma.layer_types = 1, 2, gemma.layer_types[:2]
    models = {
        "llama": random_hf_model(transformers.LlamaConfig(**{**TINY, "num_key_value_heads": 1,
                                                             "num_hidden_layers": 2})),
        "gemma3": random_hf_model(gemma),
        "bert": transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
            max_position_embeddings=64, type_vocab_size=2)).eval(),
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
    return models


def reference_logits(models: dict, ids) -> dict:
    import torch

    with torch.no_grad():
        return {name: m(input_ids=torch.tensor(ids)).logits.numpy() for name, m in models.items()}


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    return root, write_odd_models(root)


@pytest.fixture(scope="module")
def results(tmp_path_factory, odd_models):
    tmp = tmp_path_factory.mktemp("sharding")
    # vocab 128 and 2 layers: every param dimension divides every mesh axis of MESHES except the
    # 2 KV heads on tensor=4 (replicated there: a head is never split)
    cfg = transformers.LlamaConfig(**{**TINY, "vocab_size": 128, "num_hidden_layers": 2})
    hf = random_hf_model(cfg)
    hf.save_pretrained(tmp / "f128")
    tokenizer_into(tmp / "f128")  # for generate's text path and the CLI
    write_tiny_gguf(hf, tmp / "f128.gguf", tokenizer=False)
    proc = run_python(HERE / "sharding_worker.py", tmp / "f128", tmp / "f128.gguf", odd_models[0], tmp / "out.npz",
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
    kv = 2 * 2 * 64 * 2 * 16 * 4  # k_proj + v_proj kernels of 2 layers, [64, 2 KV heads x 16] float32
    whole = kv if tensor > 2 else 0  # 2 KV heads: replicated on a tensor axis of 4, split over fsdp only
    ideal = (total - whole) / (fsdp * tensor) + whole / fsdp
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


def test_a_mesh_that_does_not_match_the_devices_is_a_clear_error(results):
    assert "needs 3 devices but 8 are available" in str(results["err_product"])


def check_odd(r, reference, generated_on_every_mesh=False):
    """Every mesh's logits (and greedy tokens) equal the single device's, which equal
    transformers'; the load warned once with a note naming each replicated dimension, and the
    placed arrays follow the plan."""
    for name, want in reference.items():
        np.testing.assert_allclose(r[f"odd/{name}/single/logits"], want, atol=1e-4, rtol=1e-4, err_msg=name)
        tags = sorted({k.split("/")[2] for k in r if k.startswith(f"odd/{name}/mesh")})
        assert len(tags) >= 4, tags
        for tag in tags:
            got = lambda what: r[f"odd/{name}/{tag}/{what}"]
            np.testing.assert_allclose(got("logits"), r[f"odd/{name}/single/logits"], atol=2e-5, rtol=1e-5,
                                       err_msg=f"{name} {tag}")
            if name != "bert" and (generated_on_every_mesh or tag == "mesh118"):
                np.testing.assert_array_equal(got("tokens"), r[f"odd/{name}/single/tokens"], err_msg=f"{name} {tag}")
            assert bool(got("plan_followed")), (name, tag)
            plan, notes = list(got("plan")), list(got("notes"))
            assert len(notes) == (1 if plan else 0), (name, tag, notes)  # once per load, only when needed
            for entry in plan:
                assert entry.split(" ", 1)[1] in notes[0], (entry, notes)


def test_dimensions_a_mesh_axis_does_not_divide_are_replicated(results, odd_models):
    check_odd(results, reference_logits(odd_models[1], results["odd/ids"]))


def test_the_replication_plan_names_what_does_not_divide(results):
    plan = lambda name, tag: set(results[f"odd/{name}/{tag}/plan"])
    spec = lambda name, tag, path: dict(s.split(" ", 1) for s in results[f"odd/{name}/{tag}/specs"])[path]
    attn = "layers_0/self_attn/"
    # tensor=8: vocab 97, 1 KV head and 4 query heads are all whole; the MLP (112 = 8 x 14) is split
    assert {"embed_tokens/embedding vocab 97 on tensor=8", "lm_head/kernel vocab 97 on tensor=8",
            f"{attn}k_proj/kernel 1 KV head on tensor=8", f"{attn}v_proj/kernel 1 KV head on tensor=8",
            f"{attn}q_proj/kernel 4 heads on tensor=8", f"{attn}o_proj/kernel 4 heads on tensor=8",
            } <= plan("llama", "mesh118")
    assert not any("mlp" in e for e in plan("llama", "mesh118"))
    assert spec("llama", "mesh118", "layers_0/mlp/up_proj/kernel") == "('fsdp', 'tensor')"
    assert spec("llama", "mesh118", f"{attn}k_proj/kernel") == "('fsdp', None)"
    # tensor=2: the 4 query heads split two per device, the single KV head stays whole
    assert spec("llama", "mesh412", f"{attn}q_proj/kernel") == "('fsdp', 'tensor')"
    assert spec("llama", "mesh412", f"{attn}k_proj/kernel") == "('fsdp', None)"
    assert not any("q_proj" in e for e in plan("llama", "mesh412"))
    # the KV cache follows the same rule: its head axis is whole on the tensor axis
    assert results["odd/llama/mesh118/cache_spec"] == "(('data', 'fsdp'), None, None, None)"
    assert results["odd/gemma3/mesh124/cache_spec"] == "(('data', 'fsdp'), None, None, None)"
    # BERT: 2 token types and vocab 101 whole on tensor=4
    assert {"token_type_embeddings/embedding vocab 2 on tensor=4",
            "word_embeddings/embedding vocab 101 on tensor=4"} <= plan("bert", "mesh124")


@pytest.mark.slow
def test_every_layout_loads_the_odd_models(odd_models, tmp_path):
    """Every (data, fsdp, tensor) layout of 8 devices: logits and greedy generation."""
    run_python(HERE / "sharding_worker.py", "odd", odd_models[0], tmp_path / "odd.npz")
    r = dict(np.load(tmp_path / "odd.npz"))
    assert len({k.split("/")[2] for k in r if k.startswith("odd/llama/mesh")}) == 10
    check_odd(r, reference_logits(odd_models[1], r["odd/ids"]), generated_on_every_mesh=True)


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
