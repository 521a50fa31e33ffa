"""Customer-service chat: retrieve FAQ entries with MiniLM, answer with Gemma 3 270M grounded on them.

    python -m recipes.support_chat [--quick] [--out DIR] [--overwrite]

1. Retrieval: `Model.embed` (MiniLM) embeds every FAQ entry ("question answer") once; a customer
   question is embedded the same way and the `k` entries with the highest cosine are retrieved.
   Hit rate@1 / @k: how often the entry a held-out question is about is among them.
2. The answerer sees a chat: a system message holding the retrieved entries and the customer's
   question (`chat_messages`); `prompt_text` writes it out exactly as CHAT_TEMPLATE (the jinja
   template the server renders) does, so the tune, `jaxaccel.generate` and `jaxaccel serve` all
   see the same tokens. Answers are greedy, one line (stop at a newline), streamed (`answer(...,
   stream=)`).
3. LoRA tune: `jaxaccel.finetune(gemma, rows, task="sft", lora_rank=...)` on the shipped training
   dialogues, each written as that prompt (its retrieved entries; the dialogue's own entry takes
   the last place when retrieval missed it, so the tune always teaches answering from the
   context) and the assistant's reply as the completion. OUT/finetuned is the merged HF folder.
4. Serving: `jaxaccel quantize --mode int8` -> OUT/served, plus OUT/served/chat_template.jinja
   (Gemma 3 270M is a base model without a chat template; `jaxaccel serve --model OUT/served`
   reads the folder's chat_template.jinja). `chat_body` is the /v1/chat/completions request for
   a question: retrieval runs in the client, the server answers.
5. Held-out questions (none of them in a training dialogue; some about entries no dialogue
   covers): hit rates, and token-F1 of the answers against the reference answers for the base
   model, the tuned model (float32) and the served int8 folder, beside a no-generation baseline
   (the top retrieved entry's answer, verbatim). OUT/results.json, OUT/answers.jsonl, OUT/data.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import common
from .text_metrics import token_f1  # lora_sft's: the same token-F1 in every LM recipe

SYSTEM_HEADER = "Kestrel Mobile customer service. Answer the customer's question from these FAQ entries.\n"
# What prompt_text writes, for the server (jinja, rendered with trim_blocks / lstrip_blocks: no
# text outside {{ }} so those settings change nothing). bos_token is text: the server encodes
# the rendered prompt without adding special tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'Customer: ' + m['content'] + '\\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] + '\\n' }}"
    "{% else %}{{ raise_exception('roles are system, user and assistant') }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
STOP = ["\n"]  # an answer is one line


@dataclass(frozen=True)
class Config:
    data: Path = common.DATA / "support"
    encoder: str = "minilm"
    answerer: str = "gemma3-270m"
    k: int = 3  # entries retrieved per question, all shown to the answerer
    steps: int = 16  # packed rows of 512 tokens hold about 2 prompts + answers: about 70 dialogues in all
    batch_size: int = 2
    max_length: int = 512
    lr: float = 1e-3
    warmup: int = 4
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    max_new_tokens: int = 64
    generate_batch: int = 8
    dialogues: int | None = None  # None: every training dialogue
    questions: int | None = None  # None: every held-out question


QUICK = replace(Config(), encoder="tiny", answerer="tiny", steps=2, batch_size=2, warmup=0, max_new_tokens=6,
                generate_batch=8, dialogues=6, questions=8)


# --- retrieval ---------------------------------------------------------------------------------
def entry_text(entry: dict) -> str:
    return f"{entry['question']} {entry['answer']}"


class Retriever:
    """The FAQ embedded once; `search(questions)` -> the k best entries' indices per question."""

    def __init__(self, encoder, faq: list[dict], batch_size: int = 64):
        self.encoder, self.faq, self.batch_size = encoder, faq, batch_size
        self.vectors = encoder.embed([entry_text(e) for e in faq], batch_size=batch_size)

    def search(self, questions: list[str], k: int) -> np.ndarray:
        scores = self.encoder.embed(questions, batch_size=self.batch_size) @ self.vectors.T  # unit vectors: cosine
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def hit_rate(retrieved: list[list[str]], wanted: list[str], k: int) -> float:
    """The share of questions whose wanted entry id is among their first k retrieved ids."""
    if not wanted:
        raise ValueError("hit_rate needs at least one question")
    return round(sum(w in r[:k] for r, w in zip(retrieved, wanted, strict=True)) / len(wanted), 4)


# --- prompts -----------------------------------------------------------------------------------
def system_message(entries: list[dict]) -> str:
    return SYSTEM_HEADER + "".join(f"FAQ: {e['question']}\nAnswer: {e['answer']}\n" for e in entries)


def chat_messages(question: str, entries: list[dict], history: list[dict] = ()) -> list[dict]:
    """The chat the answerer sees: the retrieved entries as the system message, earlier turns, the question."""
    return [{"role": "system", "content": system_message(entries)}, *history, {"role": "user", "content": question}]


def prompt_text(messages: list[dict]) -> str:
    """CHAT_TEMPLATE's output without the BOS token (the tokenizer adds it when encoding)."""
    label = {"system": "", "user": "Customer: ", "assistant": "Assistant: "}
    for m in messages:
        if m["role"] not in label:
            raise ValueError(f"unknown role {m['role']!r}: roles are system, user and assistant")
    return "".join(label[m["role"]] + m["content"] + "\n" for m in messages) + "Assistant:"


def chat_body(question: str, entries: list[dict], max_tokens: int = 64, stream: bool = False) -> dict:
    """A /v1/chat/completions request answering `question` from the retrieved `entries` (greedy, one line)."""
    return {"messages": chat_messages(question, entries), "max_tokens": max_tokens, "temperature": 0,
            "stop": STOP, "stream": stream}


def training_rows(dialogues: list[dict], retriever: Retriever, index: dict, k: int) -> list[dict]:
    """SFT rows {"prompt", "completion"}: every assistant turn of each dialogue, its prompt holding the
    entries retrieved for the customer's question (the dialogue's own entry last if retrieval missed it)."""
    asked = [(d, n) for d in dialogues for n, m in enumerate(d["messages"]) if m["role"] == "assistant"]
    found = retriever.search([d["messages"][n - 1]["content"] for d, n in asked], k)
    rows = []
    for (d, n), hits in zip(asked, found):
        hits = list(hits)
        if index[d["faq_id"]] not in hits:
            hits[-1] = index[d["faq_id"]]
        entries = [retriever.faq[i] for i in hits]
        rows.append({"prompt": prompt_text(chat_messages(d["messages"][n - 1]["content"], entries,
                                                         d["messages"][:n - 1])),
                     "completion": " " + d["messages"][n]["content"]})
    return rows


# --- answering ---------------------------------------------------------------------------------
def answer(model, questions: list[str], entries: list[list[dict]], cfg: Config, stream=None) -> list[str]:
    """Greedy one-line answers, `cfg.generate_batch` questions per call; stream(i, text) gets the
    new text of question i as it is decoded."""
    import jaxaccel

    prompts = [prompt_text(chat_messages(q, e)) for q, e in zip(questions, entries, strict=True)]
    out = []
    for s in range(0, len(prompts), cfg.generate_batch):
        relay = None if stream is None else (lambda i, text, s=s: stream(s + i, text))
        out += jaxaccel.generate(model, prompts[s:s + cfg.generate_batch], max_new_tokens=cfg.max_new_tokens,
                                 stop=STOP, stream=relay)
    return [t.strip() for t in out]


def overlap(answers: list[str], heldout: list[dict]) -> dict:
    """Mean token-F1 (text_metrics: normalized words, articles and punctuation dropped) against the reference answers: all questions, and those about entries no
    training dialogue covers."""
    f1 = [token_f1(a, q["reference"]) for a, q in zip(answers, heldout, strict=True)]
    unseen = [f for f, q in zip(f1, heldout) if not q["entry_in_train"]]
    return {"token_f1": round(float(np.mean(f1)), 4),
            "token_f1_unseen_entries": round(float(np.mean(unseen)), 4) if unseen else None}


def main(args) -> dict:
    import jaxaccel

    cfg = QUICK if args.quick else Config()
    out = common.prepare_out(args.out, args.overwrite)
    faq = common.read_jsonl(cfg.data / "faq.jsonl")
    dialogues = common.read_jsonl(cfg.data / "train.jsonl")[:cfg.dialogues]
    heldout = common.read_jsonl(cfg.data / "heldout.jsonl")[:cfg.questions]
    index = {e["id"]: i for i, e in enumerate(faq)}
    common.write_jsonl(out / "data" / "train.jsonl", dialogues)
    common.write_jsonl(out / "data" / "heldout.jsonl", heldout)

    encoder = common.tiny_encoder() if cfg.encoder == "tiny" else jaxaccel.load(cfg.encoder)
    retriever = Retriever(encoder, faq)
    questions, wanted = [q["question"] for q in heldout], [q["faq_id"] for q in heldout]
    found = [[faq[i]["id"] for i in row] for row in retriever.search(questions, cfg.k)]
    entries = [[faq[index[i]] for i in row] for row in found]
    retrieval = {"hit_rate@1": hit_rate(found, wanted, 1), f"hit_rate@{cfg.k}": hit_rate(found, wanted, cfg.k)}
    train_file = common.write_jsonl(out / "data" / "train_sft.jsonl", training_rows(dialogues, retriever, index, cfg.k))

    base = common.decoder(cfg.answerer)
    answers = {"top retrieved entry's answer (no generation)": [e[0]["answer"] for e in entries]}

    def report(name: str, texts: list[str]) -> None:  # each figure as soon as it is known (the run is long)
        answers[name] = texts
        print(f"{name}: {overlap(texts, heldout)}", file=sys.stderr, flush=True)

    print(f"retrieval: {retrieval}", file=sys.stderr, flush=True)
    report("base model", answer(base, questions, entries, cfg))
    tuned = jaxaccel.finetune(base, train_file, task="sft", steps=cfg.steps, out=out / "finetuned",
                              batch_size=cfg.batch_size, max_length=cfg.max_length, lr=cfg.lr, warmup=cfg.warmup,
                              lora_rank=cfg.lora_rank, lora_targets=cfg.lora_targets, save_every=cfg.steps, keep=1,
                              progress=not args.quick, tensorboard=False)
    report("LoRA-tuned, float32", answer(tuned, questions, entries, cfg))
    del base, tuned

    # serving: int8, with the chat template the base model lacks
    common.jaxaccel_cli("quantize", "--model", out / "finetuned", "--mode", "int8", "--out", out / "served")
    (out / "served" / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    served = jaxaccel.load(out / "served", fast_tokenizer=True)
    chunks: dict[int, list[str]] = {}
    report("LoRA-tuned, served int8", answer(served, questions, entries, cfg,
                                             stream=lambda i, text: chunks.setdefault(i, []).append(text)))
    print(f"streamed: {questions[0]}\n  -> {''.join(chunks.get(0, []))}", file=sys.stderr)

    common.write_jsonl(out / "answers.jsonl", [
        {"id": q["id"], "question": q["question"], "faq_id": q["faq_id"], "retrieved": r,
         "reference": q["reference"], **{name: a[n] for name, a in answers.items()}}
        for n, (q, r) in enumerate(zip(heldout, found))])
    table = [{"answers": name, **overlap(a, heldout)} for name, a in answers.items()]
    results = {"recipe": "support_chat", "quick": args.quick, "faq_entries": len(faq),
               "training_dialogues": len(dialogues), "heldout_questions": len(heldout),
               "heldout_on_unseen_entries": sum(not q["entry_in_train"] for q in heldout), "k": cfg.k,
               "steps": cfg.steps, "retrieval": retrieval, "answers": table,
               "streamed": {"question": questions[0], "chunks": chunks.get(0, [])},
               "finetuned": str(out / "finetuned"), "served": str(out / "served")}
    common.save_results(out, results)
    return results


if __name__ == "__main__":
    raise SystemExit(common.run(main, "support_chat", __doc__))
