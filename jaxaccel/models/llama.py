"""Llama family: Llama 2/3/3.1/3.2, Mistral (sliding window) and Qwen2 (q/k/v biases).

Block: x + attn(norm(x)); then x + mlp(norm(x)). Param names follow the HF checkpoint
(`self_attn.q_proj`, `mlp.gate_proj`, `input_layernorm`, ...), so loading is a table.
"""

from __future__ import annotations

import flax.linen as nn

from ..config import FULL, SLIDING, ModelConfig, RopeConfig
from ..layers import LayerModule, MLP, Attention, RMSNorm

MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


class LlamaBlock(LayerModule):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    @nn.compact
    def __call__(self, x, positions, segment_ids=None, cache=None, index=None):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(cfg.rms_norm_eps, name="input_layernorm", **kw)(x)
        h, cache = Attention(cfg, self.layer, name="self_attn", **self.shared())(h, positions, segment_ids, cache, index)
        x = x + h
        h = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        x = x + MLP(cfg, name="mlp", **self.shared())(h)
        return x, cache


# --- config mapping: the only place HF key names appear for this family ------------------
def rope_from_hf(hf: dict, params: dict | None = None) -> RopeConfig:
    """RoPE from either spelling: `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
    p = dict(params if params is not None else (hf.get("rope_parameters") or {}))
    if not p:
        p = dict(hf.get("rope_scaling") or {})
        p.setdefault("rope_theta", hf.get("rope_theta", 10_000.0))
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3")
    theta = float(p.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, kind=kind, factor=float(p["factor"]))
    return RopeConfig(
        theta=theta,
        kind=kind,
        factor=float(p["factor"]),
        low_freq_factor=float(p.get("low_freq_factor", 1.0)),
        high_freq_factor=float(p.get("high_freq_factor", 4.0)),
        original_max_position=int(p.get("original_max_position_embeddings",
                                        hf.get("max_position_embeddings", 8192))),
    )


def rope_to_hf(rope: RopeConfig) -> dict | None:
    if rope.kind == "default":
        return None
    out = {"rope_type": rope.kind, "factor": rope.factor}
    if rope.kind == "llama3":
        out.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
                   original_max_position_embeddings=rope.original_max_position)
    return out


def layer_types_from_hf(hf: dict, n: int, window: int | None) -> tuple[str, ...]:
    names = {"full_attention": FULL, "sliding_attention": SLIDING}
    if hf.get("layer_types"):
        types = tuple(names[t] for t in hf["layer_types"])
        return types if window else (FULL,) * n
    return (SLIDING,) * n if window else ()


def common_from_hf(hf: dict) -> dict:
    heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(hf["eos_token_id"]) if isinstance(hf.get("eos_token_id"), list) else hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )


def from_hf(hf: dict) -> ModelConfig:
    family = MODEL_TYPES[hf["model_type"]]
    # every field that changes transformers' computation is either followed or refused by name
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r} for {family}; supported: silu")
    if (hf.get("pretraining_tp") or 1) != 1:
        raise ValueError(f"unsupported pretraining_tp {hf['pretraining_tp']!r}; supported: 1")
    common = common_from_hf(hf)
    window = None
    if family == "mistral":
        window = hf.get("sliding_window")
    elif family == "qwen2" and hf.get("use_sliding_window"):
        window = hf.get("sliding_window")
    bias = hf.get("attention_bias", False)
    return ModelConfig(
        family=family,
        **common,
        attention_bias=True if family == "qwen2" else bias,
        o_bias=False if family == "qwen2" else bias,
        mlp_bias=hf.get("mlp_bias", False),
        activation="silu",
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        sliding_window=window,
        layer_types=layer_types_from_hf(hf, common["num_layers"], window),
        rope=rope_from_hf(hf),
    )


def common_to_hf(cfg: ModelConfig, model_type: str, arch: str) -> dict:
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    return {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": "float32",
    }


def to_hf(cfg: ModelConfig) -> dict:
    out = common_to_hf(cfg, cfg.family, ARCHITECTURES[cfg.family])
    out.update(hidden_act="silu", rope_theta=cfg.rope.theta, rope_scaling=rope_to_hf(cfg.rope))
    if cfg.family == "llama":
        out.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    elif cfg.family == "mistral":
        out.update(sliding_window=cfg.sliding_window)
    elif cfg.family == "qwen2":
        sliding = cfg.sliding_window is not None
        out.update(use_sliding_window=sliding, sliding_window=cfg.sliding_window,
                   layer_types=["sliding_attention" if k == SLIDING else "full_attention" for k in cfg.kinds],
                   max_window_layers=cfg.num_layers)
    return out
