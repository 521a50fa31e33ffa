"""Programs cached on disk: traced programs kept with `jax.export`, so a warm process skips
Python tracing, and XLA's persistent compilation cache, so it skips compiling.

Tracing the generation program of a model with many layers is pure Python (flax modules, jnp
calls) that runs at every process start, before XLA's persistent compilation cache can even be
asked for the executable. `lower_cached` saves the traced program (StableHLO; params are
arguments, not constants) the first time and deserializes it afterwards; compiling it then hits
the XLA cache. The CLI turns both on (`enable`); the Python API traces as usual unless
`set_folder(path)` is called.

The file name is a hash of everything the program depends on: the caller's key (model config,
dtype, quantization, shapes), the argument shapes and dtypes, the jax / jaxlib / flax /
aqtp / numpy versions, every jax config flag (PRNG implementation, x64, ...), the backend, and
the source of every jaxaccel module, so any change makes a new program instead of reusing a
stale one. Each file starts with its payload's sha256: an unreadable or damaged file is traced
again and rewritten; files unused for 30 days are deleted when a new one is written.

`COMPILER_OPTIONS[backend]`: XLA options (DebugOptions names, e.g. "xla_gpu_enable_command_buffer")
that programs `lower_cached` returns are compiled with when jax's default backend is `backend`
(the backend generation programs run on); XLA's persistent cache keys on them. A model's engine
keeps the programs it has compiled, so a change reaches programs compiled after it (a fresh
Model object: bench/profile_decode.py times variants that way).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jaxlib
import numpy as np

from . import kernels
from .paths import cache_dir, cache_writable, write_atomic

_folder: Path | None = None
COMPILER_OPTIONS: dict[str, dict[str, Any]] = {}


def _compile(lowered):
    return lowered.compile(COMPILER_OPTIONS.get(jax.default_backend()) or None)


def enable() -> Path:
    """Turn on XLA's persistent compilation cache (warm starts skip compiling) and the saved
    traces (warm starts skip tracing), both under the cache folder; returns XLA's folder."""
    set_folder(cache_dir() / "programs")
    path = cache_dir() / "xla"
    if not cache_writable():  # read what a warm, read-only cache holds; write nothing
        if not path.is_dir():
            return path
        warnings.filterwarnings("ignore", message="Error writing persistent compilation cache entry")
    else:
        drop_damaged_xla_entries(path)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def drop_damaged_xla_entries(path: Path) -> list[Path]:
    """Delete XLA cache entries (under `path`) that no longer decompress: jax warns about such an
    entry and compiles again on every run but never replaces it. Only entries changed since the
    last check (size, mtime; `.checked`) are read, so a warm start reads none."""
    from jax._src import compilation_cache  # the decompression jax itself applies to its entries

    stamp, dropped = path / ".checked", []
    try:
        seen = json.loads(stamp.read_text())
    except (OSError, ValueError):
        seen = {}
    now = {}
    for entry in sorted(path.glob("*-cache")) if path.is_dir() else []:
        try:
            st = entry.stat()
            key = [st.st_size, st.st_mtime_ns]
            if seen.get(entry.name) != key:
                compilation_cache.decompress_executable(entry.read_bytes())
            now[entry.name] = key
        except OSError:
            continue  # pruned by jax or another process meanwhile
        except Exception:  # noqa: BLE001 - any decompression error: the entry is damaged
            entry.unlink(missing_ok=True)
            dropped.append(entry)
    if dropped:
        warnings.warn(f"dropped {len(dropped)} damaged XLA cache entr{'y' if len(dropped) == 1 else 'ies'} in {path}; "
                      "they are compiled again", RuntimeWarning, stacklevel=3)
    if now != seen:
        try:
            write_atomic(stamp, json.dumps(now).encode())
        except OSError:
            pass
    return dropped


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
            exported = export.deserialize(bytearray(_checked(path.read_bytes())))
        except Exception:  # noqa: BLE001 - a damaged file is traced again and replaced
            exported = None
        else:
            try:
                os.utime(path)  # last used now: pruning keeps it
            except OSError:
                pass  # a read-only cache: still a hit
    if exported is None:
        flat_fn = lambda *xs: jax.tree.leaves(fn(*jax.tree.unflatten(in_tree, xs)))
        exported = export.export(jax.jit(flat_fn), disabled_checks=[  # our FFI kernels (kernels/)
            export.DisabledSafetyCheck.custom_call(t) for t in kernels.TARGETS])(*abstract)
        if cache_writable():
            try:
                payload = bytes(exported.serialize())
                write_atomic(path, hashlib.sha256(payload).digest() + payload)
                _prune(_folder)
            except OSError as e:  # the cache filled up, or went read-only, meanwhile: run without saving
                _warn_once(f"cannot save traced programs in {_folder} ({type(e).__name__}: {e.strerror or e})")
    lowered = jax.jit(exported.call, donate_argnums=donated).lower(*abstract)

    def finish() -> Callable:
        compiled = _compile(lowered)
        return lambda *a: jax.tree.unflatten(out_tree, compiled(*jax.tree.leaves(a)))

    return finish


def _checked(data: bytes) -> bytes:
    """A saved trace's payload, after its sha256 (the file's first 32 bytes): a flipped bit could
    otherwise deserialize into another program that runs."""
    digest, payload = data[:32], data[32:]
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError("saved trace does not match its checksum")
    return payload


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


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
