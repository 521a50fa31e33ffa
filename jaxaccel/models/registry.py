"""Family registry: HF `model_type` -> (block or module, config mapping, HF name table)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ..config import ModelConfig, resolve_dtype
from ..kernels import XLA, KernelChoice
from ..layers import DecoderLM
from . import bert, gemma3, llama


@dataclass(frozen=True)
class Family:
    """`block` goes into `DecoderLM`, unless the family builds its own module with
    `build(cfg, dtype, param_dtype, dot_general_cls, kernels)`. `hf_name(cfg, path)` overrides the
    generic HF name table (hf.py) and `hf_ignored(cfg)` names checkpoint tensors to read past."""

    block: Any
    from_hf: Callable[[dict], ModelConfig]
    to_hf: Callable[[ModelConfig], dict]
    build: Callable | None = None
    hf_name: Callable[[ModelConfig, tuple], str] | None = None
    hf_ignored: Callable[[ModelConfig], set] | None = None


FAMILIES = {
    "llama": Family(llama.LlamaBlock, llama.from_hf, llama.to_hf),
    "mistral": Family(llama.LlamaBlock, llama.from_hf, llama.to_hf),
    "qwen2": Family(llama.LlamaBlock, llama.from_hf, llama.to_hf),
    "gemma3": Family(gemma3.Gemma3Block, gemma3.from_hf, gemma3.to_hf),
    "bert": Family(None, bert.from_hf, bert.to_hf, bert.build, bert.hf_name, bert.hf_ignored),
}
MODEL_TYPES = {**llama.MODEL_TYPES, **gemma3.MODEL_TYPES, **bert.MODEL_TYPES}


# config.json fields every family reads, with what they must hold: a wrong type or value is an
# error naming the field (not a traceback, and not a silently different model)
_POSITIVE_INT = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window",
                 "sliding_window_pattern", "query_pre_attn_scalar")
_NON_NEGATIVE_INT = ("type_vocab_size", "num_labels")
_POSITIVE_FLOAT = ("rms_norm_eps", "layer_norm_eps", "rope_theta", "rope_local_base_freq",
                   "final_logit_softcapping", "attn_logit_softcapping")
_BOOL = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "is_decoder",
         "add_cross_attention", "use_bidirectional_attention")
_TOKEN_ID = ("bos_token_id", "pad_token_id")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_hf_fields(hf) -> None:
    """Types and ranges of the config fields we read; ValueError naming the field otherwise.
    Optional fields may be absent or null."""
    if not isinstance(hf, dict):
        raise ValueError(f"a model config must be a JSON object, got a {type(hf).__name__}")
    for key, ok, want in (
            *((k, lambda v: _is_int(v) and v >= 1, "an integer >= 1") for k in _POSITIVE_INT),
            *((k, lambda v: _is_int(v) and v >= 0, "an integer >= 0") for k in _NON_NEGATIVE_INT),
            *((k, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf"),
               "a number > 0") for k in _POSITIVE_FLOAT),
            *((k, lambda v: isinstance(v, bool), "true or false") for k in _BOOL),
            *((k, lambda v: _is_int(v) and v >= 0, "a token id (integer >= 0)") for k in _TOKEN_ID),
            ("eos_token_id", lambda v: (_is_int(v) and v >= 0) or (isinstance(v, list) and all(
                _is_int(x) and x >= 0 for x in v)), "a token id or a list of token ids")):
        value = hf.get(key)
        if value is not None and not ok(value):
            raise ValueError(f"field {key!r} must be {want}, got {value!r}")
    heads, kv = hf.get("num_attention_heads"), hf.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise ValueError(f"field 'num_key_value_heads' ({kv}) must divide 'num_attention_heads' ({heads})")
    if hf.get("head_dim") is None and heads and hf.get("hidden_size") and hf["hidden_size"] % heads:
        raise ValueError(f"field 'hidden_size' ({hf['hidden_size']}) must be a multiple of 'num_attention_heads' "
                         f"({heads}) when 'head_dim' is not given")


def config_from_hf(hf: dict) -> ModelConfig:
    """HF config.json dict -> ModelConfig; unknown model_type, or a field of the wrong type ->
    ValueError naming it."""
    check_hf_fields(hf)
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(MODEL_TYPES))}"
        )
    try:
        return FAMILIES[MODEL_TYPES[model_type]].from_hf(hf)
    except KeyError as e:
        raise ValueError(f"config.json for model_type {model_type!r} lacks required key {e}") from None


def config_to_hf(cfg: ModelConfig) -> dict:
    return FAMILIES[cfg.family].to_hf(cfg)


def build(cfg: ModelConfig, dtype="float32", param_dtype=None, dot_general_cls=None, kernels: KernelChoice = XLA):
    """The Flax module of `cfg` (compute in `dtype`; params stored in `param_dtype` or `dtype`).

    dot_general_cls: the matmul factory (quant.dot_general_cls; None: XLA's dots in `dtype`).
    kernels: which CPU kernels its programs call (kernels.KernelChoice; default none: XLA's ops,
    as training needs). Only the generation engine and the encoder programs ask for them."""
    dtype = resolve_dtype(dtype)
    param_dtype = resolve_dtype(param_dtype) if param_dtype else dtype
    family = FAMILIES[cfg.family]
    if family.build is not None:
        return family.build(cfg, dtype, param_dtype, dot_general_cls, kernels)
    return DecoderLM(cfg, family.block, dtype=dtype, param_dtype=param_dtype, dot_general_cls=dot_general_cls,
                     kernels=kernels)


_FIRST_LAYER = re.compile(r"^(layers?)_0$")  # "layers_0" (decoders), "layer_0" (BERT)


def abstract_params(cfg: ModelConfig, dtype="float32", dot_general_cls=None, every_layer: bool = False):
    """Boxed (`nn.Partitioned`) ShapeDtypeStructs of cfg's params, without allocating anything.

    Traces a one-layer copy of the model and repeats its layer entry for every layer: all layers
    of a family hold the same params (only their attention window / rope differ), and tracing
    one instead of all of them is what makes a warm load fast (tracing is pure Python, and grows
    with the layer count). `tests/test_fast_start.py` checks this against tracing the whole model.
    every_layer=True traces them all: when a layer's params depend on its path (quantization
    rules that name layers).
    """
    one = cfg if every_layer else cfg.replace(num_layers=1, layer_types=cfg.layer_types[:1])
    module = build(one, dtype, dot_general_cls=dot_general_cls)
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    tree = jax.eval_shape(lambda t: module.init(jax.random.PRNGKey(0), t), tokens)["params"]
    return tree if every_layer else _repeat_layers(tree, cfg.num_layers)


def _repeat_layers(tree, n: int):
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        m = _FIRST_LAYER.match(key)
        if m:
            out.update({f"{m.group(1)}_{i}": value for i in range(n)})
        else:
            out[key] = _repeat_layers(value, n)
    return out
