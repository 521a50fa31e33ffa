"""`jaxaccel generate | convert | info | bench` — flags map straight onto API arguments."""

from __future__ import annotations

import argparse
import sys
import time


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load(args):
    import jaxaccel
    from .embedded import default_model_path

    path = args.model or default_model_path(_err)
    t = time.perf_counter()
    m = jaxaccel.load(path, dtype=args.dtype)
    _err(f"loaded {m.config.family} ({m.num_params / 1e6:.0f}M params, {args.dtype}) from {path} "
         f"in {time.perf_counter() - t:.1f}s")
    return m


def cmd_generate(args) -> int:
    from .engine import GenerationStats, generate

    m = _load(args)
    stats = GenerationStats()
    write = lambda i, text: (sys.stdout.write(text), sys.stdout.flush())
    generate(m, [args.prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
             top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop or None, stream=write,
             stats=stats)
    sys.stdout.write("\n")
    _err(f"time to first token {stats.time_to_first_token:.2f}s | prefill {stats.prefill_tokens_per_s:.1f} tok/s "
         f"({stats.prompt_tokens} tokens) | decode {stats.decode_tokens_per_s:.1f} tok/s "
         f"({stats.generated_tokens} tokens)")
    return 0


def cmd_convert(args) -> int:
    m = _load(args)
    out = m.save_hf(args.out)
    _err(f"wrote {out} ({m.params_bytes / 2**20:.0f} MiB of params)")
    return 0


def cmd_info(args) -> int:
    m = _load(args)
    for k, v in vars(m.config).items():
        print(f"{k:26s} {v}")
    print(f"{'params':26s} {m.num_params:,} ({m.params_bytes / 2**20:.1f} MiB)")
    return 0


def cmd_bench(args) -> int:
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / f"{args.which}.py"
    if not script.is_file():
        _err(f"benchmark script {script} not found: benchmarks run from a source checkout of jaxaccel")
        return 2
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxaccel", description="JAX-native language models")
    sub = p.add_subparsers(dest="command", required=True)

    def with_model(sp):
        sp.add_argument("--model", help="HF folder or .gguf file (default: embedded Gemma 3 270M)")
        sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        return sp

    g = with_model(sub.add_parser("generate", help="stream a continuation of a prompt"))
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.set_defaults(fn=cmd_generate)

    c = with_model(sub.add_parser("convert", help="load any supported checkpoint and write an HF folder"))
    c.add_argument("--out", required=True)
    c.set_defaults(fn=cmd_convert)

    i = with_model(sub.add_parser("info", help="print a model's config and size"))
    i.set_defaults(fn=cmd_info)

    b = sub.add_parser("bench", help="run a benchmark script from bench/ (e.g. jaxaccel bench decode --quick)")
    b.add_argument("which", choices=["decode"])
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from .embedded import enable_compilation_cache

    enable_compilation_cache()
    try:
        return args.fn(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        _err(f"error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
