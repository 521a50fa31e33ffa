"""Shared fixtures: tiny random transformers models written as HF folders."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def tiny_hf_config(kind: str):
    """transformers config of a tiny model of `kind` (every parity case in the issue)."""
    T = transformers
    if kind == "llama3":
        return T.LlamaConfig(**TINY, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    if kind == "llama_tied":
        return T.LlamaConfig(**TINY, tie_word_embeddings=True, rope_parameters={
            "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    if kind == "mistral":
        return T.MistralConfig(**TINY, sliding_window=5)
    if kind == "qwen2":
        return T.Qwen2Config(**{**TINY, "num_key_value_heads": 1})
    if kind == "gemma3":
        return T.Gemma3TextConfig(**{**TINY, "num_hidden_layers": 4, "head_dim": 32}, sliding_window=6,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
                                  query_pre_attn_scalar=24, final_logit_softcapping=30.0,
                                  rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                                   "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    raise KeyError(kind)


FAMILY_KINDS = ["llama3", "llama_tied", "mistral", "qwen2", "gemma3"]


def make_hf_model(kind: str, seed: int = 0):
    return random_hf_model(tiny_hf_config(kind), seed)


def random_hf_model(cfg, seed: int = 0):
    """A transformers causal LM of `cfg` with every tensor randomly perturbed (eval mode)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    # Random init leaves norms at 1 / 0; perturb every tensor so each one matters in parity.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    """kind -> (folder, torch model): cached across the session."""
    made = {}

    def get(kind: str):
        if kind not in made:
            model = make_hf_model(kind)
            path = tmp_path_factory.mktemp(kind)
            model.save_pretrained(path, safe_serialization=True)
            made[kind] = (path, model)
        return made[kind]

    return get


def torch_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Reference logits; positions count real tokens (as generate() does for padded batches)."""
    ids_t = torch.tensor(ids, dtype=torch.long)
    if mask is None:
        mask = np.ones_like(ids)
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=ids_t, attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos, dtype=torch.long))
    return out.logits.float().numpy()
