"""Programs cached on disk: traced programs kept with `jax.export`, so a warm process skips
Python tracing, and XLA's persistent compilation cache, so it skips compiling.

Tracing the generation program of a model with many layers is pure Python (flax modules, jnp
calls) that runs at every process start, before XLA's persistent compilation cache can even be
asked for the executable. `lower_cached` saves the traced program (StableHLO; params are
arguments, not constants) the first time and deserializes it afterwards; compiling it then hits
the XLA cache. The CLI turns both on (`enable`); the Python API traces as usual unless
`set_folder(path)` is called.

The file name is a hash of everything the program depends on: the caller's key (model config,
dtype, quantization, sampler, shapes), the argument shapes and dtypes, the jax / jaxlib / flax /
aqtp / numpy versions, every jax config flag (PRNG implementation, x64, ...), the backend, and
the source of every jaxaccel module, so any change makes a new program instead of reusing a
stale one. An unreadable file is traced again and
rewritten; files unused for 30 days are deleted when a new one is written.

`COMPILER_OPTIONS[backend]`: XLA options (DebugOptions names, e.g. "xla_gpu_enable_command_buffer")
that programs `lower_cached` returns are compiled with when jax's default backend is `backend`
(the backend generation programs run on); XLA's persistent cache keys on them. A model's engine
keeps the programs it has compiled, so a change reaches programs compiled after it (a fresh
Model object: bench/profile_decode.py times variants that way).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jaxlib
import numpy as np

from . import kernels
from .paths import cache_dir

_folder: Path | None = None
COMPILER_OPTIONS: dict[str, dict[str, Any]] = {}


def _compile(lowered):
    return lowered.compile(COMPILER_OPTIONS.get(jax.default_backend()) or None)


def enable() -> Path:
    """Turn on XLA's persistent compilation cache (warm starts skip compiling) and the saved
    traces (warm starts skip tracing), both under the cache folder; returns XLA's folder."""
    set_folder(cache_dir() / "programs")
    path = cache_dir() / "xla"
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def set_folder(path) -> None:
    """Save and reuse traced programs under `path` (None: off)."""
    global _folder
    _folder = None if path is None else Path(path)


def folder() -> Path | None:
    return _folder


@lru_cache(maxsize=1)
def _source_hash() -> str:
    root = Path(__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@lru_cache(maxsize=1)
def _versions() -> str:
    """Versions of everything that shapes a traced program."""
    from importlib.metadata import PackageNotFoundError, version

    out = [jax.__version__, jaxlib.__version__]
    for dist in ("flax", "aqtp", "numpy"):
        try:
            out.append(f"{dist}={version(dist)}")
        except PackageNotFoundError:
            out.append(f"{dist}=-")
    return " ".join(out)


@lru_cache(maxsize=1)
def _can_serialize() -> bool:
    """jax.export serializes with the `flatbuffers` package (a jaxaccel dependency); without it
    programs are traced as usual."""
    import importlib.util

    return importlib.util.find_spec("flatbuffers") is not None


def _abstract(x) -> jax.ShapeDtypeStruct:
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def lower_cached(fn: Callable, args: Sequence[Any], donate_argnums: Sequence[int], out_like: Any,
                 key: str) -> Callable[[], Callable]:
    """`jax.jit(fn, donate_argnums).lower(*args)`, through a saved trace when `set_folder` is on.

    Returns `finish()`, which compiles (XLA, or its persistent cache; no Python, the GIL is
    released, so it can run in a thread) and returns the program. Arguments sharded over a mesh
    bypass the saved traces (no shardings are recorded). `out_like` is a pytree with the
    structure of fn's output; the program takes and returns pytrees."""
    if _folder is None or not _can_serialize() or any(
            isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding) for x in jax.tree.leaves(args)):
        lowered = jax.jit(fn, donate_argnums=tuple(donate_argnums)).lower(*args)
        return lambda: _compile(lowered)
    from jax import export

    leaves_per_arg = [len(jax.tree.leaves(a)) for a in args]
    leaves, in_tree = jax.tree.flatten(tuple(args))
    abstract = [_abstract(x) for x in leaves]
    starts = [sum(leaves_per_arg[:i]) for i in range(len(args))]
    donated = tuple(j for i in donate_argnums for j in range(starts[i], starts[i] + leaves_per_arg[i]))
    out_tree = jax.tree.structure(out_like)
    parts = [key, str(in_tree), repr(abstract), str(out_tree), _versions(), jax.default_backend(),
             repr(sorted((k, repr(v)) for k, v in jax.config.values.items())),  # every jax flag (PRNG, x64, ...)
             _source_hash()]
    path = _folder / (hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32] + ".jaxexport")
    exported = None
    if path.is_file():
        try:
            exported = export.deserialize(bytearray(path.read_bytes()))
            os.utime(path)  # last used now: pruning keeps it
        except Exception:  # noqa: BLE001 - a damaged file is traced again and replaced
            exported = None
    if exported is None:
        flat_fn = lambda *xs: jax.tree.leaves(fn(*jax.tree.unflatten(in_tree, xs)))
        exported = export.export(jax.jit(flat_fn), disabled_checks=[  # our FFI kernels (kernels/)
            export.DisabledSafetyCheck.custom_call(t) for t in kernels.TARGETS])(*abstract)
        _write_atomic(path, exported.serialize())
        _prune(_folder)
    lowered = jax.jit(exported.call, donate_argnums=donated).lower(*abstract)

    def finish() -> Callable:
        compiled = _compile(lowered)
        return lambda *a: jax.tree.unflatten(out_tree, compiled(*jax.tree.leaves(a)))

    return finish


def _prune(folder: Path, max_age_days: float = 30.0) -> None:
    """Delete saved traces unused for `max_age_days` (older jaxaccel versions, other models)."""
    import time

    limit = time.time() - max_age_days * 86400
    for f in folder.glob("*.jaxexport"):
        try:
            if f.stat().st_mtime < limit:
                f.unlink()
        except OSError:
            pass  # another process pruned or replaced it first


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
