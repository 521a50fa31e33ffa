"""Fill-mask: train a masked-LM head on MiniLM, fill masks in float32 / bfloat16 / int8, export for transformers.

    python -m recipes.fill_mask [--quick] [--out DIR] [--overwrite]

No masked-LM BERT ships offline, so this starts from the embedded MiniLM encoder:
1. `jaxaccel.finetune(minilm, corpus/train.txt, task="mlm")` adds BERT's masked-LM head (dense ->
   gelu -> LayerNorm, decoder tied to the word embeddings) and trains it and the encoder with
   BERT's masking (15 % of tokens: 80 % [MASK], 10 % random, 10 % kept). OUT/finetuned is an HF
   folder (BertForMaskedLM).
2. The held-out sentences (corpus/masked_heldout.jsonl: one word hidden in sentences the
   corpus does not hold) are filled in float32, bfloat16 and int8: top-1 / top-5 accuracy
   against the hidden word, and how often each precision's top-1 equals float32's.
3. transformers' fill-mask pipeline loads OUT/finetuned; its top-5 on the held-out sentences
   is compared with ours (same tokens, probabilities within 1e-4).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from . import common


@dataclass(frozen=True)
class Config:
    corpus: Path = common.DATA / "corpus"
    model: str = "minilm"
    steps: int = 400  # about 19 passes over the corpus (16 packed rows of 64 tokens a step)
    batch_size: int = 16
    lr: float = 1e-4
    warmup: int = 40
    max_length: int = 64  # packed rows of this many tokens
    top_k: int = 5
    heldout_rows: int | None = None  # None: every held-out sentence
    pipeline_rows: int = 40  # sentences compared with transformers' pipeline


QUICK = replace(Config(), model="tiny", steps=2, batch_size=4, warmup=0, heldout_rows=4, pipeline_rows=2)
PRECISIONS = ("float32", "bfloat16", "int8")


def variant(folder: Path, precision: str):
    """The fine-tuned model served in `precision`: loaded in it (float32 / bfloat16) or int8-quantized."""
    import jaxaccel

    if precision == "int8":
        return jaxaccel.load(folder).quantize(jaxaccel.QuantConfig(mode="int8"))
    return jaxaccel.load(folder, dtype=precision)


def fill(model, texts: list[str], top_k: int) -> tuple[list[list[tuple[str, float]]], float]:
    """Top-k (token, prob) per text, and the warm rate in texts/s: a second pass over the same
    texts, timed, once the first has compiled the program of every length bucket."""
    got = [model.fill_mask(text, top_k=top_k) for text in texts]
    t = time.perf_counter()
    for text in texts:
        model.fill_mask(text, top_k=top_k)
    return got, len(texts) / (time.perf_counter() - t)


def pipeline_check(folder: Path, texts: list[str], ours: list, top_k: int) -> dict:
    """transformers' fill-mask pipeline on our export vs our float32 predictions."""
    import transformers

    pipe = transformers.pipeline("fill-mask", model=str(folder), device="cpu")
    theirs = [[(c["token_str"], c["score"]) for c in pipe(text, top_k=top_k)] for text in texts]
    same_tokens = sum([tok for tok, _ in a] == [tok for tok, _ in b] for a, b in zip(ours, theirs))
    diff = max(abs(p - q) for a, b in zip(ours, theirs) for (_, p), (_, q) in zip(a, b))
    return {"sentences": len(texts), "same_top_k_tokens": same_tokens, "max_prob_diff": diff}


def main(args) -> dict:
    import jaxaccel

    cfg = QUICK if args.quick else Config()
    out = common.prepare_out(args.out, args.overwrite)
    base = common.tiny_encoder() if cfg.model == "tiny" else jaxaccel.load(cfg.model)
    vocab = base.tokenizer.get_vocab()
    # a hidden word the model can name in one token; the rest cannot be scored by top-k tokens
    heldout = [r for r in common.read_jsonl(cfg.corpus / "masked_heldout.jsonl") if r["answer"] in vocab][:cfg.heldout_rows]
    train_lines = (cfg.corpus / "train.txt").read_text(encoding="utf-8").splitlines()
    if args.quick:
        train_lines = train_lines[:16]
    train_file = out / "data" / "train.txt"
    train_file.parent.mkdir(parents=True, exist_ok=True)
    train_file.write_text("".join(line + "\n" for line in train_lines), encoding="utf-8")
    common.write_jsonl(out / "data" / "heldout.jsonl", heldout)

    jaxaccel.finetune(base, train_file, task="mlm", steps=cfg.steps, out=out / "finetuned", batch_size=cfg.batch_size,
                      lr=cfg.lr, warmup=cfg.warmup, max_length=cfg.max_length, pack=True, save_every=cfg.steps, keep=1,
                      progress=not args.quick, tensorboard=False)
    texts = [r["text"] for r in heldout]
    table, preds = [], {}
    for precision in PRECISIONS:
        got, rate = fill(variant(out / "finetuned", precision), texts, cfg.top_k)
        preds[precision] = got
        top1 = [ranked[0][0] for ranked in got]
        table.append({
            "precision": precision,
            "top1_accuracy": round(sum(t == r["answer"] for t, r in zip(top1, heldout)) / len(heldout), 4),
            f"top{cfg.top_k}_accuracy": round(sum(r["answer"] in [tok for tok, _ in ranked]
                                                  for ranked, r in zip(got, heldout)) / len(heldout), 4),
            "top1_agrees_with_float32": round(sum(a[0][0] == b[0][0] for a, b in zip(got, preds["float32"]))
                                              / len(heldout), 4),
            "texts_per_s_batch1": round(rate, 1),
        })
    common.write_jsonl(out / "predictions.jsonl", [
        {"id": r["id"], "answer": r["answer"], **{p: preds[p][i] for p in PRECISIONS}} for i, r in enumerate(heldout)])
    n = cfg.pipeline_rows
    results = {
        "recipe": "fill_mask", "quick": args.quick, "train_lines": len(train_lines), "heldout_sentences": len(heldout),
        "steps": cfg.steps, "table": table,
        "transformers_pipeline": pipeline_check(out / "finetuned", texts[:n], preds["float32"][:n], cfg.top_k),
        "finetuned": str(out / "finetuned"),
    }
    common.save_results(out, results)
    return results


if __name__ == "__main__":
    raise SystemExit(common.run(main, "fill_mask", __doc__))
