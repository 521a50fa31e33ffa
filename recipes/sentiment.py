"""Financial-news sentiment: fine-tune MiniLM with a new classification head, evaluate on held-out news.

    python -m recipes.sentiment [--quick] [--out DIR] [--overwrite]

1. `jaxaccel.finetune(minilm, train.jsonl, task="classify")`: the encoder gets a new classifier
   head over the labels the data names (negative / neutral / positive) and is trained with optax
   (AdamW, warmup + cosine). OUT/finetuned is an HF folder (BertForSequenceClassification).
2. Test accuracy in float32 (`Model.classify`) against the majority-class rate (always
   answering the training set's most common label).
3. The served model: `jaxaccel quantize --mode int8` writes OUT/served, and
   `jaxaccel classify --model OUT/served --input test.jsonl` classifies the test split with it.
4. OUT/results.json: the figures; OUT/data: the exact train / test rows used (ids never overlap).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from . import common


@dataclass(frozen=True)
class Config:
    data: Path = common.DATA / "sentiment"
    model: str = "minilm"
    steps: int = 150  # 4 epochs of the 600 training sentences
    batch_size: int = 16
    lr: float = 1e-4
    warmup: int = 15
    serve_mode: str = "int8"
    per_label: int | None = None  # None: every row (quick: the first rows of each label)


QUICK = replace(Config(), model="tiny", steps=3, batch_size=8, warmup=0, per_label=4)


def take(rows: list[dict], per_label: int | None) -> list[dict]:
    """The first `per_label` rows of each label, in file order (all rows for None)."""
    seen: Counter = Counter()
    kept = []
    for r in rows:
        seen[r["label"]] += 1
        if per_label is None or seen[r["label"]] <= per_label:
            kept.append(r)
    return kept


def accuracy(predicted, rows) -> float:
    return sum(p == r["label"] for p, r in zip(predicted, rows, strict=True)) / len(rows)


def main(args) -> dict:
    import jaxaccel

    cfg = QUICK if args.quick else Config()
    out = common.prepare_out(args.out, args.overwrite)
    train = take(common.read_jsonl(cfg.data / "train.jsonl"), cfg.per_label)
    test = take(common.read_jsonl(cfg.data / "test.jsonl"), cfg.per_label)
    train_file = common.write_jsonl(out / "data" / "train.jsonl", train)
    test_file = common.write_jsonl(out / "data" / "test.jsonl", test)

    base = common.tiny_encoder() if cfg.model == "tiny" else jaxaccel.load(cfg.model)
    model = jaxaccel.finetune(base, train_file, task="classify", steps=cfg.steps, out=out / "finetuned",
                              batch_size=cfg.batch_size, lr=cfg.lr, warmup=cfg.warmup, save_every=cfg.steps,
                              keep=1, progress=not args.quick, tensorboard=False)
    texts = [r["text"] for r in test]
    float_pred = [label for label, _ in model.classify(texts)]
    majority_label, _ = Counter(r["label"] for r in train).most_common(1)[0]
    majority = sum(r["label"] == majority_label for r in test) / len(test)

    # the served model: quantized with the CLI, classified with the CLI, as a user would
    served = out / "served"
    common.jaxaccel_cli("quantize", "--model", out / "finetuned", "--mode", cfg.serve_mode, "--out", served)
    common.write_jsonl(out / "data" / "test_texts.jsonl", [{"text": t} for t in texts])
    common.jaxaccel_cli("classify", "--model", served, "--input", out / "data" / "test_texts.jsonl",
                        "--output", out / "served_predictions.jsonl")
    served_pred = [r["label"] for r in common.read_jsonl(out / "served_predictions.jsonl")]
    unseen = [i for i, r in enumerate(test) if not r["frame_in_train"]]
    results = {
        "recipe": "sentiment", "quick": args.quick, "labels": list(model.config.labels),
        "train_rows": len(train), "test_rows": len(test), "steps": cfg.steps,
        "majority_label": majority_label, "majority_rate": round(majority, 4),
        "float32_accuracy": round(accuracy(float_pred, test), 4),
        # the test sentences whose frame training never saw (data/README.md): the harder part
        "unseen_frame_rows": len(unseen),
        "float32_accuracy_unseen_frames": round(accuracy([float_pred[i] for i in unseen], [test[i] for i in unseen]), 4)
        if unseen else None,
        f"served_{cfg.serve_mode}_accuracy": round(accuracy(served_pred, test), 4),
        "served_agreement_with_float32": round(
            sum(a == b for a, b in zip(served_pred, float_pred)) / len(test), 4),
        "finetuned": str(out / "finetuned"), "served": str(served),
    }
    common.save_results(out, results)
    return results


if __name__ == "__main__":
    raise SystemExit(common.run(main, "sentiment", __doc__))
