"""Extractive question answering over a passage: LoRA-tune Gemma 3 270M, score held-out questions, time speculation.

    python -m recipes.qa [--quick] [--out DIR] [--overwrite]

1. Each item of data/qa (a company profile, a question, the answer: a span of the passage)
   becomes an instruction in lora_sft's chat format (`instruction`); `lora_sft.tune` LoRA-tunes
   the embedded Gemma 3 270M on the training items and merges the adapters (OUT/finetuned).
2. Exact match and token F1 (SQuAD-style normalisation: lower case, no punctuation or articles)
   of the greedy answers on the held-out items, before and after tuning; the held-out items'
   companies, people and towns never occur in training. Also the share of answers that are a
   span of their passage (extractive).
3. Speed: `speed_rows` held-out prompts answered one at a time, without and with speculative
   decoding (`jaxaccel.generate(..., speculative="prompt_lookup")`: drafts copied from the
   prompt, which an extractive answer repeats), in generated tokens/s; greedy speculation must
   give the same answers, and the result says whether it did.
4. OUT/results.json: the figures; OUT/data: the exact rows used; OUT/answers.jsonl: every answer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from . import common, lora_sft
from .text_metrics import exact_match, mean, token_f1


@dataclass(frozen=True)
class Config:
    data: Path = common.DATA / "qa"
    model: str = "gemma3-270m"
    # a passage and its question are 90 to 150 tokens: packed rows of 256
    tuning: lora_sft.Tuning = lora_sft.Tuning(steps=20, batch_size=2, max_length=256, warmup=2)
    max_new_tokens: int = 16
    test_rows: int | None = None  # None: every held-out item
    train_rows: int | None = None
    speed_rows: int = 4  # held-out prompts timed one at a time, with and without speculation


QUICK = replace(Config(), model="tiny", tuning=lora_sft.Tuning(steps=2, batch_size=2, max_length=256, warmup=0, rank=4),
                max_new_tokens=6, test_rows=4, train_rows=8, speed_rows=2)


def instruction(row: dict) -> str:
    return ("Answer the question with words copied from the passage.\n\n"
            f"Passage: {row['passage']}\n\nQuestion: {row['question']}")


def as_sft(rows: list[dict]) -> list[dict]:
    return [{"instruction": instruction(r), "response": r["answer"]} for r in rows]


def score(answers: list[str], rows: list[dict]) -> dict:
    pairs = list(zip(answers, rows, strict=True))
    return {"exact_match": mean(exact_match(a, r["answer"]) for a, r in pairs),
            "token_f1": mean(token_f1(a, r["answer"]) for a, r in pairs),
            "answer_in_passage": mean(bool(a) and a in r["passage"] for a, r in pairs)}


def main(args) -> dict:
    cfg = QUICK if args.quick else Config()
    out = common.prepare_out(args.out, args.overwrite)
    train = common.read_jsonl(cfg.data / "train.jsonl")[:cfg.train_rows]
    test = common.read_jsonl(cfg.data / "test.jsonl")[:cfg.test_rows]
    common.write_jsonl(out / "data" / "train.jsonl", train)
    common.write_jsonl(out / "data" / "test.jsonl", test)
    prompts = [instruction(r) for r in test]

    base = common.decoder(cfg.model)
    before = lora_sft.answer(base, prompts, cfg.max_new_tokens)
    tuned = lora_sft.tune(base, as_sft(train), cfg.tuning, out / "finetuned", eval_rows=as_sft(test),
                          progress=not args.quick)
    after = lora_sft.answer(tuned, prompts, cfg.max_new_tokens)
    common.write_jsonl(out / "answers.jsonl", [
        {"id": r["id"], "question": r["question"], "reference": r["answer"], "before": b, "after": a}
        for r, b, a in zip(test, before, after)])

    speed = [lora_sft.decode_speed(tuned, prompts[:cfg.speed_rows], cfg.max_new_tokens, speculative=s)
             for s in (None, "prompt_lookup")]
    same = speed[0].pop("answers") == speed[1].pop("answers")
    metrics = common.read_jsonl(out / "finetuned" / "metrics.jsonl")
    results = {
        "recipe": "qa", "quick": args.quick, "model": cfg.model, "train_rows": len(train), "test_rows": len(test),
        "steps": cfg.tuning.steps, "before": score(before, test), "after": score(after, test),
        "heldout_response_loss_after": round(metrics[-1]["eval_loss"], 4),
        "speed": speed, "speculative_same_answers": same,
        "speed_note": "measured on a shared machine; the ratio between the rows means more than the figures",
        "finetuned": str(out / "finetuned"),
    }
    common.save_results(out, results)
    return results


if __name__ == "__main__":
    raise SystemExit(common.run(main, "qa", __doc__))
