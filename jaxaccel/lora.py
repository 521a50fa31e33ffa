"""LoRA: low-rank adapters on chosen projections, outside the model files.

y = x W (+ b) + dropout(x) A B * (alpha / rank), with A [in, r] (random) and B [r, out]
(zeros, so training starts at the base model). The adapter path is added by intercepting
`layers.Dense.__call__` (flax `intercept_methods`), so the model's own `apply` runs unchanged
and the base weights stay frozen (they are not trainable params, so they get no optimizer
state). `merge` folds the adapters into the kernels for serving; `save` / `load` write the
adapters alone (safetensors + lora.json).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from .layers import Dense

A, B = "lora_a", "lora_b"


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # Dense module names to adapt

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def init(params, cfg: LoraConfig, seed: int = 0) -> dict:
    """Adapters for every Dense kernel named in cfg.targets: {module path: {lora_a, lora_b}}."""
    flat = traverse_util.flatten_dict(params)
    kernels = [p for p in flat if p[-1] == "kernel" and p[-2] in cfg.targets]
    if not kernels:
        names = sorted({p[-2] for p in flat if p[-1] == "kernel"})
        raise ValueError(f"no projection matches LoRA targets {list(cfg.targets)}; this model has {names}")
    out = {}
    for i, path in enumerate(kernels):
        fan_in, fan_out = flat[path].shape
        key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
        out[path[:-1] + (A,)] = jax.random.normal(key, (fan_in, cfg.rank), jnp.float32) / np.sqrt(fan_in)
        out[path[:-1] + (B,)] = jnp.zeros((cfg.rank, fan_out), jnp.float32)
    return traverse_util.unflatten_dict(out)


def _find(adapters: dict, path: tuple[str, ...]):
    node = adapters
    for name in path:
        if not isinstance(node, dict) or name not in node:
            return None
        node = node[name]
    return node if isinstance(node, dict) and A in node else None


def apply(module, params, adapters, cfg: LoraConfig, *args, rng=None, **kwargs):
    """module.apply({"params": params}, *args, **kwargs) with the adapters added.
    rng: a PRNG key for adapter dropout (None = no dropout, e.g. eval / serving)."""
    paths = {tuple(p[:-1]) for p in traverse_util.flatten_dict(adapters)}
    index = {p: i for i, p in enumerate(sorted(paths))}

    def interceptor(next_fun, a, kw, context):
        m = context.module
        if context.method_name != "__call__" or not isinstance(m, Dense):
            return next_fun(*a, **kw)
        ad = _find(adapters, m.path)
        if ad is None:
            return next_fun(*a, **kw)
        x = a[0].astype(m.dtype)
        if rng is not None and cfg.dropout > 0:
            keep = jax.random.bernoulli(jax.random.fold_in(rng, index[tuple(m.path)]), 1 - cfg.dropout, x.shape)
            x = jnp.where(keep, x / (1 - cfg.dropout), 0).astype(m.dtype)
        delta = (x @ ad[A].astype(m.dtype)) @ ad[B].astype(m.dtype)
        return next_fun(*a, **kw) + delta * jnp.asarray(cfg.scale, m.dtype)

    with nn.intercept_methods(interceptor):
        return module.apply({"params": params}, *args, **kwargs)


def merge(params, adapters, cfg: LoraConfig):
    """Base params with each adapted kernel replaced by W + A B * scale (in W's dtype)."""
    flat = traverse_util.flatten_dict(params)
    for path, ad in traverse_util.flatten_dict(adapters, is_leaf=lambda _, v: isinstance(v, dict) and A in v).items():
        w = flat[path + ("kernel",)]
        delta = jnp.asarray(ad[A], jnp.float32) @ jnp.asarray(ad[B], jnp.float32) * cfg.scale
        flat[path + ("kernel",)] = (w.astype(jnp.float32) + delta).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def save(folder, adapters, cfg: LoraConfig) -> Path:
    """Write the adapters alone: adapters.safetensors ("a/b/lora_a" names) + lora.json."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"/".join(k): np.asarray(jax.device_get(v)) for k, v in traverse_util.flatten_dict(adapters).items()}
    save_file(tensors, str(folder / "adapters.safetensors"))
    (folder / "lora.json").write_text(json.dumps(asdict(cfg), indent=2))
    return folder


def load(folder) -> tuple[dict, LoraConfig]:
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not (folder / "lora.json").is_file():
        raise FileNotFoundError(f"{folder} holds no LoRA adapters (lora.json + adapters.safetensors)")
    raw = json.loads((folder / "lora.json").read_text())
    cfg = LoraConfig(**{**raw, "targets": tuple(raw["targets"])})
    flat = {tuple(k.split("/")): jnp.asarray(v) for k, v in load_file(str(folder / "adapters.safetensors")).items()}
    return traverse_util.unflatten_dict(flat), cfg
