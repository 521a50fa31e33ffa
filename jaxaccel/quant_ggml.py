"""GGUF weights served as stored: the numerics of llama.cpp's block types in jnp, and how a dot
or an embedding lookup reads them.

A weight of one of `TYPES` is held as the GGUF file's bytes, uint8 [out, bytes per row]
(`kernels.ggml.byte_shape`), never re-quantized into our own int8 / int4 layout. Decode programs
multiply their rows through `kernels/ggml_blocks.cc` (`kernels.ggml.dot`: the decode steps, and
the prefill's rows on the SIMD builds); every other dot (`Model.logits`, programs without
kernels, prompts past `kernels.ggml.max_rows()`) dequantizes the blocks inside the program
(`dequantize`: exact, equal bit for bit to `gguf.quants.dequantize`) for XLA's dot, and an
embedding lookup dequantizes only the rows it takes. `quant.QuantConfig(mode="gguf")` names each
weight's type; `checkpoints/gguf_stored.py` loads a file this way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .kernels import XLA, KernelChoice
from .kernels import ggml

TYPES = tuple(ggml.BLOCKS)  # the ggml types a weight can be served as


def _half(b: jax.Array, i: int) -> jax.Array:
    """The little-endian float16 at bytes i, i+1 of the last axis -> float32 (exact)."""
    bits = b[..., i].astype(jnp.uint16) | (b[..., i + 1].astype(jnp.uint16) << 8)
    return lax.bitcast_convert_type(bits, jnp.float16).astype(jnp.float32)


def _nibbles(qs: jax.Array) -> jax.Array:
    """Bytes [..., n] -> their low nibbles then their high nibbles [..., 2n] (the 32-input types'
    order: byte l holds inputs l and l + n)."""
    return jnp.concatenate([qs & 0xF, qs >> 4], axis=-1)


def _blocks(ggml_type: str, b: jax.Array) -> jax.Array:
    """Blocks [..., bytes per block] -> float32 [..., inputs per block], as ggml dequantizes
    them (the same products in the same order, so the same bits)."""
    if ggml_type == "Q8_0":
        return lax.bitcast_convert_type(b[..., 2:], jnp.int8).astype(jnp.float32) * _half(b, 0)[..., None]
    if ggml_type == "Q4_0":
        return _half(b, 0)[..., None] * (_nibbles(b[..., 2:18]).astype(jnp.int32) - 8).astype(jnp.float32)
    if ggml_type == "Q5_0":
        qh = sum(b[..., 2 + i].astype(jnp.uint32) << (8 * i) for i in range(4))  # bit l: input l's 5th bit
        high = ((qh[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1).astype(jnp.int32) << 4
        codes = (_nibbles(b[..., 6:22]).astype(jnp.int32) | high) - 16
        return _half(b, 0)[..., None] * codes.astype(jnp.float32)
    if ggml_type == "Q4_K":
        s = b[..., 4:16].astype(jnp.int32)
        lo, mid, top = s[..., 0:4], s[..., 4:8], s[..., 8:12]
        sc = jnp.concatenate([lo & 63, (top & 0xF) | ((lo >> 6) << 4)], axis=-1).astype(jnp.float32)
        mn = jnp.concatenate([mid & 63, (top >> 4) | ((mid >> 6) << 4)], axis=-1).astype(jnp.float32)
        d, dm = _half(b, 0)[..., None] * sc, _half(b, 2)[..., None] * mn  # [..., 8] per 32 inputs
        qs = b[..., 16:144].reshape(*b.shape[:-1], 4, 1, 32)
        codes = jnp.concatenate([qs & 0xF, qs >> 4], axis=-2).reshape(*b.shape[:-1], 8, 32).astype(jnp.float32)
        return (d[..., None] * codes - dm[..., None]).reshape(*b.shape[:-1], 256)
    if ggml_type == "Q6_K":
        lead = b.shape[:-1]
        ql = b[..., 0:128].reshape(*lead, 2, 1, 64)  # two halves of 128 inputs
        low = jnp.concatenate([ql & 0xF, ql >> 4], axis=-2).reshape(*lead, 2, 4, 32)
        qh = b[..., 128:192].reshape(*lead, 2, 1, 32)
        high = (qh >> jnp.array([0, 2, 4, 6], jnp.uint8)[:, None]) & 3  # [..., 2, 4, 32]
        codes = ((low | (high << 4)).astype(jnp.int32) - 32).astype(jnp.float32).reshape(*lead, 16, 16)
        d = _half(b, 208)[..., None] * lax.bitcast_convert_type(b[..., 192:208], jnp.int8).astype(jnp.float32)
        return (d[..., None] * codes).reshape(*lead, 256)
    raise ValueError(f"ggml type {ggml_type!r} cannot be served as stored; one of {', '.join(TYPES)}")


def dequantize(ggml_type: str, q: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Stored rows uint8 [..., bytes per row] -> the weight [..., in] in `dtype`."""
    _, inputs, nbytes = ggml.BLOCKS[ggml_type]
    lead, row = q.shape[:-1], q.shape[-1]
    w = _blocks(ggml_type, q.reshape(*lead, row // nbytes, nbytes))
    return w.reshape(*lead, row // nbytes * inputs).astype(dtype)


def serve_dot(ggml_type: str, x: jax.Array, q: jax.Array, preferred_element_type=None,
              choice: KernelChoice = XLA) -> jax.Array:
    """x [..., in] . the stored weight [out, in] -> [..., out]: in decode programs
    (`KernelChoice.decode`) through the kernel where it takes the rows (`kernels.ggml.wants`),
    else the blocks dequantized in the program for XLA's dot."""
    if choice.decode:
        x2 = x.reshape(-1, x.shape[-1])
        y = ggml.dot(x2, q, ggml_type, preferred_element_type or x.dtype)
        if y is not None:
            return y.reshape(*x.shape[:-1], y.shape[-1])
    w = dequantize(ggml_type, q, x.dtype)
    return lax.dot_general(x, w.T, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=preferred_element_type)


def serve_rows(ggml_type: str, q: jax.Array, ids: jax.Array) -> jax.Array:
    """Rows `ids` [...] of the stored weight -> float32 [..., in] (only those rows dequantized)."""
    rows = jnp.take(q, ids.reshape(-1), axis=0)
    return dequantize(ggml_type, rows).reshape(*ids.shape, -1)
