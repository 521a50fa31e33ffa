"""jaxaccel: JAX-native language models — load real checkpoints, prove parity, run fast."""

from .checkpoints import CheckpointError, load
from .config import ModelConfig, RopeConfig
from .engine import GenerationStats, generate, generate_tokens
from .model import Model, init_random
from .quant import QuantConfig
from .train import finetune
from .sharding import MeshConfig

__all__ = ["load", "Model", "QuantConfig", "ModelConfig", "RopeConfig", "CheckpointError", "init_random",
           "generate", "generate_tokens", "GenerationStats", "finetune", "MeshConfig"]
__version__ = "0.1.0"
