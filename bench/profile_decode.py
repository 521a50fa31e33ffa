"""Where a decode step's time goes: timings of one jaxaccel generation without and with
streaming, and a profiler trace of each, summarised per device line (kernels per step, busy time
per step, the costliest ops).

    python -m bench.profile_decode --model gemma-random --weights bfloat16 --out prof.json

The wall time per decode step against the device's busy time per step says what bounds decode:
busy ~ wall means the kernels themselves (their count and size); busy << wall means launches,
host round trips or synchronisation. `bench/gpu_decode.sh` runs it on a GPU; on the CPU backend
the trace has XLA's CPU ops instead of kernels. Timings are medians of --repeats runs after a
warm-up (compilation excluded); the traced runs are extra and slower than untraced ones.

`--huge-pages ROUNDS` (CPU backend, Linux >= 6.1) times the decode with the weights in 4 KiB
pages, as XLA allocates them, against a copy collapsed into 2 MiB transparent huge pages
(madvise MADV_HUGEPAGE + MADV_COLLAPSE), alternating the two for ROUNDS rounds: the bandwidth
probe of `bench.decode` (`bench.common.BandwidthProbe`) reads numpy arrays, which numpy puts in
huge pages, and the weights are not.

`--fused-projections-ab ROUNDS` times a layer's projections of one input (q / k / v, gate / up)
in one kernel call, the default, against one call each, alternating in the same way.
`--model gemma-gguf --weights gguf` profiles the embedded GGUF with its blocks as stored.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import dataclasses
import gzip
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    from bench.common import flags_text, machine_info, random_config, random_model, write_json
except ImportError:  # run as a script: python bench/profile_decode.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.common import flags_text, machine_info, random_config, random_model, write_json

MODELS = ("random", "gemma-random", "gemma-gguf")


def build(name: str, weights: str):
    """Random-weight model `name` (bench.common's, as bench.decode builds it) on the default
    device, in `weights`; "gemma-gguf" is the embedded Gemma 3 270M Q4_K_M GGUF with its blocks
    as stored (`weights` "gguf"), EOS off as for the random models."""
    import jaxaccel

    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    if name == "gemma-gguf":
        from jaxaccel import default_models

        if weights != "gguf":
            raise SystemExit("--model gemma-gguf serves the file's blocks as stored: pass --weights gguf")
        model = jaxaccel.load(default_models.gemma_gguf_path(), gguf_weights="as_stored")
        return dataclasses.replace(model, config=model.config.replace(eos_token_id=None), tokenizer=None)
    model = random_model(random_config(name).replace(eos_token_id=None))  # no EOS: every row runs the full length
    if weights != "float32":
        model = model.quantize(jaxaccel.QuantConfig(mode=weights))
    return model


def keep_going(tokens, first_step):
    return np.zeros(tokens.shape[0], bool)


def stop_after_first(tokens, first_step):  # host_step: every row stops after its first token
    return np.ones(tokens.shape[0], bool)


def decode_ms_per_step(total_s: float, first_token_s: float, new_tokens: int) -> float:
    """ms per decode step of a generation of `new_tokens` (the first token's time excluded)."""
    return 1e3 * (total_s - first_token_s) / (new_tokens - 1)


def timings(model, prompts, new_tokens: int, repeats: int) -> dict:
    """Median seconds of: a whole generation (one program call), its prefill + first token, a
    streamed one (host_step: chunks of about streaming.STREAM_INTERVAL_S) and one with a program
    call per token; decode ms per step of each (first token excluded)."""
    from jaxaccel.generation import _engine, generate_tokens, make_rows

    gen = lambda **kw: lambda: generate_tokens(model, prompts, max_new_tokens=new_tokens, **kw)
    per_token = lambda: _engine(model).run(prompts, new_tokens, make_rows(model, len(prompts), 0.0, None, None),
                                           [0] * len(prompts), [], keep_going, chunk=1)
    runs = {"whole": gen(), "first_token": gen(host_step=stop_after_first),
            "streamed": gen(host_step=keep_going), "per_token_calls": per_token}
    out = {}
    for name, fn in runs.items():
        fn()  # compiles (once: every run is the same program)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[f"{name}_s"] = statistics.median(times)
    for name in ("whole", "streamed", "per_token_calls"):
        out[f"{name}_decode_ms_per_step"] = decode_ms_per_step(out[f"{name}_s"], out["first_token_s"], new_tokens)
    return out


MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25  # Linux <sys/mman.h>
HUGE_PAGE = 2 << 20


def collapse_huge_pages(arrays) -> dict:
    """Back the whole 2 MiB pages inside each (CPU) array with transparent huge pages: madvise
    MADV_HUGEPAGE, then MADV_COLLAPSE per 2 MiB (Linux >= 6.1; the data stay where they are).
    -> {"bytes": collapsed, "failed": 2 MiB pages refused, "errno": the last refusal's, "seconds"}."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    out = {"bytes": 0, "failed": 0, "errno": 0}
    t0 = time.perf_counter()
    for x in arrays:
        x.block_until_ready()  # an array still being computed has no pages to collapse yet
        start = x.unsafe_buffer_pointer()
        lo, hi = -(-start // HUGE_PAGE) * HUGE_PAGE, (start + x.nbytes) // HUGE_PAGE * HUGE_PAGE
        if hi <= lo:
            continue
        libc.madvise(lo, hi - lo, MADV_HUGEPAGE)
        for page in range(lo, hi, HUGE_PAGE):
            if libc.madvise(page, HUGE_PAGE, MADV_COLLAPSE):
                out["failed"] += 1
                out["errno"] = ctypes.get_errno()
            else:
                out["bytes"] += HUGE_PAGE
    out["seconds"] = time.perf_counter() - t0
    return out


def huge_page_ab(model, prompts, new_tokens: int, rounds: int) -> dict:
    """Decode ms/step of two copies of `model`'s params, one as XLA allocated it (4 KiB pages),
    one collapsed into huge pages, timed alternately `rounds` times (a VM's bandwidth can drift
    within minutes, so only neighbouring timings compare); medians and the median per-round ratio."""
    import jax
    import jax.numpy as jnp

    if jax.default_backend() != "cpu" or not Path("/proc/self/smaps").exists():
        raise SystemExit("--huge-pages: CPU backend on Linux only (transparent huge pages of host memory)")
    copy = jax.jit(lambda p: jax.tree.map(lambda x: x * jnp.ones((), x.dtype), p))  # fresh XLA buffers
    small = dataclasses.replace(model, params=copy(model.params))
    huge = dataclasses.replace(model, params=copy(model.params))
    collapsed = collapse_huge_pages(jax.tree.leaves(huge.params))

    times = alternate({"4k": small, "huge": huge}, prompts, new_tokens, rounds)
    ratios = [h / s for h, s in zip(times["huge"], times["4k"])]
    return {"collapse": collapsed, "params_bytes": model.params_bytes, "ms_per_step": times,
            "median_4k_ms": statistics.median(times["4k"]), "median_huge_ms": statistics.median(times["huge"]),
            "median_ratio_huge_to_4k": statistics.median(ratios)}


def alternate(models: dict, prompts, new_tokens: int, rounds: int) -> dict[str, list[float]]:
    """Decode ms/step of each of `models` (a whole generation less its first token's time), timed
    in turn `rounds` times after one compiling run each: a VM's bandwidth can drift within
    minutes, so only neighbouring timings compare."""
    from jaxaccel.generation import generate_tokens

    def step_ms(m):
        t0 = time.perf_counter()
        generate_tokens(m, prompts, max_new_tokens=new_tokens)
        t1 = time.perf_counter()
        generate_tokens(m, prompts, max_new_tokens=new_tokens, host_step=stop_after_first)
        return decode_ms_per_step(t1 - t0, time.perf_counter() - t1, new_tokens)

    for m in models.values():
        step_ms(m)  # compiles
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, m in models.items():
            times[name].append(step_ms(m))
    return times


def fused_projections_ab(model, prompts, new_tokens: int, rounds: int) -> dict:
    """Decode ms/step with a layer's projections of one input in one kernel call (the default)
    against one call per projection (`KernelChoice(fuse_projections=False)`), alternating."""
    from jaxaccel.kernels import KernelChoice

    apart = dataclasses.replace(model, kernels=KernelChoice(decode=True, fuse_projections=False))
    times = alternate({"fused": model, "apart": apart}, prompts, new_tokens, rounds)
    ratios = [f / a for f, a in zip(times["fused"], times["apart"])]
    return {"ms_per_step": times, "median_fused_ms": statistics.median(times["fused"]),
            "median_apart_ms": statistics.median(times["apart"]), "median_ratio_fused_to_apart": statistics.median(ratios)}


def parse_variant(text: str) -> tuple[str, dict]:
    """"NAME:OPTION=VALUE OPTION=VALUE" -> (NAME, {OPTION: value}); true/false and integers parsed."""
    name, _, rest = text.partition(":")
    opts = {}
    for item in rest.split():
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--variant {text!r}: options are OPTION=VALUE, got {item!r}")
        low = value.lower()
        opts[key] = True if low == "true" else False if low == "false" else int(value) if value.isdigit() else value
    return name, opts


def load_trace(trace_dir: Path) -> dict:
    (path,) = sorted(trace_dir.rglob("perfetto_trace.json.gz"))[-1:]
    with gzip.open(path, "rt") as f:
        return json.load(f)


def summarise(trace: dict, steps: int, top: int = 25) -> dict:
    """Per (process, thread) line: complete events, their summed duration, both per decode step
    (the prefill and first token are in the sums too: "per step" overstates a step by about 1 /
    steps of a prefill), and the costliest event names (by summed duration). Lines are the
    trace's own: on a GPU the stream lines hold one event per kernel / copy; host lines nest
    events (a function and its callees), so their busy time can exceed their span."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    lines = collections.defaultdict(lambda: {"events": 0, "busy_us": 0.0, "names": collections.Counter(),
                                             "counts": collections.Counter(), "first": None, "last": None})
    for e in events:
        if e.get("ph") != "X":
            continue
        key = (procs.get(e["pid"], str(e["pid"])), threads.get((e["pid"], e["tid"]), str(e["tid"])))
        line, dur, ts = lines[key], float(e.get("dur", 0.0)), float(e["ts"])
        line["events"] += 1
        line["busy_us"] += dur
        line["names"][e["name"]] += dur
        line["counts"][e["name"]] += 1
        line["first"] = ts if line["first"] is None else min(line["first"], ts)
        line["last"] = ts + dur if line["last"] is None else max(line["last"], ts + dur)
    out = []
    for (proc, thread), line in sorted(lines.items(), key=lambda kv: -kv[1]["busy_us"]):
        out.append({"process": proc, "thread": thread, "events": line["events"],
                    "events_per_step": line["events"] / steps, "busy_us": line["busy_us"],
                    "busy_us_per_step": line["busy_us"] / steps, "span_us": line["last"] - line["first"],
                    "top": [{"name": n[:160], "us": us, "count": line["counts"][n], "us_per_step": us / steps}
                            for n, us in line["names"].most_common(top)]})
    return {"lines": out}


def profile(model, prompts, new_tokens: int, trace_dir: Path, **kw) -> dict:
    import jax

    from jaxaccel.generation import generate_tokens

    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        t0 = time.perf_counter()
        generate_tokens(model, prompts, max_new_tokens=new_tokens, **kw)
        wall = time.perf_counter() - t0
    return {"traced_wall_s": wall, **summarise(load_trace(trace_dir), new_tokens - 1)}


def print_summary(label: str, s: dict, lines: int = 8, top: int = 15) -> None:
    """The busiest lines, then the costliest events of the busiest device line (of the busiest
    non-Python host line on the CPU backend) and of the Python line."""
    from bench.common import format_table

    print(f"\n{label}: traced wall {1e3 * s['traced_wall_s']:.1f} ms")
    rows = [[x["process"][:28], x["thread"][:36], x["events"], f"{x['events_per_step']:.1f}",
             f"{x['busy_us_per_step']:.1f}", f"{x['span_us'] / 1e3:.1f}"] for x in s["lines"][:lines]]
    print(format_table(["process", "line", "events", "per step", "busy us/step", "span ms"], rows))
    device = [x for x in s["lines"] if not x["process"].startswith("/host")]
    host = [x for x in s["lines"] if x["process"].startswith("/host") and x["thread"] != "python"]
    python = [x for x in s["lines"] if x["thread"] == "python"]
    for x in (device or host)[:1] + python[:1]:
        print(f"costliest on {x['process']} / {x['thread']}:")
        print(format_table(["name", "count", "us/step"],
                           [[t["name"][:100], t["count"], f"{t['us_per_step']:.2f}"] for t in x["top"][:top]]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-random",
                    help="random or gemma-random (random weights), or gemma-gguf (the embedded GGUF as stored)")
    ap.add_argument("--weights", default="bfloat16",
                    help="float32, bfloat16, int8 or int4 (QuantConfig modes); gguf with --model gemma-gguf")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-trace", action="store_true", help="timings only")
    ap.add_argument("--variant", action="append", default=[],
                    help='"NAME:OPTION=VALUE ..." XLA compile options to time beside the defaults (no trace), e.g. '
                         '"no_graphs:xla_gpu_enable_command_buffer="; repeatable')
    ap.add_argument("--huge-pages", type=int, default=0, metavar="ROUNDS",
                    help="also time the weights in 4 KiB against 2 MiB (transparent huge) pages, alternating "
                         "for ROUNDS rounds (CPU backend, Linux)")
    ap.add_argument("--fused-projections-ab", type=int, default=0, metavar="ROUNDS",
                    help="also time a layer's projections of one input in one kernel call (the default) against "
                         "one call each (KernelChoice(fuse_projections=False)), alternating for ROUNDS rounds")
    ap.add_argument("--out", default=None, help="JSON output")
    args = ap.parse_args(argv)
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be >= 2 (decode excludes the first token)")
    if args.huge_pages < 0 or args.fused_projections_ab < 0:
        raise SystemExit("--huge-pages and --fused-projections-ab must be >= 0 rounds")
    variants = [parse_variant(v) for v in args.variant]
    import jax

    from jaxaccel import program_cache

    model = build(args.model, args.weights)
    V = model.config.vocab_size
    prompts = np.random.default_rng(0).integers(100, V, size=(args.batch, args.prompt_len)).tolist()
    machine = machine_info()
    doc = {"benchmark": "profile_decode", "argv": argv, "machine": machine, "settings": vars(args),
           "params_bytes": model.params_bytes, "backend": jax.default_backend()}
    print(f"machine: {machine['cpu']}, {machine['cpus_usable']} usable cores; {flags_text(machine)}")
    print(f"{args.model} {args.weights} B={args.batch} on {jax.devices()[0]}; weights "
          f"{model.params_bytes / 2**20:.0f} MiB; decode ms/step (tok/s) of a whole generation / streamed / "
          "one call per token:", flush=True)
    backend = jax.default_backend()
    doc["timings"] = {}
    saved = program_cache.COMPILER_OPTIONS.get(backend)
    for name, opts in [("default", saved or {}), *variants]:
        program_cache.COMPILER_OPTIONS[backend] = opts
        try:  # another Model object has its own engine: programs compiled with these options
            t = timings(model if name == "default" else dataclasses.replace(model), prompts, args.new_tokens,
                        args.repeats)
        except Exception as e:  # noqa: BLE001 - an option this XLA lacks: say so, time the rest
            print(f"  {name} {opts}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            doc["timings"][name] = {"options": opts, "error": str(e)[:2000]}
            continue
        doc["timings"][name] = {"options": opts, **t}
        tok_s = lambda k: f"{t[k]:.3f} ({args.batch * 1e3 / t[k]:.0f})"
        print(f"  {name}: {tok_s('whole_decode_ms_per_step')} / {tok_s('streamed_decode_ms_per_step')} / "
              f"{tok_s('per_token_calls_decode_ms_per_step')}; first token {1e3 * t['first_token_s']:.1f} ms",
              flush=True)
    program_cache.COMPILER_OPTIONS.pop(backend, None)
    if saved is not None:
        program_cache.COMPILER_OPTIONS[backend] = saved
    if args.huge_pages:
        doc["huge_pages"] = h = huge_page_ab(model, prompts, args.new_tokens, args.huge_pages)
        c = h["collapse"]
        print(f"  weights in 4 KiB pages {h['median_4k_ms']:.3f} ms/step, in huge pages {h['median_huge_ms']:.3f} "
              f"(median ratio {h['median_ratio_huge_to_4k']:.3f} over {args.huge_pages} alternating rounds); "
              f"collapsed {c['bytes'] / 2**20:.0f} of {h['params_bytes'] / 2**20:.0f} MiB in {c['seconds']:.1f} s"
              + (f", {c['failed']} pages of 2 MiB refused (errno {c['errno']})" if c["failed"] else ""), flush=True)
    if args.fused_projections_ab:
        doc["fused_projections"] = f = fused_projections_ab(model, prompts, args.new_tokens, args.fused_projections_ab)
        print(f"  projections of one input in one call {f['median_fused_ms']:.3f} ms/step, one call each "
              f"{f['median_apart_ms']:.3f} (median ratio {f['median_ratio_fused_to_apart']:.3f} over "
              f"{args.fused_projections_ab} alternating rounds)", flush=True)
    if not args.no_trace:
        with tempfile.TemporaryDirectory(prefix="jaxaccel-prof-") as tmp:
            for label, kw in (("whole", {}), ("streamed", {"host_step": keep_going})):
                try:
                    doc[f"trace_{label}"] = s = profile(model, prompts, args.new_tokens, Path(tmp) / label, **kw)
                except Exception as e:  # noqa: BLE001 - no profiler here (e.g. no CUPTI): keep the timings
                    print(f"trace of one {label} generation failed: {type(e).__name__}: {str(e)[:300]}")
                    continue
                print_summary(f"trace of one {label} generation", s)
    if args.out:
        write_json(doc, args.out)
    return doc


if __name__ == "__main__":
    main()
