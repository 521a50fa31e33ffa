"""A GGUF file's metadata as a Hugging Face config dict (`read_gguf_config`): the architecture,
sizes, RoPE, norms and special tokens llama.cpp's converter stored, in the keys and spelling
`config.json` uses, so the families' `from_hf` map it like any HF folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .gguf_header import GGUFError, _header, _Header

SUPPORTED_ARCHS: tuple[str, ...] = ("llama", "qwen2", "gemma3")

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
