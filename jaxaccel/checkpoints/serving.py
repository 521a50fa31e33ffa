"""Serving folders: quantized (or float) params in our own layout, which `jaxaccel.load` serves as stored.

  config.json         the HF config of the architecture (as an HF folder has)
  quant_config.json   {"format": "jaxaccel-quantized", "version": 1, "dtype": ..., "quant": QuantConfig}
  model.safetensors   the serving params by "/"-joined path: "layers_0/mlp/up_proj/kernel_q" (int8
                      [out, in], or uint8 [out, in / 2] for int4), ".../kernel_scale" (float32
                      [out, groups]) and the float params (norms, unquantized weights) as they are
  tokenizer files     when the model has a tokenizer

Loading checks every tensor's name, shape and dtype against what `quant_config.json` makes the
model expect, and the quantization mode the tensors were written with (kept in the safetensors
header) against it, so a config that does not match the tensors is a clear error, never a wrong
model.

Integrity: `quant_config.json` records every other file's size and sha256 (version 2). Loading
compares the sizes every time, and the sha256s whenever the files are not the ones last verified:
a stamp (`.verified`: each file's size, mtime and inode, and the time of the check) says which
files were verified, so any change through the filesystem (a rewrite, an in-place overwrite, a
copy) is hashed at the next load, and unchanged files are hashed again after VERIFY_EVERY_S in
case the medium decayed.
A damaged file is a `DamagedCheckpoint` error; the embedded models' cache rebuilds itself on it
(default_models.py). Folders of version 1 (no record) still load, unchecked.

The params are in our own layout (no transposes on load) and `model.safetensors` is written with
every tensor 64-byte aligned in the file, so loading memory-maps it: on CPU each array *is* the
mapped file (copy-on-write, zero copies; pages come in as the first call touches them), on an
accelerator it is one host-to-device copy. A float model is stored the same way with a float mode
(`QuantConfig(mode="float32")`): the embedded default model's cache is such a folder, which is how
a warm `jaxaccel generate` has its params without reading or copying them.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from flax import traverse_util
from safetensors import SafetensorError, safe_open

from .. import quant
from ..models import registry
from ..config import resolve_dtype
from ..paths import write_atomic
from ..sharding import placer
from .folders import atomic_folder
from .loaded import CheckpointError, Loaded
from .hf import load_tokenizer, read_config, with_tokenizer_in_background

FORMAT, VERSION, META = "jaxaccel-quantized", 2, "quant_config.json"
READABLE_VERSIONS = (1, 2)
WEIGHTS, STAMP = "model.safetensors", ".verified"
VERIFY_EVERY_S = 30 * 86400


class DamagedCheckpoint(CheckpointError):
    """A serving folder whose files do not match what was written (truncated, overwritten)."""


def is_quantized_folder(path: Path) -> bool:
    return path.is_dir() and (path / META).is_file()


def serving_shapes(config, cfg: quant.QuantConfig, dtype="float32") -> dict:
    """"/"-joined path -> ShapeDtypeStruct of the serving params of `config` under `cfg`."""
    shapes = registry.abstract_params(config, dtype, quant.dot_general_cls(cfg, serving=True),
                                      every_layer=bool(cfg.rules))
    return traverse_util.flatten_dict(nn.unbox(shapes), sep="/")


def save(model, out_dir, overwrite: bool = False) -> Path:
    """Write `model` (a Model from `Model.quantize`, or anything with its config, params,
    tokenizer, dtype and quant) as a serving folder, atomically (see folders.py); an existing
    non-empty folder is refused unless `overwrite`."""
    if model.quant is None:
        raise ValueError("this model is not quantized: call model.quantize(QuantConfig(...)) first, "
                         "or save_hf() to export float weights")
    quant_json = json.loads(model.quant.to_json())
    with atomic_folder(out_dir, overwrite) as tmp:
        save_aligned({k: np.asarray(jax.device_get(v)) for k, v in
                      traverse_util.flatten_dict(model.params, sep="/").items()},
                     tmp / WEIGHTS, metadata={"format": FORMAT, "quant": json.dumps(quant_json, sort_keys=True)})
        (tmp / "config.json").write_text(json.dumps(registry.config_to_hf(model.config), indent=2))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp))
        files = {f.name: _record(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        meta = {"format": FORMAT, "version": VERSION, "dtype": model.dtype, "quant": quant_json, "files": files}
        (tmp / META).write_text(json.dumps(meta, indent=1))
    return Path(out_dir).expanduser()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _record(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _stat_key(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def verify(folder) -> None:
    """Check the folder's files against the record in quant_config.json (see the module doc);
    DamagedCheckpoint naming the first that differs. Version-1 folders have no record and pass."""
    folder = Path(folder)
    records = _read_meta_json(folder).get("files")
    if records is None:
        return
    if not isinstance(records, dict):
        raise DamagedCheckpoint(f"{folder / META}: field 'files' must be an object")
    keys = {}
    for name, record in sorted(records.items()):
        path = folder / name
        if not path.is_file():
            raise DamagedCheckpoint(f"{path} is missing")
        size = path.stat().st_size
        if not isinstance(record, dict) or size != record.get("size"):
            raise DamagedCheckpoint(f"{path} has {size:,} bytes where {record.get('size')} were written "
                                    "(truncated or replaced)")
        keys[name] = _stat_key(path)
    stamp = folder / STAMP
    try:
        seen = json.loads(stamp.read_text())
        if seen.get("files") == keys and time.time() - seen.get("at", 0) < VERIFY_EVERY_S:
            return
    except (OSError, ValueError, AttributeError):
        pass  # no stamp (or a damaged one): verify
    for name, record in sorted(records.items()):
        if _sha256(folder / name) != record.get("sha256"):
            raise DamagedCheckpoint(f"{folder / name} does not hold the bytes that were written (its sha256 differs)")
    try:  # a read-only folder is verified at every load instead
        write_atomic(stamp, json.dumps({"files": keys, "at": time.time()}).encode())
    except OSError:
        pass


def _read_meta_json(folder: Path) -> dict:
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / META} cannot be read: {e}; re-create it with `jaxaccel quantize`") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{folder / META} must be a JSON object with format, version, dtype and quant; got a "
                              f"{type(meta).__name__}; re-create it with `jaxaccel quantize`")
    return meta


def read_meta_version(folder: Path) -> int:
    """The format version a serving folder was written with (CheckpointError if it is none)."""
    version = _read_meta_json(folder).get("version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{folder / META}: version {version!r} is not one of {READABLE_VERSIONS}")
    return version


def read_meta(folder: Path) -> tuple[str, quant.QuantConfig]:
    """quant_config.json -> (float dtype, QuantConfig), with a clear error for anything else."""
    meta = _read_meta_json(folder)
    try:
        if meta.get("format") != FORMAT or meta.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"format {meta.get('format')!r} version {meta.get('version')!r} is not "
                             f"{FORMAT!r} version {' or '.join(map(str, READABLE_VERSIONS))}")
        if not isinstance(meta.get("quant"), dict):
            raise ValueError(f"field 'quant' must be an object (a QuantConfig), got {meta.get('quant')!r}")
        if meta.get("dtype") not in quant.FLOAT_MODES:
            raise ValueError(f"field 'dtype' must be one of {', '.join(quant.FLOAT_MODES)}, got {meta.get('dtype')!r}")
        return meta["dtype"], quant.QuantConfig.from_json(json.dumps(meta["quant"]))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder / META} is not a valid jaxaccel quantized-checkpoint config: {e}; "
                              "re-create it with `jaxaccel quantize`") from None


def load_folder(folder, fast_tokenizer: bool = False, mesh=None, dtype="float32"):
    """A serving folder -> `Loaded` parts of a model serving the stored ints (no re-quantizing).
    A float32 folder is the plain float model; `dtype` casts it (e.g. bfloat16), as for HF folders."""
    folder = Path(folder)
    _, cfg = read_config(folder)
    requested, (stored, qcfg) = dtype, read_meta(folder)
    verify(folder)
    if mesh is not None and qcfg.integer:
        raise CheckpointError("loading a quantized checkpoint sharded over a mesh is not supported yet; "
                              "load the float checkpoint with mesh=..., then call .quantize()")

    def params():
        flat, written_as = read_mapped(folder / WEIGHTS, with_metadata=True)
        if "quant" in written_as:  # the QuantConfig the tensors were written with (version 2)
            # both read through QuantConfig, so a field added since (at its default) is no difference
            said = json.loads(qcfg.to_json())
            wrote = json.loads(quant.QuantConfig.from_json(written_as["quant"]).to_json())
            diff = sorted(k for k in set(said) | set(wrote) if said.get(k) != wrote.get(k))
            if diff:
                raise CheckpointError(
                    f"the tensors do not match {folder / META}: it says "
                    + ", ".join(f"{k}={said.get(k)!r}" for k in diff) + "; they were written with "
                    + ", ".join(f"{k}={wrote.get(k)!r}" for k in diff)
                    + ". Re-create the checkpoint with `jaxaccel quantize` instead of editing it")
        check(flat, cfg, qcfg, stored, folder)
        if mesh is None:
            return traverse_util.unflatten_dict({k: jax.device_put(v) for k, v in flat.items()}, sep="/")
        place = placer(cfg, mesh, stored)
        return traverse_util.unflatten_dict({tuple(k.split("/")): place(tuple(k.split("/")), v)
                                             for k, v in flat.items()})

    p, tok = with_tokenizer_in_background(params, lambda: load_tokenizer(folder, fast_tokenizer))
    if qcfg.mode == "float32":  # the float model itself (can be cast, quantized, trained)
        want = jnp.dtype(resolve_dtype(requested))
        if want != jnp.float32:
            p = jax.tree.map(lambda x: x.astype(want), p)
        return Loaded(cfg, p, tok, want.name, mesh=mesh)
    return Loaded(cfg, p, tok, stored, quant=qcfg, mesh=mesh)


def check(flat: dict, cfg, qcfg: quant.QuantConfig, dtype: str, folder: Path) -> None:
    """Every tensor present, nothing extra, each with the shape and dtype `qcfg` expects."""
    why = (f"the tensors do not match {folder / META} (mode {qcfg.mode}, group_size {qcfg.group_size}, "
           f"quantize_embedding {qcfg.quantize_embedding}) and config.json; re-create the checkpoint with "
           "`jaxaccel quantize` instead of editing it")
    try:
        expected = serving_shapes(cfg, qcfg, dtype)
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


# --- aligned safetensors -----------------------------------------------------------------------
ALIGN = 64  # bytes; what XLA's CPU client needs to use a host buffer without copying it
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def save_aligned(tensors: dict[str, np.ndarray], path: Path, metadata: dict | None = None) -> None:
    """A standard safetensors file (any reader opens it) laid out so that every tensor whose size
    is a multiple of 64 bytes starts 64-byte aligned: the header is padded with spaces to a
    multiple of 64 and those tensors come first (the format allows no gaps between tensors)."""
    names = sorted(tensors, key=lambda k: (tensors[k].nbytes % ALIGN != 0, k))
    header, offset = {"__metadata__": dict(metadata or {})}, 0
    for k in names:
        a = tensors[k]
        header[k] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for k in names:
            f.write(np.ascontiguousarray(tensors[k]).tobytes())


def read_mapped(path: Path, with_metadata: bool = False):
    """A safetensors file -> {name: array viewing a private (copy-on-write) memory map of it}
    (and its header's metadata, with `with_metadata`).

    safetensors' own reader validates the file first (header, offsets, sizes), so a truncated
    or corrupt file is a CheckpointError here, never a crash later."""
    try:
        with safe_open(str(path), framework="numpy"):
            pass
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}; re-create the checkpoint") from None
    base, out = 8 + n, {}
    buf = np.frombuffer(data, np.uint8)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which jaxaccel does not serve")
        out[name] = buf[base + start: base + end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
    return (out, header.get("__metadata__") or {}) if with_metadata else out
