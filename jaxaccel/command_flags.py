"""`jaxaccel serve`'s and `jaxaccel accelerate`'s flags (argparse only: `--help` answers without
jax), apart from cli.py so that it keeps the commands themselves; `finetune`'s are in finetune_flags.py."""

from __future__ import annotations

from pathlib import Path

def add_serve_arguments(sp) -> None:
    """`jaxaccel serve`'s flags besides --model / --dtype."""
    sp.add_argument("--embed-model", default=None, help="encoder for /v1/embeddings; default: the embedded minilm "
                    "when installed; 'none': no embeddings")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--max-batch", type=int, default=8, help="decode slots: requests generating at once")
    sp.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429s")
    sp.add_argument("--context", type=int, default=2048, help="tokens per slot (prompt + output)")
    sp.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take, queue included")
    sp.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set JAXACCEL_API_KEY)")
    sp.add_argument("--chat-template", type=Path, help="jinja chat template (default: the model's own, if any)")
    sp.add_argument("--speculative", default="none", choices=["prompt_lookup", "none"],
                   help="speculative decoding for requests that do not say (a request's \"speculative\" field "
                    "overrides it): prompt_lookup drafts tokens from the request's own prompt and output and the "
                    "model checks several per call (greedy: the same text; sampling: the same distribution); "
                    "default: none")


def add_accelerate_arguments(sp) -> None:
    """`jaxaccel accelerate`'s flags besides --model / --dtype."""
    sp.add_argument("--task", default="generate", choices=["generate", "embed", "classify"],
                   help="generate (decoder LM), embed (sentence embeddings) or classify (a sequence-classifier "
                    "folder, with --eval)")
    sp.add_argument("--eval", help="classify: JSONL of labelled rows {\"text\": ..., \"label\": ...} (optionally "
                    "\"text_pair\"); accuracy on them is the quality")
    sp.add_argument("--quality-budget", help="generate: kl:N (mean next-token KL vs float32) or ppl:N%% (perplexity "
                    "increase); embed: cos:N (mean cosine vs float32); classify: acc:N (accuracy at most N percentage "
                    "points below float32's); default kl:0.02 / cos:0.995 / acc:1")
    sp.add_argument("--batch-sizes", help="comma-separated; the first one decides the choice (default: 1 for "
                    "generate, 32 for embed / classify)")
    sp.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per speed measurement")
    sp.add_argument("--time-budget", type=float, default=3.5, help="minutes for measuring: float32 jit is always "
                    "measured, then the variants cheapest first; one that would not fit is skipped for time "
                    "(default: 3.5; inf: every variant)")
    sp.add_argument("--out", type=Path, help="folder for model/ (the chosen variant), report.json (schema: "
                    "jaxaccel/accelerate_report.schema.json), report.md, report.png; default: "
                    "./accelerated/<model name>. An earlier accelerate output there is replaced")
    sp.add_argument("--overwrite", action="store_true", help="replace --out even if it is not an accelerate output")
