"""What every checkpoint reader returns (`Loaded`: the parts of a model) and raises
(`CheckpointError`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message says which file/tensor and why."""


@dataclass(frozen=True)
class Loaded:
    """What a checkpoint holds: config, params (a pytree of arrays, sharded over `mesh` when one
    was given), tokenizer (or None), the params' float dtype name, and the QuantConfig a serving
    folder was written with (None for HF folders and GGUF files)."""

    config: Any
    params: Any
    tokenizer: Any
    dtype: str
    quant: Any = None
    mesh: Any = None
