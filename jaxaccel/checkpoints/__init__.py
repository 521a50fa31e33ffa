"""Checkpoint formats: HF folders (hf.py), GGUF files (gguf.py), orbax stores (store.py)."""

from __future__ import annotations

from pathlib import Path

from .hf import CheckpointError


def load(path, dtype="float32", fast_tokenizer: bool = False):
    """HF folder or .gguf file -> jaxaccel.Model.

    fast_tokenizer: for folders with tokenizer.json, use `jaxaccel.tokenizer.FastTokenizer`
    (the Rust `tokenizers` object, ~1 s) instead of transformers' AutoTokenizer (~6 s for
    Gemma's vocabulary); same ids, a smaller API. The CLI's generate uses it.
    """
    from ..model import Model

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"no model at {p}: pass an HF folder (config.json + *.safetensors) or a .gguf file")
    if p.is_file() and p.suffix == ".gguf":
        from . import gguf

        cfg, params, tok = gguf.load_file(p, dtype)
    elif p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if not (p / "config.json").exists() and len(ggufs) == 1:
            from . import gguf

            cfg, params, tok = gguf.load_file(ggufs[0], dtype)
        else:
            from . import hf

            cfg, params, tok = hf.load_folder(p, dtype, fast_tokenizer=fast_tokenizer)
    else:
        raise CheckpointError(
            f"{p} is neither an HF model folder nor a .gguf file; pickle files (.bin/.pt) are never loaded")
    return Model(cfg, params, tok, str(dtype) if isinstance(dtype, str) else dtype.name)
