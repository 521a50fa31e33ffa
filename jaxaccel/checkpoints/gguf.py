"""Read llama.cpp ``.gguf`` checkpoints and translate them into Hugging Face terms.

The rest of the loader already knows how to map a transformers ``config.json`` and a transformers
``state_dict`` onto our parameters, so this module produces exactly those two things from a GGUF:

* :func:`read_gguf_config` -- an HF-style config dict built from the GGUF metadata;
* :func:`iter_gguf_tensors` -- ``(hf_name, float32 ndarray)`` pairs, one tensor at a time, in the
  layout of ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` /
  ``Gemma3ForCausalLM``'s ``state_dict``;
* :func:`load_gguf_tokenizer` -- an HF tokenizer built from the GGUF tokenizer metadata.

Undoing llama.cpp's converter:

* numpy shapes are GGUF's ``ne`` reversed, which is already HF's ``[out, in]``;
* for arch ``llama`` (Llama and Mistral) the converter permutes the rows of Q and K (weights and
  biases) into the interleaved-pairs RoPE layout; we apply the inverse permutation so the rows are
  back in HF's rotate-half order. Qwen2 and Gemma 3 files are not permuted (llama.cpp uses NeoX-style
  RoPE for them);
* for Gemma 3 the converter stores ``w + 1`` for every ``*norm.weight`` (HF's RMSNorm multiplies
  by ``1 + w``, llama.cpp's by ``w``); we subtract 1 again.

The header is parsed by our own code (``gguf_header.py``, with the ``gguf`` package's constants) instead
of with ``gguf.GGUFReader``: the reader materialises one numpy view per vocabulary string, which for
the Gemma 3 270M file (262k tokens) costs ~10 s and ~700 MB of Python objects on every open. Tensor
bytes are memory-mapped and dequantized one tensor at a time with ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

import gguf
from gguf import GGMLQuantizationType

from .gguf_header import GGUFError, _header, _Header, _parse_header, _TensorInfo  # noqa: F401  (re-exported)
from .hf import load_tensors, with_tokenizer_in_background
from ..models import registry

__all__ = [
    "SUPPORTED_QUANT_TYPES",
    "SUPPORTED_ARCHS",
    "GGUFError",
    "read_gguf_config",
    "iter_gguf_tensors",
    "load_gguf_tokenizer",
]

SUPPORTED_QUANT_TYPES: tuple[str, ...] = (
    "F32",
    "F16",
    "BF16",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q8_0",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)

SUPPORTED_ARCHS: tuple[str, ...] = ("llama", "qwen2", "gemma3")

# Defaults llama.cpp applies at load time when a key is absent.
_DEFAULT_ROPE_THETA = 10000.0
# What llama.cpp hard-codes for Gemma 3 (src/llama-model.cpp) and transformers' GGUF loader assumes.
_GEMMA3_SLIDING_WINDOW_PATTERN = 6
_GEMMA3_ROPE_LOCAL_BASE_FREQ = 10000.0
_GEMMA3_27B_BLOCK_COUNT = 62


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def _require(meta: dict, key: str, path: Path) -> Any:
    if key not in meta:
        raise GGUFError(f"{path}: required GGUF metadata key {key!r} is missing")
    return meta[key]


def _scalar(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        if value.size == 1:
            return value.item()
        raise GGUFError(f"expected a scalar, got an array of {value.size} values")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _uniform(value: Any, key: str, path: Path) -> int:
    """Some GGUFs store per-layer arrays (e.g. head_count_kv); we need one value for all layers."""
    if isinstance(value, np.ndarray):
        uniq = np.unique(value)
        if uniq.size != 1:
            raise GGUFError(f"{path}: per-layer {key} values {value.tolist()} are not supported")
        return int(uniq[0])
    return int(value)


def _arch(header: _Header) -> str:
    arch = header.metadata.get("general.architecture")
    if arch is None:
        raise GGUFError(f"{header.path}: GGUF metadata has no general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise GGUFError(
            f"{header.path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    return arch


def _config_from_header(header: _Header) -> dict:
    path, meta, tensors = header.path, header.metadata, header.tensors
    arch = _arch(header)

    def key(name: str, default: Any = ...) -> Any:
        full = f"{arch}.{name}"
        if default is ...:
            return _scalar(_require(meta, full, path))
        return _scalar(meta.get(full, default))

    if "rope_freqs.weight" in tensors:
        raise GGUFError(
            f"{path}: tensor 'rope_freqs.weight' (Llama-3 style rope-frequency scaling) is not "
            f"supported yet: the llama3 rope_scaling parameters cannot be recovered faithfully from it"
        )

    name = str(meta.get("general.name", "") or "")
    if arch == "llama":
        model_type = "mistral" if "mistral" in name.lower() else "llama"
    elif arch == "qwen2":
        model_type = "qwen2"
    else:
        model_type = "gemma3_text"

    hidden = int(key("embedding_length"))
    n_heads = _uniform(key("attention.head_count"), "attention.head_count", path)
    n_kv = _uniform(meta.get(f"{arch}.attention.head_count_kv", n_heads), "attention.head_count_kv", path)
    n_layers = int(key("block_count"))
    intermediate = _uniform(key("feed_forward_length"), "feed_forward_length", path)
    if n_heads <= 0 or n_kv <= 0 or n_heads % n_kv:
        raise GGUFError(f"{path}: invalid head counts: {n_heads} query heads, {n_kv} key/value heads")

    head_dim = key("attention.key_length", None)
    if head_dim is None:
        q = tensors.get("blk.0.attn_q.weight")
        if q is not None and q.shape[0] % n_heads == 0:
            head_dim = q.shape[0] // n_heads
        else:
            head_dim = hidden // n_heads
    head_dim = int(head_dim)
    value_length = key("attention.value_length", None)
    if value_length is not None and int(value_length) != head_dim:
        raise GGUFError(
            f"{path}: attention.value_length {value_length} != key_length {head_dim} is not supported"
        )
    rope_dims = key("rope.dimension_count", None)
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise GGUFError(
            f"{path}: partial rotary embeddings (rope.dimension_count {rope_dims} != head_dim {head_dim}) "
            f"are not supported"
        )

    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: missing tensor 'token_embd.weight'")
    vocab = key("vocab_size", None)
    if vocab is None and "tokenizer.ggml.tokens" in meta:
        vocab = len(meta["tokenizer.ggml.tokens"])
    if vocab is None:
        vocab = tensors["token_embd.weight"].shape[0]

    cfg: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [
            {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(
                model_type, "Gemma3ForCausalLM"
            )
        ],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", _DEFAULT_ROPE_THETA)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": _scalar(meta.get("tokenizer.ggml.bos_token_id")),
        "eos_token_id": _scalar(meta.get("tokenizer.ggml.eos_token_id")),
        "pad_token_id": _scalar(meta.get("tokenizer.ggml.padding_token_id")),
        "attention_bias": "blk.0.attn_q.bias" in tensors,
    }
    if arch == "llama":
        cfg["hidden_act"] = "silu"
        cfg["mlp_bias"] = "blk.0.ffn_gate.bias" in tensors
        if model_type == "mistral":
            # llama.cpp runs arch "llama" with full attention; no sliding window is stored.
            cfg["sliding_window"] = None
    elif arch == "qwen2":
        cfg["hidden_act"] = "silu"
        cfg["use_sliding_window"] = False
    else:  # gemma3
        window = key("attention.sliding_window", None)
        cfg["sliding_window"] = int(window) if window is not None else None
        cfg["sliding_window_pattern"] = _GEMMA3_SLIDING_WINDOW_PATTERN
        cfg["layer_types"] = [
            "sliding_attention" if (i + 1) % _GEMMA3_SLIDING_WINDOW_PATTERN else "full_attention"
            for i in range(n_layers)
        ]
        cfg["rope_local_base_freq"] = float(key("rope.freq_base_swa", _GEMMA3_ROPE_LOCAL_BASE_FREQ))
        cfg["hidden_activation"] = "gelu_pytorch_tanh"
        scale = key("attention.scale", None)
        if scale:
            cfg["query_pre_attn_scalar"] = float(scale) ** -2
        elif n_layers == _GEMMA3_27B_BLOCK_COUNT:
            # llama.cpp: Gemma 3 27B scales queries by 1/sqrt(hidden/heads), the others by 1/sqrt(head_dim)
            cfg["query_pre_attn_scalar"] = hidden // n_heads
        else:
            cfg["query_pre_attn_scalar"] = head_dim
        cfg["final_logit_softcapping"] = None
        cfg["attn_logit_softcapping"] = None

    scaling_type = key("rope.scaling.type", None)
    factor = key("rope.scaling.factor", None)
    if scaling_type is None and key("rope.scale_linear", None) not in (None, 1.0):
        scaling_type, factor = "linear", key("rope.scale_linear")
    if scaling_type not in (None, "none"):
        if scaling_type != "linear":
            raise GGUFError(f"{path}: rope scaling type {scaling_type!r} is not supported (only 'linear')")
        if factor is None:
            raise GGUFError(f"{path}: rope.scaling.type is 'linear' but rope.scaling.factor is missing")
        if float(factor) != 1.0:
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    return cfg


def read_gguf_config(path: str | os.PathLike) -> dict:
    """An HF ``config.json``-style dict built from the GGUF metadata (see module docstring)."""
    return _config_from_header(_header(path))


# --------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------

_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")

# GGUF per-layer tensor stem -> HF module path under model.layers.{i}, per architecture.
_COMMON_LAYER_MAP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_MAPS = {
    "llama": {**_COMMON_LAYER_MAP, "ffn_norm": "post_attention_layernorm"},
    "qwen2": {**_COMMON_LAYER_MAP, "ffn_norm": "post_attention_layernorm"},
    "gemma3": {
        **_COMMON_LAYER_MAP,
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
_GLOBAL_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _gguf_arch_of(config: dict) -> str:
    mt = config.get("model_type")
    table = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
    if mt not in table:
        raise GGUFError(f"config model_type {mt!r} is not one of {sorted(table)}")
    return table[mt]


def _expected(config: dict, arch: str) -> dict[str, tuple[tuple[int, ...], bool]]:
    """GGUF tensor name -> (HF shape, required?) for this config."""
    d = int(config["hidden_size"])
    ff = int(config["intermediate_size"])
    v = int(config["vocab_size"])
    h = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or h)
    hd = int(config.get("head_dim") or d // h)
    attn_bias = bool(config.get("attention_bias")) or arch == "qwen2"
    mlp_bias = bool(config.get("mlp_bias")) and arch == "llama"
    out: dict[str, tuple[tuple[int, ...], bool]] = {
        "token_embd.weight": ((v, d), True),
        "output_norm.weight": ((d,), True),
        "output.weight": ((v, d), not config.get("tie_word_embeddings", False)),
    }
    for i in range(int(config["num_hidden_layers"])):
        b = f"blk.{i}."
        layer = {
            "attn_q.weight": (h * hd, d),
            "attn_k.weight": (kv * hd, d),
            "attn_v.weight": (kv * hd, d),
            "attn_output.weight": (d, h * hd),
            "attn_norm.weight": (d,),
            "ffn_norm.weight": (d,),
            "ffn_gate.weight": (ff, d),
            "ffn_up.weight": (ff, d),
            "ffn_down.weight": (d, ff),
        }
        if arch == "gemma3":
            layer.update(
                {
                    "attn_q_norm.weight": (hd,),
                    "attn_k_norm.weight": (hd,),
                    "post_attention_norm.weight": (d,),
                    "post_ffw_norm.weight": (d,),
                }
            )
        for k, shape in layer.items():
            out[b + k] = (shape, True)
        if attn_bias:
            out[b + "attn_q.bias"] = ((h * hd,), True)
            out[b + "attn_k.bias"] = ((kv * hd,), True)
            out[b + "attn_v.bias"] = ((kv * hd,), True)
            if arch == "llama":
                out[b + "attn_output.bias"] = ((d,), True)
        if mlp_bias:
            out[b + "ffn_gate.bias"] = ((ff,), True)
            out[b + "ffn_up.bias"] = ((ff,), True)
            out[b + "ffn_down.bias"] = ((d,), True)
    return out


def _hf_name(gguf_name: str, arch: str) -> str | None:
    if gguf_name in _GLOBAL_MAP:
        return _GLOBAL_MAP[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if not m:
        return None
    idx, rest = m.groups()
    stem, _, suffix = rest.rpartition(".")
    if suffix not in ("weight", "bias") or stem not in _LAYER_MAPS[arch]:
        return None
    return f"model.layers.{idx}.{_LAYER_MAPS[arch][stem]}.{suffix}"


def _unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``LlamaModel.permute`` (rows: interleaved pairs -> rotate-half halves).

    llama.cpp views the rows of each head as ``[2, head_dim/2]`` and transposes to ``[head_dim/2, 2]``;
    we view them as ``[head_dim/2, 2]`` and transpose back.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise GGUFError(f"cannot un-permute {rows} rows over {n_head} heads")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _plan(header: _Header, config: dict) -> list[tuple[_TensorInfo, str]]:
    """Validate every tensor's name, type and shape before any dequantization."""
    path = header.path
    arch = _gguf_arch_of(config)
    file_arch = _arch(header)
    if file_arch != arch:
        raise GGUFError(f"{path}: file architecture {file_arch!r} does not match config model_type {config['model_type']!r}")
    if "rope_freqs.weight" in header.tensors:
        raise GGUFError(
            f"{path}: tensor 'rope_freqs.weight' (Llama-3 style rope-frequency scaling) is not supported yet"
        )
    expected = _expected(config, arch)
    plan = []
    for info in header.tensors.values():
        hf = _hf_name(info.name, arch)
        if hf is None or info.name not in expected:
            raise GGUFError(
                f"{path}: unexpected tensor {info.name!r} for architecture {arch!r} with this config"
            )
        if info.type_name not in SUPPORTED_QUANT_TYPES:
            raise GGUFError(
                f"{path}: tensor {info.name!r} has unsupported quantization type {info.type_name} "
                f"(supported: {', '.join(SUPPORTED_QUANT_TYPES)})"
            )
        want = expected[info.name][0]
        if info.shape != want:
            raise GGUFError(
                f"{path}: tensor {info.name!r} ({hf}) has shape {list(info.shape)} but the config "
                f"implies {list(want)}"
            )
        plan.append((info, hf))
    missing = [n for n, (_, req) in expected.items() if req and n not in header.tensors]
    if missing:
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise GGUFError(f"{path}: missing tensors {missing[:8]}{more}")
    return plan


def _dequantize(mm: np.memmap, info: _TensorInfo, path: Path) -> np.ndarray:
    qtype = GGMLQuantizationType(info.ggml_type)
    raw = np.frombuffer(mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)
    try:
        raw = raw.reshape(gguf.quants.quant_shape_to_byte_shape(info.shape, qtype))
        if qtype == GGMLQuantizationType.F32:
            out = raw.view(np.float32)
        elif qtype == GGMLQuantizationType.F16:
            out = raw.view(np.float16)
        else:
            out = gguf.quants.dequantize(raw, qtype)
    except Exception as e:  # the gguf package's own errors (QuantError, NotImplementedError, ...)
        raise GGUFError(f"{path}: failed to dequantize tensor {info.name!r} ({qtype.name}): {e}") from e
    out = np.array(out, dtype=np.float32, copy=True)  # own the memory, detach from the mmap
    if out.shape != info.shape:
        raise GGUFError(
            f"{path}: tensor {info.name!r} dequantized to shape {list(out.shape)}, expected {list(info.shape)}"
        )
    return out


def gguf_tensor_specs(path: str | os.PathLike, config: dict | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """(hf_name, HF shape) of every tensor, validated against the config; reads the header only."""
    header = _header(path)
    return [(hf, info.shape) for info, hf in _plan(header, config or _config_from_header(header))]


def load_file(path: str | os.PathLike, dtype="float32", placer=None, mesh=None):
    """A .gguf file -> (ModelConfig, params, tokenizer | None), streaming tensor by tensor."""
    config = read_gguf_config(path)
    try:
        cfg = registry.config_from_hf(config)
    except ValueError as e:
        raise GGUFError(f"{path}: {e}") from None
    specs = gguf_tensor_specs(path, config)
    return cfg, *with_tokenizer_in_background(
        lambda: load_tensors(cfg, specs, iter_gguf_tensors(path, config), dtype, source=str(path), placer=placer,
                             mesh=mesh),
        lambda: load_gguf_tokenizer(path))


def iter_gguf_tensors(path: str | os.PathLike, config: dict | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, float32 array in HF layout)`` for every tensor, one at a time.

    All names, quantization types and shapes are validated (against ``config``, or the config read
    from the file) before the first tensor is dequantized, so bad input fails fast with ``GGUFError``.
    """
    header = _header(path)
    if config is None:
        config = _config_from_header(header)
    plan = _plan(header, config)
    arch = _gguf_arch_of(config)
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)

    mm = np.memmap(header.path, dtype=np.uint8, mode="r")
    try:
        for info, hf in plan:
            w = _dequantize(mm, info, header.path)
            if arch == "llama":
                if info.name.endswith((".attn_q.weight", ".attn_q.bias")):
                    w = _unpermute_rope_rows(w, n_head)
                elif info.name.endswith((".attn_k.weight", ".attn_k.bias")):
                    w = _unpermute_rope_rows(w, n_kv)
            elif arch == "gemma3" and info.name.endswith("norm.weight"):
                w = w - np.float32(1.0)
            yield hf, np.ascontiguousarray(w, dtype=np.float32)
    finally:
        del mm


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def _tokenizer_inputs(meta: dict, path: Path) -> tuple[str, dict, dict]:
    """(architecture, tokenizer dict, tokenizer config) in the vocabulary of transformers'
    GGUF tokenizer builders, read with our own parser (transformers' reader needs torch)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

    def plain(v):
        return v.tolist() if isinstance(v, np.ndarray) else v

    groups = {
        group: {name: plain(meta[f"tokenizer.{key}"]) for key, name in renames.items() if f"tokenizer.{key}" in meta}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer, config = groups["tokenizer"], groups["tokenizer_config"]
    if tokenizer.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)  # llama.cpp adds BOS to sentencepiece vocabularies
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    return str(meta["general.architecture"]), tokenizer, config


def load_gguf_tokenizer(path: str | os.PathLike):
    """An HF tokenizer built from the GGUF tokenizer metadata; ``None`` if there is none.

    The vocabulary is read by our parser and handed to transformers' GGUF tokenizer builders,
    so no PyTorch is needed (transformers' own GGUF reader imports torch)."""
    p = Path(path)
    meta = _header(p).metadata
    if "tokenizer.ggml.model" not in meta or "tokenizer.ggml.tokens" not in meta:
        return None
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import convert_gguf_tokenizer
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name

    full = _parse_header(p.resolve(), decode=("tokenizer.ggml.tokens", "tokenizer.ggml.merges")).metadata
    try:
        arch, tokenizer, config = _tokenizer_inputs(full, p)
        backend, extra = convert_gguf_tokenizer(arch, tokenizer)
        # the class AutoTokenizer would pick for this model type (it sets e.g. Gemma's left padding)
        name = TOKENIZER_MAPPING_NAMES.get(read_gguf_config(p)["model_type"])
        cls = (tokenizer_class_from_name(name) if name else None) or PreTrainedTokenizerFast
        return cls(tokenizer_object=backend, **config, **extra)
    except Exception as e:
        raise GGUFError(f"{p}: could not build a tokenizer from the GGUF metadata: {e}") from e
