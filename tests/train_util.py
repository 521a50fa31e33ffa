"""Helpers of the training tests: a tiny Llama HF folder with a word-level tokenizer, and data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import transformers

from conftest import random_hf_model, tiny_hf_config

WORDS = ("the cat dog sat on a mat big red ball runs fast slow and is was very happy sad house tree sky "
         "blue green over under one two three four five six seven eight nine ten").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS


def tokenizer_into(folder: Path) -> None:
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    transformers.BertTokenizerFast(str(folder / "vocab.txt"), eos_token="[SEP]").save_pretrained(str(folder))


def llama_folder(path: Path, kind: str = "llama3", seed: int = 0, layers: int | None = None) -> Path:
    """The conftest tiny model of `kind` (vocab 97 > our 45 words), optionally with fewer layers
    (quicker to compile), + tokenizer, as an HF folder."""
    cfg = tiny_hf_config(kind)
    if layers:
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = cfg.layer_types[:layers]
        cfg.num_hidden_layers = layers
    random_hf_model(cfg, seed).save_pretrained(path, safe_serialization=True)
    tokenizer_into(path)
    return path


def sft_rows(n: int = 8, seed: int = 0) -> list[dict]:
    """Counting prompts: "one two" -> "three four five" (learnable, so loss can fall)."""
    rnd = random.Random(seed)
    nums = WORDS[-10:]
    rows = []
    for _ in range(n):
        i = rnd.randrange(0, 5)
        rows.append({"prompt": " ".join(nums[i:i + 2]), "completion": " ".join(nums[i + 2:i + 5])})
    return rows


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def padded_causal_batch(vocab, seed=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, vocab, (3, 12)).astype(np.int32)
    segments = np.ones_like(tokens)
    segments[1, 9:] = 0  # right padding
    weights = np.ones_like(tokens)
    weights[:, :4] = 0  # the prompt: no loss
    positions = np.broadcast_to(np.arange(12, dtype=np.int32), tokens.shape).copy()
    return {"tokens": tokens, "positions": positions, "segments": segments, "weights": weights * segments,
            "labels": np.full((3,), -1, np.int32)}
