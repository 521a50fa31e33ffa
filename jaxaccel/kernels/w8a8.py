"""The w8a8 int8 GEMM (`w8a8.cc`): many activation rows (an encoder's sentences x tokens) times an
int8 weight [out, in] with one scale per output channel, the rows quantized to int8 per token in
the call exactly as AQT's serving dot (`quant._aqt_dot`) quantizes them, the products summed in
int32 with the CPU's integer dot-product instructions (AMX tiles where the CPU has them). XLA
compiles AQT's dot into a quantizing pass, an int8 GEMM and a scaling pass; whether this call is
the faster one on a given CPU is what `python -m bench.encoder --scenarios gemm` measures.

Programs ask for it with `KernelChoice(int8_gemm=True)` (the encoders' programs on the CPU
backend); `quant._serve_dot` calls `dot` and falls back to AQT's dot where it returns None.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import build

MAX_K = 65536  # inputs per output: the int32 sums (codes + 128 on the VNNI path) cannot overflow below it
PATHS = {0: "portable", 1: "avx2", 2: "vnni", 3: "amx"}


def path() -> str:
    """How this build multiplies: "amx" (AMX-INT8 tiles), "vnni" (AVX-512 VNNI), "avx2" (int16
    pairs, vpmaddwd), "portable" (one int32 dot product per output), or "none" without the kernels."""
    return PATHS[int(build._loaded["lib"].JaxaccelW8a8Path())] if build.load() else "none"


def wants(x2: jax.Array, q: jax.Array, scale: jax.Array) -> bool:
    """Would float32 `x2 [M, K]` times the int8 weight q [N, K] with scale [N, 1] go to the kernel?
    (other activation dtypes keep AQT's dot: its scales are in the activations' dtype; so does
    a machine where the kernels do not build)"""
    return (x2.ndim == 2 and q.ndim == 2 and x2.dtype == jnp.float32 and q.dtype == jnp.int8
            and scale.shape == (q.shape[0], 1) and x2.shape[1] == q.shape[1] and 1 <= q.shape[1] <= MAX_K
            and x2.shape[0] >= 1 and build.load())


def dot(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array | None:
    """x [..., K] . the int8 weight q [N, K] (scale [N, 1]) -> float32 [..., N], x quantized per
    row as AQT's dot does it, through the kernel when it applies (`wants`), else None."""
    x2 = x.reshape(-1, x.shape[-1])
    if not wants(x2, q, scale):
        return None
    out = jax.ShapeDtypeStruct((x2.shape[0], q.shape[0]), jnp.float32)
    y = jax.ffi.ffi_call("jaxaccel_w8a8", out)(x2, q, scale.astype(jnp.float32))
    return y.reshape(*x.shape[:-1], q.shape[0])
