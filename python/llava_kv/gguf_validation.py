"""Checks a GGUF text model or mmproj projector before llama.cpp or mtmd reads it.

llama.cpp trusts what it loads: a block count of zero, a head count that does not divide the width,
a NaN epsilon, a duplicated vocabulary entry or a metadata value of an unexpected type ends in an
assert (the whole process aborts) or in silent garbage. So every file is read here first, by a
parser of our own that bounds every count and length by the file's size, and the hyperparameters
the loaders use are checked against the ranges they can live with. Anything wrong is a
:class:`~llava_kv.ModelLoadError` that names the file, the key and the value.

The facts the checks encode (architecture and projector names, ggml type sizes, the keys mtmd
reads and their types, llama.cpp's layer and expert limits) come from the pinned llama.cpp
(``src/llama-arch.cpp``, ``src/llama-hparams.h``, ``src/llama-model.cpp``, ``src/llama-vocab.cpp``,
``ggml/include/ggml.h``, ``tools/mtmd/clip.cpp``, ``tools/mtmd/clip-impl.h``).
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ModelLoadError

__all__ = ["GGUFFile", "TensorInfo", "read_gguf", "check_text_model", "check_projector", "check_model_files",
           "TEXT_ARCHITECTURES", "PROJECTOR_TYPES"]

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

# --- what llama.cpp and mtmd can load -----------------------------------------------------------

LLAMA_MAX_LAYERS = 512  # src/llama-hparams.h; a larger block_count trips a GGML_ASSERT
LLAMA_MAX_EXPERTS = 1024
MAX_EMBD = 1 << 17
MAX_HEADS = 1 << 12
MAX_FF = 1 << 20
MAX_CONTEXT = 1 << 26
MAX_VOCAB = 1 << 23
MAX_HEAD_DIM = 1 << 16
CLIP_MAX_IMAGE_SIZE = 8192  # clip.cpp refuses larger
CLIP_MAX_LAYERS = 1024

# Decoder-only transformer families llama.cpp knows (src/llama-arch.cpp) that mtmd projectors pair
# with, or that are close kin. Names outside this set are refused rather than guessed at.
TEXT_ARCHITECTURES = frozenset({
    "llama", "llama4", "mistral3", "mistral4", "qwen", "qwen2", "qwen2moe", "qwen2vl", "qwen3", "qwen3moe",
    "qwen3vl", "qwen3vlmoe", "qwen35", "qwen35moe", "qwen3next", "gemma", "gemma2", "gemma3", "gemma3n", "gemma4",
    "phi2", "phi3", "phimoe", "internlm2", "minicpm", "minicpm3", "granite", "granitemoe", "granitehybrid",
    "glm4", "glm4moe", "chatglm", "deepseek", "deepseek2", "deepseek2-ocr", "cogvlm", "paddleocr", "ernie4_5",
    "ernie4_5-moe", "hunyuan-dense", "hunyuan-moe", "hunyuan_vl", "exaone", "exaone4", "exaone-moe", "smollm3",
    "lfm2", "lfm2moe", "olmo2", "stablelm", "starcoder2", "command-r", "cohere2", "seed_oss", "apertus",
    "dots1", "mimo2", "bailingmoe2", "nemotron", "nemotron_h", "nemotron_h_moe", "minimax-m3", "step35",
    "arcee", "gpt-oss",
})
# Families where some layers are recurrent (no attention heads, no attention tensors).
_HYBRID_ARCHITECTURES = frozenset({
    "granitehybrid", "lfm2", "lfm2moe", "qwen3next", "qwen35", "qwen35moe", "nemotron_h", "nemotron_h_moe",
})
# Multi-head latent attention: heads do not split the width, key_length says the head size.
_MLA_ARCHITECTURES = frozenset({"deepseek2", "deepseek2-ocr", "minicpm3"})

_TOKENIZER_MODELS = frozenset({"llama", "gpt2", "bert", "t5", "rwkv", "plamo2", "hybriddna", "whitespace"})
# llama.cpp's BOS default per tokenizer when the file names none (llama-vocab.cpp)
_DEFAULT_BOS = {"llama": 1, "gpt2": 11, "bert": 101}
_ROPE_SCALING_TYPES = frozenset({"none", "linear", "yarn", "longrope"})

# clip-impl.h PROJECTOR_TYPE_NAMES
PROJECTOR_TYPES = frozenset({
    "mlp", "ldp", "ldpv2", "resampler", "adapter", "qwen2vl_merger", "qwen2.5vl_merger", "qwen3vl_merger",
    "ling3vl", "step3vl", "gemma3", "gemma3nv", "gemma3na", "gemma4v", "gemma4a", "gemma4uv", "gemma4ua", "phi4",
    "idefics3", "pixtral", "ultravox", "internvl", "llama4", "qwen2a", "qwen3a", "glma", "qwen2.5o", "voxtral",
    "meralion", "musicflamingo", "lfm2", "kimivl", "paddleocr", "lightonocr", "cogvlm", "janus_pro", "dots_ocr",
    "dots3note_v", "dots3note_a", "deepseekocr", "deepseekocr2", "deepseek4v", "lfm2a", "glm4v", "glm5v",
    "youtuvl", "yasa2", "kimik25", "nemotron_v2_vl", "exaone4_5", "hunyuanvl", "minicpmv4_6", "granite_speech",
    "mimovl", "minimax_m3", "granite4_vision", "mimo_audio", "parakeet", "qwen3tts_spkenc", "qwen3tts_gen",
    "pockettts_spkenc", "pockettts_gen", "muse-glimmer",
})
# Vision towers that embed patches without the common conv (`v.patch_embd.weight`).
_NO_PATCH_EMBD = frozenset({"gemma3nv", "deepseekocr", "deepseekocr2"})
# Fixed-resolution towers whose learned position table must cover every patch exactly as stored:
# llava-style towers look rows up (get_rows: more rows than patches is fine, fewer reads out of
# bounds); SigLIP-style towers add the table to the patches (it must have one row per patch).
_POS_LOOKUP = frozenset({"mlp", "ldp", "ldpv2", "adapter"})
_POS_ADDED = frozenset({"gemma3", "idefics3", "janus_pro", "phi4"})
# Towers that embed patches with the plain conv; its kernel is [patch, patch, 3, width].
_CONV_PATCH_EMBD = _POS_LOOKUP | _POS_ADDED | frozenset({"internvl", "pixtral", "lightonocr", "qwen2vl_merger",
                                                          "qwen2.5vl_merger", "llama4", "kimivl", "lfm2"})

# Towers built from clip.cpp's standard transformer layers ({v,a}.blk.N.attn_*, ffn_*, ln1/ln2).
_STANDARD_TOWERS = _CONV_PATCH_EMBD | frozenset({"resampler", "qwen3vl_merger", "ultravox", "qwen2a", "voxtral",
                                                  "glma", "meralion", "musicflamingo"})

# The keys mtmd reads with a typed getter that asserts the stored type (gguf_get_val_u32 & co.
# abort on a mismatch, so a flipped type byte would kill the process). "%s" is vision or audio.
_CLIP_KEY_TYPES: dict[str, int] = {
    "general.name": T_STRING, "general.description": T_STRING,
    "clip.projector_type": T_STRING, "clip.vision.projector_type": T_STRING, "clip.audio.projector_type": T_STRING,
    "clip.gen.audio.projector_type": T_STRING, "clip.gen.audio.model_variant": T_STRING,
    "clip.vision.mm_patch_merge_type": T_STRING,
    "clip.has_vision_encoder": T_BOOL, "clip.has_audio_encoder": T_BOOL, "clip.has_gen_audio_encoder": T_BOOL,
    "clip.use_gelu": T_BOOL, "clip.use_silu": T_BOOL, "clip.minicpmv_version": T_I32,
    "clip.vision.swiglu_clamp": T_F32,
}
for _prefix in ("vision", "audio", "gen.audio"):
    for _k in ("attention.head_count", "attention.head_count_kv", "attention.head_dim", "block_count",
               "embedding_length", "feed_forward_length", "projection_dim"):
        _CLIP_KEY_TYPES[f"clip.{_prefix}.{_k}"] = T_U32
    _CLIP_KEY_TYPES[f"clip.{_prefix}.attention.layer_norm_epsilon"] = T_F32
for _k in ("clip.minicpmv_query_num", "clip.vision.image_size", "clip.vision.patch_size",
           "clip.vision.image_min_pixels", "clip.vision.image_max_pixels", "clip.vision.n_wa_pattern",
           "clip.vision.preproc_image_size", "clip.vision.preproc_min_tiles", "clip.vision.preproc_max_tiles",
           "clip.vision.projector.scale_factor", "clip.vision.projector.query_side",
           "clip.vision.projector.window_side", "clip.vision.spatial_merge_size", "clip.vision.window_size",
           "clip.vision.expert_used_count", "clip.vision.sam.block_count", "clip.vision.sam.embedding_length",
           "clip.vision.sam.head_count", "clip.audio.num_mel_bins", "clip.audio.chunk_size",
           "clip.audio.conv_kernel_size", "clip.audio.local_block_count", "clip.audio.local_group_size",
           "clip.audio.max_pos_emb", "clip.audio.projector.downsample_rate", "clip.audio.projector.head_count",
           "clip.audio.projector.stack_factor", "clip.audio.projector.window_size", "clip.audio.rvq.num_quantizers",
           "clip.audio.subsampling_factor", "clip.audio.window_size"):
    _CLIP_KEY_TYPES[_k] = T_U32
# arrays: key -> element type
_CLIP_ARRAY_TYPES: dict[str, int] = {
    "clip.vision.image_mean": T_F32, "clip.vision.image_std": T_F32, "clip.vision.image_grid_pinpoints": T_I32,
    "clip.vision.feature_layer": T_I32, "clip.audio.feature_layer": T_I32, "clip.vision.wa_layer_indexes": T_I32,
    "clip.vision.wa_pattern_mode": T_I32, "clip.audio.wa_pattern_mode": T_I32,
    "clip.vision.projector.spatial_offsets": T_I32, "clip.audio.rvq.codebook_size": T_I32,
}


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


# --- typed access with errors that name the key -------------------------------------------------


def _describe(value: Any) -> str:
    if isinstance(value, (list, np.ndarray)):
        return f"an array of {len(value)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _get(g: GGUFFile, key: str, *, required: bool) -> Any:
    if key not in g.metadata:
        if required:
            raise g.fail(f"required key {key!r} is missing")
        return None
    return g.metadata[key]


def _int(g: GGUFFile, key: str, lo: int, hi: int, *, required: bool = True) -> int | None:
    value = _get(g, key, required=required)
    if value is None:
        return None
    vtype = g.types[key][0]
    if vtype not in _INT_TYPES:
        raise g.fail(f"{key} = {_describe(value)} must be an integer, not {_TYPE_NAMES[vtype]}")
    if not lo <= value <= hi:
        raise g.fail(f"{key} = {value} is outside [{lo}, {hi}]")
    return int(value)


def _float(g: GGUFFile, key: str, *, required: bool = True, positive: bool = True,
           hi: float = 3.4e38) -> float | None:
    value = _get(g, key, required=required)
    if value is None:
        return None
    vtype = g.types[key][0]
    if vtype not in _FLOAT_TYPES:
        raise g.fail(f"{key} = {_describe(value)} must be a float, not {_TYPE_NAMES[vtype]}")
    if not math.isfinite(value) or value > hi or (value <= 0 if positive else value < 0):
        bound = "> 0" if positive else ">= 0"
        raise g.fail(f"{key} = {value:g} must be finite and {bound}" + (f" and at most {hi:g}" if hi < 3e38 else ""))
    return float(value)


def _str(g: GGUFFile, key: str, *, required: bool = True) -> str | None:
    value = _get(g, key, required=required)
    if value is None:
        return None
    if g.types[key][0] != T_STRING:
        raise g.fail(f"{key} = {_describe(value)} must be a string, not {_TYPE_NAMES[g.types[key][0]]}")
    return str(value)


def _per_layer(g: GGUFFile, key: str, n_layer: int, lo: int, hi: int, *, required: bool) -> list[int] | None:
    """A hyperparameter given once or per layer (llama.cpp's get_key_or_arr)."""
    value = _get(g, key, required=required)
    if value is None:
        return None
    vtype, etype = g.types[key]
    if vtype == T_ARRAY:
        if etype not in _INT_TYPES:
            raise g.fail(f"{key} is an array of {_TYPE_NAMES.get(etype or 0, str(etype))}, not integers")
        if len(value) != n_layer:
            raise g.fail(f"{key} has {len(value)} entries but block_count is {n_layer}")
        values = [int(x) for x in value]
        for i, x in enumerate(values):
            if not lo <= x <= hi:
                raise g.fail(f"{key}[{i}] = {x} is outside [{lo}, {hi}]")
        return values
    single = _int(g, key, lo, hi)
    assert single is not None
    return [single] * n_layer


def _tensor(g: GGUFFile, name: str, *, required: bool = True) -> TensorInfo | None:
    t = g.tensors.get(name)
    if t is None and required:
        raise g.fail(f"required tensor {name!r} is missing")
    return t


_FLOAT_TENSOR_TYPES = frozenset({0, 1, 30})  # F32, F16, BF16
_INTEGER_TENSOR_TYPES = frozenset({24, 25, 26, 27, 28})  # I8, I16, I32, I64, F64: not weights llama.cpp runs


def _check_tensor_types(g: GGUFFile, *, vectors_float: bool) -> None:
    for t in g.tensors.values():
        if t.ggml_type in _INTEGER_TENSOR_TYPES:
            raise g.fail(f"tensor {t.name!r} has type {GGML_TYPES[t.ggml_type][0]}; weights are float or quantized")
        if vectors_float and len(t.shape) <= 1 and t.ggml_type not in _FLOAT_TENSOR_TYPES:
            raise g.fail(f"tensor {t.name!r} (a vector) has type {GGML_TYPES[t.ggml_type][0]}; "
                         "norms and biases are F32, F16 or BF16")


def _check_biases(g: GGUFFile) -> None:
    """A bias has one value per output of its weight (linear: rows; conv: output channels; norm: width)."""
    for name, bias in g.tensors.items():
        if not name.endswith(".bias"):
            continue
        weight = g.tensors.get(name[:-5] + ".weight")
        if weight is None or not weight.shape:
            continue
        # ggml order: a conv kernel (conv1d [K, IC, OC], conv2d [KW, KH, IC, OC]) has its outputs last
        want = weight.shape[0] if len(weight.shape) == 1 else weight.shape[-1] if len(weight.shape) >= 3 \
            else weight.shape[1]
        if math.prod(bias.shape) != want:
            raise g.fail(f"tensor {name!r} has shape {list(bias.shape)} but its weight has shape "
                         f"{list(weight.shape)} ({want} outputs)")


def _dims(t: TensorInfo) -> tuple[int, int, int, int]:
    padded = tuple(t.shape) + (1,) * (GGML_MAX_DIMS - len(t.shape))
    return padded  # type: ignore[return-value]


# --- text model ---------------------------------------------------------------------------------


def check_text_model(path: str | os.PathLike[str]) -> GGUFFile:
    """Validate a GGUF text model; returns the parsed header. Raises ModelLoadError naming the key."""
    g = read_gguf(path)
    arch = _str(g, "general.architecture")
    assert arch is not None
    if arch == "clip":
        raise g.fail("general.architecture = 'clip': this is a projector (mmproj), not a text model; "
                     "pass it as mmproj_path")
    if arch not in TEXT_ARCHITECTURES:
        raise g.fail(f"general.architecture = {_describe(arch)} is not a text model architecture llava-kv "
                     f"loads (one of {', '.join(sorted(TEXT_ARCHITECTURES))})")
    _check_split(g)
    a = arch
    n_layer = _int(g, f"{a}.block_count", 1, LLAMA_MAX_LAYERS)
    assert n_layer is not None
    n_embd = _int(g, f"{a}.embedding_length", 1, MAX_EMBD)
    assert n_embd is not None
    _int(g, f"{a}.context_length", 1, MAX_CONTEXT)
    hybrid = a in _HYBRID_ARCHITECTURES
    n_head = _per_layer(g, f"{a}.attention.head_count", n_layer, 0 if hybrid else 1, MAX_HEADS, required=True)
    assert n_head is not None
    n_head_kv = _per_layer(g, f"{a}.attention.head_count_kv", n_layer, 0, MAX_HEADS, required=False) or n_head
    n_ff = _per_layer(g, f"{a}.feed_forward_length", n_layer, 0, MAX_FF, required=False)
    n_expert = _int(g, f"{a}.expert_count", 0, LLAMA_MAX_EXPERTS, required=False) or 0
    if n_ff is not None and n_expert == 0 and not hybrid and min(n_ff) == 0:
        raise g.fail(f"{a}.feed_forward_length = 0 in a model without experts")
    per_layer = any(g.types.get(f"{a}.attention.{k}", (None,))[0] == T_ARRAY for k in ("head_count", "head_count_kv"))
    for il in range(n_layer):
        h, kv = n_head[il], n_head_kv[il]
        where = f"[{il}]" if per_layer else ""
        if h == 0:
            if kv:
                raise g.fail(f"{a}.attention.head_count_kv{where} = {kv} in a layer with no attention heads")
            continue
        if kv == 0 and not hybrid:
            raise g.fail(f"{a}.attention.head_count_kv{where} = 0 must be > 0")
        if kv and (kv > h or h % kv):
            raise g.fail(f"{a}.attention.head_count_kv{where} = {kv} must divide "
                         f"{a}.attention.head_count{where} = {h}")
    key_length = _int(g, f"{a}.attention.key_length", 1, MAX_HEAD_DIM, required=False)
    _int(g, f"{a}.attention.value_length", 1, MAX_HEAD_DIM, required=False)
    h0 = next((h for h in n_head if h > 0), 0)
    if h0 and key_length is None and a not in _MLA_ARCHITECTURES and n_embd % h0:
        raise g.fail(f"{a}.attention.head_count = {h0} must divide {a}.embedding_length = {n_embd} "
                     f"(or the file must give {a}.attention.key_length)")
    if h0 and key_length is None and n_embd < h0:
        raise g.fail(f"{a}.attention.head_count = {h0} is larger than {a}.embedding_length = {n_embd}")
    _check_experts(g, a, n_layer, n_expert)
    eps = [_float(g, f"{a}.attention.layer_norm_rms_epsilon", required=False, hi=1.0),
           _float(g, f"{a}.attention.layer_norm_epsilon", required=False, hi=1.0)]
    if eps == [None, None] and not hybrid:
        raise g.fail(f"required key {a}.attention.layer_norm_rms_epsilon (or layer_norm_epsilon) is missing")
    for key in ("rope.freq_base", "rope.freq_base_swa", "rope.scaling.factor", "rope.scale_linear",
                "attn_logit_softcapping", "final_logit_softcapping"):
        _float(g, f"{a}.{key}", required=False)
    for key in ("rope.scaling.attn_factor", "rope.scaling.alpha", "embedding_scale", "residual_scale", "logit_scale",
                "attention.scale"):
        _float(g, f"{a}.{key}", required=False, positive=False)
    scaling = _str(g, f"{a}.rope.scaling.type", required=False)
    if scaling is not None and scaling not in _ROPE_SCALING_TYPES:
        raise g.fail(f"{a}.rope.scaling.type = {_describe(scaling)} is not one of {sorted(_ROPE_SCALING_TYPES)}")
    _int(g, f"{a}.rope.dimension_count", 0, MAX_HEAD_DIM, required=False)
    _int(g, f"{a}.rope.scaling.original_context_length", 0, MAX_CONTEXT, required=False)
    _int(g, f"{a}.attention.sliding_window", 0, (1 << 31) - 1, required=False)
    n_vocab = _check_vocab(g, a)
    _check_tensor_types(g, vectors_float=False)
    _check_text_tensors(g, a, n_layer, n_embd, n_vocab, hybrid)
    return g


def _check_split(g: GGUFFile) -> None:
    count = g.metadata.get("split.count")
    if count is not None and (g.types["split.count"][0] not in _INT_TYPES or count != 1):
        raise g.fail(f"split.count = {_describe(count)}: split GGUF files are not supported; merge them "
                     "first (llama-gguf-split --merge)")


def _check_experts(g: GGUFFile, a: str, n_layer: int, n_expert: int) -> None:
    used = _per_layer(g, f"{a}.expert_used_count", n_layer, 0, LLAMA_MAX_EXPERTS, required=False) or [0]
    groups = _int(g, f"{a}.expert_group_count", 0, LLAMA_MAX_EXPERTS, required=False) or 0
    group_used = _int(g, f"{a}.expert_group_used_count", 0, LLAMA_MAX_EXPERTS, required=False) or 0
    _int(g, f"{a}.nextn_predict_layers", 0, n_layer, required=False)
    most = max(used)
    if most > n_expert:
        raise g.fail(f"{a}.expert_used_count = {most} is more than {a}.expert_count = {n_expert}")
    if n_expert > 0:
        if most == 0:
            raise g.fail(f"{a}.expert_used_count must be > 0 when {a}.expert_count = {n_expert}")
        if groups >= n_expert:
            raise g.fail(f"{a}.expert_group_count = {groups} must be below {a}.expert_count = {n_expert}")
        if groups > 1 and (n_expert % groups or not 0 < group_used < groups):
            raise g.fail(f"{a}.expert_group_count = {groups} must divide {a}.expert_count = {n_expert} and "
                         f"{a}.expert_group_used_count = {group_used} must be in [1, {groups - 1}]")
    elif groups:
        raise g.fail(f"{a}.expert_group_count = {groups} in a model without experts")


def _check_vocab(g: GGUFFile, a: str) -> int:
    model = _str(g, "tokenizer.ggml.model")
    if model not in _TOKENIZER_MODELS:
        raise g.fail(f"tokenizer.ggml.model = {_describe(model)} is not a tokenizer llama.cpp knows "
                     f"({', '.join(sorted(_TOKENIZER_MODELS))})")
    key = "tokenizer.ggml.tokens"
    tokens = _get(g, key, required=True)
    if g.types[key] != (T_ARRAY, T_STRING):
        raise g.fail(f"{key} must be an array of strings")
    n = len(tokens)
    if not 0 < n <= MAX_VOCAB:
        raise g.fail(f"{key} has {n} tokens (must be in [1, {MAX_VOCAB}])")
    seen: dict[bytes, int] = {}
    for i, tok in enumerate(tokens):
        # As llama.cpp reads each token: a C string (up to its first NUL byte), an empty one renamed.
        text = tok.split(b"\0", 1)[0] or f"[EMPTY_{i}]".encode()
        j = seen.setdefault(text, i)
        if j != i:
            raise g.fail(f"{key}: token {i} {text.decode('utf-8', 'replace')!r} duplicates token {j}")
    for other, etypes in (("tokenizer.ggml.scores", (T_F32, T_I32)), ("tokenizer.ggml.token_type", (T_I32,))):
        if other in g.metadata:
            vtype, etype = g.types[other]
            if vtype != T_ARRAY or etype not in etypes:
                raise g.fail(f"{other} must be an array of {' or '.join(_TYPE_NAMES[t] for t in etypes)}")
            if len(g.metadata[other]) != n:
                raise g.fail(f"{other} has {len(g.metadata[other])} entries for {n} tokens")
    if "tokenizer.ggml.scores" in g.metadata and g.types["tokenizer.ggml.scores"][1] == T_F32:
        if not np.isfinite(g.metadata["tokenizer.ggml.scores"]).all():
            raise g.fail("tokenizer.ggml.scores holds a NaN or infinite score")
    if "tokenizer.ggml.merges" in g.metadata and g.types["tokenizer.ggml.merges"] != (T_ARRAY, T_STRING):
        raise g.fail("tokenizer.ggml.merges must be an array of strings")
    if model == "gpt2" and "tokenizer.ggml.merges" not in g.metadata and \
            g.metadata.get("tokenizer.ggml.pre") != "kimi-k2":
        raise g.fail("required key 'tokenizer.ggml.merges' is missing (a gpt2 tokenizer needs its merges)")
    for flag, id_key in (("add_bos_token", "bos_token_id"), ("add_eos_token", "eos_token_id"),
                         ("add_sep_token", "seperator_token_id")):
        on = g.metadata.get(f"tokenizer.ggml.{flag}")
        if f"tokenizer.ggml.{flag}" in g.metadata and g.types[f"tokenizer.ggml.{flag}"][0] != T_BOOL:
            raise g.fail(f"tokenizer.ggml.{flag} = {_describe(on)} must be a bool")
        token = _int(g, f"tokenizer.ggml.{id_key}", 0, (1 << 32) - 1, required=False)
        if on and token is None and flag == "add_bos_token":
            token = _DEFAULT_BOS.get(model)
        if on and (token is None or token >= n):
            raise g.fail(f"tokenizer.ggml.{flag} is true but tokenizer.ggml.{id_key} = {token} is not one of "
                         f"the {n} tokens")
    return n


def _layer_of(name: str) -> int | None:
    if not name.startswith("blk."):
        return None
    head = name[4:].split(".", 1)[0]
    return int(head) if head.isdigit() else -1


def _check_text_tensors(g: GGUFFile, a: str, n_layer: int, n_embd: int, n_vocab: int, hybrid: bool) -> None:
    embd = _tensor(g, "token_embd.weight")
    assert embd is not None
    if len(embd.shape) != 2 or embd.shape[1] != n_vocab:
        raise g.fail(f"tensor 'token_embd.weight' has shape {list(embd.shape)}; the vocabulary has {n_vocab} "
                     "tokens (tokenizer.ggml.tokens), which must be its row count")
    if a != "gemma3n" and embd.shape[0] != n_embd:
        raise g.fail(f"tensor 'token_embd.weight' has rows of {embd.shape[0]} but {a}.embedding_length = {n_embd}")
    out = _tensor(g, "output.weight", required=False)
    if out is not None and (len(out.shape) != 2 or out.shape[1] != n_vocab):
        raise g.fail(f"tensor 'output.weight' has shape {list(out.shape)}, not {n_vocab} rows (one per token)")
    norm = _tensor(g, "output_norm.weight")
    assert norm is not None
    if norm.shape[0] != n_embd:
        raise g.fail(f"tensor 'output_norm.weight' has shape {list(norm.shape)}; "
                     f"{a}.embedding_length = {n_embd}")
    layers: dict[int, set[str]] = {}
    for name in g.tensors:
        il = _layer_of(name)
        if il is None:
            continue
        if il < 0 or il >= n_layer:
            raise g.fail(f"tensor {name!r} belongs to no layer: {a}.block_count = {n_layer}")
        layers.setdefault(il, set()).add(name.split(".", 2)[2])
    missing = [il for il in range(n_layer) if il not in layers]
    if missing:
        raise g.fail(f"{a}.block_count = {n_layer} but layer {missing[0]} has no tensors "
                     f"(layers with tensors: {len(layers)})")
    if hybrid:
        return
    for il in range(n_layer):
        names = layers[il]
        if not names & {"attn_q.weight", "attn_qkv.weight", "attn_q_a.weight", "attn_q_b.weight"}:
            raise g.fail(f"required tensor 'blk.{il}.attn_q.weight' (or attn_qkv) is missing")
        if "attn_output.weight" not in names:
            raise g.fail(f"required tensor 'blk.{il}.attn_output.weight' is missing")


# --- projector ----------------------------------------------------------------------------------


def _check_clip_types(g: GGUFFile) -> None:
    for key, (vtype, etype) in g.types.items():
        want = _CLIP_KEY_TYPES.get(key)
        if want is not None and vtype != want:
            raise g.fail(f"{key} = {_describe(g.metadata[key])} must be a {_TYPE_NAMES[want]}, "
                         f"not {_TYPE_NAMES[vtype]}")
        want_elem = _CLIP_ARRAY_TYPES.get(key)
        if want_elem is not None and (vtype != T_ARRAY or etype != want_elem):
            raise g.fail(f"{key} must be an array of {_TYPE_NAMES[want_elem]}")


def check_projector(path: str | os.PathLike[str]) -> GGUFFile:
    """Validate a GGUF mmproj projector; returns the parsed header. Raises ModelLoadError naming the key."""
    g = read_gguf(path)
    arch = _str(g, "general.architecture")
    if arch != "clip":
        raise g.fail(f"general.architecture = {_describe(arch)}: a projector (mmproj) file says 'clip'; "
                     "is this the text model?")
    _check_clip_types(g)
    _check_tensor_types(g, vectors_float=True)
    _check_biases(g)
    has_vision = bool(g.metadata.get("clip.has_vision_encoder", False))
    has_audio = bool(g.metadata.get("clip.has_audio_encoder", False))
    if not (has_vision or has_audio or g.metadata.get("clip.has_gen_audio_encoder", False)):
        raise g.fail("clip.has_vision_encoder and clip.has_audio_encoder are both missing or false: "
                     "the projector encodes nothing")
    for modality, present in (("vision", has_vision), ("audio", has_audio)):
        if not present:
            continue
        proj = g.metadata.get("clip.projector_type") or g.metadata.get(f"clip.{modality}.projector_type")
        key = "clip.projector_type" if "clip.projector_type" in g.metadata else f"clip.{modality}.projector_type"
        if proj is None:
            raise g.fail(f"required key {key!r} is missing")
        if proj not in PROJECTOR_TYPES:
            raise g.fail(f"{key} = {_describe(proj)} is not a projector type mtmd knows")
        if proj == "qwen2.5o":
            proj = "qwen2.5vl_merger" if modality == "vision" else "qwen2a"
        _check_tower(g, modality, str(proj))
    return g


def _check_tower(g: GGUFFile, m: str, proj: str) -> None:
    p = f"clip.{m}"
    n_embd = _int(g, f"{p}.embedding_length", 2, MAX_EMBD)
    n_head = _int(g, f"{p}.attention.head_count", 1, MAX_HEADS)
    assert n_embd is not None and n_head is not None
    head_dim = _int(g, f"{p}.attention.head_dim", 1, MAX_HEAD_DIM, required=False)
    if head_dim is None and n_embd % n_head:
        raise g.fail(f"{p}.attention.head_count = {n_head} must divide {p}.embedding_length = {n_embd}")
    if head_dim is None and n_head > n_embd:
        raise g.fail(f"{p}.attention.head_count = {n_head} is larger than {p}.embedding_length = {n_embd}")
    n_head_kv = _int(g, f"{p}.attention.head_count_kv", 1, MAX_HEADS, required=False)
    if n_head_kv is not None and n_head % n_head_kv:
        raise g.fail(f"{p}.attention.head_count_kv = {n_head_kv} must divide {p}.attention.head_count = {n_head}")
    _int(g, f"{p}.feed_forward_length", 1, MAX_FF)
    n_layer = _int(g, f"{p}.block_count", 1, CLIP_MAX_LAYERS)
    _int(g, f"{p}.projection_dim", 1, MAX_EMBD)
    _float(g, f"{p}.attention.layer_norm_epsilon", hi=1.0)
    feature_layers = g.metadata.get(f"{p}.feature_layer")
    if feature_layers is not None and len(feature_layers) and \
            (int(np.max(feature_layers)) > (n_layer or 0) or int(np.min(feature_layers)) < -1):
        raise g.fail(f"{p}.feature_layer holds a layer outside [-1, {n_layer}]")
    if proj in _STANDARD_TOWERS:
        d_head = head_dim or n_embd // n_head
        _check_tower_layers(g, "a" if m == "audio" else "v", n_layer or 0, n_embd, n_head * d_head,
                            (n_head_kv or n_head) * d_head)
    if m == "audio":
        _int(g, "clip.audio.num_mel_bins", 1, 1 << 12)
        return
    image_size = _int(g, "clip.vision.image_size", 0, CLIP_MAX_IMAGE_SIZE)
    patch_size = _int(g, "clip.vision.patch_size", 2, 65535)
    assert image_size is not None and patch_size is not None
    if image_size % patch_size:
        raise g.fail(f"clip.vision.patch_size = {patch_size} must divide clip.vision.image_size = {image_size}")
    if image_size < patch_size and (proj in _POS_LOOKUP or proj in _POS_ADDED):
        raise g.fail(f"clip.vision.image_size = {image_size} is smaller than one patch ({patch_size})")
    for key in ("clip.vision.projector.scale_factor", "clip.vision.spatial_merge_size"):
        _int(g, key, 1, 65535, required=False)
    lo_px = _int(g, "clip.vision.image_min_pixels", 0, (1 << 31) - 1, required=False)
    hi_px = _int(g, "clip.vision.image_max_pixels", 0, (1 << 31) - 1, required=False)
    if lo_px is not None and hi_px is not None and hi_px < lo_px:
        raise g.fail(f"clip.vision.image_max_pixels = {hi_px} is below clip.vision.image_min_pixels = {lo_px}")
    for key in ("clip.vision.image_mean", "clip.vision.image_std"):
        values = g.metadata.get(key)
        if values is not None and (len(values) < 3 or not np.isfinite(values).all()):
            raise g.fail(f"{key} must hold 3 finite numbers")
    std = g.metadata.get("clip.vision.image_std")
    if std is not None and len(std) >= 3 and (np.asarray(std[:3]) == 0).any():
        raise g.fail("clip.vision.image_std holds a 0 (pixels are divided by it)")
    pins = g.metadata.get("clip.vision.image_grid_pinpoints")
    if pins is not None and (len(pins) % 2 or (len(pins) and int(np.min(pins)) <= 0)):
        raise g.fail("clip.vision.image_grid_pinpoints must be pairs of positive sizes")

    if proj == "mlp":  # the llava projector: two linear layers, the tower's width in, the text width out
        first, second = _tensor(g, "mm.0.weight"), _tensor(g, "mm.2.weight")
        assert first is not None and second is not None
        _tensor(g, "mm.0.bias")  # clip's graph adds both biases unconditionally (a missing one segfaulted: fuzz)
        _tensor(g, "mm.2.bias")
        if len(first.shape) != 2 or len(second.shape) != 2 or first.shape[0] != n_embd or \
                second.shape[0] != first.shape[1]:
            raise g.fail(f"tensors 'mm.0.weight' {list(first.shape)} and 'mm.2.weight' {list(second.shape)} do not "
                         f"chain from clip.vision.embedding_length = {n_embd}")
    if proj in _NO_PATCH_EMBD:
        return
    patch = _tensor(g, "v.patch_embd.weight")
    assert patch is not None
    if proj in _CONV_PATCH_EMBD:
        d = _dims(patch)
        if d[0] != patch_size or d[1] != patch_size or d[3] != n_embd:
            raise g.fail(f"tensor 'v.patch_embd.weight' has shape {list(patch.shape)}, expected "
                         f"[{patch_size}, {patch_size}, channels, {n_embd}] from clip.vision.patch_size and "
                         f"clip.vision.embedding_length")
    n_patches = (image_size // patch_size) ** 2
    pos = _tensor(g, "v.position_embd.weight", required=proj in _POS_LOOKUP or proj in _POS_ADDED)
    if pos is None:
        return
    if pos.shape[0] != n_embd:
        raise g.fail(f"tensor 'v.position_embd.weight' has shape {list(pos.shape)}; "
                     f"clip.vision.embedding_length = {n_embd}")
    rows = _dims(pos)[1]
    if proj in _POS_LOOKUP:
        need = n_patches + (1 if "v.class_embd" in g.tensors else 0)
        if rows < need:
            raise g.fail(f"tensor 'v.position_embd.weight' has {rows} positions but clip.vision.image_size = "
                         f"{image_size} / patch_size = {patch_size} needs {need}")
    elif proj in _POS_ADDED and rows != n_patches:
        raise g.fail(f"tensor 'v.position_embd.weight' has {rows} positions but clip.vision.image_size = "
                     f"{image_size} / patch_size = {patch_size} makes {n_patches} patches")


def _check_tower_layers(g: GGUFFile, prefix: str, n_layer: int, n_embd: int, q_out: int, kv_out: int) -> None:
    """The transformer layers every standard ViT / Whisper tower has (clip.cpp load_tensors): mtmd
    looks them up without checking shapes, and a missing or misshapen one crashes the graph."""
    for name, t in g.tensors.items():
        parts = name.split(".")
        if len(parts) >= 3 and parts[0] == prefix and parts[1] == "blk" and \
                (not parts[2].isdigit() or int(parts[2]) >= n_layer):
            raise g.fail(f"tensor {name!r} belongs to no layer: clip block_count = {n_layer}")
    for il in range(n_layer):
        def get(part: str, required: bool = False) -> TensorInfo | None:
            return _tensor(g, f"{prefix}.blk.{il}.{part}", required=required)

        qkv = get("attn_qkv.weight")
        q, k, v = get("attn_q.weight"), get("attn_k.weight"), get("attn_v.weight")
        if qkv is None and None in (q, k, v):
            missing = next(n for n, t in (("attn_q", q), ("attn_k", k), ("attn_v", v)) if t is None)
            raise g.fail(f"required tensor '{prefix}.blk.{il}.{missing}.weight' (or attn_qkv) is missing")
        out = get("attn_out.weight", required=True)
        up, down = get("ffn_up.weight"), get("ffn_down.weight")
        if (up is None or down is None) and get("ffn_gate_exps.weight") is None:
            raise g.fail(f"required tensor '{prefix}.blk.{il}.{'ffn_up' if up is None else 'ffn_down'}.weight' "
                         "is missing")
        expect: list[tuple[TensorInfo | None, int, int]] = [(out, 1, n_embd), (up, 0, n_embd), (down, 1, n_embd),
                                                             (get("ffn_gate.weight"), 0, n_embd)]
        if qkv is not None:
            expect += [(qkv, 0, n_embd), (qkv, 1, q_out + 2 * kv_out)]
        else:
            expect += [(q, 0, n_embd), (k, 0, n_embd), (v, 0, n_embd), (q, 1, q_out), (k, 1, kv_out),
                       (v, 1, kv_out)]
        if up is not None and down is not None:
            expect.append((down, 0, up.shape[1] if len(up.shape) > 1 else -1))
        for part in ("ln1.weight", "ln2.weight"):
            expect.append((get(part), 0, n_embd))
        for tensor, dim, want in expect:
            if tensor is not None and (len(tensor.shape) <= dim or tensor.shape[dim] != want):
                raise g.fail(f"tensor {tensor.name!r} has shape {list(tensor.shape)}; expected {want} in dimension {dim} "
                             f"from the tower's embedding_length / head counts")


def check_model_files(model_path: str | os.PathLike[str], mmproj_path: str | os.PathLike[str] | None = None) -> None:
    """Validate the text model and, when given, its projector, before llama.cpp sees either."""
    for path, check in ((model_path, check_text_model), (mmproj_path, check_projector)):
        if path is None or path == "":
            continue
        try:
            check(path)
        except ModelLoadError:
            raise
        except OSError as e:
            raise ModelLoadError(f"{os.fspath(path)}: cannot be read: {e}") from e

