"""Checks of a GGUF mmproj projector: it says ``clip``, encodes some modality, names a projector
type mtmd knows, stores every key mtmd reads with a typed getter in that type (a mismatch aborts
the process), and its vision or audio tower has the hyperparameters, layers and tensor shapes the
clip graph assumes without checking. :func:`check_projector` is the entry point.
"""
from __future__ import annotations

import os

import numpy as np

from .facts import (
    _CLIP_ARRAY_TYPES,
    _CLIP_KEY_TYPES,
    _CONV_PATCH_EMBD,
    _NO_PATCH_EMBD,
    _POS_ADDED,
    _POS_LOOKUP,
    _STANDARD_TOWERS,
    CLIP_MAX_IMAGE_SIZE,
    CLIP_MAX_LAYERS,
    MAX_EMBD,
    MAX_FF,
    MAX_HEAD_DIM,
    MAX_HEADS,
    PROJECTOR_TYPES,
)
from .reader import _TYPE_NAMES, GGML_MAX_DIMS, T_ARRAY, GGUFFile, TensorInfo, read_gguf
from .tensor_checks import _check_biases, _check_tensor_types
from .typed_access import _describe, _float, _int, _str, _tensor

__all__ = ["check_projector"]


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


def _dims(t: TensorInfo) -> tuple[int, int, int, int]:
    padded = tuple(t.shape) + (1,) * (GGML_MAX_DIMS - len(t.shape))
    return padded  # type: ignore[return-value]
