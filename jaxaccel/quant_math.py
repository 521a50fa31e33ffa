"""The numbers behind quantization: symmetric and asymmetric (scale + zero) int8 / int4 codes per
output row or per group of inputs, their mean-squared-error searched scales, and int4 packing
(two values a byte). Pure jnp functions on [out, in] weights; quant.py decides what is quantized
how, and layers.py uses `quantize` / `dequantize` for the int8 KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

TINY = np.float32(np.finfo(np.float32).tiny)


def _groups(w: jax.Array, bits: int, group: int | None, name: str) -> jax.Array:
    """w [out, in] -> float32 [out, in / g, g] (g = in when group is None)."""
    out, n = w.shape
    g = n if group is None else group
    if n % g:
        raise ValueError(f"int{bits} group size {g} does not divide the input dim {n} of {name} "
                         f"(shape [out={out}, in={n}]); pick a group size that divides {n}")
    return w.astype(jnp.float32).reshape(out, n // g, g)


# Scales (and zero points) are each computed as ONE reduction, never as an elementwise tail after
# one: XLA fuses such tails into their consumers and may then evaluate them differently, and QAT
# (scale computed in the graph) must compile like SERVE (scale loaded) to agree bit for bit.
# Floors at the smallest normal float make all-zero / constant groups exact (q = 0).
def quantize(w: jax.Array, bits: int, group: int | None = None, name: str = "weight"):
    """Symmetric: w [out, in] -> (q int8 [out, in] in [-qmax, qmax], float32 scale [out, G]),
    w ~= q * scale, scale = max |w| / qmax per group of `group` inputs (None: per row)."""
    qmax = 2 ** (bits - 1) - 1
    wg = _groups(w, bits, group, name)
    scale = lax.reduce(jnp.abs(wg) * np.float32(1 / qmax), TINY, lax.max, (2,))
    q = jnp.clip(jnp.round(wg / scale[..., None]), -qmax, qmax).astype(jnp.int8)
    return q.reshape(w.shape), scale


def quantize_asymmetric(w: jax.Array, bits: int, group: int | None = None, name: str = "weight"):
    """Min/max: w [out, in] -> (q uint8 [out, in] in [0, 2^bits - 1], scale, zero [out, G]),
    w ~= q * scale + zero with zero = the group's minimum; every level is used, none wasted."""
    qmax = 2 ** bits - 1
    wg = _groups(w, bits, group, name)
    zero = lax.reduce(wg, np.float32(np.inf), lax.min, (2,))
    scale = lax.reduce((wg - zero[..., None]) * np.float32(1 / qmax), TINY, lax.max, (2,))
    q = jnp.clip(jnp.round((wg - zero[..., None]) / scale[..., None]), 0, qmax).astype(jnp.uint8)
    return q.reshape(w.shape), scale, zero


def dequantize(q: jax.Array, scale: jax.Array, zero: jax.Array | None = None, dtype=jnp.float32) -> jax.Array:
    """q [out, in] (int4 already unpacked), scale (and zero) [out, G] -> [out, in] in `dtype`."""
    out, n = q.shape
    w = q.reshape(out, scale.shape[1], -1).astype(jnp.float32) * scale[..., None]
    if zero is not None:
        w = w + zero[..., None]
    return w.reshape(out, n).astype(dtype)


def pack_int4(q: jax.Array) -> jax.Array:
    """uint8 [out, in] in [0, 15] -> uint8 [out, in / 2]: even inputs in the low nibble."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(p: jax.Array) -> jax.Array:
    """uint8 [out, in / 2] -> uint8 [out, in] in [0, 15]."""
    return jnp.stack([p & 0xF, p >> 4], axis=-1).reshape(p.shape[0], -1)  # [out, in / 2, 2] -> [out, in]


# --- MSE-optimal search (what convert and QAT store for int8 / int4) ------------------------------
# Min/max spends the levels on the extremes. The stored quantizer instead tries a grid of ranges
# per row / group (`*_SHRINK` x the min/max range, each refined by alternating least squares: the
# codes for a scale (and zero), then the least-squares scale (and zero) for those codes, which
# never increases the error) and keeps the candidate with the smallest squared reconstruction
# error. Candidate 0 is min/max itself and a candidate must be strictly better to replace it, so
# the error is never above min/max's. All-zero / constant groups stay exact (min/max, error 0).
INT8_SHRINK = tuple(np.float32(1 - 0.03 * k) for k in range(8))  # 1.00 .. 0.79 of max |w|
# int4 candidates (f, a): the 16 levels span f x (max - min), starting a x (1 - f) x (max - min)
# above min. f > 1 from min fits groups already on a coarser 4-bit grid (a dequantized Q4_K block
# spanning 10..14 of its 16 levels is then stored exactly); f < 1 clips, centred or at one end.
INT4_SHRINK = tuple((np.float32(f), np.float32(a)) for f, a in
                    [(15 / j, 0) for j in range(10, 15)] + [(1 - 0.05 * k, 0.5) for k in range(9)]
                    + [(1 - 0.05 * k, a) for k in (1, 2, 3) for a in (0, 1)])
ALS_STEPS = 4


def _tree_sum(x: jax.Array) -> jax.Array:
    """Sum over the last axis as a fixed tree of elementwise adds (halves added, a zero appended to
    odd lengths): XLA may order a reduce differently in different graphs, and QAT (search in the
    training graph) must pick the same candidate as CONVERT, bit for bit."""
    while x.shape[-1] > 1:
        if x.shape[-1] % 2:
            x = jnp.concatenate([x, jnp.zeros((*x.shape[:-1], 1), x.dtype)], axis=-1)
        h = x.shape[-1] // 2
        x = x[..., :h] + x[..., h:]
    return x[..., 0]


def _keep_best(best, cand):
    """Elementwise over groups: cand (err, *params) replaces best where its error is strictly lower."""
    better = cand[0] < best[0]
    return tuple(jnp.where(better, c, b) for c, b in zip(cand, best))


def quantize_mse(w: jax.Array, bits: int, group: int | None = None, name: str = "weight",
                 shrink=INT8_SHRINK, steps: int = ALS_STEPS):
    """Like `quantize` (symmetric, same outputs), with the scale searched per row / group for the
    smallest squared error sum((w - q * scale)^2); never worse than `quantize`'s max |w| / qmax."""
    qmax = 2 ** (bits - 1) - 1
    wg = _groups(w, bits, group, name)
    base = lax.reduce(jnp.abs(wg) * np.float32(1 / qmax), TINY, lax.max, (2,))  # = quantize's scale
    codes = lambda s: jnp.clip(jnp.round(wg / s[..., None]), -qmax, qmax)
    err = lambda q, s: _tree_sum(jnp.square(wg - q * s[..., None]))

    def refit(s):  # least-squares scale for the codes of s
        q = codes(s)
        qq, qw = _tree_sum(q * q), _tree_sum(q * wg)
        s1 = qw / jnp.where(qq > 0, qq, np.float32(1))
        return jnp.where((qq > 0) & (s1 >= TINY) & jnp.isfinite(s1), s1, s)

    def candidate(k, best):
        s = jnp.maximum(base * jnp.asarray(shrink, jnp.float32)[k], TINY)
        for _ in range(steps):
            s = refit(s)
        return _keep_best(best, (err(codes(s), s), s))

    _, scale = lax.fori_loop(0, len(shrink), candidate, (err(codes(base), base), base))
    return codes(scale).astype(jnp.int8).reshape(w.shape), scale


def quantize_asymmetric_mse(w: jax.Array, bits: int, group: int | None = None, name: str = "weight",
                            shrink=INT4_SHRINK, steps: int = ALS_STEPS, importance: jax.Array | None = None):
    """Like `quantize_asymmetric` (same outputs, w ~= q * scale + zero), with scale and zero
    searched per group for the smallest sum((w - q * scale - zero)^2): each candidate range is
    centred in [min, max], then refined by least squares of (scale, zero) given the codes.
    Never worse than min/max (candidate 0). importance (float32 [in], >= 0; quant_calibration):
    each input's weight in that sum, sum(importance * (w - q * scale - zero)^2), searched and
    refitted the same way (weighted least squares); None weighs all alike."""
    qmax = 2 ** bits - 1
    wg = _groups(w, bits, group, name)
    if importance is None:  # the unweighted graph exactly (QAT traces it and must match CONVERT)
        wsum = _tree_sum
        n = np.float32(wg.shape[-1])
    else:
        a = jnp.broadcast_to(jnp.asarray(importance, jnp.float32).reshape(1, *wg.shape[1:]), wg.shape)
        wsum = lambda v: _tree_sum(a * v)
        n = wsum(jnp.ones_like(wg))  # [out, G]: a group whose inputs all weigh 0 keeps min/max
    lo = lax.reduce(wg, np.float32(np.inf), lax.min, (2,))
    wc = wg - lo[..., None]  # >= 0; min/max is scale = max / qmax, offset 0 on wc
    base = lax.reduce(wc * np.float32(1 / qmax), TINY, lax.max, (2,))  # = quantize_asymmetric's scale
    sw = wsum(wc)
    codes = lambda s, z: jnp.clip(jnp.round((wc - z[..., None]) / s[..., None]), 0, qmax)
    err = lambda q, s, z: wsum(jnp.square(wc - (q * s[..., None] + z[..., None])))

    def refit(s, z):  # (weighted) least-squares (scale, offset) for the codes of (s, z)
        q = codes(s, z)
        sq, sqq, sqw = wsum(q), wsum(q * q), wsum(q * wc)
        den = n * sqq - sq * sq
        s1 = (n * sqw - sq * sw) / jnp.where(den > 0, den, np.float32(1))
        z1 = (sw - s1 * sq) / jnp.where(n > 0, n, np.float32(1))
        ok = (den > 0) & (s1 >= TINY) & jnp.isfinite(s1) & jnp.isfinite(z1)
        return jnp.where(ok, s1, s), jnp.where(ok, z1, z)

    def candidate(k, best):
        f, a = jnp.asarray(shrink, jnp.float32)[k]
        s = jnp.maximum(base * f, TINY)
        z = base * (np.float32(qmax) * (1 - f) * a)  # the shrunk range, a of the way up [min, max]
        for _ in range(steps):
            s, z = refit(s, z)
        return _keep_best(best, (err(codes(s, z), s, z), s, z))

    zero0 = jnp.zeros_like(base)
    _, scale, z = lax.fori_loop(0, len(shrink), candidate, (err(codes(base, zero0), base, zero0), base, zero0))
    return codes(scale, z).astype(jnp.uint8).reshape(w.shape), scale, z + lo
