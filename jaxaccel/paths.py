"""Where jaxaccel keeps what it writes for itself: the cache folder (converted default models,
compiled CPU kernels, saved program traces, XLA's compilation cache), and how a file there is
written (atomically). A leaf: imports nothing of jaxaccel, so every layer may ask it."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

CACHE_ENV = "JAXACCEL_CACHE"


def cache_dir() -> Path:
    """$JAXACCEL_CACHE, else $XDG_CACHE_HOME/jaxaccel, else ~/.cache/jaxaccel."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxaccel"


_unwritable: dict[Path, str] = {}


def cache_writable() -> bool:
    """Whether files can be created in the cache folder (made if missing). When not (read-only,
    full, or a file), one warning says so and jaxaccel runs without saving to it; what the folder
    already holds is still used."""
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".probe."):
            pass
        _unwritable.pop(root, None)
        return True
    except OSError as e:
        if root not in _unwritable:
            _unwritable[root] = why = f"{type(e).__name__}: {e.strerror or e}"
            warnings.warn(f"cannot write the jaxaccel cache folder {root} ({why}); running without saving to it "
                          f"(what it holds is still used). Set {CACHE_ENV} to a writable folder for faster starts.",
                          RuntimeWarning, stacklevel=2)
        return False


def write_atomic(path: Path, data: bytes) -> None:
    """Write `path` under a temporary name beside it, then rename: readers (and a crash) see the
    old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
