"""Where tokens are: rotary position embedding (RoPE, with linear and Llama 3 scaling) and the
boolean attention masks (causal, sliding window, segments) that `layers.Attention` uses."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .config import RopeConfig

Array = jax.Array


# --- rotary position embedding ------------------------------------------------------------
def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies [H/2] (float32), with linear or Llama 3 scaling applied."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(rope.theta) ** exponent)).astype(np.float32)
    if rope.kind == "linear":
        inv_freq = inv_freq / np.float32(rope.factor)
    elif rope.kind == "llama3":
        low_wavelen = rope.original_max_position / rope.low_freq_factor
        high_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """Rotate-half RoPE. x [B, T, N, H], positions [B, T] -> [B, T, N, H]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def attention_mask(q_slot: Array, k_slot: Array, window: int | None,
                   q_seg: Array | None = None, k_seg: Array | None = None, causal: bool = True) -> Array:
    """Boolean [B, T, S]: causal over slots (bidirectional when not `causal`), optional
    sliding window and segment equality.

    q_slot [B, T], k_slot [B, S]; segments (0 = padding) [B, T] / [B, S].
    """
    q, k = q_slot[:, :, None], k_slot[:, None, :]
    mask = k <= q if causal else jnp.ones(jnp.broadcast_shapes(q.shape, k.shape), bool)
    if window is not None:
        mask &= k > q - window  # a window of W sees the current token and W - 1 before it
    if q_seg is not None:
        mask &= (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
    return mask
