"""LoRA instruction tuning of Gemma 3 270M: before / after on held-out prompts, merge, int8, serve.

    python -m recipes.lora_sft [--quick] [--out DIR] [--overwrite]

The embedded Gemma 3 270M is a base model (no chat template), so this recipe gives it one:
Gemma's turn markers (`CHAT_TEMPLATE`), the same text `prompt()` builds for training.
1. `tune()` (the function the other language-model recipes import): `jaxaccel.finetune(...,
   lora_rank=...)` trains LoRA adapters on every projection over {"prompt", "completion"} rows
   (loss on the response only) and merges them into the weights; OUT/finetuned is the merged
   HF folder (its tokenizer carries the chat template), OUT/finetuned/lora the adapters alone.
2. Before / after on the held-out prompts (data/sft/test.jsonl): greedy answers scored by
   exact match and token F1 against the reference responses, and the mean loss per response
   token (`response_loss`).
3. `jaxaccel quantize --mode int8` writes OUT/serving, a serving folder; it is reloaded with
   `jaxaccel.load` and scored again, and `jaxaccel serve --model OUT/serving` (its own process)
   answers held-out prompts on /v1/chat/completions through the folder's chat template.
4. OUT/results.json: the figures; OUT/data: the exact rows used; OUT/answers.jsonl: every answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from . import common
from .text_metrics import exact_match, mean, token_f1

# Gemma's turn markers; `bos_token` because the server tokenizes the rendered text as it is
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
                 "{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] }}<end_of_turn>\n"
                 "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Tuning:
    """The LoRA fine-tune (`tune`); recipes that reuse it override what they change."""

    steps: int = 24  # a short tune: the figures in recipes/README.md come from a shared 2-core machine
    batch_size: int = 4
    max_length: int = 128  # packed rows of this many tokens (every prompt + response fits)
    lr: float = 4e-4
    warmup: int = 3
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ALL_PROJECTIONS
    seed: int = 0


@dataclass(frozen=True)
class Config:
    data: Path = common.DATA / "sft"
    model: str = "gemma3-270m"
    tuning: Tuning = field(default_factory=Tuning)
    max_new_tokens: int = 40
    test_rows: int | None = None  # None: every held-out row
    train_rows: int | None = None
    serve_prompts: int = 2  # held-out prompts sent to `jaxaccel serve` (0: no server)


QUICK = replace(Config(), model="tiny", tuning=Tuning(steps=2, batch_size=2, max_length=96, warmup=0, rank=4),
                max_new_tokens=6, test_rows=4, train_rows=8, serve_prompts=1)


def prompt(instruction: str) -> str:
    """The training and generation prompt: CHAT_TEMPLATE's rendering of one user turn, without
    the BOS token (the tokenizer adds it)."""
    return f"<start_of_turn>user\n{instruction}<end_of_turn>\n<start_of_turn>model\n"


def sft_rows(rows: list[dict]) -> list[dict]:
    """{"instruction", "response"} rows -> jaxaccel.finetune's {"prompt", "completion"} rows."""
    return [{"prompt": prompt(r["instruction"]), "completion": r["response"]} for r in rows]


def tune(base, rows: list[dict], tuning: Tuning, out: Path, eval_rows: list[dict] | None = None,
         progress: bool = True):
    """LoRA-tune `base` (a Model) on {"instruction", "response"} rows; the merged Model.

    OUT (the finetune folder): the merged HF folder at its root (its tokenizer carries
    CHAT_TEMPLATE, so `jaxaccel quantize` / `serve` of it keep the chat format), lora/ (the
    adapters alone), metrics.jsonl (with eval_loss on `eval_rows` at the last step, if given)."""
    import jaxaccel

    base.tokenizer.chat_template = CHAT_TEMPLATE  # an HF tokenizer saves it with the export
    t = tuning
    tuned = jaxaccel.finetune(base, sft_rows(rows), task="sft", steps=t.steps, out=out, batch_size=t.batch_size,
                              max_length=t.max_length, lr=t.lr, warmup=t.warmup, lora_rank=t.rank, lora_alpha=t.alpha,
                              lora_targets=t.targets, seed=t.seed, save_every=t.steps, keep=1,
                              eval_data=sft_rows(eval_rows) if eval_rows else None, progress=progress,
                              tensorboard=False)
    # jaxaccel's FastTokenizer copies its files instead: the folder gets the template either way
    (Path(out) / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return tuned


def answer(model, instructions: list[str], max_new_tokens: int, **generate_kw) -> list[str]:
    """Greedy answers to instructions in the chat format, all prompts in one batch."""
    import jaxaccel

    texts = jaxaccel.generate(model, [prompt(i) for i in instructions], max_new_tokens=max_new_tokens, **generate_kw)
    return [t.strip() for t in texts]


def decode_speed(model, instructions: list[str], max_new_tokens: int, speculative: str | None = None) -> dict:
    """Greedy answers one prompt at a time (batch 1, as a chat request runs), each once to compile
    and once timed: generated tokens per second of wall time (prefill included), and with
    `speculative` the drafts kept. The answers, so a caller can check speculation kept them."""
    import jaxaccel

    answers, tokens, seconds, drafted, accepted = [], 0, 0.0, 0, 0
    for instruction in instructions:
        answer(model, [instruction], max_new_tokens, speculative=speculative)  # compile this prompt's bucket
        stats = jaxaccel.GenerationStats()
        answers += answer(model, [instruction], max_new_tokens, speculative=speculative, stats=stats)
        tokens, seconds = tokens + stats.generated_tokens, seconds + stats.total_time
        if stats.speculative is not None:
            drafted, accepted = drafted + stats.speculative.drafted, accepted + stats.speculative.accepted
    row = {"speculative": speculative or "none", "prompts": len(instructions), "generated_tokens": tokens,
           "tokens_per_s": round(tokens / seconds, 1)}
    if speculative:
        row["draft_acceptance"] = round(accepted / drafted, 3) if drafted else None
    return {**row, "answers": answers}


def response_loss(model, rows: list[dict], batch: int = 4, bucket: int = 32) -> float:
    """Mean next-token loss over the response tokens of {"instruction", "response"} rows (the
    tokens finetune's loss counts: the response and its EOS), through `Model.logits`. Rows are
    right-padded to a multiple of `bucket` tokens, `batch` at a time, so few programs compile."""
    import jax
    import jax.numpy as jnp

    tok = model.tokenizer
    encoded = []
    for r in rows:
        p = list(tok(prompt(r["instruction"]))["input_ids"])
        c = list(tok(r["response"], add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
        encoded.append((p + c, [0] * len(p) + [1] * len(c)))
    total = count = 0.0
    for s in range(0, len(encoded), batch):
        chunk = encoded[s:s + batch]
        chunk += [(chunk[0][0], [0] * len(chunk[0][0]))] * (batch - len(chunk))  # fill the batch; weight 0
        T = -(-max(len(ids) for ids, _ in chunk) // bucket) * bucket
        ids = np.zeros((batch, T), np.int32)
        mask, weights = np.zeros_like(ids), np.zeros((batch, T), np.float32)
        for i, (row, w) in enumerate(chunk):
            ids[i, :len(row)], mask[i, :len(row)], weights[i, :len(row)] = row, 1, w
        logp = jax.nn.log_softmax(model.logits(ids, attention_mask=mask)[:, :-1].astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.asarray(ids[:, 1:, None]), axis=-1)[..., 0]
        total += float((nll * weights[:, 1:]).sum())
        count += float(weights[:, 1:].sum())
    return round(total / count, 4)


def score(answers: list[str], rows: list[dict]) -> dict:
    return {"exact_match": mean(exact_match(a, r["response"]) for a, r in zip(answers, rows, strict=True)),
            "token_f1": mean(token_f1(a, r["response"]) for a, r in zip(answers, rows, strict=True))}


def main(args) -> dict:
    import jaxaccel

    cfg = QUICK if args.quick else Config()
    out = common.prepare_out(args.out, args.overwrite)
    train = common.read_jsonl(cfg.data / "train.jsonl")[:cfg.train_rows]
    test = common.read_jsonl(cfg.data / "test.jsonl")[:cfg.test_rows]
    common.write_jsonl(out / "data" / "train.jsonl", train)
    common.write_jsonl(out / "data" / "test.jsonl", test)
    instructions = [r["instruction"] for r in test]

    base = common.decoder(cfg.model)
    before = answer(base, instructions, cfg.max_new_tokens)
    before_loss = response_loss(base, test)
    tuned = tune(base, train, cfg.tuning, out / "finetuned", eval_rows=test, progress=not args.quick)
    after = answer(tuned, instructions, cfg.max_new_tokens)
    after_loss = response_loss(tuned, test)

    # serving: int8 folder -> reload -> generate; and `jaxaccel serve` of the same folder
    common.jaxaccel_cli("quantize", "--model", out / "finetuned", "--mode", "int8", "--out", out / "serving")
    served = jaxaccel.load(out / "serving")
    int8 = answer(served, instructions, cfg.max_new_tokens)
    n = cfg.serve_prompts
    chats = [[{"role": "user", "content": i}] for i in instructions[:n]]
    over_http = [t.strip() for t in common.serve_chat(out / "serving", chats, cfg.max_new_tokens)] if n else []
    common.write_jsonl(out / "answers.jsonl", [
        {"id": r["id"], "task": r["task"], "reference": r["response"], "before": b, "after": a, "int8": q}
        for r, b, a, q in zip(test, before, after, int8)])
    by_task = {}
    for task in sorted({r["task"] for r in test}):
        idx = [i for i, r in enumerate(test) if r["task"] == task]
        by_task[task] = {"rows": len(idx), "before": score([before[i] for i in idx], [test[i] for i in idx]),
                         "after": score([after[i] for i in idx], [test[i] for i in idx])}
    results = {
        "recipe": "lora_sft", "quick": args.quick, "model": cfg.model, "train_rows": len(train), "test_rows": len(test),
        "steps": cfg.tuning.steps, "lora_rank": cfg.tuning.rank, "lora_targets": list(cfg.tuning.targets),
        "before": {**score(before, test), "response_loss": before_loss},
        "after": {**score(after, test), "response_loss": after_loss},
        "int8_served": {**score(int8, test), "same_answer_as_float32": mean(a == q for a, q in zip(after, int8))},
        "by_task": by_task,
        "served_over_http": [{"instruction": c[0]["content"], "reply": r, "same_as_int8_generate": r == int8[i]}
                             for i, (c, r) in enumerate(zip(chats, over_http))],
        "finetuned": str(out / "finetuned"), "serving": str(out / "serving"),
    }
    common.save_results(out, results)
    return results


if __name__ == "__main__":
    raise SystemExit(common.run(main, "lora_sft", __doc__))
