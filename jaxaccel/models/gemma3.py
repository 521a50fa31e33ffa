"""Gemma 3 (text): local/global layer pattern, sliding window, QK-norm, pre+post norms,
(1 + w) RMSNorm, sqrt(hidden)-scaled embeddings, `query_pre_attn_scalar`, two RoPE bases,
tied embeddings, GeGLU (tanh) MLP.

Block: x + post_norm(attn(pre_norm(x))); then x + post_ff_norm(mlp(pre_ff_norm(x))).
"""

from __future__ import annotations

import flax.linen as nn

from ..config import FULL, SLIDING, ModelConfig, RopeConfig
from ..layers import LayerModule, MLP, Attention, RMSNorm
from .llama import common_from_hf, common_to_hf, rope_from_hf, rope_to_hf

MODEL_TYPES = {"gemma3_text": "gemma3"}


class Gemma3Block(LayerModule):
    """Sandwich-norm block: x + post_norm(attn(pre_norm(x))), then the same around the MLP."""

    @nn.compact
    def __call__(self, x, positions, segment_ids=None, cache=None, index=None):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, plus_one=True, name=name, **kw)
        h = norm("input_layernorm")(x)
        h, cache = Attention(cfg, self.layer, name="self_attn", **self.shared())(h, positions, segment_ids, cache, index)
        x = x + norm("post_attention_layernorm")(h)
        h = MLP(cfg, name="mlp", **self.shared())(norm("pre_feedforward_layernorm")(x))
        x = x + norm("post_feedforward_layernorm")(h)
        return x, cache


def from_hf(hf: dict) -> ModelConfig:
    common = common_from_hf(hf)
    n = common["num_layers"]
    if hf.get("layer_types"):
        kinds = tuple(SLIDING if t == "sliding_attention" else FULL for t in hf["layer_types"])
    else:  # older configs: every `sliding_window_pattern`-th layer is global
        pattern = hf.get("sliding_window_pattern", 6)
        kinds = tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n))
    rp = hf.get("rope_parameters") or {}
    if "full_attention" in rp:  # transformers 5 spelling: one dict per layer kind
        rope, rope_local = rope_from_hf(hf, rp["full_attention"]), rope_from_hf(hf, rp["sliding_attention"])
    else:
        rope = rope_from_hf({**hf, "rope_theta": hf.get("rope_theta", 1_000_000.0), "rope_parameters": None})
        rope_local = RopeConfig(theta=float(hf.get("rope_local_base_freq", 10_000.0)))
    if hf.get("hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"unsupported Gemma 3 activation {hf['hidden_activation']!r}; supported: gelu_pytorch_tanh")
    if hf.get("use_bidirectional_attention"):
        raise ValueError("Gemma 3 with use_bidirectional_attention is not supported (decoder LMs only)")
    return ModelConfig(
        family="gemma3",
        **common,
        norm_plus_one=True,
        qk_norm=True,
        activation="gelu_tanh",
        attention_bias=hf.get("attention_bias", False),
        o_bias=hf.get("attention_bias", False),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        scale_embeddings=True,
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
        # transformers' Gemma 3 never applies attn_logit_softcapping (Gemma 2 did); neither do we.
        attn_logit_softcap=None,
        final_logit_softcap=hf.get("final_logit_softcapping"),
        sliding_window=hf.get("sliding_window", 4096),
        layer_types=kinds,
        rope=rope,
        rope_local=rope_local,
    )


def to_hf(cfg: ModelConfig) -> dict:
    out = common_to_hf(cfg, "gemma3_text", "Gemma3ForCausalLM")
    out.update(
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=cfg.query_pre_attn_scalar,
        final_logit_softcapping=cfg.final_logit_softcap,
        attention_bias=cfg.attention_bias,
        sliding_window=cfg.sliding_window,
        layer_types=["sliding_attention" if k == SLIDING else "full_attention" for k in cfg.kinds],
        rope_theta=cfg.rope.theta,
        rope_scaling=rope_to_hf(cfg.rope),
        rope_local_base_freq=(cfg.rope_local or cfg.rope).theta,
    )
    return out
