"""`jaxaccel finetune`'s flags (argparse only: `--help` answers without jax), apart from cli.py's
other commands because there are many of them."""

from __future__ import annotations

import argparse


def add_finetune_arguments(sp) -> argparse.ArgumentParser:
    """`jaxaccel finetune`'s flags: each maps onto a `finetune.TrainOptions` field."""
    sp.add_argument("--model", required=True, help="HF folder, .gguf file or embedded model name to fine-tune")
    sp.add_argument("--data", required=True, help="train.jsonl ({prompt,completion} | {text,label} | {text}) or .txt")
    sp.add_argument("--eval", dest="eval_data", help="eval data (same format); best checkpoint by eval loss is kept")
    sp.add_argument("--task", default="sft", choices=["sft", "classify", "mlm"])
    sp.add_argument("--out", required=True, help="output folder; rerunning with the same --out resumes")
    sp.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "adafactor", "lion"])
    sp.add_argument("--lr", type=float, default=1e-4)
    sp.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"])
    sp.add_argument("--warmup", type=int, default=0)
    sp.add_argument("--weight-decay", type=float, default=0.0)
    sp.add_argument("--clip", type=float, default=1.0, help="global-norm clipping (0: off)")
    sp.add_argument("--steps", type=int, default=100)
    sp.add_argument("--batch-size", type=int, default=8)
    sp.add_argument("--accum", type=int, default=1, help="gradient accumulation micro-batches per step")
    sp.add_argument("--max-length", type=int)
    sp.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None)
    sp.add_argument("--truncate", action="store_true", help="cut over-long rows (counted) instead of failing")
    sp.add_argument("--save-every", type=int, default=100)
    sp.add_argument("--keep", type=int, default=3, help="keep the last K checkpoints (plus the best by eval loss)")
    sp.add_argument("--lora-rank", type=int, default=0)
    sp.add_argument("--lora-alpha", type=float, default=16.0)
    sp.add_argument("--lora-dropout", type=float, default=0.0)
    sp.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated projection names")
    sp.add_argument("--compute-dtype", choices=["float32", "bfloat16"], help="bfloat16: mixed precision")
    sp.add_argument("--quant", choices=["qat"], help="quantization-aware training; the export holds the float weights: "
                    "serve them quantized with `jaxaccel quantize --model OUT --mode qat --out DIR` (the same forward)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                    help="write TensorBoard events to OUT/tb (metrics.jsonl is always written)")
    sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="master-weight dtype")
    return sp
