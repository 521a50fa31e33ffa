"""Greedy tokens of the embedded Gemma 3 270M's GGUF served as stored (`jaxaccel.load(gguf,
gguf_weights="as_stored")`: its Q4_K / Q6_K / Q5_0 / Q8_0 blocks read by kernels/ggml_blocks.cc)
against llama.cpp's `llama-server` on the same file (bench/llama_server.py), and against the same
file dequantized to float32. Prompts: the README's and the opening sentences of the held-out
passages (jaxaccel/eval_data/heldout.txt). EOS is ignored on every side.

llama.cpp runs under several of its own settings (`SETTINGS`: its defaults, a float32 KV cache,
flash attention off and on), because its greedy text is not one thing: it rounds activations to
int8 blocks before every product and the KV cache to float16, and which kernels (and so which
roundings) a product takes depends on these settings. The table counts, for every pair of runs,
the prompts whose `--new-tokens` greedy tokens are identical, so "ours against llama.cpp" reads
next to "llama.cpp against itself". Never pass / fail.

    python -m bench.gguf_llama_check [--new-tokens 32] [--prompts 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

README_PROMPTS = ["The capital of France is", "Once upon a time"]
# llama.cpp settings compared (name -> llama-server options); the first is llama-server as started
SETTINGS = {
    "llama.cpp defaults": (),
    "llama.cpp f32 KV": ("-ctk", "f32", "-ctv", "f32"),
    "llama.cpp FA off": ("-fa", "off"),
    "llama.cpp FA on": ("-fa", "on"),
}
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
    runs = {"jaxaccel as stored": ours, "jaxaccel float32": dequantized}
    for name, extra in SETTINGS.items():
        server = start(path, args.threads, 1, max(map(len, ids)) + args.new_tokens + 16, extra_args=extra)
        try:
            runs[name] = [timed_completion(server, p, args.new_tokens)["tokens"] for p in ids]
        finally:
            server.stop()

    from rich.console import Console
    from rich.table import Table

    same = lambda a, b: sum(common_prefix(x, y) == args.new_tokens for x, y in zip(runs[a], runs[b]))
    table = Table(title=f"prompts (of {len(ids)}) whose {args.new_tokens} greedy tokens are identical")
    table.add_column("")
    for name in runs:
        table.add_column(name, justify="right")
    for a in runs:
        table.add_row(a, *(str(same(a, b)) for b in runs))
    Console(width=200).print(table)
    default = next(iter(SETTINGS))
    print(f"common greedy prefix per prompt (of {args.new_tokens}): as stored / float32 / each llama.cpp setting "
          f"against {default!r}")
    rows = []
    for i, text in enumerate(texts):
        prefix = {name: common_prefix(runs[name][i], runs[default][i]) for name in runs if name != default}
        rows.append({"prompt": text, "tokens": {name: runs[name][i] for name in runs},
                     f"common_prefix_with_{default}": prefix})
        print(f"  {text[:42]:42s} " + " ".join(f"{k:3d}" for k in prefix.values()))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
