"""Speculative decoding benchmark: plain greedy decoding against each drafter (prompt lookup, the
int8 self-draft, ...) on the embedded Gemma 3 270M, batch 1, on the shipped prompts
(bench/data/speculative_prompts.json: summarize a passage, answer a question about one, continue
a story), in the same run.

Prints tokens/s of each (decode after the first token; compile excluded: each variant runs once
to warm up), the speed-up, the acceptance rate and tokens per forward pass, checks that every
drafter gives plain decoding's tokens, prints the machine with its CPU flags and writes JSON under
bench/results/.

  python -m bench.speculative [--new-tokens 128] [--repeats 2] [--drafters prompt_lookup,self:int8]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

try:
    from bench.common import flags_text, format_table, machine_info, write_json
except ImportError:  # run as a script: python bench/speculative.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.common import flags_text, format_table, machine_info, write_json

PROMPTS = Path(__file__).with_name("data") / "speculative_prompts.json"


def timed(model, ids, new_tokens, speculative, repeats):
    """Best of `repeats` greedy runs after a warm-up: (tokens, seconds after the first token, stats).
    The first token's time is a run of max_new_tokens=1 (the prefill) timed the same way."""
    from jaxaccel.generation import GenerationStats, generate_tokens

    def best_time(n):
        best, out, stats = float("inf"), None, None
        for _ in range(repeats + 1):  # the first run compiles
            s = GenerationStats()
            t0 = time.perf_counter()
            out = generate_tokens(model, [ids], max_new_tokens=n, speculative=speculative, stats=s)
            best, stats = min(best, time.perf_counter() - t0), s.speculative
        return best, out[0], stats

    t_first, _, _ = best_time(1)
    t_all, tokens, stats = best_time(new_tokens)
    return tokens, max(t_all - t_first, 1e-9), stats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--drafters", default="prompt_lookup,self:int8", help="comma-separated `speculative=` values")
    ap.add_argument("--model", default="gemma3-270m", help="any model jaxaccel.load takes (default: the embedded Gemma)")
    args = ap.parse_args(argv)
    if args.new_tokens < 2 or args.repeats < 1:
        raise SystemExit("--new-tokens must be >= 2 and --repeats >= 1")

    import jaxaccel

    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['cpus_usable']} usable cores; {flags_text(machine)}")
    m = jaxaccel.load(args.model, dtype=args.dtype)
    prompts = {k: v for k, v in json.loads(PROMPTS.read_text()).items() if not k.startswith("_")}
    drafters = args.drafters.split(",")
    rows, results = [], {}
    for kind, text in prompts.items():
        ids = list(m.tokenizer(text)["input_ids"])
        plain, t_plain, _ = timed(m, ids, args.new_tokens, None, args.repeats)
        n = max(len(plain) - 1, 1)
        results[kind] = {"prompt_tokens": len(ids), "new_tokens": len(plain), "plain_tok_s": n / t_plain,
                         "text": m.tokenizer.decode(plain), "drafters": {}}
        print(f"{kind}: {results[kind]['text'][:120]!r}", flush=True)
        for d in drafters:
            spec, t_spec, s = timed(m, ids, args.new_tokens, d, args.repeats)
            r = {"tok_s": max(len(spec) - 1, 1) / t_spec, "acceptance_rate": s.acceptance_rate,
                 "tokens_per_call": s.tokens_per_call, "same_tokens": spec == plain}
            r["speedup"] = r["tok_s"] / results[kind]["plain_tok_s"]
            results[kind]["drafters"][d] = r
            rows.append([kind, len(ids), len(plain), d, f"{results[kind]['plain_tok_s']:.1f}", f"{r['tok_s']:.1f}",
                         f"{r['speedup']:.2f}x", f"{r['acceptance_rate']:.0%}", f"{r['tokens_per_call']:.2f}",
                         "yes" if r["same_tokens"] else "NO"])
    print(format_table(["prompt", "prompt tok", "new tok", "drafter", "plain tok/s", "speculative tok/s", "speed-up",
                        "accepted", "tok/pass", "same tokens"], rows))
    write_json({"date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": machine, "model": args.model,
                "dtype": args.dtype, "new_tokens": args.new_tokens, "results": results},
               Path(__file__).with_name("results") / "speculative.json")


if __name__ == "__main__":
    main()
