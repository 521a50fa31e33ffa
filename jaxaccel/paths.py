"""Where jaxaccel keeps what it writes for itself: the cache folder (converted default models,
compiled CPU kernels, saved program traces, XLA's compilation cache). A leaf: imports nothing
of jaxaccel, so every layer may ask it."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "JAXACCEL_CACHE"


def cache_dir() -> Path:
    """$JAXACCEL_CACHE, else $XDG_CACHE_HOME/jaxaccel, else ~/.cache/jaxaccel."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxaccel"
