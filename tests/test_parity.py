"""Parity with the PyTorch reference in transformers on tiny random configs (float32).

Weights are written by transformers (`save_pretrained`) and read by our loader.
"""

from __future__ import annotations

import numpy as np
import pytest
import jax.numpy as jnp

import jaxaccel
from jaxaccel.kv_cache import init_cache
from conftest import FAMILY_KINDS, torch_logits

SEQ = 12  # longer than the Mistral (5) and Gemma 3 (6) windows: the window really cuts


def padded_batch(vocab: int, seed: int = 0):
    """Three rows: full length, right-padded, left-padded."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(3, SEQ))
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, :4] = 0
    return ids, mask


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_logits_match_transformers_on_padded_batch(kind, hf_folder):
    folder, ref_model = hf_folder(kind)
    m = jaxaccel.load(folder)
    ids, mask = padded_batch(m.config.vocab_size)
    ref = torch_logits(ref_model, ids, mask)
    out = np.asarray(m.logits(ids, attention_mask=mask))
    real = mask.astype(bool)
    assert out.shape == ref.shape == (3, SEQ, m.config.vocab_size)
    assert rel_err(out[real], ref[real]) < 1e-4
    # greedy (top-1) tokens identical at every real position
    np.testing.assert_array_equal(out[real].argmax(-1), ref[real].argmax(-1))


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_padding_does_not_change_real_tokens(kind, hf_folder):
    folder, _ = hf_folder(kind)
    m = jaxaccel.load(folder)
    ids, mask = padded_batch(m.config.vocab_size)
    batched = np.asarray(m.logits(ids, attention_mask=mask))
    for row in range(3):
        keep = mask[row].astype(bool)
        alone = np.asarray(m.logits(ids[row][keep][None]))[0]
        np.testing.assert_allclose(batched[row][keep], alone, atol=2e-5, rtol=0)


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_prefill_then_decode_equals_full_forward(kind, hf_folder):
    folder, _ = hf_folder(kind)
    m = jaxaccel.load(folder)
    ids, _ = padded_batch(m.config.vocab_size, seed=1)
    ids = ids[:2]
    full = np.asarray(m.logits(ids))
    prompt = 5
    cache = init_cache(m.config, batch=2, length=16)
    apply = m.module.apply
    out = apply({"params": m.params}, jnp.asarray(ids[:, :prompt]), cache=cache)
    steps, cache = [np.asarray(out.logits)], out.cache
    for t in range(prompt, SEQ):
        out = apply({"params": m.params}, jnp.asarray(ids[:, t:t + 1]), cache=cache)
        steps.append(np.asarray(out.logits))
        cache = out.cache
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5, rtol=0)
    assert np.asarray(cache["index"]).tolist() == [SEQ, SEQ]


def test_decode_rows_at_different_lengths(hf_folder):
    """Right-padded prefill, then per-row cache indices: each row decodes as if alone."""
    folder, _ = hf_folder("gemma3")
    m = jaxaccel.load(folder)
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, m.config.vocab_size, size=9), rng.integers(0, m.config.vocab_size, size=4)
    nxt = rng.integers(0, m.config.vocab_size, size=(2, 1))
    tokens = np.zeros((2, 9), np.int32)
    tokens[0], tokens[1, :4] = a, b
    cache = init_cache(m.config, batch=2, length=16)
    cache = m.module.apply({"params": m.params}, jnp.asarray(tokens), cache=cache).cache
    cache["index"] = jnp.asarray([9, 4], jnp.int32)
    step = m.module.apply({"params": m.params}, jnp.asarray(nxt), cache=cache).logits
    ref_a = np.asarray(m.logits(np.concatenate([a, nxt[0]])[None]))[0, -1]
    ref_b = np.asarray(m.logits(np.concatenate([b, nxt[1]])[None]))[0, -1]
    np.testing.assert_allclose(np.asarray(step)[:, 0], np.stack([ref_a, ref_b]), atol=2e-5, rtol=0)


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_export_roundtrip_loads_in_transformers(kind, hf_folder, tmp_path):
    folder, _ = hf_folder(kind)
    m = jaxaccel.load(folder)
    out = m.save_hf(tmp_path / "export")
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids, mask = padded_batch(m.config.vocab_size, seed=3)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(m.logits(ids, mask))[real], torch_logits(ref, ids, mask)[real],
                               atol=1e-4 * np.abs(torch_logits(ref, ids, mask)).max(), rtol=0)
    again = jaxaccel.load(out)
    assert again.config == m.config


def test_old_config_spelling_rope_theta_and_rope_scaling(hf_folder, tmp_path):
    """Published checkpoints spell RoPE as rope_theta + rope_scaling; transformers 5 writes rope_parameters."""
    import json
    import shutil

    folder, ref_model = hf_folder("llama3")
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    cfg = json.loads((old / "config.json").read_text())
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    cfg["rope_scaling"] = rp
    (old / "config.json").write_text(json.dumps(cfg))
    assert jaxaccel.load(old).config == jaxaccel.load(folder).config
    assert jaxaccel.load(old).config.rope.kind == "llama3"


def test_sharded_safetensors_index(hf_folder, tmp_path):
    folder, ref_model = hf_folder("qwen2")
    ref_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids, _ = padded_batch(97)
    np.testing.assert_array_equal(np.asarray(jaxaccel.load(tmp_path).logits(ids)),
                                  np.asarray(jaxaccel.load(folder).logits(ids)))


def test_bfloat16_load_stores_bf16_and_stays_close(hf_folder):
    folder, ref_model = hf_folder("llama3")
    m = jaxaccel.load(folder, dtype="bfloat16")
    assert {x.dtype for x in __import__("jax").tree.leaves(m.params)} == {jnp.dtype(jnp.bfloat16)}
    ids, _ = padded_batch(97)
    out = np.asarray(m.logits(ids))
    assert out.dtype == np.float32
    assert rel_err(out, torch_logits(ref_model, ids)) < 5e-2
