"""Malformed GGUF files raise ModelLoadError naming the key; they never kill the process.

Each mutated file is a copy of a generated tiny model with one value patched in place (same byte
length, so the file stays structurally valid and only the value is wrong) or rewritten with the
``gguf`` writer (a key or tensor left out, an array of the wrong length). Loads run in a child
process, so a crash is a test failure that shows the exit code and stderr, not a dead test run.
"""
from __future__ import annotations

import json
import math
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pytest

import llava_kv as lk
from llava_kv import gguf as gv
from llava_kv import testing
from llava_kv.testing import make_test_model

# Loads each (model, mmproj) pair given as JSON on stdin and, when it loads, decodes text (and an
# image) so that a value that only hurts at decode time (a NaN epsilon) is caught too. One line per
# pair: "ok", or the exception type and message; any crash ends the process with its signal.
CHILD = textwrap.dedent(r"""
    import json, sys
    import numpy as np
    import llava_kv as lk
    for model, mmproj in json.load(sys.stdin):
        try:
            with lk.Model.load(model, mmproj or None) as m:
                with m.session(n_ctx=512) as s:
                    s.append_text("USER: hello")
                    if mmproj:
                        s.append_image(np.full((96, 96, 3), 127, np.uint8))
                    s.append_text(" there")
                    s.logits()
            print("ok", flush=True)
        except lk.LlavaKVError as e:
            print(type(e).__name__ + ": " + str(e).replace("\n", " "), flush=True)
""")


def load_in_child(pairs: list[tuple[Path, Path | None]], timeout: float = 300) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps([[str(m), str(p or "")] for m, p in pairs]),
                          capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == len(pairs), (
        f"child exited with {proc.returncode} after {len(lines)} of {len(pairs)} files "
        f"(next: {pairs[len(lines)] if len(lines) < len(pairs) else None}); stderr tail:\n{proc.stderr[-3000:]}")
    return lines


# --- mutations ----------------------------------------------------------------------------------

_PACK = {gv.T_U8: "<B", gv.T_I8: "<b", gv.T_U16: "<H", gv.T_I16: "<h", gv.T_U32: "<I", gv.T_I32: "<i",
         gv.T_F32: "<f", gv.T_U64: "<Q", gv.T_I64: "<q", gv.T_F64: "<d", gv.T_BOOL: "<B"}


def patch(src: Path, dst: Path, edits: Iterable[tuple[int, bytes]]) -> Path:
    data = bytearray(src.read_bytes())
    for offset, raw in edits:
        data[offset:offset + len(raw)] = raw
    dst.write_bytes(bytes(data))
    return dst


def set_value(g: gv.GGUFFile, key: str, value: Any) -> tuple[int, bytes]:
    """Overwrite the scalar ``key`` with ``value`` in its stored type (or a same-length string)."""
    offset, length = g.value_spans[key]
    vtype = g.types[key][0]
    if vtype == gv.T_STRING:
        raw = value.encode()
        assert len(raw) == length, "a patched string keeps its length"
        return offset, raw
    return offset, struct.pack(_PACK[vtype], value)


def set_type(g: gv.GGUFFile, key: str, vtype: int) -> tuple[int, bytes]:
    """Change the stored type of a 4-byte scalar (the value bytes stay)."""
    return g.value_spans[key][0] - 4, struct.pack("<I", vtype)


def rename_tensor(g: gv.GGUFFile, name: str, new: str) -> tuple[int, bytes]:
    offset, length = g.tensor_name_spans[name]
    assert len(new) == length
    return offset, new.encode()


def token_span(g: gv.GGUFFile, index: int) -> tuple[int, int]:
    offset = g.value_spans["tokenizer.ggml.tokens"][0] + 12  # element type, count
    for i in range(index):
        offset += 8 + struct.unpack_from("<Q", Path(g.path).read_bytes(), offset)[0]
    return offset + 8, len(g.metadata["tokenizer.ggml.tokens"][index])


def rewrite(src: Path, dst: Path, *, drop_keys: Iterable[str] = (), drop_tensors: Iterable[str] = (),
            arrays: dict[str, tuple[list[Any], Any]] | None = None) -> Path:
    """A copy of ``src`` written with the gguf writer, minus some keys or tensors, or with arrays replaced."""
    import gguf

    drop_keys, drop_tensors, arrays = set(drop_keys), set(drop_tensors), arrays or {}
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_keys:
            continue
        if key in arrays:
            values, sub = arrays[key]
            writer.add_key_value(key, values, gguf.GGUFValueType.ARRAY, sub_type=sub)
        elif f.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[-1])
        else:
            writer.add_key_value(key, f.contents(), f.types[0])
    for t in reader.tensors:
        if t.name not in drop_tensors:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> testing.TestModel:
    return make_test_model(tmp_path_factory.mktemp("validation-models"), "tiny-llava")


@pytest.fixture(scope="module")
def text_header(tiny: testing.TestModel) -> gv.GGUFFile:
    return gv.read_gguf(tiny.model_path)


@pytest.fixture(scope="module")
def proj_header(tiny: testing.TestModel) -> gv.GGUFFile:
    return gv.read_gguf(tiny.mmproj_path)


NAN = float("nan")

# (case id, key, value, what the message must show)
TEXT_VALUES = [
    ("block_count-0", "llama.block_count", 0, "0"),
    ("block_count-2^31-1", "llama.block_count", 2**31 - 1, str(2**31 - 1)),
    ("block_count-2^32-1", "llama.block_count", 2**32 - 1, str(2**32 - 1)),
    ("block_count-3", "llama.block_count", 3, "3"),  # more layers than the file has
    ("block_count-1", "llama.block_count", 1, "1"),  # fewer: blk.1 belongs to no layer
    ("rms_eps-negative", "llama.attention.layer_norm_rms_epsilon", -1e-6, "-1e-06"),
    ("rms_eps-nan", "llama.attention.layer_norm_rms_epsilon", NAN, "nan"),
    ("rms_eps-inf", "llama.attention.layer_norm_rms_epsilon", math.inf, "inf"),
    ("freq_base-0", "llama.rope.freq_base", 0.0, "= 0 "),
    ("freq_base-nan", "llama.rope.freq_base", NAN, "nan"),
    ("head_count-0", "llama.attention.head_count", 0, "0"),
    ("head_count-3", "llama.attention.head_count", 3, "3"),  # does not divide 64
    ("head_count-huge", "llama.attention.head_count", 2**31, str(2**31)),
    ("head_count_kv-0", "llama.attention.head_count_kv", 0, "0"),
    ("head_count_kv-3", "llama.attention.head_count_kv", 3, "3"),  # does not divide 4
    ("embedding_length-0", "llama.embedding_length", 0, "0"),
    ("embedding_length-huge", "llama.embedding_length", 2**32 - 1, str(2**32 - 1)),
    ("embedding_length-48", "llama.embedding_length", 48, "48"),  # tensors say 64
    ("feed_forward_length-0", "llama.feed_forward_length", 0, "0"),
    ("context_length-0", "llama.context_length", 0, "0"),
]

PROJ_VALUES = [
    ("head_count-0", "clip.vision.attention.head_count", 0, "0"),
    ("head_count-7", "clip.vision.attention.head_count", 7, "7"),
    ("head_count-huge", "clip.vision.attention.head_count", 2**32 - 1, str(2**32 - 1)),
    ("embedding_length-1", "clip.vision.embedding_length", 1, "1"),
    ("embedding_length-7", "clip.vision.embedding_length", 7, "7"),
    ("embedding_length-huge", "clip.vision.embedding_length", 2**31 + 5, str(2**31 + 5)),
    ("patch_size-1", "clip.vision.patch_size", 1, "1"),
    ("patch_size-7", "clip.vision.patch_size", 7, "7"),
    ("patch_size-32", "clip.vision.patch_size", 32, "32"),  # divides 96, but the kernel is 16x16
    ("image_size-100", "clip.vision.image_size", 100, "100"),
    ("image_size-192", "clip.vision.image_size", 192, "192"),  # more patches than position embeddings
    ("eps-negative", "clip.vision.attention.layer_norm_epsilon", -1e-6, "-1e-06"),
    ("eps-nan", "clip.vision.attention.layer_norm_epsilon", NAN, "nan"),
    ("block_count-0", "clip.vision.block_count", 0, "0"),
    ("projection_dim-0", "clip.vision.projection_dim", 0, "0"),
    ("feed_forward_length-0", "clip.vision.feed_forward_length", 0, "0"),
]


def _check_errors(lines: list[str], cases: list[tuple[str, str, str]]) -> None:
    wrong = [(case, line) for line, (case, key, shown) in zip(lines, cases)
             if not (line.startswith("ModelLoadError: ") and key in line and shown in line)]
    assert not wrong, "\n".join(f"{case}: {line}" for case, line in wrong)


def test_malformed_text_model_values(tiny: testing.TestModel, text_header: gv.GGUFFile, tmp_path: Path) -> None:
    pairs, cases = [], []
    for case, key, value, shown in TEXT_VALUES:
        bad = patch(tiny.model_path, tmp_path / f"{case}.gguf", [set_value(text_header, key, value)])
        pairs.append((bad, tiny.mmproj_path))
        cases.append((case, key, shown))
    _check_errors(load_in_child(pairs), cases)


def test_malformed_projector_values(tiny: testing.TestModel, proj_header: gv.GGUFFile, tmp_path: Path) -> None:
    pairs, cases = [], []
    for case, key, value, shown in PROJ_VALUES:
        bad = patch(tiny.mmproj_path, tmp_path / f"{case}-mmproj.gguf", [set_value(proj_header, key, value)])
        pairs.append((tiny.model_path, bad))
        cases.append((case, key, shown))
    _check_errors(load_in_child(pairs), cases)


def test_malformed_structure(tiny: testing.TestModel, text_header: gv.GGUFFile, proj_header: gv.GGUFFile,
                             tmp_path: Path) -> None:
    """Wrong names, wrong types, duplicates, missing keys and tensors, arrays of the wrong length."""
    import gguf

    m, p, t, h = tiny.model_path, tiny.mmproj_path, text_header, proj_header
    tokens = t.metadata["tokenizer.ggml.tokens"]
    # two tokens of one length: the second becomes a copy of the first
    by_len: dict[int, int] = {}
    dup = next((by_len[len(tok)], i) for i, tok in enumerate(tokens) if by_len.setdefault(len(tok), i) != i)
    dup_offset, _ = token_span(t, dup[1])
    # a token equal to a shorter one up to a NUL byte: llama.cpp reads tokens as C strings (a fuzz finding)
    longer = max(range(len(tokens)), key=lambda i: len(tokens[i]))
    shorter = next(i for i, tok in enumerate(tokens) if 0 < len(tok) < len(tokens[longer]))
    nul_offset, _ = token_span(t, longer)
    nul_token = tokens[shorter] + b"\0" * (len(tokens[longer]) - len(tokens[shorter]))
    n = len(tokens)
    cases: list[tuple[str, Path, Path, str, str]] = [
        ("arch-garbage", patch(m, tmp_path / "arch.gguf", [set_value(t, "general.architecture", "lxmxa")]), p,
         "general.architecture", "lxmxa"),
        ("arch-clip", p, p, "general.architecture", "clip"),
        ("vocab-duplicate", patch(m, tmp_path / "dup.gguf", [(dup_offset, tokens[dup[0]])]), p,
         "tokenizer.ggml.tokens", f"duplicates token {dup[0]}"),
        ("vocab-duplicate-up-to-nul", patch(m, tmp_path / "dupnul.gguf", [(nul_offset, nul_token)]), p,
         "tokenizer.ggml.tokens", f"duplicates token {min(shorter, longer)}"),
        ("vocab-type", patch(m, tmp_path / "tokmodel.gguf", [set_value(t, "tokenizer.ggml.model", "xxxxx")]), p,
         "tokenizer.ggml.model", "xxxxx"),
        ("block_count-type", patch(m, tmp_path / "bc-type.gguf", [set_type(t, "llama.block_count", gv.T_F32)]), p,
         "llama.block_count", "float32"),
        ("rms_eps-missing", rewrite(m, tmp_path / "no-eps.gguf", drop_keys=["llama.attention.layer_norm_rms_epsilon"]),
         p, "layer_norm_rms_epsilon", "missing"),
        ("block_count-missing", rewrite(m, tmp_path / "no-bc.gguf", drop_keys=["llama.block_count"]), p,
         "llama.block_count", "missing"),
        ("tokens-missing", rewrite(m, tmp_path / "no-tokens.gguf", drop_keys=["tokenizer.ggml.tokens"]), p,
         "tokenizer.ggml.tokens", "missing"),
        ("scores-short", rewrite(m, tmp_path / "scores.gguf",
                                 arrays={"tokenizer.ggml.scores": ([0.0] * (n - 1), gguf.GGUFValueType.FLOAT32)}), p,
         "tokenizer.ggml.scores", f"{n - 1} entries"),
        ("token_type-long", rewrite(m, tmp_path / "types.gguf",
                                    arrays={"tokenizer.ggml.token_type": ([1] * (n + 3), gguf.GGUFValueType.INT32)}), p,
         "tokenizer.ggml.token_type", f"{n + 3} entries"),
        ("token_embd-missing", rewrite(m, tmp_path / "no-embd.gguf", drop_tensors=["token_embd.weight"]), p,
         "token_embd.weight", "missing"),
        ("output_norm-missing", rewrite(m, tmp_path / "no-norm.gguf", drop_tensors=["output_norm.weight"]), p,
         "output_norm.weight", "missing"),
        ("attn_q-missing", patch(m, tmp_path / "no-q.gguf", [rename_tensor(t, "blk.1.attn_q.weight",
                                                                           "blk.1.attn_x.weight")]), p,
         "blk.1.attn_q.weight", "missing"),
        ("layer-out-of-range", patch(m, tmp_path / "blk9.gguf", [rename_tensor(t, "blk.1.attn_q.weight",
                                                                               "blk.9.attn_q.weight")]), p,
         "blk.9.attn_q.weight", "block_count = 2"),
        ("patch_embd-missing", m, patch(p, tmp_path / "no-patch.gguf",
                                        [rename_tensor(h, "v.patch_embd.weight", "v.patch_embx.weight")]),
         "v.patch_embd.weight", "missing"),
        ("position_embd-missing", m, rewrite(p, tmp_path / "no-pos.gguf", drop_tensors=["v.position_embd.weight"]),
         "v.position_embd.weight", "missing"),
        # the llava projector's second bias under another name: clip's graph added a null tensor (a fuzz finding)
        ("mm.2.bias-renamed", m, patch(p, tmp_path / "mm3.gguf", [rename_tensor(h, "mm.2.bias", "mm.3.bias")]),
         "mm.2.bias", "missing"),
        ("projector_type-garbage", m, patch(p, tmp_path / "ptype.gguf", [set_value(h, "clip.projector_type", "mxp")]),
         "clip.projector_type", "mxp"),
        ("image_size-type", m, patch(p, tmp_path / "isize-type.gguf",
                                     [set_type(h, "clip.vision.image_size", gv.T_I32)]),
         "clip.vision.image_size", "int32"),
        ("eps-type", m, patch(p, tmp_path / "eps-type.gguf",
                              [set_type(h, "clip.vision.attention.layer_norm_epsilon", gv.T_U32)]),
         "layer_norm_epsilon", "uint32"),
        ("has_vision-false", m, patch(p, tmp_path / "novision.gguf", [set_value(h, "clip.has_vision_encoder", 0)]),
         "clip.has_vision_encoder", "false"),
        ("mmproj-is-text", m, m, "general.architecture", "llama"),
        ("truncated", patch(m, tmp_path / "trunc.gguf", []), p, "runs past the end", "truncated"),
    ]
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(m.read_bytes()[:-100])
    lines = load_in_child([(mm, pp) for _, mm, pp, _, _ in cases])
    _check_errors(lines, [(case, key, shown) for case, _, _, key, shown in cases])


def test_header_counts_and_lengths_are_bounded(tiny: testing.TestModel, text_header: gv.GGUFFile, tmp_path: Path) -> None:
    """Counts and lengths past the file's size are refused before anything is allocated."""
    m, t = tiny.model_path, text_header
    key_len_offset = 24  # first key's length: after magic, version, tensor count, kv count
    tok_offset = t.value_spans["tokenizer.ggml.tokens"][0]
    chat_offset, _ = t.value_spans["tokenizer.chat_template"]
    cases = {
        "tensor-count": [(8, struct.pack("<Q", 2**62))],
        "kv-count": [(16, struct.pack("<Q", 2**40))],
        "key-length": [(key_len_offset, struct.pack("<Q", 2**63))],
        "array-length": [(tok_offset + 4, struct.pack("<Q", 2**60))],
        "array-nested": [(tok_offset, struct.pack("<I", gv.T_ARRAY))],
        "string-length": [(chat_offset - 8, struct.pack("<Q", 2**50))],
        "version": [(4, struct.pack("<I", 7))],
        "magic": [(0, b"GGUX")],
        "value-type": [(t.value_spans["llama.block_count"][0] - 4, struct.pack("<I", 99))],
    }
    for name, edits in cases.items():
        with pytest.raises(lk.ModelLoadError, match="not a valid GGUF file"):
            gv.read_gguf(patch(m, tmp_path / f"{name}.gguf", edits))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(lk.ModelLoadError, match="too short"):
        lk.Model.load(empty)


def _tensor_info_edits(g: gv.GGUFFile, name: str) -> int:
    """Offset of the first dimension of tensor ``name`` in its info record."""
    offset, length = g.tensor_name_spans[name]
    return offset + length + 4


def test_tensor_table_is_checked_against_the_file(tiny: testing.TestModel, text_header: gv.GGUFFile, tmp_path: Path) -> None:
    m, t = tiny.model_path, text_header
    first = next(iter(t.tensors))
    dims_at = _tensor_info_edits(t, first)
    n_dims = len(t.tensors[first].shape)
    type_at = dims_at + 8 * n_dims
    offset_at = type_at + 4
    cases = {
        "negative dimension": [(dims_at, struct.pack("<q", -4))],
        "offset": [(offset_at, struct.pack("<Q", 64))],
        "ggml type": [(type_at, struct.pack("<I", 4))],  # Q4_2, removed from ggml
        "not a multiple of": [(type_at, struct.pack("<I", 12))],  # Q4_K rows of 256
        "runs past the end": [(dims_at + 8, struct.pack("<q", 2**40))],
    }
    for what, edits in cases.items():
        with pytest.raises(lk.ModelLoadError) as info:
            gv.read_gguf(patch(m, tmp_path / "tensor.gguf", edits))
        assert what in str(info.value) or "starts at data offset" in str(info.value), (what, str(info.value))


def _flips(g: gv.GGUFFile, data: bytes, n: int, seed: int) -> list[tuple[int, int]]:
    """``n`` (offset, xor mask) byte flips in the metadata region, half of them on the hyperparameter
    and tensor-table bytes (the vocabulary would otherwise take most of them)."""
    rng = random.Random(seed)
    hot: list[int] = list(range(24))
    for key, (offset, length) in g.value_spans.items():
        if g.types[key][0] != gv.T_ARRAY:
            hot.extend(range(offset - 12, offset + min(length, 16)))
    first_tensor = min((o for o, _ in g.tensor_name_spans.values()), default=g.data_offset)
    hot.extend(range(first_tensor - 8, g.data_offset))
    positions = [rng.choice(hot) for _ in range(n // 2)] + [rng.randrange(g.data_offset) for _ in range(n - n // 2)]
    return [(pos, rng.randrange(1, 256)) for pos in positions]


@pytest.mark.parametrize("which", ["model", "mmproj"])
def test_byte_flips_in_metadata_never_crash(tiny: testing.TestModel, text_header: gv.GGUFFile, proj_header: gv.GGUFFile,
                                           which: str, tmp_path: Path) -> None:
    src = tiny.model_path if which == "model" else tiny.mmproj_path
    g = text_header if which == "model" else proj_header
    data = src.read_bytes()
    pairs = []
    for k, (pos, mask) in enumerate(_flips(g, data, 120, seed=13 if which == "model" else 17)):
        bad = patch(src, tmp_path / f"flip{k}.gguf", [(pos, bytes([data[pos] ^ mask]))])
        pairs.append((bad, tiny.mmproj_path) if which == "model" else (tiny.model_path, bad))
    lines = load_in_child(pairs, timeout=600)
    others = [line for line in lines if line != "ok" and not line.startswith(("ModelLoadError: ", "LlavaKVError: "))]
    assert not others, others
    assert any(line.startswith("ModelLoadError: ") for line in lines)


@pytest.mark.parametrize("which", ["model", "mmproj"])
def test_validator_raises_only_model_load_error(tiny: testing.TestModel, text_header: gv.GGUFFile,
                                                proj_header: gv.GGUFFile, which: str, tmp_path: Path) -> None:
    """In process, many more flips: the validator itself raises nothing but ModelLoadError."""
    src = tiny.model_path if which == "model" else tiny.mmproj_path
    g = text_header if which == "model" else proj_header
    check = gv.check_text_model if which == "model" else gv.check_projector
    data = src.read_bytes()
    target = tmp_path / "flip.gguf"
    outcomes = {"ok": 0, "refused": 0}
    for pos, mask in _flips(g, data, 1500, seed=5):
        patch(src, target, [(pos, bytes([data[pos] ^ mask]))])
        try:
            check(target)
            outcomes["ok"] += 1
        except lk.ModelLoadError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0 and outcomes["ok"] > 0, outcomes


@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-gemma3"])
def test_presets_pass_validation(preset: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    tm = make_test_model(tmp_path_factory.mktemp(preset), preset)
    text = gv.check_text_model(tm.model_path)
    proj = gv.check_projector(tm.mmproj_path)
    assert text.metadata["general.architecture"] == tm.preset.arch
    assert proj.metadata["clip.projector_type"] == tm.preset.projector
    assert {"token_embd.weight", "output_norm.weight"} <= set(text.tensors)


@pytest.mark.slow
def test_realistic_preset_passes_validation() -> None:
    tm = make_test_model(None, "realistic")  # the shared cache: made once per machine
    gv.check_model_files(tm.model_path, tm.mmproj_path)
    assert len(gv.read_gguf(tm.model_path).metadata["tokenizer.ggml.tokens"]) == tm.preset.n_vocab


def test_accepted_names_are_llama_cpp_names() -> None:
    """Every architecture and projector type we accept is one the pinned llama.cpp defines."""
    root = Path(__file__).resolve().parents[1] / "third_party" / "llama.cpp"
    arch_src, proj_src = root / "src" / "llama-arch.cpp", root / "tools" / "mtmd" / "clip-impl.h"
    if not arch_src.is_file() or not proj_src.is_file():
        pytest.skip("third_party/llama.cpp is not populated")
    import re

    archs = set(re.findall(r'\{\s*LLM_ARCH_\w+,\s*"([^"]+)"\s*\}', arch_src.read_text()))
    projs = set(re.findall(r'\{\s*PROJECTOR_TYPE_\w+,\s*"([^"]+)"\s*\}', proj_src.read_text()))
    assert gv.TEXT_ARCHITECTURES <= archs, sorted(gv.TEXT_ARCHITECTURES - archs)
    assert gv.PROJECTOR_TYPES <= projs, sorted(gv.PROJECTOR_TYPES - projs)
    assert {"llama", "gemma3", "qwen2", "qwen2vl", "qwen3", "qwen3vl", "mistral3", "phi3"} <= gv.TEXT_ARCHITECTURES


# --- images -------------------------------------------------------------------------------------


def _png(width: int, height: int, body: bytes | None = None) -> bytes:
    """A PNG header declaring ``width`` x ``height`` RGB, with ``body`` as its (compressed) data."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    if body is None:
        body = zlib.compress(b"".join(b"\0" + bytes(3 * width) for _ in range(height)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


BAD_IMAGES = {
    "bomb-30000x30000": _png(30000, 30000, b""),  # Pillow's DecompressionBombError
    "over-our-limit": _png(9000, 9000, b""),  # Pillow lets it through; our limit does not
    "truncated-data": _png(16, 16)[:-30],  # OSError('image file is truncated')
    "truncated-ihdr": _png(16, 16)[:20],  # OSError('Truncated File Read') / ValueError('Truncated IHDR chunk')
    "broken-ihdr": _png(16, 16)[:16] + b"\xff" * 13 + _png(16, 16)[29:],  # SyntaxError('broken PNG file')
    "not-an-image": b"GIF87a" + b"\x00" * 10,
    "empty": b"",
}


@pytest.mark.parametrize("name", BAD_IMAGES)
def test_pillow_errors_become_image_error(name: str, tmp_path: Path) -> None:
    data = BAD_IMAGES[name]
    with pytest.raises(lk.ImageError, match="<%d bytes>" % len(data)):
        lk.images.load_image(data)
    path = tmp_path / f"{name}.png"
    path.write_bytes(data)
    with pytest.raises(lk.ImageError, match=name):  # the message names the file
        lk.images.load_image(path)


def test_pixel_limit_is_configurable() -> None:
    from PIL import Image

    data = _png(300, 200)
    assert lk.images.get_max_image_pixels() == lk.images.DEFAULT_MAX_IMAGE_PIXELS == 8192 * 8192
    with pytest.raises(lk.ImageTooLargeError, match="300x200 = 60000 pixels") as too_large:
        lk.images.load_image(data, max_pixels=59999)
    assert (too_large.value.pixels, too_large.value.limit) == (60000, 59999)
    assert lk.images.image_header_size(data, "the image") == (300, 200)
    with pytest.raises(lk.ImageError, match="^the image cannot be decoded"):
        lk.images.image_header_size(b"not an image", "the image")
    assert lk.images.load_image(data, max_pixels=60000).pixels.shape == (200, 300, 3)
    try:
        lk.images.set_max_image_pixels(1000)
        for image in (data, Image.new("RGB", (300, 200)), np.zeros((200, 300, 3), np.uint8)):
            with pytest.raises(lk.ImageTooLargeError, match="more than the limit of 1000"):
                lk.images.load_image(image)
        with pytest.raises(ValueError, match="max_image_pixels"):
            lk.images.set_max_image_pixels(0)
    finally:
        lk.images.set_max_image_pixels(None)
    assert lk.images.load_image(data).pixels.shape == (200, 300, 3)


@pytest.fixture(scope="module")
def tiny_model(tiny: testing.TestModel):
    with lk.Model.load(tiny.model_path, tiny.mmproj_path) as m:
        yield m


def test_one_bomb_fails_only_its_batch_record(tiny_model: lk.Model, tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(_png(96, 96))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(BAD_IMAGES["bomb-30000x30000"])
    records = lk.batch.run(tiny_model, [good, bomb, BAD_IMAGES["truncated-data"], good], "Caption:",
                           max_tokens=2, parallel=2, progress=False)
    assert [r.ok for r in records] == [True, False, False, True]
    assert "ImageError" in records[1].error and "bomb.png" in records[1].image
    assert "ImageError" in records[2].error


def test_cli_batch_writes_an_error_line_and_goes_on(tiny: testing.TestModel, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(_png(96, 96))
    (photos / "b-bomb.png").write_bytes(BAD_IMAGES["bomb-30000x30000"])
    (photos / "c.png").write_bytes(_png(64, 64))
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, "-m", "llava_kv", "batch", "--model", str(tiny.model_path), "--mmproj",
                           str(tiny.mmproj_path), "--prompt", "Caption:", "--max-tokens", "2", "--no-progress",
                           "--out", str(out), str(photos)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["image"]).name for r in records] == ["a.png", "b-bomb.png", "c.png"]
    assert [r["error"] is None for r in records] == [True, False, True]
    assert "ImageError" in records[1]["error"]
    assert "2 ok, 1 failed" in proc.stderr


def test_session_and_chat_raise_image_error(tiny_model: lk.Model) -> None:
    import base64

    bomb = BAD_IMAGES["bomb-30000x30000"]
    with tiny_model.session(n_ctx=512) as s:
        s.append_text("USER: ")
        with pytest.raises(lk.ImageError):
            s.append_image(bomb)
        assert len(s.images) == 0 and len(s.timeline) == 1
        url = "data:image/png;base64," + base64.b64encode(bomb).decode()
        with pytest.raises(lk.ImageError):
            s.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}], max_tokens=1,
                   chat_template="chatml")


@pytest.mark.parametrize("url", ["file://otherhost/etc/passwd", "file://127.0.0.2/etc/passwd",
                                 "ftp://example.com/cat.png", "gopher://x/y.png"])
def test_chat_refuses_non_local_image_urls(tiny_model: lk.Model, url: str) -> None:
    from llava_kv.chat import render_messages

    with pytest.raises(ValueError, match="file://|scheme"):
        render_messages(tiny_model, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
                        chat_template="chatml")


def test_chat_accepts_local_file_urls(tiny_model: lk.Model, tmp_path: Path) -> None:
    from llava_kv.chat import render_messages

    path = tmp_path / "cat image.png"
    path.write_bytes(_png(96, 96))
    for url in (f"file://{path.as_posix().replace(' ', '%20')}", f"file://localhost{path.as_posix()}", str(path)):
        items = render_messages(tiny_model, [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}]}], chat_template="chatml")
        assert sum(isinstance(x, lk.images.LoadedImage) for x in items) == 1


# --- numeric arguments --------------------------------------------------------------------------

BAD_SAMPLING = [("temperature", NAN), ("temperature", math.inf), ("temperature", -0.5), ("top_p", NAN),
                ("top_p", 1.5), ("min_p", -0.1), ("min_p", math.inf), ("repeat_penalty", 0.0),
                ("repeat_penalty", NAN), ("top_k", -1), ("top_k", 2**31), ("seed", -1), ("seed", 2**32),
                ("max_tokens", -1), ("max_tokens", 2**31 - 1), ("max_tokens", 2**40)]
BAD_TYPES = [("temperature", "hot"), ("top_k", 1.5), ("max_tokens", True), ("seed", "7"), ("top_p", None)]


@pytest.mark.parametrize("name,value", BAD_SAMPLING)
def test_generate_and_chat_check_numbers(tiny_model: lk.Model, name: str, value: Any) -> None:
    with tiny_model.session(n_ctx=256) as s:
        s.append_text("USER: hi")
        before = s.n_past
        with pytest.raises(ValueError, match=name):
            s.generate(**{"max_tokens": 2, name: value})
        with pytest.raises(ValueError, match=name):
            s.chat([{"role": "user", "content": "hello"}], chat_template="chatml", **{name: value})
        assert s.n_past == before  # refused before anything was decoded


@pytest.mark.parametrize("name,value", BAD_TYPES)
def test_generate_checks_types(tiny_model: lk.Model, name: str, value: Any) -> None:
    with tiny_model.session(n_ctx=256) as s:
        s.append_text("USER: hi")
        with pytest.raises(TypeError, match=name):
            s.generate(**{"max_tokens": 2, name: value})


BAD_BATCH = BAD_SAMPLING[:-3] + [("max_tokens", 0), ("max_tokens", 2**31 - 1), ("max_tokens", 2**30),
                                 ("parallel", 0), ("parallel", 256), ("n_batch", 0), ("n_batch", 2**31),
                                 ("n_ctx", 0), ("n_ctx", -5), ("n_threads", 0), ("seed", None)]


@pytest.mark.parametrize("name,value", BAD_BATCH)
def test_batch_checks_numbers(tiny_model: lk.Model, name: str, value: Any) -> None:
    image = np.zeros((96, 96, 3), np.uint8)
    with pytest.raises((ValueError, TypeError), match=name) as info:
        lk.batch.run(tiny_model, [image], "Caption:", progress=False, **{name: value})
    assert "incompatible function arguments" not in str(info.value)
    with pytest.raises((ValueError, TypeError), match=name):
        next(lk.batch.iter_run(tiny_model, [image], "Caption:", progress=False, **{name: value}))


def test_batch_n_batch_below_parallel(tiny_model: lk.Model) -> None:
    with pytest.raises(ValueError, match=r"n_batch \(2\) must be >= parallel \(3\)"):
        lk.batch.run(tiny_model, [np.zeros((96, 96, 3), np.uint8)], "x", n_batch=2, parallel=3, progress=False)


@pytest.mark.parametrize("name,value", [("n_ctx", 0), ("n_ctx", 2**31), ("n_batch", 0), ("n_batch", -1),
                                        ("n_ubatch", 0), ("seed", -1), ("seed", 2**32), ("n_threads", 0),
                                        ("n_ctx", 1.5)])
def test_session_checks_numbers(tiny_model: lk.Model, name: str, value: Any) -> None:
    with pytest.raises((ValueError, TypeError), match=name):
        tiny_model.session(**{name: value})


@pytest.mark.parametrize("name,value", [("n_threads", 0), ("n_threads", 2**31), ("n_gpu_layers", -2),
                                        ("n_gpu_layers", 2**31), ("embed_cache_bytes", -1),
                                        ("embed_cache_bytes", 2**64), ("n_threads", 2.0)])
def test_model_load_checks_numbers(tiny: testing.TestModel, name: str, value: Any) -> None:
    with pytest.raises((ValueError, TypeError), match=name):
        lk.Model.load(tiny.model_path, tiny.mmproj_path, **{name: value})


def test_good_numbers_still_work(tiny_model: lk.Model) -> None:
    with tiny_model.session(n_ctx=256, n_batch=64, seed=2**32 - 1, n_ubatch=np.int64(32)) as s:
        s.append_text("USER: hi")
        s.generate(np.int32(2), temperature=np.float32(0.7), top_k=0, top_p=1, min_p=0, repeat_penalty=1.1, seed=0)
    records = lk.batch.run(tiny_model, [np.zeros((96, 96, 3), np.uint8)], "x", max_tokens=1, parallel=1, n_batch=1,
                           progress=False)
    assert records[0].ok, records[0].error
