"""Checkpoint formats: HF folders (hf.py), GGUF files (gguf.py), orbax stores (store.py)."""

from __future__ import annotations

from pathlib import Path

from .hf import CheckpointError


def load(path, dtype="float32", fast_tokenizer: bool = False, mesh=None):
    """HF folder, .gguf file or quantized checkpoint folder (`jaxaccel quantize`) -> jaxaccel.Model.

    fast_tokenizer: for folders with tokenizer.json, use `jaxaccel.tokenizer.FastTokenizer`
    (the Rust `tokenizers` object, ~1 s) instead of transformers' AutoTokenizer (~6 s for
    Gemma's vocabulary); same ids, a smaller API. The CLI's generate uses it.
    mesh: a `jaxaccel.MeshConfig` (or jax Mesh): params load sharded over it, each device
    receiving only its shard (see sharding.py).
    """
    from ..model import Model

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"no model at {p}: pass an HF folder (config.json + *.safetensors) or a .gguf file")
    if mesh is not None:
        from ..sharding import build_mesh

        mesh = build_mesh(mesh)
    if (p / "quant_config.json").is_file():  # `jaxaccel quantize` output: served as stored (its own dtype)
        from . import quantized

        return quantized.load_model(p, fast_tokenizer, mesh, dtype)
    if p.is_file() and p.suffix == ".gguf":
        from . import gguf

        cfg, params, tok = gguf.load_file(p, dtype, mesh=mesh)
    elif p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if not (p / "config.json").exists() and len(ggufs) == 1:
            from . import gguf

            cfg, params, tok = gguf.load_file(ggufs[0], dtype, mesh=mesh)
        else:
            from . import hf

            cfg, params, tok = hf.load_folder(p, dtype, fast_tokenizer=fast_tokenizer, mesh=mesh)
    else:
        raise CheckpointError(
            f"{p} is neither an HF model folder nor a .gguf file; pickle files (.bin/.pt) are never loaded")
    return Model(cfg, params, tok, str(dtype) if isinstance(dtype, str) else dtype.name, mesh=mesh)
