"""Passage summarization: LoRA-tune Gemma 3 270M, ROUGE-L on held-out news items, time speculation.

    python -m recipes.summarize [--quick] [--out DIR] [--overwrite]

1. Each item of data/summarize (a short news passage and its one-sentence summary) becomes an
   instruction in lora_sft's chat format; `lora_sft.tune` LoRA-tunes the embedded Gemma 3 270M
   on the training items and merges the adapters (OUT/finetuned).
2. ROUGE-L (F-measure of the longest common word subsequence, `text_metrics.rouge_l`) of the
   greedy summaries on the held-out items, before and after tuning, against the lead baseline
   (the passage's first sentence, which states the key facts in other words). The held-out
   items' organisations, people and towns never occur in training.
3. Speed: `speed_rows` held-out prompts summarized one at a time, without and with speculative
   decoding (`speculative="prompt_lookup"`: drafts copied from the passage, which a summary
   reuses), in generated tokens/s; greedy speculation must give the same summaries, and the
   result says whether it did.
4. OUT/results.json: the figures; OUT/data: the exact rows used; OUT/summaries.jsonl: every summary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from . import common, lora_sft
from .text_metrics import mean, rouge_l


@dataclass(frozen=True)
class Config:
    data: Path = common.DATA / "summarize"
    model: str = "gemma3-270m"
    # a passage and its summary are 100 to 150 tokens: packed rows of 256
    tuning: lora_sft.Tuning = lora_sft.Tuning(steps=20, batch_size=2, max_length=256, warmup=2)
    max_new_tokens: int = 40
    test_rows: int | None = None  # None: every held-out item
    train_rows: int | None = None
    speed_rows: int = 3  # held-out prompts timed one at a time, with and without speculation


QUICK = replace(Config(), model="tiny", tuning=lora_sft.Tuning(steps=2, batch_size=2, max_length=256, warmup=0, rank=4),
                max_new_tokens=6, test_rows=4, train_rows=8, speed_rows=2)


def instruction(row: dict) -> str:
    return f"Summarize this news item in one sentence.\n\n{row['passage']}"


def lead(passage: str) -> str:
    """The passage's first sentence: its text up to the first '.', '!' or '?' followed by a space."""
    return re.split(r"(?<=[.!?])\s", passage, maxsplit=1)[0]


def score(summaries: list[str], rows: list[dict]) -> float:
    return mean(rouge_l(s, r["summary"]) for s, r in zip(summaries, rows, strict=True))


def main(args) -> dict:
    cfg = QUICK if args.quick else Config()
    out = common.prepare_out(args.out, args.overwrite)
    train = common.read_jsonl(cfg.data / "train.jsonl")[:cfg.train_rows]
    test = common.read_jsonl(cfg.data / "test.jsonl")[:cfg.test_rows]
    common.write_jsonl(out / "data" / "train.jsonl", train)
    common.write_jsonl(out / "data" / "test.jsonl", test)
    prompts = [instruction(r) for r in test]
    rows = lambda items: [{"instruction": instruction(r), "response": r["summary"]} for r in items]

    base = common.decoder(cfg.model)
    before = lora_sft.answer(base, prompts, cfg.max_new_tokens)
    tuned = lora_sft.tune(base, rows(train), cfg.tuning, out / "finetuned", eval_rows=rows(test),
                          progress=not args.quick)
    after = lora_sft.answer(tuned, prompts, cfg.max_new_tokens)
    leads = [lead(r["passage"]) for r in test]
    common.write_jsonl(out / "summaries.jsonl", [
        {"id": r["id"], "kind": r["kind"], "reference": r["summary"], "lead": ld, "before": b, "after": a}
        for r, ld, b, a in zip(test, leads, before, after)])

    speed = [lora_sft.decode_speed(tuned, prompts[:cfg.speed_rows], cfg.max_new_tokens, speculative=s)
             for s in (None, "prompt_lookup")]
    same = speed[0].pop("answers") == speed[1].pop("answers")
    metrics = common.read_jsonl(out / "finetuned" / "metrics.jsonl")
    results = {
        "recipe": "summarize", "quick": args.quick, "model": cfg.model, "train_rows": len(train),
        "test_rows": len(test), "steps": cfg.tuning.steps,
        "rouge_l": {"lead_sentence": score(leads, test), "before": score(before, test), "after": score(after, test)},
        "rouge_l_after_by_kind": {kind: score([after[i] for i, r in enumerate(test) if r["kind"] == kind],
                                              [r for r in test if r["kind"] == kind])
                                  for kind in sorted({r["kind"] for r in test})},
        "heldout_response_loss_after": round(metrics[-1]["eval_loss"], 4),
        "speed": speed, "speculative_same_answers": same,
        "speed_note": "measured on a shared machine; the ratio between the rows means more than the figures",
        "finetuned": str(out / "finetuned"),
    }
    common.save_results(out, results)
    return results


if __name__ == "__main__":
    raise SystemExit(common.run(main, "summarize", __doc__))
