"""jaxaccel: JAX-native language models — load real checkpoints, prove parity, run fast."""

from .checkpoints import CheckpointError, load
from .config import ModelConfig, RopeConfig
from .engine import GenerationStats, generate, generate_tokens
from .model import Model, init_random

__all__ = ["load", "Model", "ModelConfig", "RopeConfig", "CheckpointError", "init_random",
           "generate", "generate_tokens", "GenerationStats"]
__version__ = "0.1.0"
