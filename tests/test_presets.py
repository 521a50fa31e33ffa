"""Full-size presets instantiate abstractly (jax.eval_shape): shapes and counts, no allocation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from jaxaccel.models import registry
from jaxaccel.presets import preset

# Published parameter counts (text decoder only for Gemma 3 4B).
EXPECTED = {
    "llama3-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "gemma3-1b": 999_885_952,
    "gemma3-4b": 3_880_263_168,
    "gemma3-270m": 268_098_176,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_full_size_preset_eval_shape(name):
    cfg = preset(name)
    module = registry.build(cfg, "bfloat16")
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda t: module.init(jax.random.PRNGKey(0), t), tokens)["params"]
    leaves = jax.tree.leaves(meta.unbox(shapes))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing was allocated
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    assert sum(int(np.prod(x.shape)) for x in leaves) == EXPECTED[name]
    # every param carries logical axis names for the sharding rules
    boxed = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, meta.Partitioned))
    assert all(isinstance(x, meta.Partitioned) and len(x.names) == len(x.value.shape) for x in boxed)
    out = jax.eval_shape(lambda p, t: module.apply({"params": p}, t), meta.unbox(shapes), tokens)
    assert out.logits.shape == (1, 8, cfg.vocab_size) and out.logits.dtype == jnp.float32
