"""Speed of each quantization mode vs float32 on whatever backend JAX finds (CPU here; the same
script runs on a GPU / TPU, where the low-precision modes are expected to win).

1. Formulations of a weight-only matmul at batch 1 (the decode case), one [out, in] = [2048, 640]
   matrix (Gemma 3 270M's MLP), best of 20 x --repeats calls: float32; int8 dequantized and
   multiplied in the [in, out] layout (what quant.py does), or contracting the last axis of
   [out, in], or as a fused multiply + reduce; int4 g=32 unpacked + dequantized; bf16.
2. End to end, per mode: prefill tokens/s (prompt tokens / time to first token) and decode
   tokens/s (tokens after the first / the rest of the time), measured exactly as
   bench/decode.py measures jaxaccel (its `bench_jax`: median of --repeats after a warm-up).

  python bench/quant_speed.py            # Gemma 3 270M, batch 1 and 8
  python bench/quant_speed.py --quick    # random ~56M Llama, batch 1, short
Targets on a GPU (issue 5): int8 decode at batch 1 >= 1.6x bf16; w8a8 prefill >= 1.3x bf16.
Never part of the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
OUT = HERE / "results" / "quant_speed.json"
MODES = [("float32", dict(mode="float32")), ("bfloat16", dict(mode="bfloat16")), ("int8", dict(mode="int8")),
         ("int4 g=32", dict(mode="int4", group_size=32)), ("w8a8", dict(mode="w8a8"))]


def formulations(repeats: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from bench.common import best_of
    from jaxaccel import quant_math

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(2048, 640)).astype(np.float32) * 0.02)
    x = jnp.asarray(rng.normal(size=(1, 640)).astype(np.float32))
    q, s = quant_math.quantize(w, 8)
    dims = (((1,), (1,)), ((), ()))
    q4, s4, z4 = quant_math.quantize_asymmetric(w, 4, 32)
    p4 = quant_math.pack_int4(q4)
    dot = lambda x, w, d=(((1,), (0,)), ((), ())): jax.lax.dot_general(x, w, d)  # w [in, out]
    cases = {
        "float32 dot, w [in, out]": (lambda x, w: dot(x, w.T), (x, w)),
        "int8: dequantize, dot on w.T [in, out] (used)": (lambda x, q, s: dot(x, quant_math.dequantize(q, s).T), (x, q, s)),
        "int8: dequantize, dot contracting w's last axis": (lambda x, q, s: dot(x, quant_math.dequantize(q, s), dims), (x, q, s)),
        "int8: fused multiply + reduce over the last axis": (lambda x, q, s: jnp.sum(x[:, None, :] * quant_math.dequantize(q, s), -1), (x, q, s)),
        "int4 g=32: unpack, dequantize, dot on w.T (used)": (lambda x, p, s, z: dot(x, quant_math.dequantize(quant_math.unpack_int4(p), s, z).T), (x, p4, s4, z4)),
        "bfloat16 dot": (lambda x, w: dot(x, w.T), (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))),
    }
    cases = {k: (jax.jit(f), a) for k, (f, a) in cases.items()}
    out = []
    for name, (fn, args) in cases.items():
        run = lambda: fn(*args).block_until_ready()
        run()  # compile
        t = best_of(run, repeats * 20)
        out.append({"formulation": name, "us": 1e6 * t})
    for r in out:
        r["vs_float32"] = out[0]["us"] / r["us"]
    return out


def end_to_end(args) -> list[dict]:
    import jaxaccel
    from bench.common import RANDOM_CONFIG
    from bench.decode import bench_jax

    if args.quick:
        base = jaxaccel.init_random(jaxaccel.ModelConfig(**RANDOM_CONFIG), seed=0)
    else:
        from jaxaccel.default_models import default_model_path

        base = jaxaccel.load(default_model_path(print))
    base = dataclasses.replace(base, config=base.config.replace(eos_token_id=None), tokenizer=None)
    rng = np.random.default_rng(0)
    results = []
    for label, kw in MODES:
        m = base.quantize(jaxaccel.QuantConfig(**kw))
        for B in args.batch:
            prompts = rng.integers(100, base.config.vocab_size, size=(B, args.prompt_len)).tolist()
            r = bench_jax(m, prompts, args.new_tokens, args.repeats, stream=False)
            results.append({"mode": label, "batch": B, "params_bytes": m.params_bytes,
                            "prefill_tok_s": B * args.prompt_len / r["ttft_s"],
                            "decode_tok_s": B * (args.new_tokens - 1) / max(r["total_s"] - r["ttft_s"], 1e-9),
                            "ttft_s": r["ttft_s"], "total_s": r["total_s"]})
            print(f"{label} B={B}: prefill {results[-1]['prefill_tok_s']:.0f} tok/s, "
                  f"decode {results[-1]['decode_tok_s']:.1f} tok/s", flush=True)
        del m
    for r in results:
        ref = next(x for x in results if x["mode"] == "float32" and x["batch"] == r["batch"])
        bf = next(x for x in results if x["mode"] == "bfloat16" and x["batch"] == r["batch"])
        r["prefill_vs_float32"], r["decode_vs_float32"] = r["prefill_tok_s"] / ref["prefill_tok_s"], r["decode_tok_s"] / ref["decode_tok_s"]
        r["prefill_vs_bf16"], r["decode_vs_bf16"] = r["prefill_tok_s"] / bf["prefill_tok_s"], r["decode_tok_s"] / bf["decode_tok_s"]
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="random ~56M Llama, batch 1, 32-token prompts, 16 new tokens")
    ap.add_argument("--batch", default=None, help="comma list (default 1,8; --quick 1)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 128 (--quick 32)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 64 (--quick 16)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    args.batch = [int(b) for b in (args.batch or ("1" if args.quick else "1,8")).split(",")]
    args.prompt_len = args.prompt_len or (32 if args.quick else 128)
    args.new_tokens = args.new_tokens or (16 if args.quick else 64)

    import jax

    from bench.common import flags_text, format_table, machine_info, write_json

    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['cpus_usable']} usable cores; jax {machine['jax']} {machine['jax_devices']}; "
          f"{flags_text(machine)}")
    forms = formulations(args.repeats)
    print("\nweight-only matmul at batch 1, [1, 640] x [2048, 640]^T, backend " + jax.default_backend())
    print(format_table(["formulation", "us", "speed vs float32"],
                       [[r["formulation"], f"{r['us']:.1f}", f"{r['vs_float32']:.2f}x"] for r in forms]))
    e2e = end_to_end(args)
    print(f"\nend to end ({'random llama' if args.quick else 'gemma3-270m'}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, median of {args.repeats})")
    print(format_table(["mode", "B", "params MiB", "prefill tok/s", "decode tok/s", "prefill vs f32", "decode vs f32",
                        "prefill vs bf16", "decode vs bf16"],
                       [[r["mode"], r["batch"], f"{r['params_bytes'] / 2**20:.0f}", f"{r['prefill_tok_s']:.0f}",
                         f"{r['decode_tok_s']:.1f}", f"{r['prefill_vs_float32']:.2f}x", f"{r['decode_vs_float32']:.2f}x",
                         f"{r['prefill_vs_bf16']:.2f}x", f"{r['decode_vs_bf16']:.2f}x"] for r in e2e]))
    write_json({"machine": machine, "args": dict(vars(args)), "formulations": forms, "end_to_end": e2e}, args.out)


if __name__ == "__main__":
    main()
