"""The only home of the building blocks: embedding, Dense, RMSNorm, LayerNorm, RoPE, attention, MLP.

Dimension legend (used in einsum strings and shape comments):
  B batch            T query length       S key length (= cache slots when decoding)
  D hidden size      N query heads        K key/value heads    G = N // K heads per group
  H head dim         F MLP hidden size    V vocabulary

Every parameter is created with logical axis names (`embed`, `heads`, `kv_heads`, `mlp`,
`vocab`, `norm`); `sharding.py` maps them onto mesh axes. Every matmul goes through the
`dot_general` of a `Dense` (or `Embed.attend`), built by an injectable `dot_general_cls`
factory: quantization swaps that factory and nothing else. Which CPU kernels a program calls
(decode matvec, in-place cache writes, decode / segment attention) is the `kernels` field
(`kernels.KernelChoice`), set where the top module is built and passed to every layer. A factory whose object has a
`weight(module, name, init, shape, axes, transposed)` method (quant.py) also owns the weight's
storage: when serving, int8/int4 values + scales replace the float param.

The KV cache is an explicit pytree (kv_cache.py), threaded through `__call__`:
`cache=None` trains / scores full sequences; with a cache the same code prefills (T > 1)
or decodes (T == 1), writing new keys/values at per-row slots `cache["index"]`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import kernels, quant
from .config import ModelConfig
from .kernels import XLA, KernelChoice
from .kv_cache import cache_update
from .positions import apply_rope, attention_mask, rope_inv_freq

Array = jax.Array
DotGeneralCls = Callable[[], Callable] | None
NEG_INF = float(np.finfo(np.float32).min)

# Initialisers only matter for random init (tests, presets); loaded checkpoints replace them.
_kernel_init = nn.initializers.normal(stddev=0.02)


@flax.struct.dataclass
class ModelOutput:
    """What every family's module returns (a pytree, so jitted functions may return it whole).

    logits: float32 [B, T, V] (decoders, masked LM), [B, labels] (classifier), None (bare encoder);
    cache: the KV cache advanced by T (decoders called with a cache), else None;
    hidden: [B, T, D] final hidden states (encoders); pooled: [B, D] (BERT encoder / classifier heads).
    Under jit, fields a caller does not return are never computed."""

    logits: Any = None
    cache: Any = None
    hidden: Any = None
    pooled: Any = None


def logical(init, axes: tuple[str, ...]):
    return nn.with_logical_partitioning(init, axes)


def _wide_sums(out_dtype) -> bool:
    """Whether an XLA dot with a bfloat16 result should ask for float32 and round after: on CPU
    its GEMM then runs on the bfloat16 dot-product instructions (AVX512_BF16), about twice
    float32's speed, where a bfloat16 result runs below float32's (`python -m bench.encoder`
    measures it). The sums are float32 either way."""
    return out_dtype == jnp.bfloat16 and jax.default_backend() == "cpu"


def float32_matmuls(dtype):
    """Context for tracing a model that computes in `dtype`: float32 models get full float32
    matmuls. jax's default precision lets a GPU multiply float32 in TF32 (10-bit mantissas) and a
    TPU in bfloat16 passes, so float32 logits would leave the PyTorch reference (on a GPU, greedy
    tokens of a random Llama left transformers' float32 ones within 128 tokens). A precision the user
    set (`jax_default_matmul_precision`, e.g. "tensorfloat32" for speed) is kept. The CPU
    computes float32 dots in float32 either way."""
    if jnp.dtype(dtype) == jnp.float32 and jax.config.jax_default_matmul_precision is None:
        return jax.default_matmul_precision("float32")
    return contextlib.nullcontext()


def _flat_dot(dot_general, x: Array, w: Array, w_in_axis: int, choice: KernelChoice = XLA, **kw) -> Array:
    """x [..., in] . w (contracting w's axis `w_in_axis`) with x flattened to 2-D: XLA's backward
    dW then contracts one merged batch axis, faster on CPU than over [B, T] separately.
    bfloat16 results on CPU come from float32 ones (`_wide_sums`). Decode programs
    (`choice.decode`) send decode-sized dots to the CPU matvec kernel."""
    x2 = x.reshape(-1, x.shape[-1])
    y, out = None, kw.get("preferred_element_type") or jnp.result_type(x, w)
    if choice.decode and dot_general is lax.dot_general:
        y = kernels.dot(x2, w, w_in_axis, out)
    if y is None:
        dims = (((1,), (w_in_axis,)), ((), ()))
        if dot_general is lax.dot_general and _wide_sums(out):
            y = dot_general(x2, w, dims, **{**kw, "preferred_element_type": jnp.float32}).astype(out)
        else:
            y = dot_general(x2, w, dims, **kw)
    return y.reshape(*x.shape[:-1], y.shape[-1])


class Dense(nn.Module):
    """y = x @ kernel (+ bias). kernel: [in, out] with logical names `axes`."""

    features: int
    axes: tuple[str, str]
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dot_general_cls: DotGeneralCls = None
    kernels: KernelChoice = XLA

    def __call__(self, x: Array) -> Array:
        x = x.astype(self.dtype)
        w, bias = self.weights(x.shape[-1])
        y = self.multiply(x, w)
        return y if bias is None else y + bias.astype(self.dtype)

    @nn.compact
    def weights(self, in_features: int):
        """(weight, bias or None) for inputs of `in_features`: the float kernel [in, out], or the
        `quant.Weight` the factory stores (int values + scales when serving, quant.py)."""
        dot_general = self.dot_general_cls() if self.dot_general_cls else lax.dot_general
        init = logical(_kernel_init, self.axes)
        if hasattr(dot_general, "weight"):  # quant.py chooses the storage
            w = dot_general.weight(self, "kernel", init, (in_features, self.features), self.axes, True)
        else:
            w = self.param("kernel", init, (in_features, self.features), self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", logical(nn.initializers.zeros, self.axes[1:]), (self.features,), self.param_dtype)
        return w, bias

    def multiply(self, x: Array, w) -> Array:
        """x [..., in] (in this layer's dtype) times `w` from `weights`, without the bias."""
        if isinstance(w, quant.Weight):
            return w.dot(x)
        dot_general = self.dot_general_cls() if self.dot_general_cls else lax.dot_general
        return _flat_dot(dot_general, x, w.astype(self.dtype), 0, self.kernels)


def project(x: Array, denses) -> list[Array]:
    """The outputs of several `Dense` layers (one dtype, factory and kernel choice) on the same x:
    a layer's q / k / v or gate / up projections. In decode programs (`KernelChoice.decode` and
    `fuse_projections`) their int8 weights or GGUF blocks are multiplied in one kernel call (`quant.dot_many`):
    each call costs a hand-off to the thread pool and a wait for its slowest thread, and a
    decode step is a chain of such calls. The outputs are those of one call per layer, bit for
    bit. Outside decode programs each layer is called (`Dense.__call__`, which lora.py and
    quant_calibration.py intercept; they run no decode programs)."""
    first = denses[0]
    if not (len(denses) > 1 and first.kernels.decode and first.kernels.fuse_projections):
        return [d(x) for d in denses]
    x = x.astype(first.dtype)
    parts = [d.weights(x.shape[-1]) for d in denses]
    ys = quant.dot_many(x, [w for w, _ in parts])
    if ys is None:  # not all int8 nor all GGUF blocks: one call each, with the weights already in hand
        ys = [d.multiply(x, w) for d, (w, _) in zip(denses, parts)]
    return [y if b is None else y + b.astype(d.dtype) for d, y, (_, b) in zip(denses, ys, parts)]


class Embed(nn.Module):
    """Token embedding [V, D]; `attend` gives tied-embedding logits."""

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dot_general_cls: DotGeneralCls = None
    kernels: KernelChoice = XLA

    def setup(self):
        init = logical(nn.initializers.normal(stddev=1.0), ("vocab", "embed"))
        shape = (self.num_embeddings, self.features)
        dot_general = self.dot_general_cls() if self.dot_general_cls else lax.dot_general
        if hasattr(dot_general, "weight"):  # quant.py: a weight with `take` (rows) and `dot` (attend)
            self.quantized = dot_general.weight(self, "embedding", init, shape, ("vocab", "embed"), False)
        else:
            self.quantized = None
            self.embedding = self.param("embedding", init, shape, self.param_dtype)

    def __call__(self, ids: Array) -> Array:
        if self.quantized is not None:
            return self.quantized.take(ids).astype(self.dtype)
        rows = kernels.take_rows(self.embedding, ids) if self.kernels.decode else None  # bfloat16 tables
        if rows is None:
            rows = jnp.take(self.embedding, ids, axis=0)
        return rows.astype(self.dtype)

    def attend(self, x: Array) -> Array:
        """x [B, T, D] -> float32 logits [B, T, V]."""
        x = x.astype(self.dtype)
        if self.quantized is not None:
            return self.quantized.dot(x, preferred_element_type=jnp.float32)
        dot_general = self.dot_general_cls() if self.dot_general_cls else lax.dot_general
        return _flat_dot(dot_general, x, self.embedding.astype(self.dtype), 1, self.kernels,
                         preferred_element_type=jnp.float32)


class RMSNorm(nn.Module):
    """x / rms(x) * w, or * (1 + w) for Gemma (`plus_one`); statistics in float32."""

    eps: float = 1e-6
    plus_one: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        scale = self.param("scale", logical(init, ("norm",)), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = scale.astype(jnp.float32)
        if self.plus_one:
            return (y * (1.0 + w)).astype(self.dtype)
        # Llama casts the normalised value back before scaling; keep that order for parity.
        return y.astype(self.dtype) * scale.astype(self.dtype)


class LayerNorm(nn.Module):
    """(x - mean) / std * w + b (BERT's post-LN); statistics in float32."""

    eps: float = 1e-12
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        D = x.shape[-1]
        scale = self.param("scale", logical(nn.initializers.ones, ("norm",)), (D,), self.param_dtype)
        bias = self.param("bias", logical(nn.initializers.zeros, ("norm",)), (D,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class LayerModule(nn.Module):
    """The fields of every per-layer module (attention, family blocks): which layer of which
    config, compute/param dtypes, the matmul factory and the CPU kernels its programs call.
    `DecoderLM` builds blocks with them; `sub` passes them on to a block's own modules."""

    cfg: ModelConfig
    layer: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dot_general_cls: DotGeneralCls = None
    kernels: KernelChoice = XLA

    def shared(self) -> dict:
        """The fields every sub-module takes: dtypes, matmul factory, kernels."""
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, dot_general_cls=self.dot_general_cls,
                    kernels=self.kernels)


class Attention(LayerModule):
    """Multi-head / grouped-query / multi-query attention of layer `layer` of `cfg`."""

    def _dense(self, features, axes, bias, name):
        return Dense(features, axes, use_bias=bias, name=name, **self.shared())

    def _norm(self, name):
        return RMSNorm(self.cfg.rms_norm_eps, self.cfg.norm_plus_one, self.dtype, self.param_dtype, name=name)

    @nn.compact
    def __call__(self, x: Array, positions: Array, segment_ids: Array | None = None,
                 cache: dict | None = None, index: Array | None = None):
        """x [B, T, D], positions [B, T] -> ([B, T, D], updated layer cache or None)."""
        cfg = self.cfg
        B, T, _ = x.shape
        N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, k, v = project(x, (self._dense(N * H, ("embed", "heads"), cfg.attention_bias, "q_proj"),
                              self._dense(K * H, ("embed", "kv_heads"), cfg.attention_bias, "k_proj"),
                              self._dense(K * H, ("embed", "kv_heads"), cfg.attention_bias, "v_proj")))
        q, k, v = q.reshape(B, T, N, H), k.reshape(B, T, K, H), v.reshape(B, T, K, H)
        if cfg.qk_norm:
            q, k = self._norm("q_norm")(q), self._norm("k_norm")(k)
        if not cfg.absolute_positions:  # encoders add learned positions to the embeddings instead
            inv_freq = rope_inv_freq(cfg.rope_for(self.layer), H)
            q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)

        if (self.kernels.segment_attention and cache is None and segment_ids is not None and not cfg.causal
                and cfg.window(self.layer) is None and not cfg.attn_logit_softcap and kernels.wants_attention(q, k, v)):
            # encoder programs on CPU: only the pairs inside a segment; padding positions get
            # zeros (XLA: the mean of all values), read by no caller
            out, new_cache = kernels.attention(q, k, v, segment_ids, cfg.attn_scale).astype(self.dtype), None
        else:
            out, new_cache = self._attend(q, k, v, segment_ids, cache, index)
        out = self._dense(cfg.hidden_size, ("heads", "embed"), cfg.o_bias, "o_proj")(out.reshape(B, T, N * H))
        return out, new_cache

    def _attend(self, q: Array, k: Array, v: Array, segment_ids: Array | None, cache: dict | None,
                index: Array | None):
        """Softmax attention in XLA ops: q [B, T, N, H], k/v [B, T, K, H] -> ([B, T, N, H], cache)."""
        cfg = self.cfg
        B, T, N, H = q.shape
        K = k.shape[2]
        q_slot = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if cache is None:
            keys, values, k_slot = k, v, q_slot
            mask = attention_mask(q_slot, k_slot, cfg.window(self.layer), segment_ids, segment_ids, cfg.causal)
            new_cache = None
        else:
            if not cfg.causal:
                raise ValueError("a KV cache needs causal attention; encoders score full sequences (cache=None)")
            new_cache, keys, values = cache_update(cache, k, v, index, self.kernels)
            if self.kernels.decode and kernels.wants_decode_attention(q, keys, self.dtype):
                out = kernels.decode_attention(q, keys, values, index, cfg.attn_scale, cfg.window(self.layer),
                                               cfg.attn_logit_softcap)
                return out.astype(self.dtype), new_cache
            S = keys.shape[1]
            q_slot = q_slot + index[:, None]
            k_slot = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
            mask = attention_mask(q_slot, k_slot, cfg.window(self.layer))
            keys, values = keys.astype(self.dtype), values.astype(self.dtype)

        q = q.reshape(B, T, K, N // K, H)  # [B, T, K, G, H]: query head n = k * G + g
        scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, keys, preferred_element_type=jnp.float32)
        scores = scores * cfg.attn_scale
        if cfg.attn_logit_softcap:
            scores = jnp.tanh(scores / cfg.attn_logit_softcap) * cfg.attn_logit_softcap
        scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        dtype = jnp.result_type(probs, values)
        wide = {"preferred_element_type": jnp.float32} if _wide_sums(dtype) else {}
        out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, values, **wide).astype(dtype)
        return out.reshape(B, T, N, H), new_cache


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); act = SiLU (SwiGLU) or tanh-GELU (GeGLU)."""

    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dot_general_cls: DotGeneralCls = None
    kernels: KernelChoice = XLA

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        dense = lambda f, axes, name: Dense(f, axes, use_bias=cfg.mlp_bias, dtype=self.dtype,
                                            param_dtype=self.param_dtype, dot_general_cls=self.dot_general_cls,
                                            kernels=self.kernels, name=name)
        gate, up = project(x, (dense(cfg.intermediate_size, ("embed", "mlp"), "gate_proj"),
                               dense(cfg.intermediate_size, ("embed", "mlp"), "up_proj")))
        act = jax.nn.silu(gate) if cfg.activation == "silu" else jax.nn.gelu(gate, approximate=True)
        h = nn.with_logical_constraint(act * up, ("batch", "length", "mlp"))
        return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(h)


class DecoderLM(nn.Module):
    """Embedding -> blocks -> final norm -> logits; the block comes from the family file.

    `block_cls(cfg, layer, dtype=, param_dtype=, dot_general_cls=, kernels=, name=)` must be a
    module with `__call__(x, positions, segment_ids, cache, index) -> (x, cache)`.
    """

    cfg: ModelConfig
    block_cls: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dot_general_cls: DotGeneralCls = None
    kernels: KernelChoice = XLA

    def __call__(self, *args, **kw):
        """See `forward`; float32 models trace with float32 matmuls (`float32_matmuls`)."""
        with float32_matmuls(self.dtype):
            return self.forward(*args, **kw)

    @nn.compact
    def forward(self, tokens: Array, positions: Array | None = None, cache: dict | None = None,
                segment_ids: Array | None = None, logit_index: Array | None = None):
        """tokens [B, T] int -> ModelOutput(float32 logits [B, T, V], cache advanced by T or None).

        positions default to 0..T-1 (shifted by cache["index"] when decoding);
        segment_ids [B, T] (0 = padding, equal ids attend to each other) apply without cache;
        logit_index [B, P] picks the positions whose logits are computed (logits [B, P, V]),
        so a prefill need not materialise [B, T, V].
        """
        cfg = self.cfg
        B, T = tokens.shape
        index = None if cache is None else cache["index"]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            if index is not None:
                positions = positions + index[:, None]
        shared = dict(dtype=self.dtype, param_dtype=self.param_dtype, dot_general_cls=self.dot_general_cls,
                      kernels=self.kernels)
        embed = Embed(cfg.vocab_size, cfg.hidden_size, name="embed_tokens", **shared)
        x = embed(tokens)
        if cfg.scale_embeddings:
            x = x * jnp.asarray(math.sqrt(cfg.hidden_size), jnp.float32).astype(self.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        new_layers = []
        for i in range(cfg.num_layers):
            layer_cache = None if cache is None else cache["layers"][i]
            x, layer_cache = self.block_cls(cfg, i, name=f"layers_{i}", **shared)(
                x, positions, segment_ids, layer_cache, index)
            x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
            new_layers.append(layer_cache)
        if logit_index is not None:
            x = jnp.take_along_axis(x, logit_index[..., None], axis=1)  # [B, P, D]
        x = RMSNorm(cfg.rms_norm_eps, cfg.norm_plus_one, self.dtype, self.param_dtype, name="norm")(x)
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = Dense(cfg.vocab_size, ("embed", "vocab"), name="lm_head", **shared)(x)
        logits = logits.astype(jnp.float32)
        if cfg.final_logit_softcap:
            logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
        if cache is not None:
            cache = {"index": index + T, "layers": tuple(new_layers)}
        return ModelOutput(logits=logits, cache=cache)
