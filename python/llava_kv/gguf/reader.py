"""The bounded GGUF reader: the header of a GGUF file (metadata and tensor table) parsed into a
:class:`GGUFFile`, with every count and length checked against the file's size before anything is
allocated or read, so a hostile or truncated header costs neither memory nor time and ends in a
:class:`~llava_kv.ModelLoadError` that names the file and the byte. Also the format's constants:
value type ids (``T_U8`` ... ``T_F64``), ggml tensor types and the sanity limits the parser holds to.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ModelLoadError

__all__ = ["GGUFFile", "TensorInfo", "read_gguf", "GGML_TYPES", "T_U8", "T_I8", "T_U16", "T_I16", "T_U32", "T_I32",
           "T_F32", "T_BOOL", "T_STRING", "T_ARRAY", "T_U64", "T_I64", "T_F64"]

# --- GGUF format --------------------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
GGUF_DEFAULT_ALIGNMENT = 32

(T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STRING, T_ARRAY, T_U64, T_I64, T_F64) = range(13)
_TYPE_NAMES = {T_U8: "uint8", T_I8: "int8", T_U16: "uint16", T_I16: "int16", T_U32: "uint32", T_I32: "int32",
               T_F32: "float32", T_BOOL: "bool", T_STRING: "string", T_ARRAY: "array", T_U64: "uint64",
               T_I64: "int64", T_F64: "float64"}
# element size and numpy dtype of the fixed-size value types
_SCALARS = {T_U8: (1, "<u1"), T_I8: (1, "<i1"), T_U16: (2, "<u2"), T_I16: (2, "<i2"), T_U32: (4, "<u4"),
            T_I32: (4, "<i4"), T_F32: (4, "<f4"), T_BOOL: (1, "<u1"), T_U64: (8, "<u8"), T_I64: (8, "<i8"),
            T_F64: (8, "<f8")}
_INT_TYPES = {T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_U64, T_I64}
_FLOAT_TYPES = {T_F32, T_F64}

# ggml types a GGUF may hold: type id -> (elements per block, bytes per block) (ggml.h, ggml-common.h).
# Ids 4, 5 and 31..38 were removed from ggml and are refused by its loader, so here too.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18), 42: ("Q2_0", 64, 18),
}
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # bytes, NUL included

# Sanity limits, far above any real model, that keep a hostile header from costing memory or time.
MAX_KV = 1 << 16
MAX_TENSORS = 1 << 20
MAX_KEY_BYTES = 1 << 16
MAX_ARRAY_ELEMENTS = 1 << 26
MAX_ALIGNMENT = 1 << 16

# --- the parser ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the innermost (row) dimension
    ggml_type: int
    offset: int  # from the start of the data section
    nbytes: int


@dataclass
class GGUFFile:
    """What the header of a GGUF file says. Array values are lists (strings: bytes) or numpy arrays."""

    path: str
    version: int
    file_size: int
    metadata: dict[str, Any] = field(default_factory=dict)
    types: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # key -> (type, array element type)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    alignment: int = GGUF_DEFAULT_ALIGNMENT
    data_offset: int = 0
    # where each value lies in the file: key -> (offset, length) of its value bytes (after the type;
    # for a string, after its length), tensor name -> (offset, length) of the name
    value_spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    tensor_name_spans: dict[str, tuple[int, int]] = field(default_factory=dict)

    def fail(self, message: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: {message}")


class _Reader:
    def __init__(self, buf: Any, path: str) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path} is not a valid GGUF file: {what} (at byte {self.pos})")

    def remaining(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> int:
        if n < 0 or n > self.remaining():
            raise self.fail(f"{what} runs past the end of the file")
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str, n: int, what: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self.take(n, what))[0]

    def u32(self, what: str) -> int:
        return int(self.unpack("<I", 4, what))

    def u64(self, what: str) -> int:
        return int(self.unpack("<Q", 8, what))

    def i64(self, what: str) -> int:
        return int(self.unpack("<q", 8, what))

    def string(self, what: str, limit: int | None = None) -> bytes:
        n = self.u64(f"length of {what}")
        if limit is not None and n > limit:
            raise self.fail(f"{what} is {n} bytes long (at most {limit})")
        start = self.take(n, what)
        return bytes(self.buf[start:start + n])

    def value(self, vtype: int, key: str) -> Any:
        if vtype == T_STRING:
            return self.string(f"the string value of {key!r}").decode("utf-8", "surrogateescape")
        if vtype in _SCALARS:
            size, dtype = _SCALARS[vtype]
            start = self.take(size, f"the value of {key!r}")
            v = np.frombuffer(self.buf, dtype=dtype, count=1, offset=start)[0]
            if vtype == T_BOOL:
                if v > 1:
                    raise self.fail(f"key {key!r} is a bool stored as {int(v)} (must be 0 or 1)")
                return bool(v)
            return float(v) if vtype in _FLOAT_TYPES else int(v)
        raise self.fail(f"key {key!r} has unknown value type {vtype}")

    def array(self, key: str) -> tuple[int, Any]:
        etype = self.u32(f"element type of {key!r}")
        if etype == T_ARRAY or (etype not in _SCALARS and etype != T_STRING):
            raise self.fail(f"key {key!r} is an array of unknown or nested type {etype}")
        n = self.u64(f"length of {key!r}")
        min_size = 8 if etype == T_STRING else _SCALARS[etype][0]
        if n > MAX_ARRAY_ELEMENTS or n * min_size > self.remaining():
            raise self.fail(f"array {key!r} declares {n} elements, more than the file holds")
        if etype == T_STRING:
            items = []
            for i in range(n):
                items.append(self.string(f"element {i} of {key!r}"))
            return etype, items
        size, dtype = _SCALARS[etype]
        start = self.take(n * size, f"array {key!r}")
        arr = np.frombuffer(self.buf, dtype=dtype, count=n, offset=start).copy()
        if etype == T_BOOL and n and int(arr.max()) > 1:
            raise self.fail(f"array {key!r} holds a bool that is neither 0 nor 1")
        return etype, arr


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse the header of the GGUF at ``path`` (metadata and tensor table; no tensor data is read
    beyond what the header says). Raises ModelLoadError for anything malformed."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise ModelLoadError(f"{path} is not a valid GGUF file: {size} bytes is too short for a header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                return _parse(_Reader(view, path), size)
            finally:
                view.release()


def _parse(r: _Reader, size: int) -> GGUFFile:
    magic = bytes(r.buf[0:4])
    r.take(4, "magic")
    if magic != GGUF_MAGIC:
        raise r.fail(f"magic is {magic!r}, not b'GGUF'")
    version = r.u32("version")
    if version not in GGUF_VERSIONS:
        raise r.fail(f"GGUF version {version} (llama.cpp reads versions 2 and 3)")
    n_tensors = r.u64("tensor count")
    n_kv = r.u64("metadata count")
    # each metadata pair takes at least 8+1 (key) + 4 (type) + 1 bytes; each tensor info 8+1+4+4+8
    if n_kv > MAX_KV or n_kv * 14 > r.remaining():
        raise r.fail(f"header declares {n_kv} metadata entries, more than the file can hold")
    if n_tensors > MAX_TENSORS or n_tensors * 25 > r.remaining():
        raise r.fail(f"header declares {n_tensors} tensors, more than the file can hold")
    g = GGUFFile(r.path, version, size)
    for i in range(n_kv):
        raw = r.string(f"key {i}", MAX_KEY_BYTES)
        if not raw:
            raise r.fail(f"key {i} is empty")
        key = raw.decode("utf-8", "surrogateescape")
        if key in g.metadata:
            raise r.fail(f"key {key!r} appears twice")
        vtype = r.u32(f"type of {key!r}")
        start = r.pos
        if vtype == T_ARRAY:
            etype, value = r.array(key)
            g.types[key] = (T_ARRAY, etype)
        elif vtype in _SCALARS or vtype == T_STRING:
            value = r.value(vtype, key)
            g.types[key] = (vtype, None)
        else:
            raise r.fail(f"key {key!r} has unknown value type {vtype}")
        g.metadata[key] = value
        g.value_spans[key] = (start + 8, r.pos - start - 8) if vtype == T_STRING else (start, r.pos - start)

    if "general.alignment" in g.metadata:
        align = g.metadata["general.alignment"]
        if g.types["general.alignment"][0] != T_U32 or not 0 < align <= MAX_ALIGNMENT or align & (align - 1):
            raise g.fail(f"general.alignment = {align!r} must be a uint32 power of two up to {MAX_ALIGNMENT}")
        g.alignment = align

    infos = []
    for i in range(n_tensors):
        raw = r.string(f"name of tensor {i}", GGML_MAX_NAME - 1)
        name = raw.decode("utf-8", "surrogateescape")
        g.tensor_name_spans[name] = (r.pos - len(raw), len(raw))
        if name in g.tensors:
            raise r.fail(f"tensor {name!r} appears twice")
        n_dims = r.u32(f"dimension count of tensor {name!r}")
        if n_dims > GGML_MAX_DIMS:
            raise r.fail(f"tensor {name!r} has {n_dims} dimensions (at most {GGML_MAX_DIMS})")
        shape = tuple(r.i64(f"shape of tensor {name!r}") for _ in range(n_dims))
        if any(d < 0 for d in shape):
            raise r.fail(f"tensor {name!r} has a negative dimension {shape}")
        ttype = r.u32(f"type of tensor {name!r}")
        if ttype not in GGML_TYPES:
            raise r.fail(f"tensor {name!r} has unknown ggml type {ttype}")
        tname, block, block_bytes = GGML_TYPES[ttype]
        if shape and shape[0] % block:
            raise r.fail(f"tensor {name!r} of type {tname} has rows of {shape[0]} elements, not a multiple of {block}")
        n_elements = math.prod(shape) if shape else 1
        if n_elements >= 1 << 63:
            raise r.fail(f"tensor {name!r} has {n_elements} elements")
        nbytes = n_elements // block * block_bytes
        offset = r.u64(f"data offset of tensor {name!r}")
        infos.append((name, shape, ttype, offset, nbytes))
        g.tensors[name] = TensorInfo(name, shape, ttype, offset, nbytes)

    g.data_offset = -(-r.pos // g.alignment) * g.alignment
    expected = 0
    for name, shape, ttype, offset, nbytes in infos:
        if offset != expected:
            raise g.fail(f"tensor {name!r} starts at data offset {offset}, expected {expected}")
        expected += -(-nbytes // g.alignment) * g.alignment
        if g.data_offset + offset + nbytes > size:
            raise g.fail(f"tensor {name!r} ({nbytes} bytes at offset {g.data_offset + offset}) runs past the end "
                         f"of the {size}-byte file (truncated?)")
    return g
