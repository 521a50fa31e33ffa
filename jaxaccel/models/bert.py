"""BERT encoders: HF BertModel, BertForMaskedLM, BertForSequenceClassification (and the
sentence-transformers MiniLM folders, which are BertModel checkpoints).

Embeddings (word + learned absolute position + token type) -> LayerNorm; then per layer
(post-LN): x = LN(x + attn(x)); x = LN(x + out(gelu(intermediate(x)))). Attention is the
shared `layers.Attention`, bidirectional (`causal=False`) and without RoPE
(`absolute_positions=True`). Heads: pooler (tanh(dense(h[:, 0]))) + classifier, or the
masked-LM transform (dense -> gelu -> LN) with decoder tied to the word embeddings.

Our param names are short; `hf_name` is the table to the HF names (with the `bert.` prefix
for the task models, without it for a bare BertModel checkpoint).
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..config import ModelConfig
from ..kernels import XLA, KernelChoice
from ..layers import (LayerModule, Attention, Dense, DotGeneralCls, Embed, LayerNorm, ModelOutput, float32_matmuls,
                      logical)

MODEL_TYPES = {"bert": "bert"}
ARCHITECTURES = {"BertModel": "encoder", "BertForMaskedLM": "masked_lm", "BertForPreTraining": "masked_lm",
                 "BertForSequenceClassification": "classifier"}
HEAD_ARCH = {"encoder": "BertModel", "masked_lm": "BertForMaskedLM", "classifier": "BertForSequenceClassification"}


def _gelu(x):
    """HF "gelu": the exact erf form, written as torch does (x/2 (1 + erf(x/sqrt 2))); jax.nn.gelu's
    erfc form costs more than twice as much on CPU. In float32, as torch
    does: 1 + erf cancels for negative x, too much in bfloat16."""
    x32 = x.astype(jnp.float32)
    return (x32 * (1 + jax.lax.erf(x32 * 0.7071067811865476)) * 0.5).astype(x.dtype)


class BertLayer(LayerModule):
    """Post-LN layer: LN(x + attn(x)), then LN(x + out(gelu(intermediate(x))))."""

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dense = lambda f, axes, name: Dense(f, axes, use_bias=True, name=name, **self.shared())
        h, _ = Attention(cfg, self.layer, name="attention", **self.shared())(x, positions, segment_ids)
        x = LayerNorm(cfg.rms_norm_eps, name="attention_norm", **kw)(x + h)
        h = _gelu(dense(cfg.intermediate_size, ("embed", "mlp"), "intermediate")(x))
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        return LayerNorm(cfg.rms_norm_eps, name="output_norm", **kw)(x + dense(cfg.hidden_size, ("mlp", "embed"), "output")(h))


class BertEncoder(nn.Module):
    """tokens [B, T] -> ModelOutput(hidden [B, T, D], pooled [B, D] (encoder/classifier heads),
    logits float32 [B, T, V] (masked_lm) or [B, L] (classifier)).

    segment_ids [B, T]: 1 = token, 0 = padding (padding keys are never attended to);
    token_types [B, T] default 0; positions [B, T] default 0..T-1 (right padding).
    Under jit, outputs a caller does not return are never computed.
    """

    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dot_general_cls: DotGeneralCls = None
    kernels: KernelChoice = XLA

    def __call__(self, *args, **kw):
        """See `forward`; float32 models trace with float32 matmuls (`float32_matmuls`)."""
        with float32_matmuls(self.dtype):
            return self.forward(*args, **kw)

    @nn.compact
    def forward(self, tokens, positions=None, segment_ids=None, token_types=None):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        B, T = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        word = Embed(cfg.vocab_size, cfg.hidden_size, dot_general_cls=self.dot_general_cls,
                     name="word_embeddings", **kw)
        x = word(tokens) + Embed(cfg.max_position_embeddings, cfg.hidden_size, name="position_embeddings", **kw)(positions)
        if cfg.type_vocab_size:
            types = jnp.zeros_like(tokens) if token_types is None else token_types
            x = x + Embed(cfg.type_vocab_size, cfg.hidden_size, name="token_type_embeddings", **kw)(types)
        x = LayerNorm(cfg.rms_norm_eps, name="embeddings_norm", **kw)(x)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        for i in range(cfg.num_layers):
            x = BertLayer(cfg, i, dot_general_cls=self.dot_general_cls, kernels=self.kernels, name=f"layer_{i}",
                          **kw)(x, positions, segment_ids)
            x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        pooled = logits = None
        dense = lambda f, axes, name: Dense(f, axes, use_bias=True, dot_general_cls=self.dot_general_cls,
                                            name=name, **kw)
        if cfg.head in ("encoder", "classifier"):
            pooled = jnp.tanh(dense(cfg.hidden_size, ("embed", "embed"), "pooler")(x[:, 0]))
        if cfg.head == "classifier":
            logits = dense(len(cfg.labels), ("embed", "vocab"), "classifier")(pooled).astype(jnp.float32)
        elif cfg.head == "masked_lm":
            h = _gelu(dense(cfg.hidden_size, ("embed", "embed"), "predictions_transform")(x))
            h = LayerNorm(cfg.rms_norm_eps, name="predictions_norm", **kw)(h)
            bias = self.param("predictions_bias", logical(nn.initializers.zeros, ("vocab",)), (cfg.vocab_size,),
                              self.param_dtype)
            logits = word.attend(h) + bias.astype(jnp.float32)
        return ModelOutput(logits=logits, hidden=x, pooled=pooled)


def build(cfg: ModelConfig, dtype, param_dtype, dot_general_cls=None, kernels: KernelChoice = XLA) -> BertEncoder:
    return BertEncoder(cfg, dtype=dtype, param_dtype=param_dtype, dot_general_cls=dot_general_cls, kernels=kernels)


# --- HF names: the table ------------------------------------------------------------------
_TOP = {"word_embeddings": "embeddings.word_embeddings", "position_embeddings": "embeddings.position_embeddings",
        "token_type_embeddings": "embeddings.token_type_embeddings", "embeddings_norm": "embeddings.LayerNorm",
        "pooler": "pooler.dense"}
_LAYER = {("attention", "q_proj"): "attention.self.query", ("attention", "k_proj"): "attention.self.key",
          ("attention", "v_proj"): "attention.self.value", ("attention", "o_proj"): "attention.output.dense",
          ("attention_norm",): "attention.output.LayerNorm", ("intermediate",): "intermediate.dense",
          ("output",): "output.dense", ("output_norm",): "output.LayerNorm"}
_HEADS = {"predictions_transform": "cls.predictions.transform.dense",
          "predictions_norm": "cls.predictions.transform.LayerNorm", "classifier": "classifier"}


def hf_name(cfg: ModelConfig, path: tuple[str, ...]) -> str:
    """Our param path -> HF tensor name, e.g. ("layer_0", "attention", "q_proj", "kernel") ->
    "bert.encoder.layer.0.attention.self.query.weight"."""
    prefix = "" if cfg.head == "encoder" else "bert."
    if path == ("predictions_bias",):
        return "cls.predictions.bias"
    *mods, leaf = path
    leaf = "bias" if leaf == "bias" else "weight"
    if mods[0] in _HEADS:
        return f"{_HEADS[mods[0]]}.{leaf}"
    if mods[0] in _TOP:
        return f"{prefix}{_TOP[mods[0]]}.{leaf}"
    layer = re.fullmatch(r"layer_(\d+)", mods[0])
    if layer is None or tuple(mods[1:]) not in _LAYER:
        raise KeyError(f"no HF name for BERT param {'/'.join(path)}")
    return f"{prefix}encoder.layer.{layer.group(1)}.{_LAYER[tuple(mods[1:])]}.{leaf}"


def hf_ignored(cfg: ModelConfig) -> set[str]:
    """Checkpoint tensors we read past: buffers, the tied decoder copy, the NSP head."""
    prefix = "" if cfg.head == "encoder" else "bert."
    return {f"{prefix}embeddings.position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
            "cls.seq_relationship.weight", "cls.seq_relationship.bias"}


# --- config mapping: the only place HF key names appear for this family ------------------
def from_hf(hf: dict) -> ModelConfig:
    arch = (hf.get("architectures") or ["BertModel"])[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported BERT architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"unsupported position_embedding_type {hf['position_embedding_type']!r}; supported: absolute")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ValueError("BERT as a decoder / with cross-attention is not supported (encoders only)")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"unsupported BERT hidden_act {hf['hidden_act']!r}; supported: gelu")
    head = ARCHITECTURES[arch]
    labels: tuple[str, ...] = ()
    if head == "classifier":
        id2label = hf.get("id2label") or {}
        n = len(id2label) or int(hf.get("num_labels", 2))  # transformers' default is 2 classes
        labels = tuple(id2label.get(str(i), id2label.get(i, f"LABEL_{i}")) for i in range(n))
    problem_type = hf.get("problem_type") if head == "classifier" else None  # ModelConfig checks it
    heads = hf["num_attention_heads"]
    return ModelConfig(
        family="bert",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hf["hidden_size"] // heads,
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        rms_norm_eps=hf.get("layer_norm_eps", 1e-12),
        activation="gelu",
        attention_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
        pad_token_id=hf.get("pad_token_id", 0),
        causal=False,
        absolute_positions=True,
        type_vocab_size=hf.get("type_vocab_size", 2),
        head=head,
        labels=labels,
        problem_type=problem_type,
    )


def to_hf(cfg: ModelConfig) -> dict:
    out = {
        "architectures": [HEAD_ARCH[cfg.head]],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.rms_norm_eps,
        "hidden_act": "gelu",
        "position_embedding_type": "absolute",
        "pad_token_id": cfg.pad_token_id,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    if cfg.head == "classifier":
        out["id2label"] = {str(i): name for i, name in enumerate(cfg.labels)}
        out["label2id"] = {name: i for i, name in enumerate(cfg.labels)}
        if cfg.problem_type is not None:
            out["problem_type"] = cfg.problem_type
    return out
