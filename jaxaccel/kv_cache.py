"""The KV cache: an explicit pytree (`init_cache`) that attention writes each step's keys and values
into at per-row slots (`cache_update`), in place through the CPU kernel in decode programs, and as
int8 + one scale per (token, kv head) when the model serves an int8 cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from . import kernels
from .config import ModelConfig
from .kernels import XLA, KernelChoice
from .quant_math import dequantize, quantize

Array = jax.Array


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> dict:
    """Preallocated KV cache pytree.

    {"index": int32 [B] next slot to write per row,
     "layers": tuple over layers of {"k": [B, S, K, H], "v": [B, S, K, H]}} with S = length.
    Slot s of a row holds the token at position s of that row. With dtype int8 (QuantConfig
    kv_cache_int8) each layer also holds float32 "k_scale" / "v_scale" [B, S, K, 1].
    """
    shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
    int8 = jnp.dtype(dtype) == jnp.int8
    scales = lambda: {f"{n}_scale": jnp.ones(shape[:3] + (1,), jnp.float32) for n in ("k", "v") if int8}
    layer = lambda: {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), **scales()}
    return {"index": jnp.zeros((batch,), jnp.int32), "layers": tuple(layer() for _ in range(cfg.num_layers))}


def _write_rows(buf: Array, new: Array, index: Array, choice: KernelChoice = XLA) -> Array:
    """buf [B, S, K, H] <- new [B, T, K, H] at slots index[b] .. index[b] + T - 1 (in place
    through the CPU kernel in decode programs)."""
    written = kernels.write_rows(buf, new, index) if choice.decode else None
    if written is not None:
        return written
    write = lambda b, n, i: lax.dynamic_update_slice(b, n.astype(b.dtype), (i, 0, 0))
    return jax.vmap(write)(buf, new, index)


def cache_update(cache: dict, k: Array, v: Array, index: Array, choice: KernelChoice = XLA):
    """Write k, v [B, T, K, H] at each row's slots -> (layer cache, keys, values [B, S, K, H]).
    An int8 cache stores each (token, kv head) vector as int8 + one float32 scale."""
    if "k_scale" not in cache:
        new = {"k": _write_rows(cache["k"], k, index, choice), "v": _write_rows(cache["v"], v, index, choice)}
        return new, new["k"], new["v"]
    new, out = {}, []
    for name, x in (("k", k), ("v", v)):
        q, scale = quantize(x.reshape(-1, x.shape[-1]), 8)  # [B*T*K, H], [B*T*K, 1]
        new[name] = _write_rows(cache[name], q.reshape(x.shape), index, choice)
        new[name + "_scale"] = _write_rows(cache[name + "_scale"], scale.reshape(x.shape[:3] + (1,)), index, choice)
        S = new[name].shape
        flat = dequantize(new[name].reshape(-1, S[-1]), new[name + "_scale"].reshape(-1, 1))
        out.append(flat.reshape(S))
    return new, *out
