"""Quantized checkpoints: a folder that `jaxaccel.load` serves without re-quantizing.

  config.json         the HF config of the architecture (as an HF folder has)
  quant_config.json   {"format": "jaxaccel-quantized", "version": 1, "dtype": ..., "quant": QuantConfig}
  model.safetensors   the serving params by "/"-joined path: "layers_0/mlp/up_proj/kernel_q" (int8
                      [out, in], or uint8 [out, in / 2] for int4), ".../kernel_scale" (float32
                      [out, groups]) and the float params (norms, unquantized weights) as they are
  tokenizer files     when the model has a tokenizer

Loading checks every tensor's name, shape and dtype against what `quant_config.json` makes the
model expect, so a config that does not match the tensors is a clear error, never a wrong model.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import jax.numpy as jnp
from flax import traverse_util
from safetensors import SafetensorError
from safetensors.flax import load_file, save_file

from .. import quant
from ..models import registry
from .hf import CheckpointError, load_tokenizer, read_config, with_tokenizer_in_background

FORMAT, VERSION, META = "jaxaccel-quantized", 1, "quant_config.json"


def is_quantized_folder(path: Path) -> bool:
    return path.is_dir() and (path / META).is_file()


def save(model, out_dir) -> Path:
    """Write `model` (from `Model.quantize`) as a quantized checkpoint folder, atomically."""
    if model.quant is None:
        raise ValueError("this model is not quantized: call model.quantize(QuantConfig(...)) first, "
                         "or save_hf() to export float weights")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out folder or delete it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        tmp = Path(tmp)
        save_file(traverse_util.flatten_dict(model.params, sep="/"), str(tmp / "model.safetensors"),
                  metadata={"format": FORMAT})
        (tmp / "config.json").write_text(json.dumps(registry.config_to_hf(model.config), indent=2))
        meta = {"format": FORMAT, "version": VERSION, "dtype": model.dtype,
                "quant": json.loads(model.quant.to_json())}
        (tmp / META).write_text(json.dumps(meta, indent=1))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        tmp.mkdir()  # TemporaryDirectory cleans up a (now empty) folder of its name
    return out


def read_meta(folder: Path) -> tuple[str, quant.QuantConfig]:
    """quant_config.json -> (float dtype, QuantConfig), with a clear error for anything else."""
    try:
        meta = json.loads((folder / META).read_text())
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"format {meta.get('format')!r} version {meta.get('version')!r} is not "
                             f"{FORMAT!r} version {VERSION}")
        return meta["dtype"], quant.QuantConfig.from_json(json.dumps(meta["quant"]))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder / META} is not a valid jaxaccel quantized-checkpoint config: {e}; "
                              "re-create it with `jaxaccel quantize`") from None


def load_model(folder, fast_tokenizer: bool = False, mesh=None):
    """`jaxaccel.load` of a quantized folder: a Model serving the stored ints (no re-quantizing)."""
    from ..model import Model

    if mesh is not None:
        raise CheckpointError("loading a quantized checkpoint sharded over a mesh is not supported yet; "
                              "load the float checkpoint with mesh=..., then call .quantize()")
    cfg, params, tok, dtype, qcfg = load_folder(folder, fast_tokenizer)
    return Model(cfg, params, tok, dtype, dot_general_cls=quant.dot_general_cls(qcfg, serving=True), quant=qcfg)


def load_folder(folder, fast_tokenizer: bool = False):
    """Quantized checkpoint folder -> (ModelConfig, serving params, tokenizer, dtype, QuantConfig)."""
    folder = Path(folder)
    _, cfg = read_config(folder)
    dtype, qcfg = read_meta(folder)

    def params():
        try:
            flat = load_file(str(folder / "model.safetensors"))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {folder / 'model.safetensors'}: {e}") from None
        check(flat, cfg, qcfg, dtype, folder)
        return traverse_util.unflatten_dict(flat, sep="/")

    p, tok = with_tokenizer_in_background(params, lambda: load_tokenizer(folder, fast_tokenizer))
    return cfg, p, tok, dtype, qcfg


def check(flat: dict, cfg, qcfg: quant.QuantConfig, dtype: str, folder: Path) -> None:
    """Every tensor present, nothing extra, each with the shape and dtype `qcfg` expects."""
    why = (f"the tensors do not match {folder / META} (mode {qcfg.mode}, group_size {qcfg.group_size}, "
           f"quantize_embedding {qcfg.quantize_embedding}) and config.json; re-create the checkpoint with "
           "`jaxaccel quantize` instead of editing it")
    try:
        expected = quant.serving_shapes(cfg, qcfg, dtype)
    except ValueError as e:
        raise CheckpointError(f"{why}: {e}") from None
    missing, extra = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{why}: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, want in expected.items():
        got = flat[name]
        if tuple(got.shape) != tuple(want.shape) or jnp.dtype(got.dtype) != jnp.dtype(want.dtype):
            raise CheckpointError(f"{why}: tensor {name} is {got.dtype}{list(got.shape)}, "
                                  f"expected {want.dtype}{list(want.shape)}")
