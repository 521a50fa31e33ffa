"""CPU kernels that XLA lacks, called through XLA's FFI: the decode matvec, encoder attention, and
bfloat16 embedding rows and in-place KV cache writes for the generation loop.

`matvec.cc` multiplies a few activation rows by a float32, bfloat16 or int8 (+ scales) weight,
reading the weight as stored (XLA's CPU dot widens a bfloat16 or int8 weight to a float32 copy
first, so fewer bytes buy nothing there) and spreading the rows of the weight over XLA's
intra-op threads. With int8 weights on AVX-512 VNNI and AVX2 CPUs it rounds x to int16 per block of 32-128
inputs, within 2^-16 of the block's largest |x| (far below int8's own weight error), and
multiplies in integers; it also takes the prefill's rows of int8 weights (`int8_prefill`), and
several int8 weights on one input in one call (`dot_many`: a layer's q / k / v, gate / up).

`int4.cc` multiplies decode rows, and on VNNI / AVX2 builds the prefill's rows, by int4 weights as
quant_math packs them (two codes a byte, a scale and a zero per group) without unpacking them in
memory: the nibbles are widened in registers and meet x rounded to int16 per block of 64 inputs
(`dot_int4`). XLA instead unpacks and dequantizes every int4 weight in every call.

`attention.cc` is bidirectional softmax attention within segments (the encoders): it scores only
the (query, key) pairs of one text, reading q, k, v in the projections' [B, T, heads, H] layout,
so padding and several texts packed in one row cost nothing (see `attention`).
`decode_attention.cc` is the generation programs' attention (`decode_attention`): the queries
of a decode step (one per row) or a prefill against the KV cache as stored, each up to its own
slot (XLA transposes every layer's cache and scores all slots), a decode step's slots split over
threads when a batch has fewer (row, KV head) pairs than threads.

`argmax.cc` gives a greedy step's tokens (`argmax`): jnp.argmax of the logits in two vector passes.

`take.cc` copies the rows of a bfloat16 embedding table for the decode loop (`take_rows`): XLA
gathers bfloat16 rows from a float32 copy of the whole table, hoisted out of the loop, so every
generate call would write the whole table once. It also writes the KV cache in place
(`write_rows`): XLA's CPU backend copies each layer's cache several times per decode step.

`w8a8.cc` (wrapper `w8a8.py`) is the int8 x int8 GEMM of w8a8 encoders: the activation rows are
quantized per token in the call exactly as AQT's serving dot quantizes them, and summed in int32
with AMX tiles, VNNI or AVX2 integer dot products, in one call (XLA runs AQT's dot as three passes).

The kernels are compiled on first use with the system C++ compiler (`$CXX`, else `c++`) against
jaxlib's FFI headers, for an ISA tier of this machine's CPU (`ISA_TIERS`: `native`, the default,
`-march=native`; `avx2`, x86-64-v3 without AVX-512; `generic`, x86-64-v2), chosen with
`JAXACCEL_CPU_ISA` (so the AVX2 code is built, tested and benchmarked on an AVX-512 machine too;
a tier the CPU cannot run is refused). The library is cached under the jaxaccel cache folder,
keyed by the sources, jaxlib's version, the compiler, the flags and the CPU, with its sha256
beside it: a library that does not match it (a truncated or damaged file) is rebuilt, never
loaded. A cache folder that cannot be written gives a build in a temporary folder for the
process. Without a compiler, or with `JAXACCEL_CPU_KERNELS=0`, XLA's dots and attention are used
(a warning says why once).

Which programs use them is an argument, never a global switch: a module is built with a
`KernelChoice` (`registry.build(..., kernels=...)`), which every layer carries. The generation
engine builds its module with `KernelChoice(decode=True)` on the CPU backend for unsharded models
(dots of at most `MAX_ROWS` rows, int8 and int4 dots of up to 512 rows on VNNI builds and 64 on
AVX2, bfloat16 table rows, the KV cache writes, attention against the
cache, the greedy token: the generation programs pass the choice to `sampling.sample`); the encoders' programs with
`KernelChoice(segment_attention=True, int8_gemm=True)`. Training and scoring build theirs without: the kernels
have no gradient. The matvec's sums are deterministic (same input, same bits) but ordered
differently from XLA's, so decode logits agree with `Model.logits` to float rounding (int8
weights: to the int16 rounding of x), not bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

# the build and its state live in build.py; these names are part of this package's surface (tests, bench)
from .build import (ENV, FLAGS_ENV, ISA_ENV, ISA_TIERS, SOURCES, TARGETS, _verified, cpu_flags,
                    isa_tier, load)
from . import build

_REEXPORTED = (ENV, FLAGS_ENV, ISA_ENV, ISA_TIERS, SOURCES, TARGETS, _verified, cpu_flags, isa_tier)

MAX_ROWS = 8  # larger row counts (prefill, big batches) are compute-bound: XLA's GEMM is better (but int8)
INT8_PREFILL_MAX_ROWS = 512  # int8 weights (VNNI): the kernel takes up to this many rows (`int8_prefill`)
INT4_PREFILL_MAX_ROWS = 512  # int4 weights (VNNI): int4.cc's blocked GEMM takes up to this many rows
AVX2_PREFILL_MAX_ROWS = 64  # both on AVX2 builds, whose int16 products XLA's float32 GEMM outruns beyond
WEIGHT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.int8)

INT8_PATHS = {0: "float", 1: "avx2", 2: "vnni"}


def int8_path() -> str:
    """How this build multiplies int8 weights: "vnni" (AVX-512 VNNI) or "avx2" (activations rounded
    to int16 per block of inputs, integer dot products; `matvec`), or "float" (widened to float32,
    and prefill-sized row counts refused)."""
    return INT8_PATHS[int(build._loaded["lib"].JaxaccelInt8Path())] if load() else "float"


def int4_path() -> str:
    """How this build multiplies int4 weights (`int4.cc`): "vnni" (AVX-512 VNNI), "avx2", or
    "portable" (one code at a time); "none" without the kernels (XLA dequantizes them)."""
    return {0: "portable", 1: "avx2", 2: "vnni"}[int(build._loaded["lib"].JaxaccelInt4Path())] if load() else "none"


def int4_decode_x_levels() -> int:
    """The largest code x's blocks of 64 inputs round to in int4.cc's decode rows (at most MAX_ROWS
    rows): 127 (int8: vpmaddubsw takes the codes as they are) on the avx2 build, 32767 (int16) on
    the others. The prefill's rows round to int16 on every build."""
    return 127 if int4_path() == "avx2" else 32767


def _prefill_max_rows(path: str, vnni_max: int) -> int:
    """How many prefill rows the int8 / int4 kernel takes on a build whose int8_path / int4_path is
    `path` (0: none, XLA's GEMM takes them all)."""
    return {"vnni": vnni_max, "avx2": AVX2_PREFILL_MAX_ROWS}.get(path, 0)


def int8_int16() -> bool:
    """Whether int8 weights take an int16-activation path here (and so the prefill's rows)."""
    return int8_path() != "float"


def usable(model) -> bool:
    """Whether `model`'s programs should trace with the kernels: CPU backend, one device (the
    kernels have no sharding rule), and they build here."""
    return jax.default_backend() == "cpu" and getattr(model, "mesh", None) is None and load()


@dataclass(frozen=True)
class KernelChoice:
    """Which CPU kernels a model's programs call, fixed where its module is built
    (`registry.build(..., kernels=...)`) and carried by every layer.

    decode: the generation loop's kernels: dots of at most MAX_ROWS rows (and int8 prefill rows,
      see `int8_prefill`), bfloat16 embedding rows, in-place KV cache writes, attention against the
      cache, the greedy token (`argmax`).
    segment_attention: the encoders' bidirectional attention within segments.
    int8_gemm: w8a8 dots (int8 weights x activations quantized per token) through `w8a8.cc`
      (the encoders' programs); otherwise AQT's dot as XLA compiles it (same numerics).
    fuse_projections: with decode, the projections of one input (q / k / v, gate / up) with int8
      weights or GGUF blocks multiply in one kernel call (`dot_many`, `ggml.dot_many`; same
      outputs, one hand-off to the threads); False keeps one call each (to compare the two).
    The default (all off) is XLA's ops everywhere: training, scoring, sharded models."""

    decode: bool = False
    segment_attention: bool = False
    int8_gemm: bool = False
    fuse_projections: bool = True


XLA = KernelChoice()


def wants(x2: jax.Array, w: jax.Array, scale: jax.Array | None = None) -> bool:
    """Would `x2 [M, K] . w` go to the kernel in a decode program? (at most MAX_ROWS rows, or more
    rows for int8 weights on the VNNI path, see `int8_prefill`)"""
    if not (x2.ndim == 2 and w.ndim == 2 and any(w.dtype == d for d in WEIGHT_DTYPES)):
        return False
    return 1 <= x2.shape[0] <= MAX_ROWS or int8_prefill(x2, w, scale)


def int8_prefill(x2: jax.Array, w: jax.Array, scale: jax.Array | None) -> bool:
    """Whether more than MAX_ROWS rows (the generation's prefill) times int8 weights [N, K] with
    scales [N, G] go to the kernel: on AVX-512 VNNI or AVX2 builds (`int8_int16`), with groups of a multiple of 32 inputs,
    it rounds x to int16 per block as the decode steps do and multiplies in integers, reading
    each weight row once for all rows. XLA instead dequantizes every weight to a float32 temporary
    on one thread, which also page-faults fresh memory on every call. Past INT8_PREFILL_MAX_ROWS
    rows the two take the same time (measured: `python -m bench.decode`), so XLA keeps those.
    On AVX2 builds (no VNNI) the kernel's int16 products are slower per row than XLA's float32
    GEMM, which wins once its dequantization is spread over more than AVX2_PREFILL_MAX_ROWS
    rows (`python -m bench.profile_decode --weights int8` with JAXACCEL_CPU_ISA=avx2;
    docs/performance.md)."""
    limit = _prefill_max_rows(int8_path(), INT8_PREFILL_MAX_ROWS)
    if scale is None or w.dtype != jnp.int8 or scale.ndim != 2 or not MAX_ROWS < x2.shape[0] <= limit:
        return False
    K, G = x2.shape[1], scale.shape[1]
    return G > 0 and K % G == 0 and (K // G) % 32 == 0 and w.shape[1] == K and int8_int16()


def dot(x2: jax.Array, w: jax.Array, w_in_axis: int, out_dtype, scale: jax.Array | None = None) -> jax.Array | None:
    """In a decode program (`KernelChoice.decode`), `x2 [M, K] . w` (int8 w: times `scale`, see
    `matvec`) through the kernel when it applies (`wants`), else None: the caller uses XLA's dot
    (prefill: for bfloat16 weights, XLA's bfloat16 GEMM with float32 sums, see layers._wide_sums)."""
    if wants(x2, w, scale):
        return matvec(x2, w, w_in_axis, scale).astype(out_dtype)
    return None


def dot_many(x2: jax.Array, weights, out_dtype) -> list[jax.Array] | None:
    """In a decode program, `x2 [M, K]` times several int8 weights [N_i, K] with scales [N_i, G_i]
    (`weights`: (w, scale) pairs; a layer's q / k / v or gate / up projections) in one kernel call
    (`matvec_many`) when the kernel takes each of them (`wants`), else None: the caller multiplies
    them one at a time. The outputs equal one `dot` per weight bit for bit."""
    if len(weights) < 2 or not all(w.dtype == jnp.int8 and s is not None and wants(x2, w, s) for w, s in weights):
        return None
    return [y.astype(out_dtype) for y in matvec_many(x2, weights)]


def matvec_many(x2: jax.Array, weights) -> list[jax.Array]:
    """float32 [M, N_i] = x2 [M, K] . w_i for int8 w_i [N_i, K] times scale_i [N_i, G_i] (as `matvec`
    with `w_in_axis` 1), one kernel call for all: the pool threads get the rows of every weight
    at once, where one call per weight hands work to them and waits for them once per weight."""
    outs = tuple(jax.ShapeDtypeStruct((x2.shape[0], w.shape[0]), jnp.float32) for w, _ in weights)
    args = [a for w, s in weights for a in (w, s.astype(jnp.float32))]
    return list(jax.ffi.ffi_call("jaxaccel_matvec_scaled_many", outs)(x2.astype(jnp.float32), *args))


def int4_wants(x2: jax.Array, packed: jax.Array, scale: jax.Array, zero: jax.Array | None) -> bool:
    """Would `x2 [M, K]` times the int4 weight (packed uint8 [N, K / 2], scale and zero [N, G]) go
    to `int4.cc` in a decode program? K a multiple of 64, groups of a multiple of 32, and at most
    MAX_ROWS rows, or more (the prefill) up to INT4_PREFILL_MAX_ROWS on the AVX-512 VNNI builds and
    AVX2_PREFILL_MAX_ROWS on AVX2: there a blocked GEMM unpacks each tile of weight rows once for
    all rows, with x rounded to int16 per block exactly as in the decode steps (so prefill and
    decode agree). XLA instead dequantizes every weight to float32 on each call, which pays off
    on AVX2 past its row limit as for int8 (`int8_prefill`); the portable build's kernel (one
    code at a time) leaves the prefill to it."""
    if zero is None or x2.ndim != 2 or packed.ndim != 2 or packed.dtype != jnp.uint8 or scale.ndim != 2:
        return False
    M, K = x2.shape
    G = scale.shape[1]
    rows = 1 <= M <= MAX_ROWS or MAX_ROWS < M <= _prefill_max_rows(int4_path(), INT4_PREFILL_MAX_ROWS)
    return (rows and packed.shape[1] * 2 == K and K % 64 == 0 and G > 0 and K % G == 0
            and (K // G) % 32 == 0 and zero.shape == scale.shape == (packed.shape[0], G))


def dot_int4(x2: jax.Array, packed: jax.Array, scale: jax.Array, zero: jax.Array | None, out_dtype) -> jax.Array | None:
    """In a decode program (its decode steps and its prefill), `x2 [M, K]` times the int4 weight
    [N, K] stored as quant_math packs it (two codes a byte, W = code * scale + zero per group)
    through `int4.cc` when it applies (`int4_wants`), else None: the caller dequantizes for XLA's dot."""
    if not int4_wants(x2, packed, scale, zero):
        return None
    out = jax.ShapeDtypeStruct((x2.shape[0], packed.shape[0]), jnp.float32)
    y = jax.ffi.ffi_call("jaxaccel_matvec_int4", out)(x2.astype(jnp.float32), packed, scale.astype(jnp.float32),
                                                      zero.astype(jnp.float32))
    return y.astype(out_dtype)


def matvec(x2: jax.Array, w: jax.Array, w_in_axis: int, scale: jax.Array | None = None) -> jax.Array:
    """float32 [M, N] = x2 [M, K] . w, contracting w's axis `w_in_axis` (w [K, N] for 0, [N, K]
    for 1); int8 w ([N, K] only) is multiplied by `scale` [N, G], one per K / G inputs."""
    n = w.shape[1 - w_in_axis]
    out = jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32)
    x2 = x2.astype(jnp.float32)
    if scale is not None:
        return jax.ffi.ffi_call("jaxaccel_matvec_scaled", out)(x2, w, scale.astype(jnp.float32))
    return jax.ffi.ffi_call("jaxaccel_matvec", out)(x2, w, w_in_axis=np.int64(w_in_axis))


def argmax(x: jax.Array) -> jax.Array | None:
    """In a decode program, int32 [...] = jnp.argmax of float32 logits [..., V] over the last axis
    (the first maximum; the first NaN where a row has one) through `argmax.cc`: two vector passes
    over each row, where XLA runs the reductions of sampling.argmax as several passes of small
    loops. None for other arrays (the caller's reductions)."""
    if x.dtype != jnp.float32 or x.ndim < 1 or x.shape[-1] < 1:
        return None
    flat = x.reshape(-1, x.shape[-1])
    out = jax.ffi.ffi_call("jaxaccel_argmax", jax.ShapeDtypeStruct(flat.shape[:1], jnp.int32))(flat)
    return out.reshape(x.shape[:-1])


def take_rows(table: jax.Array, ids: jax.Array) -> jax.Array | None:
    """In a decode program, the rows `ids` (any shape) of a bfloat16 table [V, D] -> [*ids.shape, D]
    through the kernel (`take.cc`: XLA copies the whole table to gather bfloat16 rows and hoists
    that copy out of the decode loop); else (another table) None: the caller uses jnp.take. Ids
    as jnp.take's: negative ones count from the end, ones still outside [0, V) give NaN rows."""
    if not (table.ndim == 2 and table.dtype == jnp.bfloat16):
        return None
    flat = ids.reshape(-1).astype(jnp.int32)
    out = jax.ffi.ffi_call("jaxaccel_take_rows", jax.ShapeDtypeStruct((flat.size, table.shape[1]), table.dtype))(table, flat)
    return out.reshape(*ids.shape, table.shape[1])


def write_rows(buf: jax.Array, rows: jax.Array, index: jax.Array) -> jax.Array | None:
    """In a decode program, buf [B, S, ...] with rows [B, T, ...] written at slots index[b] ..
    index[b] + T - 1 of row b, in place (the KV cache update); else (shapes it does not take)
    None: the caller uses lax.dynamic_update_slice. XLA's CPU backend fuses that update into each
    of its readers (the new cache and the attention), each on its own copy of the cache. Starts
    are clamped to [0, S - T] as dynamic_update_slice clamps them."""
    if buf.ndim < 2 or rows.shape[0] != buf.shape[0] or rows.shape[2:] != buf.shape[2:]:
        return None
    call = jax.ffi.ffi_call("jaxaccel_write_rows", jax.ShapeDtypeStruct(buf.shape, buf.dtype), input_output_aliases={0: 0})
    return call(buf, rows.astype(buf.dtype), index.astype(jnp.int32))


def wants_decode_attention(q: jax.Array, keys: jax.Array, dtype) -> bool:
    """Would this attention go to the cache-attention kernel in a generation program? (queries
    [B, T, N, H] against a float32 / bfloat16 cache in the model's dtype: decode steps, T = 1, and
    prefills)"""
    return (q.ndim == 4 and keys.ndim == 4 and keys.dtype == jnp.dtype(dtype)
            and any(keys.dtype == d for d in (jnp.float32, jnp.bfloat16)))


def decode_attention(q: jax.Array, keys: jax.Array, values: jax.Array, index: jax.Array, scale: float,
                     window: int | None, softcap: float | None) -> jax.Array:
    """float32 [B, T, N, H]: each row's queries q [B, T, N, H], query t at cache slot index[b] + t,
    against its cache slots [slot - window + 1, slot] (all up to its slot without a window) of
    keys / values [B, S, KH, H] (float32 or bfloat16, read as stored): softmax(softcap(scale *
    q . k)) v, as `layers.Attention._attend` computes it (bfloat16 caches: probabilities rounded
    to bfloat16 before the values, as there). Only the slots attended to are read; XLA read all S
    slots of a transposed copy of the cache."""
    call = jax.ffi.ffi_call("jaxaccel_decode_attention", jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q.astype(jnp.float32), keys, values, index.astype(jnp.int32),
                scale=np.float32(scale), window=np.int64(window or 0), softcap=np.float32(softcap or 0.0),
                round_probs=bool(keys.dtype == jnp.bfloat16))


def wants_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """Would this attention go to the kernel in an encoder program? (float heads; the kernel
    computes in float32 whatever their float type)"""
    return all(a.ndim == 4 and jnp.issubdtype(a.dtype, jnp.floating) for a in (q, k, v))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, scale: float) -> jax.Array:
    """float32 [B, T, N, H]: softmax(scale * q . k) v, bidirectional, each query over the keys of
    its own segment (equal nonzero ids; 0 = padding, whose queries get zeros where XLA's fully
    masked softmax gives the mean of all values: callers must not read padding positions).
    A NaN or +inf score makes its query's output NaN, as in XLA.

    q [B, T, N, H]; k, v [B, T, KH, H] with KH dividing N (query head n reads KV head
    n // (N // KH)); segments int [B, T]. Only (query, key) pairs inside a segment are computed.
    """
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3] \
            or k.shape[2] < 1 or q.shape[2] % k.shape[2]:
        raise ValueError(f"attention kernel: q must be [B, T, N, H] and k, v [B, T, KH, H] with KH dividing N; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    if segments.shape != q.shape[:2]:
        raise ValueError(f"attention kernel: segments must be [B, T] = {q.shape[:2]}, got {segments.shape}")
    f32 = lambda a: a.astype(jnp.float32)
    return jax.ffi.ffi_call("jaxaccel_segment_attention", jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        f32(q), f32(k), f32(v), segments.astype(jnp.int32), scale=np.float32(scale))
