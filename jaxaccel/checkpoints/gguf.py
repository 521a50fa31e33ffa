"""Read llama.cpp ``.gguf`` checkpoints and translate them into Hugging Face terms.

The rest of the loader already knows how to map a transformers ``config.json`` and a transformers
``state_dict`` onto our parameters, so this module produces exactly those two things from a GGUF:

* :func:`read_gguf_config` -- an HF-style config dict built from the GGUF metadata (gguf_config.py);
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
from typing import Iterator

import numpy as np

import gguf
from gguf import GGMLQuantizationType

from .gguf_config import SUPPORTED_ARCHS, _arch, _config_from_header, read_gguf_config  # noqa: F401  (re-exported)
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



# Defaults llama.cpp applies at load time when a key is absent.


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
            w = undo_converter(info.name, _dequantize(mm, info, header.path), arch, n_head, n_kv)
            yield hf, np.ascontiguousarray(w, dtype=np.float32)
    finally:
        del mm


def undo_converter(name: str, w: np.ndarray, arch: str, n_head: int, n_kv: int) -> np.ndarray:
    """Undo what llama.cpp's converter did to the tensor `name` (see the module docstring). The
    row permutation moves whole rows, so it is right for a weight's stored blocks too
    (`gguf_stored.py`); norms are never quantized."""
    if arch == "llama":
        if name.endswith((".attn_q.weight", ".attn_q.bias")):
            return _unpermute_rope_rows(w, n_head)
        if name.endswith((".attn_k.weight", ".attn_k.bias")):
            return _unpermute_rope_rows(w, n_kv)
    elif arch == "gemma3" and name.endswith("norm.weight"):
        return w - np.float32(1.0)
    return w


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
