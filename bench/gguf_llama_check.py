"""Greedy tokens of the embedded Gemma 3 270M's GGUF served as stored (`jaxaccel.load(gguf,
gguf_weights="as_stored")`: its Q4_K / Q6_K / Q5_0 / Q8_0 blocks read by kernels/ggml_blocks.cc)
against llama.cpp's `llama-server` on the same file (bench/llama_server.py), and against the same
file dequantized to float32. Prompts: the README's and the opening sentences of the held-out
passages (jaxaccel/eval_data/heldout.txt). Never pass / fail: it prints, per prompt, the common
greedy prefix of each pair and where they part. EOS is ignored on both sides.

    python -m bench.gguf_llama_check [--new-tokens 32] [--prompts 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

README_PROMPTS = ["The capital of France is", "Once upon a time"]
HELDOUT = Path(__file__).resolve().parent.parent / "jaxaccel" / "eval_data" / "heldout.txt"


def prompts(n: int) -> list[str]:
    """The README's prompts, then the first sentence of each held-out paragraph, n in all."""
    paragraphs = [p.strip() for p in HELDOUT.read_text().split("\n\n") if len(p.strip()) > 80]
    return (README_PROMPTS + [p.split(". ")[0] + "." for p in paragraphs])[:n]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=8, help="how many prompts (default 8)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama-server's threads")
    ap.add_argument("--out", default=None, help="also write the tokens and prefixes as JSON here")
    args = ap.parse_args(argv)
    if args.new_tokens < 1 or args.prompts < 1:
        ap.error("--new-tokens and --prompts must be >= 1")

    import jaxaccel
    from jaxaccel import default_models
    from jaxaccel.generation import generate_tokens
    from bench.llama_server import start, timed_completion

    path = default_models.gemma_gguf_path()
    no_eos = lambda m: dataclasses.replace(m, config=m.config.replace(eos_token_id=None))
    stored = no_eos(jaxaccel.load(path, gguf_weights="as_stored"))
    plain = no_eos(jaxaccel.load(path))
    texts = prompts(args.prompts)
    ids = [list(stored.tokenizer(t)["input_ids"]) for t in texts]
    ours = [generate_tokens(stored, [p], max_new_tokens=args.new_tokens)[0] for p in ids]
    dequantized = [generate_tokens(plain, [p], max_new_tokens=args.new_tokens)[0] for p in ids]
    server = start(path, args.threads, 1, max(map(len, ids)) + args.new_tokens + 16)
    try:
        theirs = [timed_completion(server, p, args.new_tokens)["tokens"] for p in ids]
    finally:
        server.stop()

    rows = []
    print(f"{'prompt':42s} | as_stored = llama.cpp | as_stored = float32 | float32 = llama.cpp  (common greedy prefix "
          f"of {args.new_tokens})")
    for text, o, d, t in zip(texts, ours, dequantized, theirs):
        row = {"prompt": text, "as_stored": o, "float32": d, "llama_cpp": t,
               "as_stored_vs_llama_cpp": common_prefix(o, t), "as_stored_vs_float32": common_prefix(o, d),
               "float32_vs_llama_cpp": common_prefix(d, t)}
        rows.append(row)
        print(f"{text[:42]:42s} | {row['as_stored_vs_llama_cpp']:21d} | {row['as_stored_vs_float32']:19d} | "
              f"{row['float32_vs_llama_cpp']:d}")
        if row["as_stored_vs_llama_cpp"] < args.new_tokens:
            k = row["as_stored_vs_llama_cpp"]
            print(f"    parts at token {k}: ours {stored.tokenizer.decode(o[k:k + 6])!r} vs llama.cpp "
                  f"{stored.tokenizer.decode(t[k:k + 6])!r}")
    same = sum(r["as_stored_vs_llama_cpp"] == args.new_tokens for r in rows)
    print(f"identical to llama.cpp: {same} of {len(rows)} prompts; to the dequantized file: "
          f"{sum(r['as_stored_vs_float32'] == args.new_tokens for r in rows)} of {len(rows)}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
