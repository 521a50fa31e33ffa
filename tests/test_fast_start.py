"""The warm-start path of `jaxaccel generate`: memory-mapped serving folders, one-layer shape
checks, saved program traces (jax.export) and the tokenizer worker process. Each piece must
give exactly what the slow path gives."""

from __future__ import annotations

import json
import os
import signal
import time

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file

import jaxaccel
from jaxaccel import program_cache
from jaxaccel.checkpoints import CheckpointError, serving
from jaxaccel.engine import Engine
from jaxaccel.generation import _engine, generate_tokens
from jaxaccel.models import registry
from jaxaccel.quant import QuantConfig
from jaxaccel.tokenizer import FastTokenizer

from conftest import FAMILY_KINDS
from test_bert import ARCHS, VOCAB, tiny_config


def full_trace_shapes(cfg):
    module = registry.build(cfg)
    tree = jax.eval_shape(lambda t: module.init(jax.random.PRNGKey(0), t), jax.ShapeDtypeStruct((1, 1), np.int32))
    return traverse_util.flatten_dict(tree["params"])


def assert_same_abstract(cfg):
    fast = traverse_util.flatten_dict(registry.abstract_params(cfg))
    full = full_trace_shapes(cfg)
    assert fast.keys() == full.keys()
    for k in full:  # shapes, dtypes and the sharding names of every param
        assert (fast[k].value.shape, fast[k].value.dtype) == (full[k].value.shape, full[k].value.dtype), k
        assert fast[k].names == full[k].names, k


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_one_layer_shape_trace_equals_tracing_every_layer(hf_folder, kind):
    assert_same_abstract(jaxaccel.load(hf_folder(kind)[0]).config)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_layer_shape_trace_equals_tracing_every_layer_bert(arch):
    assert_same_abstract(registry.config_from_hf(tiny_config(arch).to_dict()))


# --- serving folders: aligned safetensors, memory-mapped --------------------------------------
def serving_folder(hf_folder, tmp_path, kind="gemma3"):
    m = jaxaccel.load(hf_folder(kind)[0])
    return m, serving.save(m.quantize(QuantConfig(mode="float32")), tmp_path / "serving")


def test_serving_folder_is_aligned_standard_and_loads_without_copies(hf_folder, tmp_path):
    m, folder = serving_folder(hf_folder, tmp_path)
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8: 8 + n])
    assert (8 + n) % 64 == 0
    for name, info in header.items():
        if name != "__metadata__" and (info["data_offsets"][1] - info["data_offsets"][0]) % 64 == 0:
            assert (8 + n + info["data_offsets"][0]) % 64 == 0, name
    # any safetensors reader reads it: the same values as the model's params
    flat = traverse_util.flatten_dict(m.params, sep="/")
    theirs = load_file(str(path))
    assert theirs.keys() == flat.keys()
    for k, v in flat.items():
        np.testing.assert_array_equal(theirs[k], np.asarray(v), err_msg=k)
    # loading maps the file: on CPU the device buffers are the mapped pages themselves
    mapped = serving.read_mapped(path)
    placed = {k: jax.device_put(v) for k, v in mapped.items()}
    assert all(placed[k].unsafe_buffer_pointer() == mapped[k].ctypes.data for k in mapped)
    served = jaxaccel.load(folder)
    assert served.quant is None and served.dtype == "float32"  # the float model itself: quantizable, trainable
    ids = np.random.default_rng(0).integers(0, 97, size=(2, 9))
    np.testing.assert_array_equal(np.asarray(served.logits(ids)), np.asarray(m.logits(ids)))
    assert generate_tokens(served, [[3, 4, 5]], 8) == generate_tokens(m, [[3, 4, 5]], 8)
    assert served.quantize(QuantConfig(mode="int8")).quant.mode == "int8"


def test_corrupt_serving_folder_is_a_clear_error(hf_folder, tmp_path):
    _, folder = serving_folder(hf_folder, tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors has .* bytes where .* were written .truncated"):
        jaxaccel.load(folder)
    # a folder without an integrity record (format version 1): safetensors' own checks still refuse it
    meta_path = folder / "quant_config.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**{k: v for k, v in meta.items() if k != "files"}, "version": 1}))
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors"):
        jaxaccel.load(folder)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="cannot read"):
        jaxaccel.load(folder)


# --- saved program traces ---------------------------------------------------------------------
@pytest.fixture
def program_folder(tmp_path):
    program_cache.set_folder(tmp_path / "programs")
    yield tmp_path / "programs"
    program_cache.set_folder(None)


def fresh(model):
    model.__dict__.pop("_engine", None)
    return model


def test_saved_trace_gives_the_same_tokens_and_skips_tracing(hf_folder, program_folder, monkeypatch):
    m = jaxaccel.load(hf_folder("llama3")[0])
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14]]
    program_cache.set_folder(None)
    want = generate_tokens(fresh(m), prompts, 12, temperature=0.8, top_k=20, seed=[1, 2])
    greedy = generate_tokens(fresh(m), prompts, 12)
    program_cache.set_folder(program_folder)
    assert generate_tokens(fresh(m), prompts, 12, temperature=0.8, top_k=20, seed=[1, 2]) == want
    assert len(list(program_folder.glob("*.jaxexport"))) == 1

    from jax import export

    def no_tracing(*a, **k):
        raise AssertionError("traced again although a saved trace exists")

    monkeypatch.setattr(export, "export", no_tracing)
    assert generate_tokens(fresh(m), prompts, 12, temperature=0.8, top_k=20, seed=[1, 2]) == want
    # other sampling settings are runtime values of the same saved program: no tracing
    assert generate_tokens(fresh(m), prompts, 12) == greedy
    # another shape is another program (traced: here it fails, proving it was not reused)
    with pytest.raises(AssertionError, match="traced again"):
        generate_tokens(fresh(m), prompts + [[3, 4]] * 3, 12)


def test_damaged_saved_trace_is_traced_again_and_replaced(hf_folder, program_folder):
    m = jaxaccel.load(hf_folder("qwen2")[0])
    want = generate_tokens(fresh(m), [[1, 2, 3]], 6)
    (saved,) = program_folder.glob("*.jaxexport")
    saved.write_bytes(b"garbage")
    stale = program_folder / "0123.jaxexport"  # unused for 40 days: pruned when a trace is written
    stale.write_bytes(b"old")
    os.utime(stale, (0, time.time() - 40 * 86400))
    assert generate_tokens(fresh(m), [[1, 2, 3]], 6) == want
    assert saved.stat().st_size > 1000 and not stale.exists()


def test_prepare_compiles_once_in_the_background(hf_folder):
    m = fresh(jaxaccel.load(hf_folder("mistral")[0]))
    jaxaccel.generation.prepare(m, 1, 5, 10)  # traces now, compiles in a thread
    out = generate_tokens(m, [[1, 2, 3, 4, 5]], 10)  # waits for that compile
    assert _engine(m).compiled_programs == 1
    assert out == generate_tokens(fresh(jaxaccel.load(hf_folder("mistral")[0])), [[1, 2, 3, 4, 5]], 10)
    assert isinstance(_engine(m), Engine)


# --- tokenizer worker process -----------------------------------------------------------------
def test_tokenizer_worker_errors_are_clear(tmp_path):
    import transformers

    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    transformers.BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(str(folder))
    tok = FastTokenizer(folder, process=True)
    assert tok.encode("hello world") == FastTokenizer(folder).encode("hello world")
    os.kill(tok._tok._proc.pid, signal.SIGKILL)
    tok._tok._proc.wait()
    with pytest.raises(RuntimeError, match="tokenizer process .* ended unexpectedly"):
        tok.encode("again")
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="cannot load .*tokenizer.json"):
        FastTokenizer(tmp_path, process=True).encode("x")


def test_without_flatbuffers_programs_are_traced_as_usual(hf_folder, program_folder, monkeypatch):
    m = jaxaccel.load(hf_folder("llama3")[0])
    want = generate_tokens(fresh(m), [[4, 5, 6]], 5)
    for f in program_folder.glob("*.jaxexport"):
        f.unlink()
    monkeypatch.setattr(program_cache, "_can_serialize", lambda: False)
    assert generate_tokens(fresh(m), [[4, 5, 6]], 5) == want
    assert not list(program_folder.glob("*.jaxexport"))


def test_cli_leaves_the_process_without_saved_traces(hf_folder, tmp_path, monkeypatch, capsys):
    from jaxaccel import cli

    monkeypatch.setenv("JAXACCEL_CACHE", str(tmp_path / "cache"))
    # this folder has no tokenizer, so the command fails (rc 2); the setting is reset either way
    assert cli.main(["generate", "a b", "--model", str(hf_folder("llama3")[0]), "--max-new-tokens", "3"]) == 2
    assert program_cache.folder() is None


# --- review fixes ----------------------------------------------------------------------------
def test_exit_during_a_background_compile_is_clean(hf_folder):
    """prepare() compiles in a thread; a process that ends meanwhile waits for it instead of
    aborting inside XLA (it used to die with SIGABRT)."""
    from mesh_util import run_python

    code = ("import jaxaccel, jaxaccel.generation as G\n"
            f"m = jaxaccel.load({str(hf_folder('gemma3')[0])!r})\n"
            "G.prepare(m, 1, 5, 8)\n")
    for _ in range(2):
        assert run_python("-c", code, devices=1).returncode == 0


def test_prepare_checks_its_arguments_before_tracing(hf_folder, capsys):
    m = fresh(jaxaccel.load(hf_folder("qwen2")[0]))
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        jaxaccel.generation.prepare(m, 1, 5, 0)
    with pytest.raises(ValueError, match="top_k must be"):
        jaxaccel.generation.prepare(m, 1, 5, 4, temperature=1.0, top_k=0)
    assert _engine(m).compiled_programs == 0 and not _engine(m)._compiled


def test_quantized_checkpoint_with_layer_rules_loads(hf_folder, tmp_path):
    m = jaxaccel.load(hf_folder("llama3")[0])
    cfg = QuantConfig(mode="int8", group_size=32, rules=(("layers_0/mlp/down_proj", "float"), ("layers_2/self_attn", "int4")))
    q = m.quantize(cfg)
    served = jaxaccel.load(serving.save(q, tmp_path / "q"))
    ids = np.random.default_rng(1).integers(0, 97, size=(2, 7))
    np.testing.assert_array_equal(np.asarray(served.logits(ids)), np.asarray(q.logits(ids)))
    assert "kernel" in served.params["layers_0"]["mlp"]["down_proj"]  # float there, int8 elsewhere
    assert "kernel_q" in served.params["layers_1"]["mlp"]["down_proj"]


def test_float_serving_folder_honours_dtype(hf_folder, tmp_path):
    m, folder = serving_folder(hf_folder, tmp_path)
    bf = jaxaccel.load(folder, dtype="bfloat16")
    ref = jaxaccel.load(hf_folder("gemma3")[0], dtype="bfloat16")
    assert bf.dtype == "bfloat16" and {x.dtype for x in jax.tree.leaves(bf.params)} == {np.dtype(jax.numpy.bfloat16)}
    ids = np.random.default_rng(2).integers(0, 97, size=(1, 6))
    np.testing.assert_array_equal(np.asarray(bf.logits(ids)), np.asarray(ref.logits(ids)))


def test_saved_trace_key_includes_jax_flags(hf_folder, program_folder):
    m = jaxaccel.load(hf_folder("llama_tied")[0])
    sample = lambda: generate_tokens(fresh(m), [[3, 4]], 6, temperature=1.0, seed=7)
    before = jax.config.jax_threefry_partitionable
    try:
        jax.config.update("jax_threefry_partitionable", not before)
        program_cache.set_folder(None)
        want = sample()  # traced fresh under the flipped flag
        program_cache.set_folder(program_folder)
        jax.config.update("jax_threefry_partitionable", before)
        sample()  # saves a trace under the original flag
        jax.config.update("jax_threefry_partitionable", not before)
        assert sample() == want  # not the saved trace of the other flag value
        assert len(list(program_folder.glob("*.jaxexport"))) == 2
    finally:
        jax.config.update("jax_threefry_partitionable", before)


def test_interrupted_tokenizer_exchange_is_not_misread(tmp_path, monkeypatch):
    import transformers

    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    transformers.BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(str(folder))
    tok, ref = FastTokenizer(folder, process=True), FastTokenizer(folder)
    worker = tok._tok
    real_read = type(worker)._read
    calls = []

    def interrupted(self):
        calls.append(1)
        if len(calls) == 2:  # the reply to the first request: Ctrl-C before it is read
            raise KeyboardInterrupt
        return real_read(self)

    monkeypatch.setattr(type(worker), "_read", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tok.encode("the cat")
    assert tok.encode("a dog") == ref.encode("a dog")  # a fresh worker, not the stale reply


def test_tensor_of_a_dtype_we_do_not_serve_is_a_clear_error(tmp_path):
    header = json.dumps({"w": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    with pytest.raises(CheckpointError, match="tensor 'w' has dtype F8_E4M3, which jaxaccel does not serve"):
        serving.read_mapped(path)
