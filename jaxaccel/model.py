"""The public `Model` (config + params + tokenizer + the jitted pure function) and how one is
made: `load` (a checkpoint path or an embedded model's name) and `init_random`.

`Model` is a facade: it holds the parts and hands each task to the module that owns it
(encoder_tasks, quant, checkpoints); those modules take any object with a Model's attributes
and never import this one, so imports go one way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta

from . import checkpoints, default_models, encoder_tasks, quant, quant_calibration, sharding
from .checkpoints.hf import save_folder
from .config import ModelConfig
from .models import registry


@dataclass
class Model:
    """A loaded language model (decoder LM, or BERT encoder: `embed` / `fill_mask` / `classify`).

    config: frozen `ModelConfig`; params: pytree of arrays; tokenizer: HF tokenizer or None.
    `module.apply({"params": params}, tokens, positions, cache=..., segment_ids=...)` is the
    single pure function used for training, prefill and decode.
    """

    config: ModelConfig
    params: Any
    tokenizer: Any = None
    dtype: str = "float32"
    dot_general_cls: Any = field(default=None, repr=False)
    quant: Any = None  # the jaxaccel.QuantConfig these params were quantized with (None: float)
    mesh: Any = field(default=None, repr=False)  # jax Mesh the params are sharded over (sharding.py)
    # the CPU kernels generation's programs call (a kernels.KernelChoice): None lets the engine pick
    # (decode kernels on one CPU device where they build); KernelChoice() is XLA's ops throughout
    kernels: Any = field(default=None, repr=False)

    @cached_property
    def module(self):
        return registry.build(self.config, self.dtype, dot_general_cls=self.dot_general_cls)

    @cached_property
    def _forward(self):
        def forward(params, tokens, positions, segment_ids):
            return self.module.apply({"params": params}, tokens, positions, segment_ids=segment_ids).logits

        return jax.jit(forward)

    def check_tokens(self, input_ids) -> np.ndarray:
        """Validate token ids on the host: int [B, T] (or [T]), all in [0, V), T within positions."""
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty [batch, length] array, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"input_ids must be integers, got dtype {ids.dtype}")
        V = self.config.vocab_size
        bad = np.argwhere((ids < 0) | (ids >= V))
        if len(bad):
            b, t = bad[0]
            raise ValueError(
                f"token id {int(ids[b, t])} at [row {b}, position {t}] is outside the vocabulary [0, {V}) "
                f"({len(bad)} bad id(s) in total)")
        if ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {ids.shape[1]} exceeds the model's max_position_embeddings "
                f"{self.config.max_position_embeddings}; split or truncate the input")
        return ids.astype(np.int32)

    def logits(self, input_ids, attention_mask=None) -> jax.Array:
        """input_ids int [B, T] -> float32 logits [B, T, V].

        attention_mask [B, T] (1 = token, 0 = padding, left or right): padding never affects
        real tokens, and positions count real tokens only, so a padded row gives the same
        logits as the row alone. Logits at padded positions are meaningless.
        """
        if self.config.head not in ("causal_lm", "masked_lm"):
            raise ValueError(f"logits() needs a language-model head; this model has a {self.config.head!r} head "
                             "(use embed() or classify())")
        ids = self.check_tokens(input_ids)
        if attention_mask is None:
            mask = np.ones_like(ids)
        else:
            mask = np.asarray(attention_mask).reshape(ids.shape).astype(np.int32)
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
        return self._forward(self.params, jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask))

    # --- encoders (BERT): batched, bucketed; see encoder_tasks.py -----------------------------
    def embed(self, texts, **kw) -> np.ndarray:
        """texts (a list, or one string) -> float32 [N, D] unit-norm sentence embeddings."""
        return encoder_tasks.embed(self, [texts] if isinstance(texts, str) else texts, **kw)

    def fill_mask(self, text: str, top_k: int = 5, **kw) -> list:
        """A text with one [MASK] -> [(token, prob)] best first (several masks: one list per mask)."""
        per_mask = encoder_tasks.fill_mask(self, [text], top_k=top_k, **kw)[0]
        return per_mask[0] if len(per_mask) == 1 else per_mask

    def classify(self, texts, **kw) -> list:
        """texts (a list, or one string or (text, text_pair) tuple) -> [(label, score)] of the top
        class per text; list items may be (text, text_pair) sentence pairs (see encoder_tasks.classify)."""
        one = isinstance(texts, str) or (isinstance(texts, tuple) and encoder_tasks.is_pair(texts))
        return encoder_tasks.classify(self, [texts] if one else texts, **kw)

    def with_head(self, head: str, labels=(), seed: int = 0) -> "Model":
        """This encoder with another output head ("classifier" over `labels`, "masked_lm", or
        "encoder"): the shared params (embeddings, layers, a pooler both heads have) are kept, the
        new head's are initialised as transformers initialises them (normal(0.02) weights, zero
        biases, unit norms; the masked-LM decoder is tied to the word embeddings, as BERT's is)."""
        if self.config.family != "bert":
            raise ValueError(f"with_head() changes encoder heads; this is a {self.config.family} model")
        if self.quant is not None and self.quant.integer:
            raise ValueError("with_head() needs the float model; quantize after fine-tuning")
        cfg = self.config.replace(head=head, labels=tuple(labels) if head == "classifier" else (),
                                  problem_type="single_label_classification" if head == "classifier" else None)
        fresh = init_random(cfg, seed, self.dtype).params
        old = traverse_util.flatten_dict(self.params)
        kept = {k: (old[k] if k in old and old[k].shape == v.shape else v)
                for k, v in traverse_util.flatten_dict(fresh).items()}
        return Model(cfg, traverse_util.unflatten_dict(kept), self.tokenizer, self.dtype, mesh=self.mesh)

    def quantize(self, cfg, calibration=None) -> "Model":
        """A new Model serving `cfg` (a jaxaccel.QuantConfig): int8 / int4 / w8a8 params become
        int values + scales (no float copy); float modes recast the params. See quant.py.
        calibration (int4 weights only): the text (str) or token ids [rows, T] whose activations
        weigh each int4 scale search; None: the text shipped for it (models with a tokenizer);
        False: unweighted. See quant_calibration.py."""
        return quant.quantize_model(self, cfg, quant_calibration.importance_for(self, cfg, calibration))

    def save_hf(self, out_dir, overwrite: bool = True) -> Path:
        """Export as an HF folder (model.safetensors + config.json + tokenizer) that transformers loads."""
        return save_folder(out_dir, self.config, self.params, self.tokenizer, overwrite)

    @property
    def cache_dtype(self):
        """KV cache dtype: int8 when quantized with kv_cache_int8, else the compute dtype."""
        return jnp.int8 if self.quant is not None and self.quant.kv_cache_int8 else self.module.dtype

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))

    @property
    def params_bytes(self) -> int:
        return sum(int(x.nbytes) for x in jax.tree.leaves(self.params))


def load(path, dtype="float32", fast_tokenizer: bool = False, mesh=None, gguf_weights: str = "float") -> Model:
    """A Model from an HF folder, a .gguf file, a serving folder (`jaxaccel quantize`), or an
    embedded model's name: "gemma3-270m" (converted once into the cache) or "minilm".

    fast_tokenizer: use `jaxaccel.tokenizer.FastTokenizer` (the Rust `tokenizers` object) where a
    folder has tokenizer.json: much faster to load, same ids, a smaller API.
    mesh: a `jaxaccel.MeshConfig` (or jax Mesh): params load sharded over it (see sharding.py).
    gguf_weights: for a .gguf file (or "gemma3-270m"): "float" (default) dequantizes its weights;
    "as_stored" keeps its Q4_0 / Q5_0 / Q8_0 / Q4_K / Q6_K weights as the file's blocks, read by
    CPU kernels in that layout (checkpoints/gguf_stored.py, quant_ggml.py).
    """
    got = checkpoints.read(default_models.resolve(path, gguf=gguf_weights == "as_stored"), dtype, fast_tokenizer,
                           mesh, gguf_weights)
    dot = None if got.quant is None else quant.dot_general_cls(got.quant, serving=True)
    return Model(got.config, got.params, got.tokenizer, got.dtype, dot_general_cls=dot, quant=got.quant,
                 mesh=got.mesh)


def init_random(config: ModelConfig, seed: int = 0, dtype="float32", mesh=None) -> Model:
    """A randomly initialised model (tests, benchmarks, shape presets); with `mesh`, its params
    are created already sharded over it (equal to the single-device init of the same seed)."""
    if mesh is not None:
        mesh = sharding.build_mesh(mesh)
        return Model(config, sharding.init_params(config, mesh, seed, dtype), None, dtype, mesh=mesh)
    module = registry.build(config, dtype)
    variables = jax.jit(module.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 1), jnp.int32))
    return Model(config, meta.unbox(variables["params"]), None, dtype)
