"""`jaxaccel accelerate`: every variant measured (speed and quality against float32), the fastest
within the budget chosen and saved, the report / table / plot written; budgets nothing meets keep
float32 jit and say so; bad arguments are clear errors that touch nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest

import jaxaccel
from jaxaccel import accelerate as acc
from jaxaccel import cli
from jaxaccel.quant import QuantConfig
from conftest import make_hf_model
from serve_util import write_char_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tinyacc")
    make_hf_model("gemma3").save_pretrained(path)
    write_char_tokenizer(path)
    return path


def _rate(row, batch=1):
    return row["speed"][str(batch)]["decode_tok_s"]


def test_accelerate_measures_chooses_saves_and_reports(tiny, tmp_path, capsys):
    out = tmp_path / "acc"
    assert cli.main(["accelerate", "--model", str(tiny), "--out", str(out), "--new-tokens", "8",
                     "--quality-budget", "kl:0.05"]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert set(rows) == {v.name for v in acc.lm_variants()}
    measured = [r for r in rows.values() if "skipped" not in r]
    assert len(measured) >= 6 and acc.BASELINE in {r["variant"] for r in measured}
    assert any("skipped" in r for r in rows.values())  # groups of 128 do not divide the tiny model's 64 inputs
    for r in measured:
        q = r["quality"]
        assert 0 <= q["kl_mean"] <= q["kl_p99"] + 1e-12 and 0 < q["top1_agreement"] <= 1 and _rate(r) > 0
    assert rows["int8 per channel"]["quality"]["kl_mean"] < rows["int4 g32"]["quality"]["kl_mean"]
    assert rows["bfloat16"]["params_bytes"] < rows[acc.BASELINE]["params_bytes"]
    # the choice, recomputed from the measurements: the fastest within the budget that beats float32 jit
    base = _rate(rows[acc.BASELINE])
    ok = [r for r in measured if r["variant"] != acc.BASELINE and r["quality"]["kl_mean"] <= 0.05 and _rate(r) > base]
    want = max(ok, key=_rate)["variant"] if ok else acc.BASELINE
    assert report["chosen"] == want and want in report["reason"]
    for r in measured:
        if r["variant"] not in (want, acc.BASELINE):
            assert r["verdict"].startswith(("outside the quality budget", "not faster", "within budget")), r
    # the saved folder is the chosen variant
    chosen = acc.variant_named(want, "generate")
    saved = jaxaccel.load(out / "model")
    ref = jaxaccel.load(tiny).quantize(chosen.quant or QuantConfig(mode="float32"))
    ids = np.asarray([[2, 40, 41, 42, 43, 44]])
    np.testing.assert_allclose(np.asarray(saved.logits(ids)), np.asarray(ref.logits(ids)), atol=1e-5)
    assert (out / "speed_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert want in (out / "report.txt").read_text()
    assert "chosen" in capsys.readouterr().err


def test_a_budget_nothing_meets_keeps_float32_and_says_so(tiny):
    model = jaxaccel.load(tiny)
    variants = [acc.Variant(acc.BASELINE), acc.Variant("int8 per channel", QuantConfig(mode="int8"))]
    report = acc.plan(model, "generate", acc.Budget("kl", 0.0), new_tokens=4, windows=1, variants=variants,
                      log=lambda s: None)
    assert report["chosen"] == acc.BASELINE and "no variant is both within the budget" in report["reason"]
    assert report["rows"][1]["verdict"].startswith("outside the quality budget")


def test_embeddings_variants_on_minilm(tmp_path):
    out = tmp_path / "emb"
    assert cli.main(["accelerate", "--task", "embed", "--model", "minilm", "--out", str(out),
                     "--batch-sizes", "8"]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert rows["bfloat16"]["quality"]["cos_mean"] > 0.99 and rows[acc.BASELINE]["quality"]["cos_mean"] > 0.9999
    assert report["chosen"] in rows and (out / "model").is_dir()


@pytest.mark.parametrize("argv,message", [
    (["--quality-budget", "fast"], "--quality-budget 'fast': expected one of kl:N, ppl:N"),
    (["--quality-budget", "cos:0.99"], "expected one of kl:N, ppl:N"),
    (["--batch-sizes", "1,x"], "--batch-sizes must be positive integers"),
    (["--task", "classify"], "--task classify is not measured yet"),
])
def test_bad_arguments_are_clear_errors(tiny, tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    assert cli.main(["accelerate", "--model", str(tiny), "--out", str(out), *argv]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_a_non_empty_out_folder_is_refused_before_any_work(tiny, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(["accelerate", "--model", str(tiny), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
