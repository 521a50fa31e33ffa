"""What the bench scripts share: the machine description (with the CPU's ISA flags) each prints
and writes to its JSON, the JSON writer, the text table, best-of timing, the host / device
memory bandwidth probes, and the random-weight models several benches build.

Works both under `python -m bench.X` and `python bench/X.py` (the scripts put the repository
root on sys.path before importing it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

# "(a) ~56M Llama-style random model"
# Every weight int4, the tied embedding too (QuantConfig arguments): the fewest bytes int4 reads on
# Gemma 3 270M, whose embedding is most of them. bench.decode's --weights int4-all, and
# bench.quant_quality's "all int4, int4 embedding" row (what it costs in quality).
INT4_ALL = dict(mode="int4", int4_keeps_int8=(), rules=((r"embed_tokens/", "int4"),))
RANDOM_CONFIG = dict(family="llama", vocab_size=32000, hidden_size=512, intermediate_size=1408,
                     num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64,
                     max_position_embeddings=2048, rms_norm_eps=1e-5, eos_token_id=None)

# The x86 ISA extensions jaxaccel's CPU kernels and XLA's CPU code can use, as /proc/cpuinfo names them
KERNEL_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


# --- machine --------------------------------------------------------------------------------
def _cpuinfo() -> str | None:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def cpu_flags(cpuinfo: str | None = None) -> list[str] | None:
    """The KERNEL_FLAGS the CPU has (the first `flags` line of /proc/cpuinfo, or of `cpuinfo`),
    in KERNEL_FLAGS' order; None where there is no such line (not Linux, not x86)."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    for line in (text or "").splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return [f for f in KERNEL_FLAGS if f in have]
    return None


def flags_text(machine: dict) -> str:
    """`machine_info()`'s CPU flags as the scripts print them."""
    flags = machine.get("cpu_flags")
    return "CPU flags: " + ("unknown" if flags is None else " ".join(flags) or "none")


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    text = _cpuinfo()
    for line in (text or "").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import jax
    import torch
    import transformers

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    mem = None
    try:
        import psutil

        mem = psutil.virtual_memory().total
    except ImportError:
        pass
    dev = jax.devices()[0]
    accel = None if dev.platform == "cpu" else {"platform": dev.platform, "kind": dev.device_kind,
                                                 "count": jax.device_count()}
    return {
        "accelerator": accel,
        "cpu": cpu,
        "cpu_flags": cpu_flags(text or ""),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "memory_bytes": mem,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "jax": jax.__version__,
        "jax_devices": [str(d) for d in jax.devices()],
        "torch": torch.__version__,
        "torch_cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_num_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
    }


# --- output ---------------------------------------------------------------------------------
def write_json(doc: dict, path) -> None:
    """Write a benchmark's results (bench/results/ by default) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")


def format_table(header: list, rows: list) -> str:
    """Rows of cells -> an aligned text table (first column left, the rest right)."""
    cells = [[str(c) for c in r] for r in [header, *rows]]
    width = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, width)))
    return "\n".join([fmt(cells[0]), "-+-".join("-" * w for w in width), *map(fmt, cells[1:])])


# --- timing and bandwidth -------------------------------------------------------------------
def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


class _Probe:
    """What both probes share: a context manager; `sample()` = copy and read, best of SAMPLES."""

    SAMPLES = 2

    def __enter__(self):
        return self

    def sample(self) -> dict:
        m = self.measure(self.SAMPLES)
        return {"copy": m["copy"], "read": m["read"]}


class BandwidthProbe(_Probe):
    """Copy and read bandwidth of `nbytes` float32 arrays kept between samples, so that a short
    sample can be taken right before each timed run: a VM's bandwidth can move 2x within
    minutes, so a roofline from one start-of-run sample says as much about the minute as about
    the code. `sample()` is the all-threads copy and read, best of 2."""

    def __init__(self, nbytes: int):
        n = nbytes // 4
        self.src = np.ones(n, np.float32)
        self.dst = np.empty_like(self.src)
        np.copyto(self.dst, self.src)  # fault the pages in
        self.threads = os.cpu_count() or 1
        self.slices = [slice(c[0], c[-1] + 1) for c in np.array_split(np.arange(n), self.threads) if len(c)]
        self.pool = ThreadPoolExecutor(self.threads)

    def __exit__(self, *exc):
        self.pool.shutdown()

    def _par(self, f):
        return list(self.pool.map(f, self.slices))

    def _copy(self, s):
        np.copyto(self.dst[s], self.src[s])

    def _read(self, s):
        return self.src[s].sum()

    def measure(self, repeats: int, single_thread: bool = False) -> dict:
        src, dst = self.src, self.dst
        out = {"array_bytes": int(src.nbytes), "repeats": repeats, "threads": self.threads}
        if single_thread:
            out["copy_1thread"] = 2 * src.nbytes / best_of(lambda: np.copyto(dst, src), repeats)
            out["read_1thread"] = src.nbytes / best_of(lambda: src.sum(), repeats)
        out["copy_all_threads"] = 2 * src.nbytes / best_of(lambda: self._par(self._copy), repeats)
        out["read_all_threads"] = src.nbytes / best_of(lambda: self._par(self._read), repeats)
        out["copy"] = max(out["copy_all_threads"], out.get("copy_1thread", 0.0))
        out["read"] = max(out["read_all_threads"], out.get("read_1thread", 0.0))
        return out


class DeviceBandwidthProbe(_Probe):
    """BandwidthProbe's figures for an accelerator's own memory (GPU / TPU runs): copy = 2 * bytes
    / time of a jitted `x * 2` over `nbytes` float32, read = bytes / time of a jitted sum. Each
    figure is the best of `repeats` timings of LOOP back-to-back calls (dispatch is asynchronous,
    so the per-call launch cost hides behind the previous call), divided by LOOP."""

    LOOP = 10
    SAMPLES = 3

    def __init__(self, nbytes: int):
        import jax
        import jax.numpy as jnp

        self.x = jnp.ones(nbytes // 4, jnp.float32)
        self.device = str(self.x.devices().pop())
        self._copy, self._read = jax.jit(lambda x: x * 2), jax.jit(jnp.sum)
        for f in (self._copy, self._read):
            f(self.x).block_until_ready()  # compile

    def __exit__(self, *exc):
        del self.x

    def _seconds(self, f, repeats: int) -> float:
        def run():
            for _ in range(self.LOOP):
                out = f(self.x)  # one result alive at a time: 4 GiB stays 4 GiB more, not 40
            out.block_until_ready()
        return best_of(run, repeats) / self.LOOP

    def measure(self, repeats: int, single_thread: bool = False) -> dict:
        n = self.x.nbytes
        return {"array_bytes": int(n), "repeats": repeats, "device": self.device, "calls_per_timing": self.LOOP,
                "copy": 2 * n / self._seconds(self._copy, repeats), "read": n / self._seconds(self._read, repeats)}


# --- models ---------------------------------------------------------------------------------
def random_config(name: str):
    """The random-weight models' configs: "random" (the issue's ~56M Llama), "gemma-random"
    (Gemma 3 270M's shapes, for machines the GGUF cannot be taken to)."""
    import jaxaccel
    from jaxaccel.presets import preset

    return jaxaccel.ModelConfig(**RANDOM_CONFIG) if name == "random" else preset("gemma3-270m")


def random_model(config):
    """float32 random weights initialised on the CPU where jax has one, then put on the default
    device: an init on an accelerator is compiled there by XLA, which takes far longer than the
    same init on the CPU."""
    import jax

    import jaxaccel

    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu
        cpu = jax.devices()[0]
    with jax.default_device(cpu):
        model = jaxaccel.init_random(config, seed=0, dtype="float32")
    return dataclasses.replace(model, params=jax.device_put(model.params, jax.devices()[0]))
