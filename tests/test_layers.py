"""Unit checks of layers.py pieces the parity tests do not reach on their own."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaccel.config import SLIDING, ModelConfig, RopeConfig
from jaxaccel.layers import Attention, attention_mask, rope_inv_freq


def _cfg(**kw):
    base = dict(family="llama", vocab_size=11, hidden_size=16, intermediate_size=24, num_layers=1,
                num_heads=4, num_kv_heads=1, head_dim=8, max_position_embeddings=64)
    return ModelConfig(**{**base, **kw})


def np_attention(params, x, cfg, window=None):
    """Straight numpy attention (no RoPE: positions all 0) for one layer."""
    p = params
    B, T, _ = x.shape
    q = (x @ p["q_proj"]["kernel"]).reshape(B, T, cfg.num_heads, cfg.head_dim)
    k = (x @ p["k_proj"]["kernel"]).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    v = (x @ p["v_proj"]["kernel"]).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    g = cfg.num_heads // cfg.num_kv_heads
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, k) * cfg.attn_scale
    if cfg.attn_logit_softcap:
        s = np.tanh(s / cfg.attn_logit_softcap) * cfg.attn_logit_softcap
    i = np.arange(T)
    allowed = i[None, :] <= i[:, None]
    if window:
        allowed &= i[None, :] > i[:, None] - window
    s = np.where(allowed, s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("bnts,bsnh->btnh", w, v).reshape(B, T, -1)
    return o @ p["o_proj"]["kernel"]


@pytest.mark.parametrize("kw", [
    dict(num_kv_heads=1),                                     # MQA
    dict(num_kv_heads=2),                                     # GQA
    dict(num_kv_heads=4, attn_logit_softcap=0.5),             # MHA with soft-capping
    dict(num_kv_heads=2, sliding_window=3, layer_types=(SLIDING,)),
])
def test_attention_matches_numpy(kw):
    cfg = _cfg(**kw)
    att = Attention(cfg, 0)
    x = np.random.default_rng(0).normal(size=(2, 7, 16)).astype(np.float32)
    pos = jnp.zeros((2, 7), jnp.int32)
    params = jax.tree.map(np.asarray, __import__("flax").core.meta.unbox(
        att.init(jax.random.PRNGKey(1), x, pos)["params"]))
    params = jax.tree.map(lambda a: a * 20, params)  # large scores, so softcap matters
    out, _ = att.apply({"params": params}, x, pos)
    ref = np_attention(params, x, cfg, cfg.window(0))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4)


def test_sliding_window_mask_counts_current_token():
    q = jnp.arange(6)[None]
    m = np.asarray(attention_mask(q, q, window=3))[0]
    assert m.sum(axis=1).tolist() == [1, 2, 3, 3, 3, 3]
    assert m[5].tolist() == [False, False, False, True, True, True]


@pytest.mark.parametrize("rope", [
    RopeConfig(theta=10000.0),
    RopeConfig(theta=10000.0, kind="linear", factor=4.0),
    RopeConfig(theta=500000.0, kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position=64),
])
def test_rope_frequencies_match_transformers(rope):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": rope.kind, "rope_theta": rope.theta}
    if rope.kind != "default":
        params["factor"] = rope.factor
    if rope.kind == "llama3":
        params.update(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    cfg = LlamaConfig(hidden_size=512, num_attention_heads=4, rope_parameters=params)
    if rope.kind == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        ref, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        ref, _ = ROPE_INIT_FUNCTIONS[rope.kind](cfg, "cpu")
    np.testing.assert_allclose(rope_inv_freq(rope, 128), ref.numpy(), rtol=1e-6)


def test_bfloat16_dots_take_float32_sums_on_cpu():
    """On CPU a bfloat16 x bfloat16 dot asks XLA for a float32 result and rounds it once (XLA's
    CPU GEMM then uses the bfloat16 dot-product instructions): the lowered program's dot yields
    float32, and the result is the float32 product of the same bfloat16 values, rounded."""
    from jax import lax

    from jaxaccel import layers

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 16, 64)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((64, 32)), jnp.bfloat16)
    f = jax.jit(lambda x, w: layers._flat_dot(lax.dot_general, x, w, 0))
    y = f(x, w)
    text = f.lower(x, w).as_text()
    assert y.dtype == jnp.bfloat16 and y.shape == (2, 16, 32)
    assert jax.default_backend() != "cpu" or "-> tensor<32x32xf32>" in text, text
    ref = (np.asarray(x, np.float32).reshape(32, 64) @ np.asarray(w, np.float32)).reshape(2, 16, 32)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=2.0 ** -8, atol=1e-6)  # one rounding


def _dot_precisions(model):
    import re

    f = jax.jit(lambda p, t: model.module.apply({"params": p}, t))
    text = f.lower(model.params, jnp.zeros((1, 4), jnp.int32)).as_text()
    dots = re.findall(r"stablehlo\.dot_general.*", text)
    assert dots, text
    return [("HIGHEST" in d) for d in dots]


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_float32_models_trace_float32_matmuls(family):
    """float32 models ask for full float32 matmuls (a GPU would otherwise take TF32, a TPU
    bfloat16 passes); bfloat16 models keep the default; a precision the user set is kept."""
    import jaxaccel

    kw = dict(family="bert", head="encoder", type_vocab_size=2) if family == "bert" else {}
    cfg = _cfg(**kw)
    assert all(_dot_precisions(jaxaccel.init_random(cfg, dtype="float32")))
    assert not any(_dot_precisions(jaxaccel.init_random(cfg, dtype="bfloat16")))
    with jax.default_matmul_precision("tensorfloat32"):
        assert not any(_dot_precisions(jaxaccel.init_random(cfg, dtype="float32")))
