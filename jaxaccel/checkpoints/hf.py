"""Hugging Face folders: config.json + safetensors in, and back out.

Our parameter paths mirror the HF names, so the table is derived, not typed out:
  ("layers_3", "self_attn", "q_proj", "kernel")  <->  "model.layers.3.self_attn.q_proj.weight" (transposed)
  ("embed_tokens", "embedding")                  <->  "model.embed_tokens.weight"
  ("norm", "scale")                              <->  "model.norm.weight"
  ("lm_head", "kernel")                          <->  "lm_head.weight" (transposed)
A family may supply its own table (`Family.hf_name`, e.g. BERT); `name_table(cfg)` picks it.
Every tensor is shape-checked against `jax.eval_shape` of the module before it is placed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import jax
import numpy as np
from flax import traverse_util
from flax.core import meta
from tqdm.auto import tqdm
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ..config import ModelConfig, resolve_dtype
from ..models import registry
from ..sharding import placer as mesh_placer
from ..tokenizer import FastTokenizer
from .folders import atomic_folder
from .loaded import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# --- name table ----------------------------------------------------------------------------
def hf_name(path: tuple[str, ...]) -> str:
    """Our param path -> HF tensor name."""
    *mods, leaf = path
    leaf = "bias" if leaf == "bias" else "weight"
    mods = [m.replace("layers_", "layers.") if re.fullmatch(r"layers_\d+", m) else m for m in mods]
    prefix = "" if mods[0] == "lm_head" else "model."
    return prefix + ".".join(mods + [leaf])


def name_table(cfg: ModelConfig):
    """The path -> HF name function of cfg's family (the generic `hf_name` by default)."""
    family = registry.FAMILIES[cfg.family]
    return (lambda path: family.hf_name(cfg, path)) if family.hf_name else hf_name


def ignored_names(cfg: ModelConfig) -> set[str]:
    """Checkpoint tensors that load skips (tied copies, buffers)."""
    family = registry.FAMILIES[cfg.family]
    skip = set(family.hf_ignored(cfg)) if family.hf_ignored else set()
    if cfg.tie_word_embeddings:
        skip.add("lm_head.weight")  # some exporters keep the tied copy
    return skip


def is_transposed(path: tuple[str, ...]) -> bool:
    """Dense kernels are [in, out] here and [out, in] in HF."""
    return path[-1] == "kernel"


def expected_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Param path -> shape of a freshly initialised model, computed without allocating."""
    flat = traverse_util.flatten_dict(meta.unbox(registry.abstract_params(cfg)))
    return {k: tuple(v.shape) for k, v in flat.items()}


def to_ours(path, array: np.ndarray) -> np.ndarray:
    return array.T if is_transposed(path) else array


# --- loading -------------------------------------------------------------------------------
def read_config(folder: Path) -> tuple[dict, ModelConfig]:
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{folder} has no config.json; an HF model folder needs config.json + *.safetensors")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
    try:
        return hf, registry.config_from_hf(hf)
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (ValueError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a JSON object with a \"weight_map\": {e}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: \"weight_map\" must map tensor names to shard file names")
        for f in set(weight_map.values()):  # a shard outside the model folder is never read
            # judged by the name, not by where links lead: HF hub snapshots link to blobs elsewhere
            if os.path.isabs(f) or os.path.normpath(f).split(os.sep)[0] == "..":
                raise CheckpointError(f"{index} names the shard {f!r}, which is outside the model folder {folder}; "
                                      "shards must be files inside it")
        files = sorted({folder / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise CheckpointError(
                f"{folder} holds only pickle weights ({', '.join(pickles)}); jaxaccel never unpickles "
                "checkpoints. Convert them once with transformers: "
                "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
        raise CheckpointError(f"{folder} has no *.safetensors weights")
    return files


def safetensors_specs(files: Iterable[Path]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, read from the headers only."""
    specs = []
    for f in files:
        try:
            with safe_open(str(f), framework="numpy") as handle:
                specs += [(n, tuple(handle.get_slice(n).get_shape())) for n in handle.keys()]
        except SafetensorError as e:
            raise CheckpointError(f"{f} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    return specs


def iter_safetensors(files: Iterable[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) one tensor at a time (memory-mapped reads)."""
    for f in files:
        with safe_open(str(f), framework="numpy") as handle:
            for name in handle.keys():
                try:
                    yield name, handle.get_tensor(name)
                except SafetensorError as e:
                    raise CheckpointError(f"{f}: tensor {name!r} cannot be read (truncated or corrupt?): {e}") from None


def load_tensors(cfg: ModelConfig, specs: Iterable[tuple[str, tuple[int, ...]]],
                 data: Iterator[tuple[str, np.ndarray]], dtype="float32", source: str = "checkpoint",
                 placer=None, mesh=None) -> dict:
    """Stream HF-named tensors into our nested params dict, one tensor at a time.

    `specs` (HF name, HF shape) are all validated first, before `data` is read: errors name
    the tensor and both shapes. `placer(path, np_array)` puts an array on devices (default:
    jax.device_put); with a `mesh` each device receives only its shard of every tensor.
    """
    dtype = resolve_dtype(dtype)
    want = expected_shapes(cfg)
    name_of = name_table(cfg)
    by_name = {name_of(p): p for p in want}
    skip = ignored_names(cfg)
    unexpected, bad, seen = [], [], set()
    for name, shape in specs:
        path = by_name.get(name)
        if path is None:
            if name not in skip:
                unexpected.append(name)
            continue
        ours = tuple(reversed(shape)) if is_transposed(path) else tuple(shape)
        if ours != want[path]:
            bad.append(f"{name}: checkpoint shape {tuple(shape)} -> {ours} here, model expects {want[path]}")
        seen.add(name)
    missing = sorted(set(by_name) - seen)
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:10])}" + (" ..." if len(unexpected) > 10 else ""))
    if bad:
        problems.append("shape mismatch: " + "; ".join(bad))
    if problems:
        raise CheckpointError(f"{source} does not match the {cfg.family} config: " + " | ".join(problems))
    if mesh is not None:  # shardings (and their divisibility errors) before any data is read
        placer = mesh_placer(cfg, mesh, dtype)
    placer = placer or (lambda path, a: jax.device_put(a))
    flat = {}
    # a bar only where loading is slow (a large GGUF to dequantize) and stderr is a terminal
    bar = tqdm(total=len(by_name), desc=f"loading {Path(source).name}", unit="tensor", delay=2, disable=None,
               leave=False)
    for name, array in data:
        if name in skip:
            continue
        path = by_name[name]
        if not np.issubdtype(array.dtype, np.floating):
            raise CheckpointError(f"{source}: tensor {name!r} has non-float dtype {array.dtype}")
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        if bad:
            raise CheckpointError(f"{source}: tensor {name!r} holds {bad:,} NaN or infinite value(s) of {array.size:,}; "
                                  "the checkpoint is damaged or was saved after training diverged")
        flat[path] = placer(path, np.ascontiguousarray(to_ours(path, array), dtype=dtype))
        del array
        bar.update()
    bar.close()
    return traverse_util.unflatten_dict(flat)


def load_tokenizer(folder: Path, fast: bool = False):
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    if not any((folder / n).exists() for n in names):
        return None
    if fast and (folder / "tokenizer.json").is_file():
        return FastTokenizer(folder, process=True)  # parsed in a worker process meanwhile
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    st = folder / "sentence_bert_config.json"  # sentence-transformers' own (shorter) length limit
    if st.is_file():
        limit = json.loads(st.read_text()).get("max_seq_length")
        if limit:
            tok.model_max_length = int(limit)
    return tok


def load_folder(folder, dtype="float32", placer=None, fast_tokenizer: bool = False, mesh=None):
    """HF folder -> (ModelConfig, params, tokenizer | None)."""
    folder = Path(folder)
    _, cfg = read_config(folder)
    files = safetensors_files(folder)
    specs = safetensors_specs(files)
    return cfg, *with_tokenizer_in_background(
        lambda: load_tensors(cfg, specs, iter_safetensors(files), dtype, source=str(folder), placer=placer,
                             mesh=mesh),
        lambda: load_tokenizer(folder, fast_tokenizer))


def with_tokenizer_in_background(load_params, load_tok):
    """Run load_params() here while load_tok() runs in a thread: the tokenizer's parsing and the
    tensor copies overlap (both spend most of their time outside the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="jaxaccel-tokenizer") as pool:
        tok = pool.submit(load_tok)
        params = load_params()
        return params, tok.result()


# --- export --------------------------------------------------------------------------------
def hf_state_dict(params: dict, cfg: ModelConfig | None = None) -> Iterator[tuple[str, np.ndarray]]:
    name_of = name_table(cfg) if cfg is not None else hf_name
    for path, value in traverse_util.flatten_dict(params).items():
        array = np.asarray(jax.device_get(value))
        yield name_of(path), np.ascontiguousarray(array.T if is_transposed(path) else array)


def save_folder(out_dir, cfg: ModelConfig, params: dict, tokenizer=None, overwrite: bool = True) -> Path:
    """Write model.safetensors + config.json (+ tokenizer) atomically (see folders.py); an existing
    folder is replaced, or refused when not `overwrite`."""
    with atomic_folder(out_dir, overwrite) as tmp:
        tensors = dict(hf_state_dict(params, cfg))
        dtypes = {str(a.dtype) for a in tensors.values()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf = registry.config_to_hf(cfg)
        hf["torch_dtype"] = "bfloat16" if dtypes == {"bfloat16"} else ("float16" if dtypes == {"float16"} else "float32")
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out_dir).expanduser()
