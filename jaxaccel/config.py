"""Frozen configuration dataclasses.

`ModelConfig` is family-neutral: every field is a switch that `layers.py` or a model file
reads directly. The mapping from a checkpoint's own key names lives in the family's file
(`models/<family>.py`, functions `from_hf` / `to_hf`); no HF key name appears here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import jax.numpy as jnp

FULL = "full"
SLIDING = "sliding"
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")

DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


def resolve_dtype(dtype) -> jnp.dtype:
    """'float32' | 'bfloat16' | 'float16' | a jnp dtype -> jnp dtype (clear error otherwise)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype)


@dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """Rotary embedding of one layer kind.

    kind: "default" | "linear" (positions divided by `factor`) | "llama3" (frequency-dependent
    interpolation of Llama 3.1/3.2, needs low/high_freq_factor and original_max_position).
    """

    theta: float = 10_000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        if self.kind not in ("default", "linear", "llama3"):
            raise ValueError(
                f"unsupported rope type {self.kind!r}; supported: default, linear, llama3"
            )


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a decoder LM (Llama / Mistral / Qwen2 / Gemma 3) or a BERT encoder.

    Shapes: D = hidden_size, N = num_heads, K = num_kv_heads, H = head_dim, F = intermediate_size.
    """

    family: str  # registry key: "llama", "mistral", "qwen2", "gemma3", "bert"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6  # epsilon of every norm (RMSNorm, or LayerNorm in encoders)
    # RMSNorm scale is (1 + w) (Gemma) instead of w (Llama).
    norm_plus_one: bool = False
    qk_norm: bool = False
    activation: str = "silu"  # "silu" (SwiGLU) | "gelu_tanh" (GeGLU) | "gelu" (exact erf; BERT)
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    scale_embeddings: bool = False  # multiply embeddings by sqrt(hidden_size) (Gemma)
    # Attention scores scale = query_pre_attn_scalar ** -0.5 (defaults to head_dim).
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    # Per layer: FULL or SLIDING; empty means all FULL.
    layer_types: tuple[str, ...] = ()
    rope: RopeConfig = field(default_factory=RopeConfig)
    rope_local: RopeConfig | None = None  # rope of SLIDING layers when it differs (Gemma 3)
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # --- encoders (BERT) ---
    causal: bool = True  # False: every token attends to every non-padding token
    absolute_positions: bool = False  # learned position embeddings instead of RoPE
    type_vocab_size: int = 0  # token-type (segment A/B) embeddings; 0 = none
    # Output head: "causal_lm" (decoders) | "encoder" (hidden states + pooler, HF BertModel)
    # | "masked_lm" | "classifier" (pooler + classifier over `labels`).
    head: str = "causal_lm"
    labels: tuple[str, ...] = ()  # class names of a "classifier" head, index = class id
    # A classifier's HF problem_type: None (scores as transformers' pipeline does: sigmoid for one
    # label, softmax for more), or one of PROBLEM_TYPES.
    problem_type: str | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers"
            )
        bad = set(self.layer_types) - {FULL, SLIDING}
        if bad:
            raise ValueError(f"unknown layer types {sorted(bad)}; use {FULL!r} or {SLIDING!r}")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ValueError("sliding layers need sliding_window > 0")
        if self.activation not in ("silu", "gelu_tanh", "gelu"):
            raise ValueError(f"unsupported activation {self.activation!r}; supported: silu, gelu_tanh, gelu")
        if self.head not in ("causal_lm", "encoder", "masked_lm", "classifier"):
            raise ValueError(f"unknown head {self.head!r}; use causal_lm, encoder, masked_lm or classifier")
        if self.head == "classifier" and not self.labels:
            raise ValueError("a classifier head needs at least one label")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"unsupported problem_type {self.problem_type!r}; supported: {', '.join(PROBLEM_TYPES)}")

    # --- derived values -------------------------------------------------------------
    @property
    def kinds(self) -> tuple[str, ...]:
        """Layer kind per layer (FULL when not given)."""
        return self.layer_types or (FULL,) * self.num_layers

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.kinds[layer] == SLIDING else None

    def rope_for(self, layer: int) -> RopeConfig:
        if self.kinds[layer] == SLIDING and self.rope_local is not None:
            return self.rope_local
        return self.rope

    @property
    def attn_scale(self) -> float:
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def num_params(self) -> int:
        d, h = self.hidden_size, self.head_dim
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * d * self.intermediate_size
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp) + emb

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
