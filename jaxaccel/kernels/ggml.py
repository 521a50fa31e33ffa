"""The CPU kernel for weights kept in llama.cpp's (ggml's) block layouts as a GGUF file stores
them (`ggml_blocks.cc`), and the table of those layouts.

A weight [out, in] of one of `BLOCKS`' types is held as the file's bytes, one row of `out` per
row: uint8 [out, in / inputs * bytes] (`byte_shape`). `dot` multiplies a decode program's rows by
it without a float copy: the codes are widened in registers and meet x rounded to int16 per block
of 32 inputs (within 2^-16 of the block's largest |x|, as int4.cc does). It takes the decode
steps' rows (at most `MAX_ROWS`) and the prefill's (up to `PREFILL_MAX_ROWS` on the AVX-512 VNNI
build, `kernels.AVX2_PREFILL_MAX_ROWS` on the AVX2 one; the same rounding, so prefill and decode
agree); other row counts get None: the caller dequantizes the blocks in the program
(`jaxaccel.quant_ggml`), writing a float32 copy of every weight on each call. `dot_many` takes a
layer's projections of one input in one call. The build, tiers and registration are build.py's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import MAX_ROWS, _prefill_max_rows, build, load

PREFILL_MAX_ROWS = 512  # as kernels.INT8_PREFILL_MAX_ROWS: past it XLA's GEMM on the dequantized weight

# ggml type name -> (ggml type id, inputs per block, bytes per block); ggml-common.h's block_* structs
BLOCKS = {
    "Q4_0": (2, 32, 18),    # float16 d, 16 bytes of 4-bit codes: W = d * (q - 8)
    "Q5_0": (6, 32, 22),    # float16 d, 4 bytes of 5th bits, 16 bytes of low nibbles: W = d * (q - 16)
    "Q8_0": (8, 32, 34),    # float16 d, 32 int8 codes: W = d * q
    "Q4_K": (12, 256, 144),  # float16 d, dmin, 12 bytes of 6-bit scales / mins per 32, 4-bit codes
    "Q6_K": (14, 256, 210),  # 4-bit low codes, 2-bit high codes, int8 scales per 16, float16 d
}


def byte_shape(ggml_type: str, out: int, n: int) -> tuple[int, int]:
    """The stored shape of a [out, n] weight of `ggml_type`: (out, bytes per row)."""
    _, inputs, nbytes = BLOCKS[ggml_type]
    if n % inputs:
        raise ValueError(f"a {ggml_type} weight needs its input dim to be a multiple of {inputs}, got {n}")
    return out, n // inputs * nbytes


def path() -> str:
    """How this build multiplies ggml blocks: "vnni" (AVX-512 VNNI), "avx2", or "portable" (one
    code at a time); "none" without the kernels (the blocks are dequantized in XLA)."""
    return {0: "portable", 1: "avx2", 2: "vnni"}[int(build._loaded["lib"].JaxaccelGgmlPath())] if load() else "none"


def max_rows() -> int:
    """The most rows of x the kernel takes: PREFILL_MAX_ROWS on the VNNI build,
    kernels.AVX2_PREFILL_MAX_ROWS on the AVX2 one (past it, as for int8 and int4 there, XLA's
    float32 GEMM on the dequantized blocks outruns int16 products), MAX_ROWS (decode) otherwise."""
    return max(MAX_ROWS, _prefill_max_rows(path(), PREFILL_MAX_ROWS))


def wants(x2: jax.Array, q: jax.Array, ggml_type: str) -> bool:
    """Would `x2 [M, K]` times the stored weight q (uint8 [N, bytes]) go to the kernel in a decode
    program? At most `max_rows()` rows, K a multiple of the type's block, q of the type's byte shape."""
    if ggml_type not in BLOCKS or x2.ndim != 2 or q.ndim != 2 or q.dtype != jnp.uint8:
        return False
    M, K = x2.shape
    _, inputs, nbytes = BLOCKS[ggml_type]
    rows = 1 <= M <= max_rows()
    return rows and K % inputs == 0 and q.shape[1] == K // inputs * nbytes


def matvec(x2: jax.Array, q: jax.Array, ggml_type: str) -> jax.Array:
    """float32 [M, N] = x2 [M, K] . W^T for W [N, K] stored as `ggml_type` blocks in q."""
    out = jax.ShapeDtypeStruct((x2.shape[0], q.shape[0]), jnp.float32)
    return jax.ffi.ffi_call("jaxaccel_ggml_dot", out)(x2.astype(jnp.float32), q,
                                                      ggml_type=np.int64(BLOCKS[ggml_type][0]))


def dot(x2: jax.Array, q: jax.Array, ggml_type: str, out_dtype) -> jax.Array | None:
    """In a decode program (`KernelChoice.decode`), `x2 [M, K]` times the stored weight through
    the kernel when it applies (`wants`), else None: the caller dequantizes for XLA's dot."""
    if not wants(x2, q, ggml_type):
        return None
    return matvec(x2, q, ggml_type).astype(out_dtype)


def matvec_many(x2: jax.Array, weights) -> list[jax.Array]:
    """float32 [M, N_i] = x2 [M, K] . W_i^T for each (q_i, ggml_type_i) in `weights`, in one kernel
    call: x is rounded once and the pool threads get the rows of every weight at once."""
    outs = tuple(jax.ShapeDtypeStruct((x2.shape[0], q.shape[0]), jnp.float32) for q, _ in weights)
    types = np.asarray([BLOCKS[t][0] for _, t in weights], np.int64)
    return list(jax.ffi.ffi_call("jaxaccel_ggml_dot_many", outs)(x2.astype(jnp.float32), *[q for q, _ in weights],
                                                                ggml_types=types))


def dot_many(x2: jax.Array, weights, out_dtype) -> list[jax.Array] | None:
    """In a decode program, `x2 [M, K]` times several stored weights ((q, ggml_type) pairs; a
    layer's q / k / v or gate / up projections) in one call (`matvec_many`) when the kernel takes
    each (`wants`), else None: the caller multiplies them one at a time. Each output equals
    `dot`'s for its weight bit for bit."""
    if len(weights) < 2 or not all(wants(x2, q, t) for q, t in weights):
        return None
    return [y.astype(out_dtype) for y in matvec_many(x2, weights)]
