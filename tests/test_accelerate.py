"""`jaxaccel accelerate`: every variant measured (speed, quality against float32, peak memory), the
fastest within the budget chosen and saved, report.json (validated against its shipped schema),
report.md and report.png written; classifiers measured by accuracy on labelled --eval rows; the
transformers baseline row; budgets nothing meets keep float32 jit and say so; Ctrl-C keeps the
measured rows; bad arguments are clear errors that touch nothing."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import jaxaccel
from jaxaccel import accelerate as acc
from jaxaccel import accelerate_baseline, accelerate_llama, accelerate_measure, accelerate_report, accelerate_variants, cli
from jaxaccel.quant import QuantConfig
from conftest import random_hf_model, tiny_hf_config
from serve_util import write_char_tokenizer
from train_util import WORDS, tokenizer_into

SCHEMA = json.loads(accelerate_report.SCHEMA.read_text())
TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
         "integer": int, "number": (int, float)}


def schema_errors(x, schema: dict, root: dict = SCHEMA, at: str = "$") -> list[str]:
    """Where `x` breaks `schema`: the JSON Schema keywords the report's schema uses (a small
    validator, so the test needs no jsonschema package; where that is installed it checks too)."""
    errs = []
    sub = lambda v, s, where=at: schema_errors(v, s, root, where)
    if "$ref" in schema:  # applies beside the schema's other keywords (draft 2020-12)
        target = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        errs += sub(x, target)
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(isinstance(x, TYPES[k]) and not (isinstance(x, bool) and k in ("integer", "number")) for k in kinds):
            return errs + [f"{at}: {x!r} is not {kinds}"]
    if "const" in schema and x != schema["const"]:
        errs.append(f"{at}: {x!r} != {schema['const']!r}")
    if "enum" in schema and x not in schema["enum"]:
        errs.append(f"{at}: {x!r} not in {schema['enum']}")
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        if x < schema.get("minimum", -np.inf) or x > schema.get("maximum", np.inf):
            errs.append(f"{at}: {x} out of range")
        if "exclusiveMinimum" in schema and x <= schema["exclusiveMinimum"]:
            errs.append(f"{at}: {x} <= {schema['exclusiveMinimum']}")
    if isinstance(x, list):
        errs += [f"{at}: fewer than {schema['minItems']} items"] if len(x) < schema.get("minItems", 0) else []
        errs += [e for i, v in enumerate(x) for e in sub(v, schema.get("items", {}), f"{at}[{i}]")]
    if isinstance(x, dict):
        errs += [f"{at}: no {k!r}" for k in schema.get("required", []) if k not in x]
        errs += [f"{at}: fewer than {schema['minProperties']} keys"] if len(x) < schema.get("minProperties", 0) else []
        for k, v in x.items():
            if k in schema.get("properties", {}):
                errs += sub(v, schema["properties"][k], f"{at}.{k}")
                continue
            pattern = [s for p, s in schema.get("patternProperties", {}).items() if re.search(p, k)]
            errs += [e for s in pattern for e in sub(v, s, f"{at}.{k}")]
            if not pattern and schema.get("additionalProperties") is False:
                errs.append(f"{at}: unexpected key {k!r}")
    if "oneOf" in schema and sum(not sub(x, s) for s in schema["oneOf"]) != 1:
        errs.append(f"{at}: not exactly one of oneOf")
    if "anyOf" in schema and all(sub(x, s) for s in schema["anyOf"]):
        errs.append(f"{at}: none of anyOf")
    if "not" in schema and not sub(x, schema["not"]):
        errs.append(f"{at}: matches a 'not'")
    if "if" in schema:
        errs += sub(x, schema["then"] if not sub(x, schema["if"]) else schema.get("else", {}))
    return errs


def _jsonschema():
    try:
        import jsonschema
    except ImportError:
        return None
    return jsonschema


def validate(report: dict, schema: dict = SCHEMA) -> None:
    """report.json against the shipped schema: the small validator, and jsonschema where installed."""
    errors = schema_errors(report, schema, schema)
    assert not errors, errors
    if _jsonschema():
        _jsonschema().validate(report, schema)


def assert_invalid(x, schema: dict = SCHEMA) -> None:
    assert schema_errors(x, schema, schema)
    if _jsonschema():
        with pytest.raises(_jsonschema().ValidationError):
            _jsonschema().validate(x, schema)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tinyacc")
    cfg = tiny_hf_config("gemma3")
    cfg.num_hidden_layers, cfg.layer_types = 2, cfg.layer_types[:2]  # two layers: quicker un-jitted and to compile
    random_hf_model(cfg).save_pretrained(path)
    write_char_tokenizer(path)
    return path


def bert_folder(path: Path, arch: str = "BertForSequenceClassification") -> Path:
    """A tiny random BERT (a 3-class classifier by default) with a word-level tokenizer."""
    kw = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              max_position_embeddings=32, type_vocab_size=2)
    if arch == "BertForSequenceClassification":
        kw.update(id2label={0: "neg", 1: "neutral", 2: "pos"}, label2id={"neg": 0, "neutral": 1, "pos": 2})
    torch.manual_seed(4)
    m = getattr(transformers, arch)._from_config(transformers.BertConfig(**kw), attn_implementation="eager")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # large enough that the texts get different labels
    m.eval().save_pretrained(path, safe_serialization=True)
    tokenizer_into(path)
    return path


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return bert_folder(tmp_path_factory.mktemp("tinycls"))


def eval_rows(n: int = 24, seed: int = 0) -> list[dict]:
    """Labelled rows: texts of 2-9 words, every fourth a sentence pair, labels by name and by index."""
    rng = np.random.RandomState(seed)
    rows = []
    for i in range(n):
        row = {"text": " ".join(rng.choice(WORDS, rng.randint(2, 10))), "label": ["neg", "neutral", "pos"][i % 3]}
        if i % 4 == 3:
            row["text_pair"] = " ".join(rng.choice(WORDS, 3))
        if i % 5 == 4:
            row["label"] = i % 3  # an index names the same class
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rate(row, batch=1, key="decode_tok_s"):
    return row["speed"][str(batch)][key]


def check_choice(report, budget_holds, key):
    """The chosen row is within the budget, and no faster jaxaccel row within the budget beats it
    (the kernels-off comparison rows are never candidates)."""
    rows = {r["variant"]: r for r in report["rows"]}
    batch = report["batch"]
    base = _rate(rows[acc.BASELINE], batch, key)
    ok = [r for r in rows.values() if "skipped" not in r and r["kind"] == "variant" and r["variant"] != acc.BASELINE
          and r.get("kernels") is None and budget_holds(r["quality"]) and _rate(r, batch, key) > base]
    want = max(ok, key=lambda r: _rate(r, batch, key))["variant"] if ok else acc.BASELINE
    assert report["chosen"] == want and want in report["reason"]
    assert report["chosen_quality"] == rows[want]["quality"]
    return want


def test_accelerate_measures_chooses_saves_and_reports(tiny, tmp_path, capsys):
    out = tmp_path / "acc"
    acc.accelerate(jaxaccel.load(tiny), out, "generate", acc.Budget("kl", 0.05), (1,), new_tokens=8, source=str(tiny),
                   windows=2, repeats=1)
    report = json.loads((out / "report.json").read_text())
    validate(report)
    rows = {r["variant"]: r for r in report["rows"]}
    # the kernels-off row repeats the fastest integer variant measured before it, through XLA's ops
    off = next(r for r in report["rows"] if r.get("kernels") == "xla")
    twin = rows[off["same_as"]]
    integer = [r for r in rows.values() if "skipped" not in r and r["quant"] and r["quant"]["mode"] in ("int8", "int4", "w8a8")
               and r["kind"] == "variant" and r is not off and r["speculative"] is None]
    assert twin is max(integer, key=_rate) and off["variant"] == f"{twin['variant']}, {accelerate_variants.KERNELS_OFF}"
    assert off["quant"] == twin["quant"] and off["quality"] == twin["quality"]  # Model.logits: no kernels either way
    assert off["verdict"].startswith(f"never chosen: {twin['variant']} through XLA's ops instead of the CPU kernels")
    assert report["chosen"] != off["variant"] and off["variant"] not in report["pareto"]
    names = {v.name for v in acc.lm_variants()} - {accelerate_variants.BEST_INTEGER_KERNELS_OFF.name} | {off["variant"]}
    assert set(rows) == names | {accelerate_baseline.NAME, accelerate_llama.NAME}
    assert rows[accelerate_llama.NAME]["skipped"].startswith("not measured: ")  # an HF folder, not a GGUF
    measured = [r for r in rows.values() if "skipped" not in r]
    assert len(measured) >= 8 and {acc.BASELINE, "float16", "float32 eager"} <= {r["variant"] for r in measured}
    assert "skipped" in rows["int4 g128"]  # groups of 128 do not divide the tiny model's 64 inputs
    for r in measured:
        q, mem = r["quality"], r["memory"]
        assert 0 <= q["kl_mean"] <= q["kl_p99"] + 1e-12 and 0 < q["top1_agreement"] <= 1 and _rate(r) > 0
        assert mem["peak_rss_bytes"] >= mem["start_rss_bytes"] > 0 and mem["method"] == report["memory_method"]
    assert rows["int8 per channel"]["quality"]["kl_mean"] < rows["int4 g32"]["quality"]["kl_mean"]
    assert rows["bfloat16"]["params_bytes"] == rows["float16"]["params_bytes"] < rows[acc.BASELINE]["params_bytes"]
    # exact variants decode float32's greedy text (eager: its first two tokens)
    base_text = rows[acc.BASELINE]["greedy_text"]
    assert rows["prompt lookup"]["greedy_text"] == rows["int8 self-draft"]["greedy_text"] == base_text
    assert base_text.startswith(rows["float32 eager"]["greedy_text"])
    # transformers on the same weights: the same next-token distributions, never chosen
    hf = rows[accelerate_baseline.NAME]
    assert hf["kind"] == "external baseline" and hf["verdict"].startswith("external baseline, never chosen")
    assert hf["quality"]["kl_mean"] < 1e-6 and hf["quality"]["top1_agreement"] > 0.99
    assert hf["params_bytes"] == rows[acc.BASELINE]["params_bytes"] and "transformers" in hf["external"]
    want = check_choice(report, lambda q: q["kl_mean"] <= 0.05, "decode_tok_s")
    for r in measured:
        if r["variant"] not in (want, acc.BASELINE) and r["kind"] == "variant" and r is not off:
            assert r["verdict"].startswith(("outside the quality budget", "not faster", "within budget")), r
    front = report["pareto"]
    assert front and all(rows[n]["kind"] == "variant" for n in front)
    # the saved folder is the chosen variant: same logits, and the greedy text the planner recorded
    chosen = acc.variant_named(want, "generate")
    assert report["saved"]["speculative"] == chosen.speculative
    saved = jaxaccel.load(out / "model")
    ref = jaxaccel.load(tiny).quantize(chosen.quant or QuantConfig(mode="float32"))
    ids = np.asarray([[2, 40, 41, 42, 43, 44]])
    np.testing.assert_allclose(np.asarray(saved.logits(ids)), np.asarray(ref.logits(ids)), atol=1e-5)
    text = jaxaccel.generate(saved, [report["eval"]["prompt"]], max_new_tokens=8, speculative=chosen.speculative)[0]
    assert text == rows[want]["greedy_text"]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert md.count("\n| ") == len(rows) + 1 and report["reason"] in md and report["memory_method"] in md
    assert "Speed at each batch size" not in md  # one batch size: the main table has it
    assert sorted(p.name for p in out.iterdir()) == ["model", "report.json", "report.md", "report.png"]
    assert "chosen" in capsys.readouterr().out


def test_classify_measures_accuracy_and_saves_a_classifier(classifier, tmp_path, capsys):
    rows_in = eval_rows()
    data = write_jsonl(tmp_path / "eval.jsonl", rows_in)
    out = tmp_path / "cls"
    assert cli.main(["accelerate", "--task", "classify", "--model", str(classifier), "--eval", str(data),
                     "--out", str(out), "--batch-sizes", "8,4", "--quality-budget", "acc:5",
                     "--time-budget", "inf"]) == 0  # every row, however busy the machine
    report = json.loads((out / "report.json").read_text())
    validate(report)
    rows = {r["variant"]: r for r in report["rows"]}
    assert set(rows) == {v.name for v in acc.encoder_variants()} | {accelerate_baseline.NAME}
    assert not [r["skipped"] for r in rows.values() if "skipped" in r]  # every variant applies to this classifier
    assert report["eval"]["rows"] == len(rows_in) and report["batch"] == 8
    # accuracy recomputed from float32's own predictions and the labels (indices name classes)
    names = ["neg", "neutral", "pos"]
    gold = [r["label"] if isinstance(r["label"], str) else names[r["label"]] for r in rows_in]
    items = [(r["text"], r["text_pair"]) if "text_pair" in r else r["text"] for r in rows_in]
    f32 = [label for label, _ in jaxaccel.load(classifier).classify(items, truncate=True)]
    assert rows[acc.BASELINE]["predictions"] == f32 and len(set(f32)) > 1
    acc32 = np.mean([g == p for g, p in zip(gold, f32)])
    for r in rows.values():
        if "skipped" in r:
            continue
        q, pred = r["quality"], r["predictions"]
        assert q["accuracy"] == pytest.approx(np.mean([g == p for g, p in zip(gold, pred)]))
        assert q["accuracy_drop_points"] == pytest.approx(100 * (acc32 - q["accuracy"]))
        assert q["agreement"] == pytest.approx(np.mean([a == b for a, b in zip(f32, pred)]))
        assert set(r["speed"]) == {"8", "4"} and _rate(r, 8, "sentences_s") > 0
    assert rows[accelerate_baseline.NAME]["predictions"] == f32  # transformers on the same weights
    assert rows["bfloat16"]["quality"]["agreement"] > 0.8
    want = check_choice(report, lambda q: q["accuracy_drop_points"] <= 5, "sentences_s")
    md = (out / "report.md").read_text()
    assert "accuracy at most 5 points below float32's" in md and "| accuracy | Δ points | agreement |" in md
    # each batch size asked for is a line of its own (the main table shows batch 8, which decides)
    bcols, lines = accelerate_report.batch_rows(report)
    measured = [r for r in report["rows"] if "skipped" not in r]
    assert [c[:2] for c in lines] == [[r["variant"], b] for r in measured for b in ("8", "4")]
    for c in lines:
        assert float(c[2]) == round(_rate(rows[c[0]], int(c[1]), "sentences_s"), 1)
        assert "| " + " | ".join(c) + " |" in md.split("Speed at each batch size:")[1]
    # the saved folder is a classifier `jaxaccel classify` serves, labelling as the chosen variant did
    capsys.readouterr()
    assert cli.main(["classify", "--model", str(out / "model"), "--input", str(data), "--truncate"]) == 0
    got = [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()]
    assert got == rows[want]["predictions"]


@pytest.mark.parametrize("argv,message", [
    (["--quality-budget", "fast"], "--quality-budget 'fast' for --task generate: expected kl:N or ppl:N"),
    (["--quality-budget", "cos:0.99"], "expected kl:N or ppl:N"),
    (["--task", "classify", "--eval", "E", "--quality-budget", "kl:0.1"], "for --task classify: expected acc:N"),
    (["--task", "classify", "--eval", "E", "--quality-budget", "acc:101"], "expected acc:N"),
    (["--batch-sizes", "1,x"], "--batch-sizes must be positive integers"),
    (["--task", "classify"], "--task classify needs --eval FILE"),
    (["--eval", "E"], "--eval is for --task classify"),
    (["--task", "classify", "--eval", "MISSING"], "--eval file"),
    (["--task", "classify", "--eval", "NOLABEL"], "line 2 has no \"label\""),
    (["--task", "classify", "--eval", "BADJSON"], "line 1 is not valid JSON"),
    (["--task", "classify", "--eval", "UNKNOWN"], "line 2: label 'meh' is not one of the model's labels ['neg', 'neutral', 'pos']"),
    (["--task", "classify", "--eval", "E", "--model", "TINY"], "--task classify needs a BERT encoder; gemma3 is a decoder LM"),
    (["--task", "classify", "--eval", "E", "--model", "BERT"], "needs a sequence classifier"),
    (["--task", "embed", "--model", "TINY"], "--task embed needs a BERT encoder"),
    (["--model", "CLS"], "--task generate needs a decoder LM"),
    (["--time-budget", "0"], "--time-budget 0: expected minutes > 0"),
    (["--time-budget", "nan"], "--time-budget nan: expected minutes > 0"),
    (["--out", "FILE/sub"], "cannot be written"),
    (["--out", "FILE"], "exists and is not a folder"),
])
def test_bad_arguments_are_clear_errors(tiny, classifier, tmp_path, capsys, argv, message):
    files = {"E": write_jsonl(tmp_path / "e.jsonl", eval_rows(3)), "MISSING": tmp_path / "none.jsonl",
             "NOLABEL": write_jsonl(tmp_path / "n.jsonl", [{"text": "a", "label": "pos"}, {"text": "b"}]),
             "BADJSON": tmp_path / "bad.jsonl", "UNKNOWN": write_jsonl(tmp_path / "u.jsonl", [{"text": "a", "label": 1},
                                                                                               {"text": "b", "label": "meh"}]),
             "TINY": tiny, "CLS": classifier, "FILE": tmp_path / "a-file", "FILE/sub": tmp_path / "a-file" / "sub"}
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    (tmp_path / "a-file").write_text("x")
    if "BERT" in argv:
        files["BERT"] = bert_folder(tmp_path / "bert", "BertModel")
    argv = [str(files.get(a, a)) for a in argv]
    out = tmp_path / "never"
    model = [] if "--model" in argv else ["--model", str(classifier if "classify" in argv else tiny)]
    assert cli.main(["accelerate", *model, "--out", str(out), *argv]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_a_non_empty_out_folder_is_refused_before_any_work(tiny, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(["accelerate", "--model", str(tiny), "--out", str(out)]) == 2
    assert "is not empty and is not an earlier `jaxaccel accelerate` output (it holds keep.txt)" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    (out / "report.json").write_text('{"mine": 1}')  # the name alone does not make it ours
    assert cli.main(["accelerate", "--model", str(tiny), "--out", str(out)]) == 2
    assert "it has no report.json that accelerate wrote" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["report.json"]


def test_ctrl_c_before_any_variant_writes_nothing(tiny, tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(acc, "accelerate", interrupted)
    out = tmp_path / "none"
    assert cli.main(["accelerate", "--model", str(tiny), "--out", str(out)]) == 130
    assert f"interrupted before any variant was measured: nothing written to {out}" in capsys.readouterr().err
    assert not out.exists()


def test_no_arguments_default_out_time_budget_sample_and_rerun(tiny, tmp_path, monkeypatch, capsys):
    """The README's command on a tiny model: --out defaults to ./accelerated/<name>; a time budget
    float32 jit alone exceeds skips every other row for time (cheapest first, externals last); the
    sample is the saved folder's greedy text; a rerun replaces the earlier output."""
    monkeypatch.chdir(tmp_path)
    argv = ["accelerate", "--model", str(tiny), "--new-tokens", "4", "--time-budget", "0.001"]
    assert cli.main(argv) == 0
    out = tmp_path / "accelerated" / tiny.name
    report = json.loads((out / "report.json").read_text())
    validate(report)
    assert report["time_budget_s"] == pytest.approx(0.06) and report["chosen"] == acc.BASELINE
    names = [r["variant"] for r in report["rows"]]
    costs = {v.name: v.cost for v in acc.lm_variants()}
    assert names[0] == acc.BASELINE and names[-2:] == [accelerate_llama.NAME, accelerate_baseline.NAME]
    assert names[-3] == "float32 eager" and len(names) == len(costs) + 2  # never chosen: the last of ours
    assert names[-4] == accelerate_variants.BEST_INTEGER_KERNELS_OFF.name  # after the integer variants it may repeat
    assert [costs[n] for n in names[1:-4]] == sorted(costs[n] for n in names[1:-4])
    assert all(r["skipped"].startswith("skipped for time (needs about ") for r in report["rows"][1:]), report["rows"]
    err = capsys.readouterr().err
    assert f"saved to {Path('accelerated') / tiny.name}" in err and "report.json" in err
    prompt = "The best thing about a quiet morning is"
    want = jaxaccel.generate(jaxaccel.load(tiny), [prompt], max_new_tokens=24)[0]  # float32 jit was chosen
    assert f"sample from {Path('accelerated') / tiny.name / 'model'}: {prompt}{want}\n" in err
    (out / "report.md").write_text("an earlier run")
    assert cli.main(argv) == 0  # an earlier accelerate output: replaced without --overwrite
    assert sorted(p.name for p in out.iterdir()) == list(accelerate_report.OUTPUTS)
    md = (out / "report.md").read_text()
    assert "an earlier run" not in md and "Time budget: 0.001 min for measuring" in md
    assert not [p for p in out.parent.iterdir() if p.name != tiny.name]  # no temporary folders left


def test_budget_parsing():
    assert acc.Budget.parse("acc:0.5", "classify") == acc.Budget("acc", 0.5)
    assert acc.Budget.parse("2", "classify") == acc.Budget("acc", 2.0)
    assert acc.Budget.parse(None, "classify") == acc.Budget("acc", 1.0)
    assert acc.Budget.parse("2%", "generate") == acc.Budget("ppl", 2.0)
    assert acc.Budget.parse(None, "embed") == acc.Budget("cos", 0.995)
    assert acc.Budget("acc", 1).holds({"accuracy_drop_points": 1.0}) and not acc.Budget("acc", 1).holds(
        {"accuracy_drop_points": 1.5})
    assert acc.parse_batch_sizes(None, "classify") == [32] and acc.parse_batch_sizes(None, "generate") == [1]


def test_peak_memory_sees_a_spike_that_is_gone_by_the_end():
    with accelerate_measure.PeakMemory() as mem:
        spike = np.ones(50 * 2**20 // 8)  # 50 MiB, touched, then freed
        del spike
    after = accelerate_measure.PeakMemory()
    with after:
        pass
    assert mem.peak - mem.start >= 45 * 2**20, mem.as_dict()
    assert after.peak - after.start < 45 * 2**20  # reset between blocks: the earlier spike is not counted again


def test_pareto_front_and_schema_rejects_a_bad_report():
    def row(name, speed, kl, kind="variant"):
        return {"variant": name, "kind": kind, "quality": {"kl_mean": kl}, "speed": {"1": {"decode_tok_s": speed}}}

    report = {"task": "generate", "batch": 1, "rows": [
        row("a", 10, 0.0), row("b", 20, 0.01), row("c", 15, 0.02), row("d", 30, 0.5), row("e", 25, 0.5),
        row("hf", 100, 0.0, "external baseline"), {"variant": "f", "kind": "variant", "skipped": "x"}]}
    assert accelerate_report.pareto(report) == ["d", "b", "a"]
    assert "$: no 'schema_version'" in schema_errors({"task": "generate"}, SCHEMA)
    assert_invalid({"task": "generate"})
    row_schema = {"$defs": SCHEMA["$defs"], "$ref": "#/$defs/row"}
    good_row = {"variant": "x", "kind": "variant", "quant": None, "speculative": None, "skipped": "y", "verdict": "skipped"}
    validate(good_row, row_schema)
    assert_invalid({**good_row, "quality": {"kl_mean": 0.0}}, row_schema)  # a skipped row has no measurements
    assert_invalid({**good_row, "kind": "baseline"}, row_schema)
    measured_row = {**good_row, "params_bytes": 1, "quality": {"kl_mean": 0.1}, "memory": {
        "peak_rss_bytes": 2, "start_rss_bytes": 1, "method": "vmhwm"}, "speed": {"1": {
            "compile_s": 0.0, "latency_p50_s": 0.1, "latency_p90_s": 0.1, "decode_tok_s": 5.0}}}
    del measured_row["skipped"]
    validate(measured_row, row_schema)
    assert_invalid({**measured_row, "speed": {"b1": measured_row["speed"]["1"]}}, row_schema)
    assert_invalid({k: v for k, v in measured_row.items() if k != "memory"}, row_schema)


def test_transformers_baseline_says_why_without_torch(tiny, monkeypatch):
    model = jaxaccel.load(tiny)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(accelerate_baseline.NotMeasured, match="torch / transformers are not installed"):
        accelerate_baseline.transformers_baseline(model, None)
    monkeypatch.undo()
    with pytest.raises(accelerate_baseline.NotMeasured, match="the source is quantized"):
        accelerate_baseline.transformers_baseline(model.quantize(QuantConfig(mode="int8")), None)


class Recorder(accelerate_report.Progress):
    def __init__(self):
        self.calls = []

    def variant(self, n, total, name):
        self.calls.append((n, total, name))

    def step(self, text):
        self.calls.append(text)


def test_a_budget_nothing_meets_keeps_float32_and_says_so_with_progress(tiny):
    model = jaxaccel.load(tiny)
    variants = [acc.Variant("int8 per channel", QuantConfig(mode="int8")), acc.Variant(acc.BASELINE)]
    progress = Recorder()
    report = acc.plan(model, "generate", acc.Budget("kl", 0.0), new_tokens=4, windows=1, variants=variants,
                      external=False, log=lambda s: None, progress=progress)
    assert report["chosen"] == acc.BASELINE and "no variant is both within the budget" in report["reason"]
    assert report["rows"][1]["verdict"].startswith("outside the quality budget")
    held_out, speed = "quality on the held-out windows", "speed at batch 1"
    assert progress.calls == [(0, 2, "float32's reference outputs"), (1, 2, acc.BASELINE), held_out, speed,
                              (2, 2, "int8 per channel"), "quantizing (int8)", held_out, speed, (3, 2, "done")]


def test_the_rich_progress_bar_shows_variant_n_of_m_and_the_step():
    import io

    from rich.console import Console

    buf = io.StringIO()
    with accelerate_report.progress_bar(True, Console(file=buf, force_terminal=True, width=120)) as bar:
        bar.variant(2, 5, "bfloat16")
        bar.step("speed at batch 8")
    assert "2/5 bfloat16: speed at batch 8" in buf.getvalue()
    buf = io.StringIO()
    with accelerate_report.progress_bar(False, Console(file=buf, force_terminal=True)) as bar:
        bar.variant(1, 2, "x")
    assert buf.getvalue() == ""


def test_llama_cpp_row_says_why_it_is_absent(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv(accelerate_llama.BINARY_ENV, str(tmp_path / "nothing"))
    with pytest.raises(accelerate_baseline.NotMeasured, match="not an executable llama-server"):
        accelerate_llama.find_binary()
    monkeypatch.delenv(accelerate_llama.BINARY_ENV)
    monkeypatch.setenv("JAXACCEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(accelerate_baseline.NotMeasured, match="no llama-server binary .*`python -m bench.llama_server`"):
        accelerate_llama.find_binary()
    with pytest.raises(accelerate_baseline.NotMeasured, match="the source is not a GGUF file"):
        accelerate_llama.source_gguf(str(tiny))


def test_llama_cpp_row_runs_the_build_of_the_kernels_isa_tier(tmp_path, monkeypatch):
    """With JAXACCEL_CPU_ISA=avx2 the row runs the llama-server built for avx2 (bench/llama_server.py
    names it), never the native build beside it nor one on PATH: both sides then run AVX2 code."""
    from bench import llama_server

    monkeypatch.delenv(accelerate_llama.BINARY_ENV, raising=False)
    monkeypatch.setenv("JAXACCEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    (tmp_path / "bin").mkdir()
    for path in (llama_server.binary_path(tier="native"), tmp_path / "bin" / "llama-server"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    assert accelerate_llama.find_binary() == llama_server.binary_path(tier="native")
    monkeypatch.setenv("JAXACCEL_CPU_ISA", "avx2")
    with pytest.raises(accelerate_baseline.NotMeasured, match="no llama-server built for the avx2 ISA tier .*"
                                                              "`python -m bench.llama_server --tier avx2`"):
        accelerate_llama.find_binary()
    avx2 = llama_server.binary_path(tier="avx2")
    avx2.write_text("#!/bin/sh\n")
    avx2.chmod(0o755)
    assert accelerate_llama.find_binary() == avx2


def test_llama_cpp_speed_evaluates_the_whole_prompt_every_time():
    """The timed llama.cpp completions ask for no prompt cache, and a reply that evaluated fewer
    prompt tokens than sent (a reused cache: its time to first token would be one token's) is an
    error, not a figure."""
    class FakeServer:
        def __init__(self, evaluated):
            self.evaluated, self.asked = evaluated, []

        def complete(self, ids, n, n_probs=0, cache_prompt=True):
            self.asked.append(cache_prompt)
            t = {"prompt_n": self.evaluated(len(ids)), "prompt_ms": 40.0, "predicted_ms": 100.0, "predicted_per_second": 50.0}
            return {"timings": t}

    whole = FakeServer(lambda n: n)
    speed = accelerate_llama._speed(whole, list(range(9)), 4, repeats=2)
    assert whole.asked == [False] * 3 and speed["ttft_s"] == pytest.approx(0.04) and speed["decode_tok_s"] == 50.0
    with pytest.raises(RuntimeError, match="evaluated \\[1, 1\\] of the 9 prompt tokens: it reused a cached prompt"):
        accelerate_llama._speed(FakeServer(lambda n: 1), list(range(9)), 4, repeats=2)


def _llama_server_built() -> bool:
    try:
        accelerate_llama.find_binary()
        return True
    except accelerate_baseline.NotMeasured:
        return False


@pytest.mark.skipif(not _llama_server_built(), reason="needs a built llama-server (python -m bench.llama_server)")
def test_llama_cpp_row_on_a_tiny_gguf(tmp_path):
    """llama.cpp's own server on the same F32 GGUF: its greedy tokens are float32's, its top-1
    choices agree with float32's almost everywhere; its speed is llama.cpp's own timings."""
    from gguf_util import write_tiny_gguf

    cfg = tiny_hf_config("gemma3")
    gguf_path = write_tiny_gguf(random_hf_model(cfg), tmp_path / "tiny.gguf", "F32")
    model = jaxaccel.load(gguf_path)
    report = acc.plan(model, "generate", acc.Budget("kl", 0.02), new_tokens=8, windows=1, repeats=1,
                      variants=[acc.Variant(acc.BASELINE)], source=str(gguf_path), log=lambda s: None)
    validate({**report, "model": "", "machine": {"platform": "", "processor": "", "cpu_count": 1, "jax_backend": "cpu",
                                                "devices": [], "jax": ""}, "pareto": [], "saved": None, "peak_rss_bytes": 0})
    rows = {r["variant"]: r for r in report["rows"]}
    row = rows[accelerate_llama.NAME]
    assert row["kind"] == "external baseline" and row["verdict"].startswith("external baseline, never chosen"), row
    assert row["quality"]["top1_agreement"] > 0.95 and "kl_mean" not in row["quality"]
    assert row["greedy_text"] == rows[acc.BASELINE]["greedy_text"]
    assert row["params_bytes"] == gguf_path.stat().st_size and row["memory"]["process"] == "llama-server"
    assert row["memory"]["peak_rss_bytes"] > 0 and _rate(row) > 0 and accelerate_report.pareto(report) == [acc.BASELINE]
    cols, cells = accelerate_report.rows_as_cells(report)
    cells = dict(zip(cols, cells[[r["variant"] for r in report["rows"]].index(accelerate_llama.NAME)]))
    assert cells["KL mean"] == "n/a" and cells["top-1"] == f"{row['quality']['top1_agreement']:.1%}"


@pytest.mark.slow  # about a minute (a whole accelerate run to interrupt): CI's slow run
def test_ctrl_c_keeps_the_measured_rows(tiny, tmp_path):
    """SIGINT once float32 jit is measured: exit 130, the report holds the rows measured before it."""
    out = tmp_path / "int"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    # a shell without job control starts background commands with SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: the child gets the default back, however pytest was started
    proc = subprocess.Popen([sys.executable, "-m", "jaxaccel.cli", "accelerate", "--model", str(tiny), "--out", str(out),
                             "--new-tokens", "4"], stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith(f"  {acc.BASELINE}:"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=300)[1]
    assert proc.returncode == 130, "".join(seen) + rest
    report = json.loads((out / "report.json").read_text())
    validate(report)
    assert report["interrupted"] and "interrupted" in report["reason"] and "Interrupted" in (out / "report.md").read_text()
    rows = {r["variant"]: r for r in report["rows"]}
    assert "skipped" not in rows[acc.BASELINE] and report["chosen"] is not None
    assert set(rows) == {v.name for v in acc.lm_variants()} | {accelerate_baseline.NAME, accelerate_llama.NAME}
    # the rows measured before the signal are kept; the one it stopped and those after say why
    stopped = [r["variant"] for r in report["rows"] if "interrupted (Ctrl-C)" in r.get("skipped", "")]
    assert stopped and stopped == [r["variant"] for r in report["rows"][-len(stopped):]]
    assert rows[accelerate_baseline.NAME]["skipped"] == "not measured: interrupted (Ctrl-C)"


def test_embed_on_a_tiny_encoder_with_the_transformers_baseline(tmp_path):
    model = jaxaccel.load(bert_folder(tmp_path / "enc", "BertModel"))
    variants = [acc.Variant(acc.BASELINE), acc.Variant("bfloat16", QuantConfig(mode="bfloat16"))]
    report = acc.plan(model, "embed", acc.Budget("cos", 0.99), batch_sizes=(8,), repeats=1, variants=variants,
                      log=lambda s: None)
    rows = {r["variant"]: r for r in report["rows"]}
    assert rows[accelerate_baseline.NAME]["quality"]["cos_min"] > 0.99999  # transformers, mean-pooled the same way
    assert 0.99 < rows["bfloat16"]["quality"]["cos_mean"] < 1.0
    assert report["chosen"] in rows and rows[accelerate_baseline.NAME]["verdict"].startswith("external baseline")


@pytest.mark.slow
def test_embeddings_variants_on_minilm(tmp_path):
    out = tmp_path / "emb"
    assert cli.main(["accelerate", "--task", "embed", "--model", "minilm", "--out", str(out),
                     "--batch-sizes", "8"]) == 0
    report = json.loads((out / "report.json").read_text())
    validate(report)
    rows = {r["variant"]: r for r in report["rows"]}
    assert rows["bfloat16"]["quality"]["cos_mean"] > 0.99 and rows[acc.BASELINE]["quality"]["cos_mean"] > 0.9999
    assert rows[accelerate_baseline.NAME]["quality"]["cos_mean"] > 0.99999
    check_choice(report, lambda q: q["cos_mean"] >= 0.995, "sentences_s")
    assert (out / "model").is_dir()


@pytest.mark.slow
@pytest.mark.real_model
def test_readme_first_command_on_the_embedded_model(tmp_path):
    """`jaxaccel accelerate` exactly as the README's first command runs it, on the embedded Gemma 3
    270M: float32 jit measured, a choice within the default budget saved to
    ./accelerated/gemma3-270m/model, and the saved folder generates the sample it printed."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-m", "jaxaccel.cli", "accelerate"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "accelerated" / "gemma3-270m"
    report = json.loads((out / "report.json").read_text())
    validate(report)
    rows = {r["variant"]: r for r in report["rows"]}
    assert rows[acc.BASELINE]["speed"] and report["chosen"] in rows
    chosen = rows[report["chosen"]]
    assert report["chosen"] == acc.BASELINE or chosen["quality"]["kl_mean"] <= 0.02
    sample = re.search(r"sample from \S+: (.*)", run.stderr)
    assert sample, run.stderr[-2000:]
    m = jaxaccel.load(out / "model")
    prompt = "The best thing about a quiet morning is"
    assert sample.group(1).startswith(prompt + jaxaccel.generate(m, [prompt], max_new_tokens=24)[0].split("\n")[0])


def strict_json(text: str):
    """JSON as a strict parser reads it: a bare NaN / Infinity (Python's json writes them) is refused."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_a_variant_with_non_finite_logits_is_rejected_and_written_as_null(tmp_path):
    """float16 really overflowing (embeddings near float16's largest value, times Gemma's
    sqrt(hidden) scale): its logits are NaN, so the row is rejected with that reason, its figures
    are null in report.json (valid JSON, valid schema) and report.md / the table say why. (The
    rows' quality is measured; their speed and memory are stand-ins: no generation compiles.)"""
    cfg = tiny_hf_config("gemma3")
    cfg.num_hidden_layers, cfg.layer_types = 2, cfg.layer_types[:2]
    hf = random_hf_model(cfg)
    with torch.no_grad():
        hf.model.embed_tokens.weight.mul_(2e5)  # |w| up to ~4e4 (< 65504), x 8 in the model: inf in float16
    hf.save_pretrained(tmp_path / "big")
    write_char_tokenizer(tmp_path / "big")
    model = jaxaccel.load(tmp_path / "big")
    windows = accelerate_measure.lm_windows(model.tokenizer, acc.HELDOUT.read_text(), 64, 1)
    ref = [accelerate_measure.log_probs(model, r) for r in windows]
    speed = {"1": {"compile_s": 0.0, "ttft_s": 0.01, "decode_tok_s": float("nan"), "latency_p50_s": 0.1,
                   "latency_p90_s": float("inf")}}  # a non-finite speed too: null like the quality's
    rows = []
    for name, m in [(acc.BASELINE, model), ("float16", model.quantize(QuantConfig(mode="float16")))]:
        speed = {"1": {**speed["1"], "decode_tok_s": 100.0 if name == acc.BASELINE else float("nan")}}
        rows.append({"variant": name, "kind": "variant", "quant": None, "speculative": None,
                     "params_bytes": m.params_bytes, "quality": accelerate_measure.lm_quality(ref, m, windows),
                     "speed": speed, "memory": {"peak_rss_bytes": 2, "start_rss_bytes": 1, "method": "vmhwm"}})
    report = acc.choose(rows, "generate", acc.Budget("kl", 1.0), 1)
    report.update(batch_sizes=[1], memory_method="vmhwm", time_budget_s=None, measure_s=1.0, model="big",
                  machine=accelerate_report.machine(), pareto=accelerate_report.pareto(report), saved=None,
                  peak_rss_bytes=2, eval={"what": "one window", "rows": None, "prompt": "x"})
    accelerate_report.write(report, tmp_path)
    report = strict_json((tmp_path / "report.json").read_text())
    validate(report)
    rows = {r["variant"]: r for r in report["rows"]}
    q = rows["float16"]["quality"]
    assert q["non_finite"].startswith("non-finite logits (inf or NaN) at ") and "kl_mean" not in q, q
    assert rows["float16"]["verdict"] == f"rejected: {q['non_finite']}"
    assert rows["float16"]["speed"]["1"]["decode_tok_s"] is None and rows["float16"]["speed"]["1"]["latency_p90_s"] is None
    assert rows[acc.BASELINE]["quality"]["kl_mean"] == 0.0 and report["chosen"] == acc.BASELINE
    assert report["pareto"] == [acc.BASELINE]
    md = (tmp_path / "report.md").read_text()
    assert f"float16: {q['non_finite']}" in md and f"rejected: {q['non_finite']}" in md
    cols, cells = accelerate_report.rows_as_cells(report)
    f16 = dict(zip(cols, cells[[r["variant"] for r in report["rows"]].index("float16")]))
    assert [f16[c] for c in ("tok/s", "KL mean", "KL p99", "top-1", "ppl Δ%")] == ["n/a"] * 5
    assert "float16" in accelerate_report.table(report)


def test_non_finite_numbers_anywhere_are_written_as_null(tmp_path):
    nan, inf = float("nan"), float("inf")
    safe = accelerate_report.json_safe({"a": [1.5, nan, {"b": -inf}], "c": (inf, 2), "d": "NaN", "e": 3})
    assert safe == {"a": [1.5, None, {"b": None}], "c": [None, 2], "d": "NaN", "e": 3}
    assert strict_json(json.dumps(safe)) == safe


def test_int8_kv_cache_quality_is_measured_through_the_cache(tiny):
    """Model.logits has no cache, so an int8 cache would look exact there: the variant is scored
    through a cache of its own dtype. A float32 cache gives Model.logits' numbers; the int8 cache
    moves the logits of int8 weights (its own rounding), and generation decodes through it."""
    model = jaxaccel.load(tiny)
    windows = accelerate_measure.lm_windows(model.tokenizer, acc.HELDOUT.read_text(), 48, 2)
    row = windows[:1]
    np.testing.assert_allclose(np.asarray(accelerate_measure.through_cache(model)(row)),
                               np.asarray(model.logits(row)), atol=1e-4)
    int8 = model.quantize(QuantConfig(mode="int8"))
    want = acc.variant_named("int8 + int8 KV cache", "generate").quant
    assert dataclasses.replace(want, kv_cache_int8=False) == int8.quant
    kv = dataclasses.replace(int8, quant=want)  # the same int8 params (quantizing again would only take time)
    assert kv.cache_dtype == np.int8 and accelerate_measure.int8_cache(kv) and not accelerate_measure.int8_cache(int8)
    np.testing.assert_allclose(np.asarray(kv.logits(row)), np.asarray(int8.logits(row)), atol=1e-6)  # no cache
    ref = [accelerate_measure.log_probs(model, r) for r in windows]
    q_int8, q_kv = (accelerate_measure.lm_quality(ref, m, windows) for m in (int8, kv))
    assert q_kv["kl_mean"] != q_int8["kl_mean"] and 0 < q_kv["kl_mean"] < 0.5 and q_kv["top1_agreement"] > 0.5


def test_the_engine_takes_the_models_kernel_choice(tiny):
    """Model.kernels is the one switch the kernels-off row uses: KernelChoice() builds generation's
    programs with XLA's ops; None leaves the engine's own choice (the kernels where they build)."""
    from jaxaccel import engine, kernels

    model = jaxaccel.load(tiny)
    off = accelerate_variants.build(model, acc.Variant("x", kernels_off=True))
    assert off.kernels == kernels.KernelChoice() and model.kernels is None
    assert engine.Engine(off).kernels == kernels.KernelChoice()
    assert engine.Engine(model).kernels == kernels.KernelChoice(decode=kernels.usable(model))


MESH_RUN = """
import json, sys
from pathlib import Path
import jax, jaxaccel
from jaxaccel import accelerate as acc, sharding
assert jax.device_count() == 4, jax.devices()
tiny, out, dest = sys.argv[1:]
variants = [v for v in acc.variants_for("generate") if v.name == acc.BASELINE or v.mesh]
report = acc.accelerate(jaxaccel.load(tiny), Path(out), "generate", acc.Budget("kl", 0.01), (1,), new_tokens=4,
                        windows=1, repeats=1, variants=variants, external=False, log=lambda s: None)
reloaded = {}  # the saved folder on each measured row's layout: its greedy text
for r in report["rows"]:
    mesh = sharding.parse_mesh(r["mesh"]) if "mesh" in r else None
    m = jaxaccel.load(Path(out) / "model", mesh=mesh)
    reloaded[r["variant"]] = jaxaccel.generate(m, [report["eval"]["prompt"]], max_new_tokens=4)[0]
json.dump(reloaded, open(dest, "w"))
"""


def test_mesh_layouts_apply_only_with_several_devices():
    assert not [v for v in acc.variants_for("generate", 1) + acc.variants_for("embed", 1) if v.mesh]
    for task in ("generate", "embed", "classify"):
        meshes = [(v.name, v.mesh_text) for v in acc.variants_for(task, 8) if v.mesh]
        assert meshes == [(f"{acc.BASELINE}, mesh data=8", "data=8,fsdp=1,tensor=1"),
                          (f"{acc.BASELINE}, mesh fsdp=8", "data=1,fsdp=8,tensor=1"),
                          (f"{acc.BASELINE}, mesh tensor=8", "data=1,fsdp=1,tensor=8")]


@pytest.mark.slow
def test_mesh_layouts_are_rows_and_the_chosen_folder_reloads(tiny, tmp_path):
    """With 4 devices (a subprocess: XLA_FLAGS before jax), float32 over the data, fsdp and tensor
    layouts are rows of their own (the tiny Gemma's 2 KV heads and vocabulary 97 are replicated on
    tensor=4); each keeps float32's quality and greedy text, and the saved folder reloads on every
    layout, generating the text its row recorded (the chosen one's included)."""
    from mesh_util import run_python

    out, dest = tmp_path / "acc", tmp_path / "reloaded.json"
    run_python("-c", MESH_RUN, tiny, out, dest, devices=4, timeout=900)
    report = strict_json((out / "report.json").read_text())
    validate(report)
    rows = {r["variant"]: r for r in report["rows"]}
    layouts = {f"{acc.BASELINE}, mesh {axis}=4": f"data={4 if axis == 'data' else 1},fsdp={4 if axis == 'fsdp' else 1},"
               f"tensor={4 if axis == 'tensor' else 1}" for axis in ("data", "fsdp", "tensor")}
    assert list(rows) == [acc.BASELINE, *layouts]
    base = rows[acc.BASELINE]
    for name, mesh in layouts.items():
        r = rows[name]
        assert "skipped" not in r and r["mesh"] == mesh and r["quant"] is None, r
        assert r["quality"]["kl_mean"] < 1e-6 and r["quality"]["top1_agreement"] == 1.0
        assert r["greedy_text"] == base["greedy_text"] and _rate(r) > 0
    chosen = rows[report["chosen"]]
    assert report["saved"]["mesh"] == chosen.get("mesh") and report["saved"]["quant"]["mode"] == "float32"
    reloaded = json.loads(dest.read_text())
    assert reloaded == {name: r["greedy_text"] for name, r in rows.items()}


def test_gguf_as_stored_applies_to_a_gguf_source_only():
    gguf = accelerate_variants.GGUF_AS_STORED
    assert gguf in acc.variants_for("generate", 1, source="model.GGUF") and gguf in acc.variants_for("generate", 1,
                                                                                                     source="gemma3-270m")
    assert gguf not in acc.variants_for("generate", 1, source="some/hf_folder") and gguf not in acc.variants_for("generate", 1)
    assert gguf not in acc.variants_for("embed", 1, source="model.gguf")


def test_gguf_as_stored_is_a_variant_of_a_gguf_source(tmp_path):
    """A GGUF source gets "GGUF as stored" (its Q8_0 blocks served as the file keeps them): measured
    against float32 (the same file dequantized), its QuantConfig the file's, and when chosen the
    saved folder serves those blocks and decodes the text its row recorded."""
    from gguf_util import write_tiny_gguf

    cfg = tiny_hf_config("gemma3")
    cfg.num_hidden_layers, cfg.layer_types, cfg.intermediate_size = 2, cfg.layer_types[:2], 128  # Q8_0: 32 | inputs
    gguf_path = write_tiny_gguf(random_hf_model(cfg), tmp_path / "tiny.gguf", "Q8_0")
    out = tmp_path / "acc"
    report = acc.accelerate(jaxaccel.load(gguf_path), out, "generate", acc.Budget("kl", 0.05), new_tokens=4,
                            windows=1, repeats=1, source=str(gguf_path), external=False, log=lambda s: None,
                            variants=[acc.Variant(acc.BASELINE), accelerate_variants.GGUF_AS_STORED])
    validate(strict_json((out / "report.json").read_text()))
    rows = {r["variant"]: r for r in report["rows"]}
    row = rows["GGUF as stored"]
    assert "skipped" not in row and row["quant"]["mode"] == "gguf" and row["quant"]["gguf_types"], row
    assert row["params_bytes"] < rows[acc.BASELINE]["params_bytes"] / 3  # 8.5 bits a weight (the norms stay float)
    assert row["quality"]["kl_mean"] < 1e-6  # Model.logits dequantizes the blocks: the float32 model's weights
    saved = jaxaccel.load(out / "model")
    assert (saved.quant.mode if saved.quant else "float32") == ("gguf" if report["chosen"] == "GGUF as stored" else "float32")
    text = jaxaccel.generate(saved, [report["eval"]["prompt"]], max_new_tokens=4)[0]
    assert text == rows[report["chosen"]]["greedy_text"]
