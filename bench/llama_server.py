"""llama.cpp's own `llama-server`, built once from the llama.cpp sources that the
`llama-cpp-python` sdist vendors (pip downloads the sdist; cmake builds the server target for
this CPU), kept in the jaxaccel cache, and run as the competitor in bench/serve.py and
bench/decode.py.

It is built per ISA tier, as jaxaccel's kernels are (JAXACCEL_CPU_ISA): "native" for this CPU,
"avx2" with AVX2 / FMA / F16C and no AVX-512 (what an AVX2-only CPU runs), "generic" with SSE4.2
only. So an AVX2 comparison on an AVX-512 machine runs AVX2 code on both sides.

    python -m bench.llama_server [--tier avx2]   # build (about 10 minutes on 2 cores) and print the path
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from jaxaccel.accelerate_llama import binary_name
from jaxaccel.paths import cache_dir

VERSION = "0.3.36"  # the llama-cpp-python release whose vendored llama.cpp is built
_NO_NATIVE = ["-DGGML_NATIVE=OFF", "-DGGML_SSE42=ON", "-DGGML_AVX512=OFF", "-DGGML_AVX_VNNI=OFF"]
TIER_FLAGS = {  # cmake flags per ISA tier (the tiers of jaxaccel.kernels.ISA_TIERS)
    "native": ["-DGGML_NATIVE=ON"],
    "avx2": _NO_NATIVE + [f"-DGGML_{f}=ON" for f in ("AVX", "AVX2", "FMA", "F16C", "BMI2")],
    "generic": _NO_NATIVE + [f"-DGGML_{f}=OFF" for f in ("AVX", "AVX2", "FMA", "F16C", "BMI2")],
}


def binary_path(version: str = VERSION, tier: str = "native") -> Path:
    return cache_dir() / "llama.cpp" / f"llama-cpp-python-{version}" / binary_name(tier)


def build(version: str = VERSION, log=print, tier: str = "native") -> Path:
    """The llama-server binary for ISA `tier`, built from the sdist's vendor/llama.cpp unless
    already built."""
    if tier not in TIER_FLAGS:
        raise ValueError(f"no llama.cpp build for ISA tier {tier!r}; choose one of {', '.join(TIER_FLAGS)}")
    out = binary_path(version, tier)
    if out.is_file() and os.access(out, os.X_OK):
        return out
    with tempfile.TemporaryDirectory(prefix="jaxaccel-llama-") as tmp:
        tmp = Path(tmp)
        log(f"downloading the llama-cpp-python {version} sdist (its vendored llama.cpp) ...")
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-binary", ":all:",
                        "--no-deps", "-d", str(tmp)], check=True, stdout=subprocess.DEVNULL)
        sdist = next(tmp.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = next(tmp.glob("llama_cpp_python-*/vendor/llama.cpp"))
        build_dir = src / "build"
        flags = [*TIER_FLAGS[tier], "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF"]
        log(f"building llama-server for the {tier} tier (cmake; several minutes) ...")
        t = time.perf_counter()
        subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), *flags], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                       check=True, stdout=subprocess.DEVNULL)
        built = next(build_dir.rglob("llama-server"))
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".partial")
        shutil.copy2(built, partial)
        partial.replace(out)  # atomic: a half-copied binary is never taken for a built one
        log(f"built {out} in {time.perf_counter() - t:.0f}s")
    return out


class LlamaServer:
    """`llama-server -m GGUF -t THREADS -np SLOTS -c CTX` on 127.0.0.1 (continuous batching)."""

    def __init__(self, gguf: Path, threads: int, slots: int, context: int, binary: Path | None = None,
                 repack: bool = True, http_threads: int = 80, extra_args: tuple[str, ...] = ()):
        """repack=False: `--no-repack` (no AMX / interleaved weight copies; llama.cpp's AMX path
        crashes on some VMs that list AMX flags, see `start`). extra_args: more llama-server
        options (bench/gguf_llama_check.py runs its KV cache types and flash-attention choices)."""
        self.repack = repack
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(binary or build()), "-m", str(gguf), "-t", str(threads), "-tb", str(threads), "-np", str(slots),
               "-c", str(context), "--host", "127.0.0.1", "--port", str(self.port), "-cb", "--no-webui",
               # HTTP threads for every client the bench opens at once (it defaults to the compute threads)
               "--threads-http", str(http_threads)]
        if not repack:
            cmd.append("--no-repack")
        cmd += list(extra_args)
        # its log goes to a file: a pipe nobody reads fills up and stalls the server mid-run
        self.log = tempfile.NamedTemporaryFile("w+", prefix="llama-server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        import httpx

        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}: "
                                   f"{Path(self.log.name).read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("llama-server did not become healthy in 300 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start(gguf: Path, threads: int, slots: int, context: int, log=print, tier: str = "native",
          extra_args: tuple[str, ...] = ()) -> LlamaServer:
    """LlamaServer built for ISA `tier`; if it dies at start-up by a signal (its AMX matmul
    crashes on some VMs whose CPU flags list AMX), again with --no-repack, saying so."""
    binary = build(log=log, tier=tier)
    try:
        return LlamaServer(gguf, threads, slots, context, binary=binary, extra_args=extra_args)
    except RuntimeError as e:
        if "exited with -" not in str(e):
            raise
        log(f"llama-server crashed at start-up ({str(e).splitlines()[0][:80]}); retrying with --no-repack")
        return LlamaServer(gguf, threads, slots, context, binary=binary, repack=False, extra_args=extra_args)


def timed_completion(server: LlamaServer, prompt_ids: list[int], new_tokens: int) -> dict:
    """One greedy completion of exactly `new_tokens` tokens (EOS ignored) from the token ids
    `prompt_ids` (no BOS added, no prompt cache reused), timed by llama.cpp itself:
    {"ttft_s": prompt evaluation, "decode_tok_s": tokens after the first per second, "tokens"}."""
    import httpx

    body = {"prompt": list(prompt_ids), "n_predict": new_tokens, "temperature": 0.0, "top_k": 1, "ignore_eos": True,
            "cache_prompt": False, "return_tokens": True, "stream": False}
    r = httpx.post(server.url + "/completion", json=body, timeout=600)
    r.raise_for_status()
    out = r.json()
    t = out["timings"]
    if t["predicted_n"] != new_tokens:
        raise RuntimeError(f"llama-server predicted {t['predicted_n']} tokens, asked for {new_tokens}")
    return {"ttft_s": t["prompt_ms"] / 1e3, "decode_tok_s": t["predicted_per_second"], "tokens": out.get("tokens")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", default=VERSION)
    p.add_argument("--tier", default="native", choices=list(TIER_FLAGS), help="ISA tier of the build")
    args = p.parse_args(argv)
    print(build(args.version, tier=args.tier))
    return 0


if __name__ == "__main__":
    sys.exit(main())
