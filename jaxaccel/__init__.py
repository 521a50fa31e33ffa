"""jaxaccel: JAX-native language models — load real checkpoints, prove parity, run fast.

The public names are imported on first use (PEP 562), so `import jaxaccel` and the CLI's
`--help` do not pay for importing jax."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load": "model", "Model": "model", "init_random": "model",
    "generate": "generation", "generate_tokens": "generation", "GenerationStats": "generation",
    "finetune": "finetuning",
    "QuantConfig": "quant",
    "ModelConfig": "config", "RopeConfig": "config",
    "CheckpointError": "checkpoints",
    "MeshConfig": "sharding",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxaccel' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
