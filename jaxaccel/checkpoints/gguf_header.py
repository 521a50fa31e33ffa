"""GGUF header parsing: metadata and tensor infos, without materialising the vocabulary.

`gguf.GGUFReader` builds one numpy view per vocabulary string (~10 s and ~700 MB for Gemma 3's
262k tokens); this parser decodes long string arrays only when asked (`decode=`), using the
format constants of the `gguf` package. Truncated or corrupt files raise `GGUFError` naming
the byte offset or tensor.
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .loaded import CheckpointError

# GGUF versions whose header layout (64-bit counts and lengths) we parse.
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32


class GGUFError(CheckpointError):
    """A GGUF file that we cannot read or translate faithfully."""


# --------------------------------------------------------------------------------------------------
# Header parsing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _StringArray:
    """A large string array (e.g. the vocabulary) whose elements were skipped, not decoded."""

    count: int

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    ne: tuple[int, ...]  # GGUF order: ne[0] is the contiguous (innermost) dimension
    ggml_type: int  # raw type id; may be one `GGMLQuantizationType` does not know
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy / HF order (``ne`` reversed)."""
        return tuple(reversed(self.ne))

    @property
    def type_name(self) -> str:
        try:
            return GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"unknown ggml type {self.ggml_type}"


@dataclass(frozen=True)
class _Header:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, _TensorInfo]  # file order
    file_size: int


# Arrays of strings longer than this are only counted (the vocabulary, merges).
_MAX_DECODED_STRING_ARRAY = 4096

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


class _Truncated(Exception):
    pass


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf = buf
        self.pos = 0
        self.size = len(buf)
        self.decode_all = False  # decode long string arrays too (the tokenizer needs them)

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated(self.pos)

    def unpack(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        self.need(n)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.unpack("<Q")
        self.need(n)
        self.pos += n

    def value(self, vtype: int) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            etype = self.unpack("<I")
            count = self.unpack("<Q")
            if etype == GGUFValueType.STRING:
                if count > _MAX_DECODED_STRING_ARRAY and not self.decode_all:
                    for _ in range(count):
                        self.skip_string()
                    return _StringArray(count)
                return [self.string() for _ in range(count)]
            if etype == GGUFValueType.ARRAY:
                return [self.value(GGUFValueType.ARRAY) for _ in range(count)]
            fmt = _SCALAR_FORMATS.get(etype)
            if fmt is None:
                raise GGUFError(f"unknown GGUF array element type {etype}")
            n = struct.calcsize(fmt) * count
            self.need(n)
            arr = np.frombuffer(self.buf, dtype=np.dtype(fmt), count=count, offset=self.pos).copy()
            self.pos += n
            return arr
        fmt = _SCALAR_FORMATS.get(vtype)
        if fmt is None:
            raise GGUFError(f"unknown GGUF value type {vtype}")
        value = self.unpack(fmt)
        if vtype == GGUFValueType.BOOL:
            return bool(value)
        if vtype == GGUFValueType.FLOAT32:
            # shortest decimal that round-trips in float32: 1e-06, not 9.999999974752427e-07
            return float(str(np.float32(value)))
        return value


def _tensor_nbytes(ne: tuple[int, ...], ggml_type: int, name: str, path: Path) -> int:
    try:
        qtype = GGMLQuantizationType(ggml_type)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        return -1  # unknown type: size unknowable; reported as an unsupported type later
    n_elems = int(np.prod(ne, dtype=np.int64)) if ne else 1
    if ne and ne[0] % block_size:
        raise GGUFError(
            f"{path}: tensor {name!r} has row length {ne[0]}, not a multiple of the "
            f"{qtype.name} block size {block_size}"
        )
    return n_elems // block_size * type_size


def _parse_header(path: Path, decode: tuple[str, ...] = ()) -> _Header:
    """Parse metadata and tensor infos; string arrays named in `decode` are decoded in full."""
    if not path.exists():
        raise GGUFError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise GGUFError(f"not a file: {path}")
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (bad magic {magic!r}, expected b'GGUF')")
    if file_size < 24:
        raise GGUFError(f"{path}: truncated GGUF file ({file_size} bytes, header incomplete)")

    mm = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        cur = _Cursor(memoryview(mm))
        cur.pos = 4
        version = cur.unpack("<I")
        if version & 0xFFFF == 0:
            raise GGUFError(f"{path}: big-endian GGUF files are not supported")
        if version not in _SUPPORTED_VERSIONS:
            raise GGUFError(
                f"{path}: GGUF version {version} is not supported (supported: {list(_SUPPORTED_VERSIONS)})"
            )
        n_tensors = cur.unpack("<Q")
        n_kv = cur.unpack("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.unpack("<I")
            cur.decode_all = key in decode
            metadata[key] = cur.value(vtype)
        infos: list[tuple[str, tuple[int, ...], int, int]] = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            if n_dims > 8:
                raise GGUFError(f"{path}: tensor {name!r} claims {n_dims} dimensions; the file is corrupt")
            ne = tuple(cur.unpack("<Q") for _ in range(n_dims))
            ggml_type = cur.unpack("<I")
            offset = cur.unpack("<Q")
            infos.append((name, ne, ggml_type, offset))
        header_end = cur.pos
    except _Truncated as e:
        raise GGUFError(
            f"{path}: truncated GGUF file (header ends past end of file at byte {e.args[0]}, "
            f"file is {file_size} bytes)"
        ) from None
    finally:
        del mm

    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: invalid general.alignment {alignment!r}")
    data_start = -(-header_end // alignment) * alignment

    tensors: dict[str, _TensorInfo] = {}
    for name, ne, ggml_type, offset in infos:
        if name in tensors:
            raise GGUFError(f"{path}: duplicate tensor {name!r}")
        nbytes = _tensor_nbytes(ne, ggml_type, name, path)
        info = _TensorInfo(name, ne, ggml_type, data_start + offset, nbytes)
        if nbytes >= 0 and info.offset + nbytes > file_size:
            raise GGUFError(
                f"{path}: truncated GGUF file: tensor {name!r} needs bytes "
                f"[{info.offset}, {info.offset + nbytes}) but the file is {file_size} bytes"
            )
        tensors[name] = info
    return _Header(path, version, metadata, tensors, file_size)


@functools.lru_cache(maxsize=8)
def _cached_header(path: str, inode: int, size: int, mtime_ns: int) -> _Header:
    del inode, size, mtime_ns  # cache key only: a rewritten file is parsed again
    return _parse_header(Path(path))


def _header(path: str | os.PathLike) -> _Header:
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise GGUFError(f"GGUF file not found: {p}") from None
    except OSError as e:
        raise GGUFError(f"cannot stat GGUF file {p}: {e}") from e
    return _cached_header(str(p.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


