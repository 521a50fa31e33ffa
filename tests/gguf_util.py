"""Write tiny transformers models into GGUF files the way llama.cpp's ``convert_hf_to_gguf.py`` does.

Only for tests: metadata keys per architecture, HF -> GGUF tensor names (from the ``gguf`` package's
own name map, so independent of ``jaxaccel.checkpoints.gguf``), llama.cpp's Q/K row permutation for
arch ``llama``, ``+1`` on Gemma 3 norm weights, 1-D tensors kept in F32, and a minimal
sentencepiece-style tokenizer block.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import gguf
from gguf import GGMLQuantizationType, GGUFValueType

_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}


def _rope_thetas(cfg) -> tuple[float, float | None, dict | None]:
    """(global theta, local theta or None, rope scaling dict or None) from a transformers-5 config."""
    rp = getattr(cfg, "rope_parameters", None) or {}
    if "full_attention" in rp:  # gemma3: one entry per layer type
        full, local = rp["full_attention"], rp.get("sliding_attention", {})
        scaling = full if full.get("rope_type", "default") != "default" else None
        return float(full["rope_theta"]), float(local.get("rope_theta", 10000.0)), scaling
    theta = rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    scaling = rp if rp.get("rope_type", "default") != "default" else None
    return float(theta), None, scaling


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: rotate-half rows -> interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_kv(cfg, vocab_size: int) -> dict[str, tuple[Any, GGUFValueType]]:
    special = {}
    for key, tid in (("bos", cfg.bos_token_id), ("eos", cfg.eos_token_id), ("pad", cfg.pad_token_id)):
        if isinstance(tid, (list, tuple)):
            tid = tid[0]
        if tid is not None:
            special[key] = int(tid)
    unk = next(i for i in range(vocab_size) if i not in special.values())
    special["unk"] = unk
    names = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = iter(["\u2581", *letters, *("\u2581" + c for c in letters)])
    tokens, types = [], []
    by_id = {v: k for k, v in special.items()}
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(names[by_id[i]])
            types.append(2 if by_id[i] == "unk" else 3)  # UNKNOWN / CONTROL
        else:
            tokens.append(next(pieces, f"\u2581t{i}"))
            types.append(1)  # NORMAL
    kv: dict[str, tuple[Any, GGUFValueType]] = {
        "tokenizer.ggml.model": ("llama", GGUFValueType.STRING),
        "tokenizer.ggml.tokens": (tokens, GGUFValueType.ARRAY),
        "tokenizer.ggml.scores": ([-float(i) for i in range(vocab_size)], GGUFValueType.ARRAY),
        "tokenizer.ggml.token_type": (types, GGUFValueType.ARRAY),
        "tokenizer.ggml.unknown_token_id": (unk, GGUFValueType.UINT32),
    }
    for key, gkey in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        if key in special:
            kv[f"tokenizer.ggml.{gkey}"] = (special[key], GGUFValueType.UINT32)
    return kv


def _encode(name: str, w: np.ndarray, qtype: str) -> tuple[np.ndarray, GGMLQuantizationType | None]:
    """Tensor data + raw dtype as llama.cpp's converter would store it for a target file type."""
    if qtype == "I8":  # for error tests: a type the reader must refuse
        return w.astype(np.int8), None
    if w.ndim == 1 or qtype == "F32":
        return w.astype(np.float32), None
    if qtype == "F16":
        return w.astype(np.float16), None
    t = GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[t][0]
    if w.shape[-1] % block:  # llama.cpp falls back to F16 when rows do not split into blocks
        return w.astype(np.float16), None
    return gguf.quants.quantize(w.astype(np.float32), t), t


def write_tiny_gguf(
    hf_model,
    path,
    qtype: str = "F32",
    *,
    name: str | None = None,
    metadata_overrides: dict[str, tuple[Any, GGUFValueType] | None] | None = None,
    tensor_qtypes: dict[str, str] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    drop_tensors: tuple[str, ...] = (),
    tokenizer: bool = True,
) -> Path:
    """Write ``hf_model`` (Llama/Mistral/Qwen2/Gemma3 ``*ForCausalLM``) to ``path`` as a GGUF.

    ``qtype``: "F32", "F16", or any type ``gguf.quants.quantize`` implements ("Q8_0", "Q4_0", ...)
    for the 2-D weights. The keyword arguments are for building broken files in tests: metadata
    overrides (value ``None`` deletes a key), per-tensor types by GGUF name, extra raw tensors, and
    tensors to leave out.
    """
    path = Path(path)
    cfg = hf_model.config
    model_type = cfg.model_type
    if model_type not in _ARCH:
        raise ValueError(f"unsupported model_type {model_type!r}")
    arch = _ARCH[model_type]
    n_layers = cfg.num_hidden_layers
    n_head = cfg.num_attention_heads
    n_kv = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    theta, local_theta, scaling = _rope_thetas(cfg)
    if name is None:
        name = {"llama": "Tiny Llama", "mistral": "Tiny Mistral", "qwen2": "Tiny Qwen2", "gemma3_text": "Tiny Gemma 3"}[
            model_type
        ]

    U32, F32, STR = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING
    kv: dict[str, tuple[Any, GGUFValueType]] = {
        "general.name": (name, STR),
        "general.file_type": ({"F32": 0, "F16": 1, "Q8_0": 7, "Q4_0": 2}.get(qtype, 1), U32),
        f"{arch}.context_length": (cfg.max_position_embeddings, U32),
        f"{arch}.embedding_length": (cfg.hidden_size, U32),
        f"{arch}.block_count": (n_layers, U32),
        f"{arch}.feed_forward_length": (cfg.intermediate_size, U32),
        f"{arch}.attention.head_count": (n_head, U32),
        f"{arch}.attention.head_count_kv": (n_kv, U32),
        f"{arch}.attention.layer_norm_rms_epsilon": (cfg.rms_norm_eps, F32),
        f"{arch}.rope.freq_base": (theta, F32),
    }
    if arch == "llama":
        kv[f"{arch}.rope.dimension_count"] = (head_dim, U32)
        kv[f"{arch}.vocab_size"] = (cfg.vocab_size, U32)
    if arch == "gemma3":
        kv[f"{arch}.attention.key_length"] = (head_dim, U32)
        kv[f"{arch}.attention.value_length"] = (head_dim, U32)
        kv[f"{arch}.attention.sliding_window"] = (cfg.sliding_window, U32)
    if scaling is not None:
        if scaling.get("rope_type") != "linear":
            raise ValueError(f"rope scaling {scaling} not supported by this test writer")
        kv[f"{arch}.rope.scaling.type"] = ("linear", STR)
        kv[f"{arch}.rope.scaling.factor"] = (float(scaling["factor"]), F32)
    if tokenizer:
        kv.update(_tokenizer_kv(cfg, cfg.vocab_size))
    new_arch = arch
    for key, value in (metadata_overrides or {}).items():
        if key == "general.architecture":
            new_arch = value[0]
        elif value is None:
            kv.pop(key, None)
        else:
            kv[key] = value

    tmap = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), n_layers)
    tensors: dict[str, np.ndarray] = {}
    for hf_name, t in hf_model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        stem, suffix = hf_name.rsplit(".", 1)
        gname = tmap.get_name(stem)
        if gname is None:
            raise ValueError(f"no GGUF name for {hf_name}")
        gname = f"{gname}.{suffix}"
        w = t.detach().to("cpu").float().numpy().copy()
        if arch == "llama":  # convert_hf_to_gguf.py LlamaModel.modify_tensors
            if stem.endswith("q_proj"):
                w = llama_cpp_permute(w, n_head, n_head)
            elif stem.endswith("k_proj"):
                w = llama_cpp_permute(w, n_head, n_kv)
        if arch == "gemma3" and hf_name.endswith("norm.weight"):  # Gemma3Model.modify_tensors
            w = w + 1
        tensors[gname] = w
    for gname in drop_tensors:
        del tensors[gname]
    tensors.update(extra_tensors or {})

    writer = gguf.GGUFWriter(str(path), new_arch)
    for key, (value, vtype) in kv.items():
        if vtype == GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, vtype)
    for gname, w in tensors.items():
        data, raw = _encode(gname, w, (tensor_qtypes or {}).get(gname, qtype))
        writer.add_tensor(gname, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
