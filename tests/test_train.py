"""Training: gradient parity with transformers (PyTorch) for SFT / classification / MLM,
accumulation, optimizers, mixed precision, QAT, the finetune loop (overfit, export, metrics,
TensorBoard, CLI) and its bad-input errors."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import traverse_util

import jaxaccel
from jaxaccel import cli, finetuning, train
from jaxaccel import data as data_lib
from jaxaccel.checkpoints import hf, store
from train_util import VOCAB, llama_folder, padded_causal_batch, sft_rows, tokenizer_into, write_jsonl


# --- gradient parity ---------------------------------------------------------------------------
def our_grads(model, task, batch, rng=jax.random.PRNGKey(0), **kw):
    loss_fn = train.make_loss_fn(model, task, **kw)

    def mean_loss(p):
        s, n = loss_fn(p, None, batch, rng)
        return s / n

    loss, grads = jax.jit(jax.value_and_grad(mean_loss))(model.params)
    return float(loss), grads


def assert_grads_match(model, grads, torch_model, rel=1e-4):
    name_of = hf.name_table(model.config)
    want = {n: p.grad for n, p in torch_model.named_parameters()}
    flat = traverse_util.flatten_dict(grads)
    assert len(flat) == len(want)
    # Key-projection biases have a true gradient of 0 (softmax ignores a per-query shift): both
    # sides hold rounding noise there, so a tensor is compared relative to its own norm, but
    # never to less than 1e-3 of the largest tensor's gradient norm.
    floor = 1e-3 * max(float(np.linalg.norm(p.numpy())) for p in want.values())
    for path, g in flat.items():
        g = np.asarray(g)
        g = g.T if hf.is_transposed(path) else g
        ref = want[name_of(path)].numpy()
        err = np.linalg.norm(g - ref) / max(np.linalg.norm(ref), floor)
        assert err <= rel, f"{name_of(path)}: relative gradient error {err:.2e}"


@pytest.mark.parametrize("kind", ["llama3", "gemma3"])
def test_sft_gradients_match_transformers(hf_folder, kind):
    folder, torch_model = hf_folder(kind)
    model = jaxaccel.load(folder)
    batch = padded_causal_batch(model.config.vocab_size)
    loss, grads = our_grads(model, "sft", batch)
    labels = np.where(batch["weights"] > 0, batch["tokens"], -100)
    torch_model.zero_grad()
    out = torch_model(input_ids=torch.tensor(batch["tokens"], dtype=torch.long),
                      attention_mask=torch.tensor(batch["segments"]), labels=torch.tensor(labels, dtype=torch.long))
    out.loss.backward()
    assert loss == pytest.approx(out.loss.item(), rel=1e-5)
    assert_grads_match(model, grads, torch_model)


def tiny_bert(arch, path):
    kw = dict(vocab_size=len(VOCAB), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=80, max_position_embeddings=32, type_vocab_size=2)
    if arch == "BertForSequenceClassification":
        kw.update(id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    torch.manual_seed(3)
    m = getattr(transformers, arch)._from_config(transformers.BertConfig(**kw), attn_implementation="eager")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.eval().save_pretrained(path, safe_serialization=True)
    tokenizer_into(path)
    return m


def bert_batch(vocab, seed=1):
    # HF's BERT embedding has padding_idx=0: torch never gives the [PAD] row a gradient. Our
    # loader puts [PAD] only in padding slots (no gradient either); keep it out of real tokens.
    b = padded_causal_batch(vocab, seed)
    b["tokens"] = np.maximum(b["tokens"], 1)
    b["weights"] = b["segments"].copy()
    b["labels"] = np.array([0, 1, 1], np.int32)
    return b


@pytest.mark.parametrize("task", ["classify", "mlm"])
def test_bert_gradients_match_transformers(tmp_path, task):
    arch = "BertForSequenceClassification" if task == "classify" else "BertForMaskedLM"
    torch_model = tiny_bert(arch, tmp_path)
    model = jaxaccel.load(tmp_path)
    batch = bert_batch(model.config.vocab_size)
    rng = jax.random.PRNGKey(5)
    mask_id = VOCAB.index("[MASK]")
    loss, grads = our_grads(model, task, batch, rng, mask_token_id=mask_id if task == "mlm" else None)
    kw = dict(attention_mask=torch.tensor(batch["segments"]))
    if task == "mlm":  # the same masking our step drew
        inputs, targets, w = train._mlm_inputs(batch, jax.random.fold_in(rng, 0), mask_id, model.config.vocab_size)
        assert 0 < float(w.sum()) < batch["segments"].sum()
        ids, labels = np.asarray(inputs), np.where(np.asarray(w) > 0, np.asarray(targets), -100)
    else:
        ids, labels = batch["tokens"], batch["labels"]
    torch_model.zero_grad()
    out = torch_model(input_ids=torch.tensor(ids, dtype=torch.long), labels=torch.tensor(labels, dtype=torch.long),
                      **kw)
    out.loss.backward()
    assert loss == pytest.approx(out.loss.item(), rel=1e-5)
    assert_grads_match(model, grads, torch_model)


# --- the step ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = llama_folder(tmp_path_factory.mktemp("tiny"), layers=1)
    return path, jaxaccel.load(path)


def test_accumulation_equals_full_batch(tiny):
    _, model = tiny
    batch = padded_causal_batch(model.config.vocab_size)
    batch = jax.tree.map(lambda x: np.concatenate([x, x[::-1]]), batch)  # 6 rows
    results = []
    for accum in (1, 3):
        opt = train.make_optimizer("sgd", 0.1, clip=None, momentum=0.0)
        step = train.make_train_step(model, opt, "sft", accum=accum)
        state, metrics = step(train.init_state(model, opt), batch)
        results.append((metrics, state.params))
    (m1, p1), (m3, p3) = results
    assert float(m1["loss"]) == pytest.approx(float(m3["loss"]), rel=1e-6)
    assert float(m1["targets"]) == float(m3["targets"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p1, p3)


@pytest.mark.parametrize("name", train.OPTIMIZERS)
def test_optimizers_and_schedules(name):
    """Each optimizer, with warmup + linear decay and weight decay, minimises a least-squares
    problem (the wiring; optax owns the update rules)."""
    rng = np.random.RandomState(0)
    a = jnp.asarray(rng.randn(32, 8), jnp.float32)
    y = a @ jnp.asarray(rng.randn(8), jnp.float32)  # realisable: the minimum loss is 0
    params = {"w": jnp.asarray(rng.randn(8, 4) * 0.3, jnp.float32), "b": jnp.zeros((4,))}
    loss = lambda p: jnp.mean((a @ p["w"] @ jnp.ones(4) + p["b"].sum() - y) ** 2)
    lr = {"adamw": 3e-2, "sgd": 3e-2, "adafactor": 0.3, "lion": 1e-2}[name]
    opt = train.make_optimizer(name, lr, steps=60, warmup=5, schedule="linear", weight_decay=1e-4)
    schedule = train.make_schedule(lr, 60, "linear", 5)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        updates, state = opt.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    start = float(loss(params))
    for _ in range(60):
        params, state = step(params, state)
    assert float(loss(params)) < 0.3 * start
    assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(lr) and float(schedule(59)) < lr / 10


def test_mixed_precision_keeps_float32_master_weights(tiny):
    _, model = tiny
    batch = padded_causal_batch(model.config.vocab_size)
    opt = train.make_optimizer("adamw", 1e-3)
    state, m = train.make_train_step(model, opt, "sft", compute_dtype="bfloat16")(train.init_state(model, opt), batch)
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
    assert int(state.step) == 1 and int(state.data_pos) == 1
    loss32 = float(np.divide(*train.make_eval_fn(model, "sft")(model.params, None, batch)))
    assert float(m["loss"]) == pytest.approx(loss32, rel=2e-2)
    assert float(m["loss"]) != loss32  # bf16 compute really ran


def test_qat_trains_through_fake_quant(tiny):
    quant = pytest.importorskip("jaxaccel.quant")
    _, model = tiny
    batch = padded_causal_batch(model.config.vocab_size)
    dg = quant.dot_general_cls(quant.QuantConfig(mode="qat"))
    loss32 = float(np.divide(*train.make_eval_fn(model, "sft")(model.params, None, batch)))
    opt = train.make_optimizer("adamw", 3e-3)
    step = train.make_train_step(model, opt, "sft", dot_general_cls=dg)
    state = train.init_state(model, opt)
    losses = []
    for _ in range(3):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[0] != loss32 and losses[0] == pytest.approx(loss32, rel=5e-2)  # fake-quant, close to float
    assert losses[-1] < losses[0]


# --- the loop ------------------------------------------------------------------------------------
def test_finetune_overfits_exports_and_logs(tiny, tmp_path):
    path, model = tiny
    out = tmp_path / "out"
    result = jaxaccel.finetune(model, sft_rows(8), steps=40, out=out, lr=3e-3, batch_size=4, pack=False,
                               save_every=20, eval_data=sft_rows(4, seed=1), progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    first, last = records[0]["loss"], np.mean([r["loss"] for r in records[-3:]])
    assert last <= 0.1 * first, (first, last)  # loss falls >= 90 %
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(records[-1]) and "eval_loss" in records[-1]
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [20, 40]
    loaded = jaxaccel.load(out)
    ids = np.arange(1, 11)[None]
    np.testing.assert_array_equal(np.asarray(loaded.logits(ids)), np.asarray(result.logits(ids)))
    assert not np.allclose(np.asarray(loaded.logits(ids)), np.asarray(model.logits(ids)))
    # a second call on the same out resumes at the end: nothing more to train, same result
    again = jaxaccel.finetune(model, sft_rows(8), steps=40, out=out, lr=3e-3, batch_size=4, pack=False,
                              save_every=20, eval_data=sft_rows(4, seed=1), progress=False)
    np.testing.assert_array_equal(np.asarray(again.logits(ids)), np.asarray(result.logits(ids)))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 40


def test_cli_finetune_qat_and_different_model_refused(tiny, tmp_path, hf_folder, capsys):
    path, _ = tiny
    data = write_jsonl(tmp_path / "train.jsonl", sft_rows(4))
    out = tmp_path / "out"
    args = ["finetune", "--model", str(path), "--data", str(data), "--out", str(out), "--steps", "2",
            "--batch-size", "2", "--save-every", "1", "--no-tensorboard", "--quant", "qat"]
    assert cli.main(args) == 0
    assert "loss (first -> last)" in capsys.readouterr().out
    other = llama_folder(tmp_path / "other", kind="qwen2", layers=1)
    code = cli.main(["finetune", "--model", str(other), *args[3:]])
    err = capsys.readouterr().err
    assert code == 2 and "different model" in err and "refusing to resume" in err and "num_kv_heads" in err
    assert store.restore(out / "checkpoints")["step"] == 2  # the old run's checkpoints are untouched
    bigger = [a if a != "2" or args[i - 1] != "--batch-size" else "4" for i, a in enumerate(args)]
    assert cli.main(bigger) == 2  # same model, another batch size: a different data stream
    err = capsys.readouterr().err
    assert "different training setup" in err and "batch_size" in err and "refusing to resume" in err


# --- bad input -----------------------------------------------------------------------------------
def test_malformed_jsonl_names_the_line(tiny, tmp_path, capsys):
    path, model = tiny
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "one", "completion": "two"}\n\n{"prompt": "one", "completion": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 3 is not valid JSON"):
        data_lib.read_rows(bad)
    code = cli.main(["finetune", "--model", str(path), "--data", str(bad), "--out", str(tmp_path / "o")])
    assert code == 2 and "line 3 is not valid JSON" in capsys.readouterr().err
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"prompt": "one", "completion": "two"}, {"text": 3}])
    with pytest.raises(ValueError, match=r"wrong.jsonl line 2: 'text' must be a string"):
        data_lib.load(wrong, model.tokenizer, "sft", max_length=16, batch_size=1)


def test_long_rows_error_or_truncate_and_count(tiny):
    _, model = tiny
    rows = [{"text": "one two three"}, {"text": " ".join(["cat"] * 40)}, {"text": " ".join(["dog"] * 30)}]
    with pytest.raises(ValueError, match=r"row 2 has 43 tokens, more than the max length 16.*truncate"):
        data_lib.load(rows, model.tokenizer, "sft", max_length=16, batch_size=2)
    ds = data_lib.load(rows, model.tokenizer, "sft", max_length=16, batch_size=2, truncate=True, pack=False)
    assert ds.stats.truncated == 2 and ds.arrays["tokens"].shape == (3, 16)


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tiny, tmp_path):
    _, model = tiny
    out = tmp_path / "out"
    with pytest.raises(finetuning.TrainingError, match=r"not finite at step (\d+)") as info:
        jaxaccel.finetune(model, sft_rows(8), steps=20, out=out, optimizer="sgd", lr=1e5, clip=None,
                          schedule="constant", batch_size=4, save_every=1, progress=False, tensorboard=False)
    bad = int(info.value.args[0].split("at step ")[1].split(";")[0])
    assert bad >= 2
    last = store.restore(out / "checkpoints")
    assert int(last["step"]) == bad - 1 and f"step {bad - 1}" in str(info.value)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(last["params"]))


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        train.make_optimizer("adam")
    with pytest.raises(ValueError, match="unknown task"):
        finetuning.TrainOptions(task="dpo")
    with pytest.raises(ValueError, match="divisible by accum"):
        finetuning.TrainOptions(batch_size=6, accum=4)


def test_finetune_classifier_with_eval(tmp_path):
    tiny_bert("BertForSequenceClassification", tmp_path / "bert")
    model = jaxaccel.load(tmp_path / "bert")
    rows = [{"text": "happy sky blue", "label": "pos"}, {"text": "sad tree", "label": "neg"},
            {"text": "very happy", "label": 1}, {"text": "very sad house", "label": 0}]
    out = tmp_path / "out"
    jaxaccel.finetune(model, rows, task="classify", steps=12, out=out, lr=1e-2, batch_size=4, save_every=6,
                      eval_data=rows[:3], progress=False, tensorboard=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < 0.5 * records[0]["loss"] and records[-1]["eval_loss"] < records[5]["eval_loss"]
    predicted = [label for label, _ in jaxaccel.load(out).classify([r["text"] for r in rows])]
    assert predicted == ["pos", "neg", "pos", "neg"]
    with pytest.raises(ValueError, match=r"row 2: label 'meh' is not one of the model's labels \['neg', 'pos'\]"):
        data_lib.load([rows[0], {"text": "x", "label": "meh"}], model.tokenizer, "classify", max_length=8, batch_size=1,
                      labels=model.config.labels)
    multi = dataclasses.replace(model, config=model.config.replace(problem_type="multi_label_classification"))
    with pytest.raises(ValueError, match="trains single-label classifiers .* this checkpoint is multi_label_classification"):
        jaxaccel.finetune(multi, rows, task="classify", steps=1, out=tmp_path / "no", progress=False, tensorboard=False)
    assert not (tmp_path / "no").exists()
    with pytest.raises(ValueError, match=r"row 2: classify fine-tuning takes one text per row; sentence pairs"):
        data_lib.load([rows[0], {"text": "a", "text_pair": "b", "label": "pos"}], model.tokenizer, "classify",
                      max_length=8, batch_size=1, labels=model.config.labels)


def test_packed_mlm_rows_do_not_see_each_other(tmp_path, monkeypatch):
    # no random masking: every real token is a target, so packed and separate rows must score alike
    monkeypatch.setattr(train, "_mlm_inputs", lambda b, rng, mask_id, vocab: (
        b["tokens"], b["tokens"], (b["segments"] > 0).astype(jnp.float32)))
    tiny_bert("BertForMaskedLM", tmp_path)
    model = jaxaccel.load(tmp_path)
    loss_fn = jax.jit(train.make_loss_fn(model, "mlm", mask_token_id=VOCAB.index("[MASK]")))
    a, b = np.array([5, 6, 7, 8, 9], np.int32), np.array([10, 11, 12], np.int32)

    def rows(seqs, segs):
        T = 8
        tok, pos, seg = (np.zeros((len(seqs), T), np.int32) for _ in range(3))
        for i, (s, sg) in enumerate(zip(seqs, segs)):
            n = sum(len(x) for x in s)
            tok[i, :n] = np.concatenate(s)
            pos[i, :n] = np.concatenate([np.arange(len(x)) for x in s])
            seg[i, :n] = np.concatenate([np.full(len(x), g) for x, g in zip(s, sg)])
        return {"tokens": tok, "positions": pos, "segments": seg, "weights": seg.copy()}

    packed = loss_fn(model.params, None, rows([[a, b]], [[1, 2]]), jax.random.PRNGKey(0))
    separate = loss_fn(model.params, None, rows([[a], [b]], [[1], [1]]), jax.random.PRNGKey(0))
    assert float(packed[1]) == float(separate[1]) == 8.0
    assert float(packed[0]) == pytest.approx(float(separate[0]), rel=1e-5)


def test_finetuning_a_quantized_model_is_refused(tiny, tmp_path):
    _, model = tiny
    q = model.quantize(jaxaccel.QuantConfig(mode="int8"))
    with pytest.raises(ValueError, match="quantized .*Fine-tune the float checkpoint"):
        jaxaccel.finetune(q, sft_rows(4), steps=1, out=tmp_path / "o", batch_size=2, progress=False,
                          tensorboard=False)
