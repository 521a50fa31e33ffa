"""GGUF files served with their quantized weights as stored: `jaxaccel.load(path,
gguf_weights="as_stored")`.

Every matmul weight (Dense kernels, the token embedding / lm_head) that the file holds in one of
`quant_ggml.TYPES` (Q4_0, Q5_0, Q8_0, Q4_K, Q6_K) keeps the file's bytes: param "<name>_q",
uint8 [out, bytes per row], the same blocks llama.cpp reads, never dequantized and re-quantized.
Float tensors (F32 / F16 / BF16: norms, biases, weights a converter kept in float) are read as
`gguf.py` reads them, in `dtype`. The model's `QuantConfig(mode="gguf", gguf_types=...)` records
each weight's type (quant.py, quant_ggml.py). Names, shapes and the converter's changes (Llama's
Q / K row order, Gemma's norms) are `gguf.py`'s: the row permutation moves whole rows of blocks.
A quantized type we have no kernel for (Q2_K, Q3_K, Q5_K, Q4_1, Q5_1) is refused by name.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from .. import quant, quant_ggml
from ..config import resolve_dtype
from ..models import registry
from .gguf import (GGUFError, _dequantize, _gguf_arch_of, _header, _plan, load_gguf_tokenizer, read_gguf_config,
                   undo_converter)
from .hf import expected_shapes, ignored_names, name_table, to_ours, with_tokenizer_in_background
from .loaded import Loaded

GGUF_WEIGHTS = ("float", "as_stored")  # jaxaccel.load(..., gguf_weights=): dequantized, or blocks as stored
FLOAT_TYPES = ("F32", "F16", "BF16")


def check_choice(gguf_weights) -> None:
    if gguf_weights not in GGUF_WEIGHTS:
        raise ValueError(f"gguf_weights must be one of {', '.join(map(repr, GGUF_WEIGHTS))} ('float': dequantize "
                         f"a GGUF's weights; 'as_stored': serve its quantized blocks as they are), got {gguf_weights!r}")


def load_file(path: str | os.PathLike, dtype="float32") -> Loaded:
    """A .gguf file -> `Loaded` whose quantized weights are the file's blocks (module docstring)."""
    path = Path(path)
    config = read_gguf_config(path)
    try:
        cfg = registry.config_from_hf(config)
    except ValueError as e:
        raise GGUFError(f"{path}: {e}") from None
    header = _header(path)
    plan = _plan(header, config)  # names, types and shapes checked before any tensor is read
    by_name = {name_table(cfg)(p): p for p in expected_shapes(cfg)}
    skip = ignored_names(cfg)
    plan = [(info, by_name[hf]) for info, hf in plan if hf not in skip]
    types = []
    for info, p in plan:
        if info.type_name in FLOAT_TYPES:
            continue
        if info.type_name not in quant_ggml.TYPES or not quant.quantizable("/".join(p)):
            raise GGUFError(f"{path}: tensor {info.name!r} is stored as {info.type_name}, which cannot be served as "
                            f"stored (the kernels read {', '.join(quant_ggml.TYPES)} blocks); load the file with "
                            "gguf_weights='float' to dequantize it")
        types.append(("/".join(p), info.type_name))
    qcfg = quant.QuantConfig(mode="gguf", gguf_types=tuple(types))
    arch = _gguf_arch_of(config)
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    float_dtype = resolve_dtype(dtype)

    def params():
        flat = {}
        mm = np.memmap(header.path, dtype=np.uint8, mode="r")
        try:
            for info, p in plan:
                if info.type_name in FLOAT_TYPES:
                    w = undo_converter(info.name, _dequantize(mm, info, header.path), arch, n_head, n_kv)
                    flat[p] = jax.device_put(np.ascontiguousarray(to_ours(p, w), dtype=float_dtype))
                    continue
                out, n = info.shape  # HF [out, in]: one row of blocks per output
                shape = quant_ggml.ggml.byte_shape(info.type_name, out, n)
                if info.nbytes != shape[0] * shape[1]:
                    raise GGUFError(f"{path}: tensor {info.name!r} ({info.type_name} {list(info.shape)}) holds "
                                    f"{info.nbytes} bytes, not {shape[0] * shape[1]}")
                raw = np.frombuffer(mm, dtype=np.uint8, count=info.nbytes, offset=info.offset).reshape(shape)
                raw = undo_converter(info.name, raw, arch, n_head, n_kv)
                flat[(*p[:-1], f"{p[-1]}_q")] = jax.device_put(np.array(raw, copy=True))  # detached from the mmap
        finally:
            del mm
        return traverse_util.unflatten_dict(flat)

    params, tok = with_tokenizer_in_background(params, lambda: load_gguf_tokenizer(path))
    return Loaded(cfg, params, tok, np.dtype(float_dtype).name, quant=qcfg)
