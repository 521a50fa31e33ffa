"""LoRA: only the adapters train (base frozen, no optimizer state for it), merged-model logits
equal adapter-model logits, adapters are saved alone, and the exported model serves them."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxaccel
from jaxaccel import lora, train
from jaxaccel.checkpoints import store
from train_util import llama_folder, padded_causal_batch, sft_rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return jaxaccel.load(llama_folder(tmp_path_factory.mktemp("lora"), layers=1))


def adapter_logits(model, adapters, cfg, ids):
    return np.asarray(lora.apply(model.module, model.params, adapters, cfg, ids).logits)


def test_only_adapters_change_and_merge_matches(tiny):
    model = tiny
    base = jax.tree.map(np.array, model.params)
    cfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=("q_proj", "v_proj", "down_proj"))
    opt = train.make_optimizer("adamw", 1e-2)
    state = train.init_state(model, opt, seed=1, lora=cfg)
    start = jax.tree.map(np.array, state.params)
    # the optimizer holds state for the adapters only (adamw: two moments per adapter leaf)
    n_adapter = sum(x.size for x in jax.tree.leaves(state.params))
    assert sum(x.size for x in jax.tree.leaves(state.opt_state)) <= 2 * n_adapter + 8
    step = train.make_train_step(model, opt, "sft", lora=cfg)
    batch = padded_causal_batch(model.config.vocab_size)
    losses = []
    for _ in range(5):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    # base weights bit-identical (also the caller's model.params, which the step must not donate)
    for tree in (state.frozen, model.params):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), tree, base)
    changed = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), b), state.params, start)
    assert all(jax.tree.leaves(changed))  # every adapter matrix trained
    ids = np.arange(1, 17)[None]
    merged = np.asarray(model.module.apply({"params": lora.merge(model.params, state.params, cfg)}, ids).logits)
    np.testing.assert_allclose(merged, adapter_logits(model, state.params, cfg, ids), rtol=1e-5, atol=1e-5)
    assert not np.allclose(merged, np.asarray(model.logits(ids)), atol=1e-3)


def test_finetune_lora_saves_adapters_alone_and_exports_merged(tiny, tmp_path):
    out = tmp_path / "out"
    result = jaxaccel.finetune(tiny, sft_rows(8), steps=6, out=out, lr=1e-2, batch_size=4, pack=False,
                               lora_rank=4, save_every=3, progress=False, tensorboard=False)
    adapters, cfg = lora.load(out / "lora")
    assert cfg.rank == 4 and cfg.targets == ("q_proj", "v_proj")
    assert sorted(p.name for p in (out / "lora").iterdir()) == ["adapters.safetensors", "lora.json"]
    ids = np.arange(1, 13)[None]
    want = adapter_logits(tiny, adapters, cfg, ids)
    np.testing.assert_allclose(np.asarray(jaxaccel.load(out).logits(ids)), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(result.logits(ids)), want, rtol=1e-5, atol=1e-5)
    # checkpoints hold the adapters, not the frozen base
    saved = store.restore(out / "checkpoints")
    assert jax.tree.structure(saved["params"]) == jax.tree.structure(adapters)


def test_lora_bad_config():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        lora.LoraConfig(rank=0)
    with pytest.raises(ValueError, match="no projection matches LoRA targets"):
        lora.init({"layers_0": {"attn": {"kernel": np.zeros((2, 2))}}}, lora.LoraConfig(targets=("q_proj",)))
