"""Financial-news sentiment: fine-tune MiniLM with a new classification head, evaluate on held-out news.

    python -m recipes.sentiment [--quick] [--out DIR] [--overwrite]

1. `jaxaccel.finetune(minilm, train.jsonl, task="classify")`: the encoder gets a new classifier
   head over the labels the data names (negative / neutral / positive) and is trained with optax
   (AdamW, warmup + cosine). OUT/finetuned is an HF folder (BertForSequenceClassification).
   The last `validation_per_label` training rows of each label are kept out of training.
2. Test accuracy in float32 (`Model.classify`) against the majority-class rate (always
   answering the training set's most common label).
3. Serving: `jaxaccel accelerate --task classify --eval validation.jsonl` measures the
   variants (bfloat16, int8, w8a8, ...) and saves the fastest within 1 accuracy point of
   float32 on the validation rows to OUT/accelerated/model; `jaxaccel classify --model
   OUT/accelerated/model` then classifies the test split, which the choice never saw. An int8
   folder (`jaxaccel quantize --mode int8`, OUT/int8) is classified too, whatever was chosen.
4. OUT/results.json: the figures; OUT/data: the exact train / validation / test rows used.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from . import common


@dataclass(frozen=True)
class Config:
    data: Path = common.DATA / "sentiment"
    model: str = "minilm"
    steps: int = 150  # 4 epochs of the training sentences
    batch_size: int = 16
    lr: float = 1e-4
    warmup: int = 15
    validation_per_label: int = 15  # training rows kept for accelerate's choice
    per_label: int | None = None  # None: every row (quick: the first rows of each label)


QUICK = replace(Config(), model="tiny", steps=3, batch_size=8, warmup=0, validation_per_label=2, per_label=6)


def take(rows: list[dict], per_label: int | None) -> list[dict]:
    """The first `per_label` rows of each label, in file order (all rows for None)."""
    seen: Counter = Counter()
    kept = []
    for r in rows:
        seen[r["label"]] += 1
        if per_label is None or seen[r["label"]] <= per_label:
            kept.append(r)
    return kept


def split_validation(rows: list[dict], per_label: int) -> tuple[list[dict], list[dict]]:
    """(training rows, validation rows): the last `per_label` rows of each label validate."""
    counts, seen = Counter(r["label"] for r in rows), Counter()
    train, val = [], []
    for r in rows:
        seen[r["label"]] += 1
        (val if seen[r["label"]] > counts[r["label"]] - per_label else train).append(r)
    return train, val


def accuracy(predicted, rows) -> float | None:
    if not rows:
        return None
    return round(sum(p == r["label"] for p, r in zip(predicted, rows, strict=True)) / len(rows), 4)


def classify_cli(folder: Path, texts_file: Path, out_file: Path) -> list[str]:
    """`jaxaccel classify --model FOLDER --input TEXTS` -> the label of each text."""
    common.jaxaccel_cli("classify", "--model", folder, "--input", texts_file, "--output", out_file)
    return [r["label"] for r in common.read_jsonl(out_file)]


def main(args) -> dict:
    import jaxaccel

    cfg = QUICK if args.quick else Config()
    out = common.prepare_out(args.out, args.overwrite)
    train, val = split_validation(take(common.read_jsonl(cfg.data / "train.jsonl"), cfg.per_label),
                                  cfg.validation_per_label)
    test = take(common.read_jsonl(cfg.data / "test.jsonl"), cfg.per_label)
    train_file = common.write_jsonl(out / "data" / "train.jsonl", train)
    val_file = common.write_jsonl(out / "data" / "validation.jsonl", val)
    common.write_jsonl(out / "data" / "test.jsonl", test)
    texts_file = common.write_jsonl(out / "data" / "test_texts.jsonl", [{"text": r["text"]} for r in test])

    base = common.tiny_encoder() if cfg.model == "tiny" else jaxaccel.load(cfg.model)
    model = jaxaccel.finetune(base, train_file, task="classify", steps=cfg.steps, out=out / "finetuned",
                              batch_size=cfg.batch_size, lr=cfg.lr, warmup=cfg.warmup, save_every=cfg.steps,
                              keep=1, progress=not args.quick, tensorboard=False)
    float_pred = [label for label, _ in model.classify([r["text"] for r in test])]
    majority_label, _ = Counter(r["label"] for r in train).most_common(1)[0]
    unseen = [i for i, r in enumerate(test) if not r["frame_in_train"]]

    # serving: accelerate chooses on the validation rows; the test split is classified after
    common.jaxaccel_cli("accelerate", "--task", "classify", "--model", out / "finetuned", "--eval", val_file,
                        "--out", out / "accelerated")
    report = json.loads((out / "accelerated" / "report.json").read_text())
    chosen_pred = classify_cli(out / "accelerated" / "model", texts_file, out / "accelerated_predictions.jsonl")
    common.jaxaccel_cli("quantize", "--model", out / "finetuned", "--mode", "int8", "--out", out / "int8")
    int8_pred = classify_cli(out / "int8", texts_file, out / "int8_predictions.jsonl")
    agree = lambda pred: round(sum(a == b for a, b in zip(pred, float_pred)) / len(test), 4)
    results = {
        "recipe": "sentiment", "quick": args.quick, "labels": list(model.config.labels),
        "train_rows": len(train), "validation_rows": len(val), "test_rows": len(test), "steps": cfg.steps,
        "majority_label": majority_label, "majority_rate": accuracy([majority_label] * len(test), test),
        "float32_accuracy": accuracy(float_pred, test),
        # the test sentences whose frame training never saw (data/README.md): the harder part
        "unseen_frame_rows": len(unseen),
        "float32_accuracy_unseen_frames": accuracy([float_pred[i] for i in unseen], [test[i] for i in unseen]),
        "accelerate_chosen": report["chosen"], "accelerate_reason": report["reason"],
        "accelerate_validation_accuracy": {row["variant"]: round(row["quality"]["accuracy"], 4)
                                           for row in report["rows"] if row.get("quality")},
        "chosen_accuracy": accuracy(chosen_pred, test), "chosen_agreement_with_float32": agree(chosen_pred),
        "int8_accuracy": accuracy(int8_pred, test), "int8_agreement_with_float32": agree(int8_pred),
        "finetuned": str(out / "finetuned"), "served": str(out / "accelerated" / "model"),
    }
    common.save_results(out, results)
    return results


if __name__ == "__main__":
    raise SystemExit(common.run(main, "sentiment", __doc__))
