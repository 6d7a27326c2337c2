"""The projector (mmproj) GGUF writer: ``_write_projector`` writes a preset's random-weight encoder
tower and projector head, laid out as :mod:`.towers` says clip.cpp loads them, with the ``clip.*``
metadata mtmd reads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .presets import Preset
from .towers import _TOWERS, _WHISPER_FRAMES
from .weights import _finish, _Weights

# clip.cpp reads these as signed 32-bit integers; other integer keys are unsigned.
_I32_KEYS = {"clip.minicpmv_version"}


def _write_projector(path: Path, p: Preset, seed: int) -> None:
    import gguf

    tw = _TOWERS[p.projector]
    w = _Weights(seed + 1_000_003, p.dtype)
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_name(f"llava-kv test projector {p.name} seed {seed}")
    writer.add_description(f"random weights: {p.description}")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if p.dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    modality = "audio" if tw.audio else "vision"
    writer.add_bool(f"clip.has_{modality}_encoder", True)
    writer.add_string("clip.projector_type", p.projector)
    writer.add_bool("clip.use_silu" if tw.gated else "clip.use_gelu", True)
    if tw.audio:
        writer.add_uint32("clip.audio.num_mel_bins", p.n_mel)
    else:
        writer.add_uint32("clip.vision.image_size", p.image_size)
        writer.add_uint32("clip.vision.patch_size", p.patch_size)
    writer.add_uint32(f"clip.{modality}.embedding_length", p.v_width)
    writer.add_uint32(f"clip.{modality}.feed_forward_length", p.v_ff)
    writer.add_uint32(f"clip.{modality}.block_count", p.v_layers)
    writer.add_uint32(f"clip.{modality}.projection_dim", p.n_embd)
    writer.add_uint32(f"clip.{modality}.attention.head_count", p.v_heads)
    writer.add_float32(f"clip.{modality}.attention.layer_norm_epsilon", 1e-6)
    if not tw.audio:
        writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
        writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    if tw.merge_key:
        writer.add_uint32(tw.merge_key, p.n_merge)
    for key, value in p.vision_keys:
        if isinstance(value, list):
            writer.add_array(key, value)
        elif key in _I32_KEYS:
            writer.add_int32(key, value)
        else:
            writer.add_uint32(key, value)

    v, n_patches = p.v_width, (p.image_size // p.patch_size) ** 2
    dims = {"v": v, "t": p.n_embd, "h": p.proj_hidden or p.n_embd, "m": v * p.n_merge ** 2,
            "q": int(dict(p.vision_keys).get("clip.minicpmv_query_num", 0)), "g": 70 * 70}
    make: dict[str, Callable[..., np.ndarray]] = {
        "linear": lambda *s: w.linear(*s), "bias": w.bias, "norm": w.norm,
        "norm0": lambda n: w.norm(n, 0.0), "embed": lambda n, d: w.embedding(n, d, 0.02)}

    def add(name: str, kind: str, *shape: int) -> None:
        writer.add_tensor(name, make[kind](*shape))

    def add_norm(name: str, n: int) -> None:
        add(name + ".weight", "norm", n)
        if tw.norm == "layer":
            add(name + ".bias", "bias", n)

    x = "a" if tw.audio else "v"  # the encoder's tensor prefix
    if tw.audio:
        # conv1d kernels are (out channels, in channels, width 3); their biases (channels, 1) broadcast
        # over the frames of the conv's output.
        for k, n_in in ((1, p.n_mel), (2, v)):
            writer.add_tensor(f"a.conv1d.{k}.weight", w.embedding(v * n_in * 3, 1, 1.0 / np.sqrt(3 * n_in))
                              .reshape(v, n_in, 3))
            writer.add_tensor(f"a.conv1d.{k}.bias", w.bias(v).reshape(v, 1))
    for k in range(tw.patch_convs):
        writer.add_tensor("v.patch_embd.weight" + (f".{k}" if k else ""),
                          w.embedding(v * 3 * p.patch_size * p.patch_size, 1, 1.0 / p.patch_size)
                          .reshape(v, 3, p.patch_size, p.patch_size))
    if tw.patch_bias:
        add("v.patch_embd.bias", "bias", v)
    if tw.class_embd:
        add("v.class_embd", "bias", v)
    if tw.pos_embd:
        n_pos = {"grid": dims["g"], "frames": _WHISPER_FRAMES // 2}.get(tw.pos_embd, n_patches + tw.class_embd)
        add(f"{x}.position_embd.weight", "embed", n_pos, v)
    if tw.pre_ln:
        add_norm(f"{x}.pre_ln", v)
    ffn = {"ffn_up": (p.v_ff, v), "ffn_gate": (p.v_ff, v), "ffn_down": (v, p.v_ff)}
    if not tw.gated:
        del ffn["ffn_gate"]
    attn = {"attn_qkv": (3 * v, v)} if tw.qkv else {"attn_q": (v, v), "attn_k": (v, v), "attn_v": (v, v)}
    for i in range(p.v_layers):
        for part, (n_out, n_in) in {**attn, "attn_out": (v, v), **ffn}.items():
            add(f"{x}.blk.{i}.{part}.weight", "linear", n_out, n_in)
            if tw.bias and not (tw.audio and part == "attn_k"):
                add(f"{x}.blk.{i}.{part}.bias", "bias", n_out)
        add_norm(f"{x}.blk.{i}.ln1", v)
        add_norm(f"{x}.blk.{i}.ln2", v)
        if tw.layer_scale:
            add(f"v.blk.{i}.ls1.weight", "norm", v)
            add(f"v.blk.{i}.ls2.weight", "norm", v)
    if tw.post_ln:
        add_norm(f"{x}.post_ln", v)
    for name, kind, shape in tw.head:
        add(name, kind, *(dims[s] for s in shape))
    for i in p.deepstack_layers:
        for name, kind, shape in tw.deepstack:
            add(name.format(i=i), kind, *(dims[s] for s in shape))
    _finish(writer)
