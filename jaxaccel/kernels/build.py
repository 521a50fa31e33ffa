"""Building and loading the CPU kernels: the ISA tier, the compiler flags, the cached library
(keyed by everything it depends on, checked by its sha256) and the FFI registration. The
kernels themselves and when programs use them: `jaxaccel/kernels/__init__.py`."""

from __future__ import annotations

import atexit
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax

from ..paths import cache_dir, cache_writable

SOURCES = tuple(Path(__file__).with_name(n) for n in ("matvec.cc", "int4.cc", "attention.cc", "decode_attention.cc",
                                                       "take.cc", "w8a8.cc"))
SOURCES += (Path(__file__).with_name("ggml_blocks.cc"),)  # GGUF blocks as stored (kernels/ggml.py)
SOURCES += (Path(__file__).with_name("argmax.cc"),)
HEADERS = tuple(Path(__file__).with_name(n) for n in ("parallel.h", "simd.h", "softmax.h"))
TARGETS = {"jaxaccel_matvec": "JaxaccelMatvec", "jaxaccel_matvec_scaled": "JaxaccelMatvecScaled",
           "jaxaccel_matvec_scaled_many": "JaxaccelMatvecScaledMany",
           "jaxaccel_matvec_int4": "JaxaccelMatvecInt4",
           "jaxaccel_segment_attention": "JaxaccelSegmentAttention", "jaxaccel_take_rows": "JaxaccelTakeRows",
           "jaxaccel_write_rows": "JaxaccelWriteRows", "jaxaccel_decode_attention": "JaxaccelDecodeAttention",
           "jaxaccel_w8a8": "JaxaccelW8a8"}
TARGETS["jaxaccel_ggml_dot"] = "JaxaccelGgmlDot"  # kernels/ggml.py
TARGETS["jaxaccel_ggml_dot_many"] = "JaxaccelGgmlDotMany"
TARGETS["jaxaccel_argmax"] = "JaxaccelArgmax"
ENV = "JAXACCEL_CPU_KERNELS"
FLAGS_ENV = "JAXACCEL_CPU_KERNEL_FLAGS"
ISA_ENV = "JAXACCEL_CPU_ISA"
# tier -> (-march flags, /proc/cpuinfo flags the CPU needs to run that code)
ISA_TIERS = {
    "native": (["-march=native"], ()),
    "avx2": (["-march=x86-64-v3", "-mtune=native"], ("avx2", "fma", "bmi2", "f16c", "movbe")),
    "generic": (["-march=x86-64-v2", "-mtune=native"], ("sse4_2", "popcnt")),
}

_lock = threading.Lock()
_loaded: dict = {}  # "ok": bool, "error": str, "path": Path


def _cpu_tag() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return "\n".join(lines) or platform.processor() or platform.machine()


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))


def isa_tier() -> str:
    """The ISA tier the kernels are built for: $JAXACCEL_CPU_ISA, else "native"."""
    tier = os.environ.get(ISA_ENV, "native").strip().lower() or "native"
    if tier not in ISA_TIERS:
        raise ValueError(f"{ISA_ENV}={tier!r} is not a tier; choose one of {', '.join(ISA_TIERS)}")
    missing = [f for f in ISA_TIERS[tier][1] if f not in cpu_flags()]
    if missing:
        raise ValueError(f"{ISA_ENV}={tier} needs CPU features this CPU lacks ({', '.join(missing)}); "
                         "choose a lower tier")
    return tier


def _flags() -> list[str]:
    """Compiler flags: the ISA tier's; $JAXACCEL_CPU_KERNEL_FLAGS adds more (e.g.
    -DJAXACCEL_GENERIC: no hand-written AVX-512 code)."""
    return ["-O3", *ISA_TIERS[isa_tier()][0], "-std=c++17", "-shared", "-fPIC", "-w",
            *os.environ.get(FLAGS_ENV, "").split()]


def _ask_compiler(*args: str) -> str:
    try:
        return subprocess.run([_compiler(), *args], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _library_path() -> Path:
    """The cached library's name hashes all it depends on: the source, jaxlib (FFI headers), the
    compiler, the flags, and what -march=native means on the CPU at hand (as the compiler resolves it;
    a library built for another CPU of a shared cache folder could crash on an instruction)."""
    import jaxlib

    flags = _flags()
    march = [f for f in flags if f.startswith(("-march", "-mtune"))]
    key = "\x00".join([*(p.read_text() for p in SOURCES + HEADERS), jaxlib.__version__, _compiler(), _ask_compiler("--version"),
                        " ".join(flags), _ask_compiler(*march, "-Q", "--help=target"), _cpu_tag()])
    return cache_dir() / "kernels" / f"cpu-{hashlib.sha256(key.encode()).hexdigest()[:24]}.so"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verified(path: Path) -> bool:
    """Whether `path` is a library we built: its sha256 matches the one written beside it after
    the build. A truncated library would crash the process (SIGBUS) when loaded."""
    try:
        return path.is_file() and path.with_suffix(".sha256").read_text().strip() == _digest(path)
    except OSError:
        return False


def _built_library() -> Path:
    """The verified library for this machine: from the cache, else built there (a damaged one is
    rebuilt), else, where the cache cannot be written, built in a temporary folder."""
    path = _library_path()
    if _verified(path):
        return path
    if path.exists():
        warnings.warn(f"rebuilding jaxaccel's CPU kernels: the cached {path} does not match its checksum",
                      RuntimeWarning, stacklevel=3)
    if cache_writable():
        try:
            _build(path)
            return path
        except OSError as e:  # the cache filled up, or went read-only, meanwhile
            warnings.warn(f"cannot write jaxaccel's kernel cache ({e}); building the CPU kernels in a temporary "
                          "folder for this process", RuntimeWarning, stacklevel=3)
    tmp = Path(tempfile.mkdtemp(prefix="jaxaccel-kernels-")) / path.name
    atexit.register(shutil.rmtree, tmp.parent, True)
    _build(tmp)
    return tmp


def _build(path: Path) -> None:
    """Compile the sources (in parallel, one compiler per source) and link them into one library
    at `path` (atomically: a concurrent process sees all of it or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        flags = [f for f in _flags() if f != "-shared"]
        objects = [os.path.join(tmp, src.stem + ".o") for src in SOURCES]
        procs, errors = [], []
        try:
            for src, obj in zip(SOURCES, objects):
                cmd = [_compiler(), *flags, f"-I{jax.ffi.include_dir()}", "-c", str(src), "-o", obj]
                procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            for proc in procs:
                _, err = proc.communicate(timeout=600)
                if proc.returncode:
                    errors.append(err[-2000:])
            if not errors:
                library = os.path.join(tmp, "lib.so")
                link = subprocess.run([_compiler(), *_flags(), *objects, "-o", library], capture_output=True, text=True,
                                      timeout=600)
                errors = [link.stderr[-2000:]] if link.returncode else []
        except (OSError, subprocess.SubprocessError) as e:  # no compiler (not a cache problem)
            raise RuntimeError(f"cannot run the C++ compiler {_compiler()!r}: {e}") from None
        finally:
            for proc in procs:  # a failed start or a timeout: stop the others too
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if errors:
            raise RuntimeError(f"{_compiler()} failed:\n" + "\n".join(errors))
        digest = os.path.join(tmp, "lib.sha256")
        Path(digest).write_text(_digest(Path(library)))
        os.replace(library, path)  # the library first: one without its checksum is rebuilt
        os.replace(digest, path.with_suffix(".sha256"))


def load() -> bool:
    """Build (once per machine) and register the kernels; False, with one warning, if they
    cannot be had here. Safe to call from several threads."""
    with _lock:
        if "ok" in _loaded:
            return _loaded["ok"]
        if os.environ.get(ENV, "1") == "0":
            _loaded.update(ok=False, error=f"{ENV}=0")
            return False
        try:
            import ctypes

            path = _built_library()
            lib = ctypes.cdll.LoadLibrary(str(path))
            for target, symbol in TARGETS.items():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
            _loaded.update(ok=True, path=path, lib=lib)
        except Exception as e:  # noqa: BLE001 - any failure means: use XLA's dots
            _loaded.update(ok=False, error=f"{type(e).__name__}: {e}")
            warnings.warn(f"jaxaccel's CPU kernels are unavailable, so decoding uses XLA's dots (bfloat16 / "
                          f"int8 weights decode several times slower) and encoders XLA's attention: {_loaded['error']}\n"
                          f"Install a C++ compiler (e.g. apt install g++) or set $CXX; set {ENV}=0 to "
                          "silence this.", RuntimeWarning, stacklevel=2)
        return _loaded["ok"]
