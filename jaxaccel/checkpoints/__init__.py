"""Checkpoint formats: HF folders (hf.py), GGUF files (gguf.py), serving folders (serving.py),
orbax training stores (store.py). `read` dispatches on what a path holds and returns the parts a
`jaxaccel.Model` is made of (`jaxaccel.load` wraps them)."""

from __future__ import annotations

from pathlib import Path

from ..sharding import build_mesh
from . import gguf, gguf_stored, hf, serving

from .loaded import CheckpointError, Loaded


def read(path, dtype="float32", fast_tokenizer: bool = False, mesh=None, gguf_weights: str = "float") -> Loaded:
    """HF folder, .gguf file (or a folder holding one) or serving folder (`jaxaccel quantize`).

    fast_tokenizer: for folders with tokenizer.json, use `jaxaccel.tokenizer.FastTokenizer`
    (the Rust `tokenizers` object, parsed in about a second) instead of transformers'
    AutoTokenizer (several seconds for Gemma's vocabulary); same ids, a smaller API.
    mesh: a `jaxaccel.MeshConfig` (or jax Mesh): params load sharded over it, each device
    receiving only its shard (see sharding.py).
    gguf_weights: "float" (a GGUF's weights dequantized) or "as_stored" (its quantized blocks
    served as they are, gguf_stored.py; a .gguf file only, unsharded).
    """
    gguf_stored.check_choice(gguf_weights)
    p = Path(path).expanduser()
    if gguf_weights == "as_stored" and p.exists():
        ggufs = [p] if p.is_file() else sorted(p.glob("*.gguf"))
        if len(ggufs) != 1 or ggufs[0].suffix != ".gguf":
            raise CheckpointError(f"gguf_weights='as_stored' serves a .gguf file's blocks as stored; {p} is not a "
                                  ".gguf file (nor a folder holding one)")
        if mesh is not None:
            raise ValueError("gguf_weights='as_stored' loads unsharded (the block kernels run on one CPU device); "
                             "drop mesh, or use gguf_weights='float'")
        return gguf_stored.load_file(ggufs[0], dtype)
    if not p.exists():
        raise FileNotFoundError(f"no model at {p}: pass an HF folder (config.json + *.safetensors), a .gguf file, "
                                "or the name of an embedded model (gemma3-270m, minilm)")
    if mesh is not None:
        mesh = build_mesh(mesh)
    name = str(dtype) if isinstance(dtype, str) else dtype.name
    if (p / "quant_config.json").is_file():  # `jaxaccel quantize` output: served as stored (its own dtype)
        return serving.load_folder(p, fast_tokenizer, mesh, dtype)
    if p.is_file() and p.suffix == ".gguf":
        cfg, params, tok = gguf.load_file(p, dtype, mesh=mesh)
    elif p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if not (p / "config.json").exists() and len(ggufs) == 1:
            cfg, params, tok = gguf.load_file(ggufs[0], dtype, mesh=mesh)
        else:
            cfg, params, tok = hf.load_folder(p, dtype, fast_tokenizer=fast_tokenizer, mesh=mesh)
    else:
        raise CheckpointError(
            f"{p} is neither an HF model folder nor a .gguf file; pickle files (.bin/.pt) are never loaded")
    return Loaded(cfg, params, tok, name, mesh=mesh)
