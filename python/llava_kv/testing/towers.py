"""The projector layouts: for each ``clip.projector_type`` a test preset can name, the encoder tower and
projector head that clip.cpp loads (``_TOWERS``), as data. :mod:`.projector` writes a tower from it and
:mod:`.presets` reads it to count a preset's image or audio tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

# A projector's own tensors after the vision tower: (name, kind, shape in symbols). Symbols: v vision
# width, t text width, h the MLP's hidden width, m merged width (v * n_merge^2), q resampler queries,
# g MiniCPM-V's 70x70 grid of position buckets.
_Head = tuple[tuple[str, str, tuple[str, ...]], ...]


def _mlp(first: int, second: int, into: str = "v") -> _Head:
    return ((f"mm.{first}.weight", "linear", ("h", into)), (f"mm.{first}.bias", "bias", ("h",)),
            (f"mm.{second}.weight", "linear", ("t", "h")), (f"mm.{second}.bias", "bias", ("t",)))


@dataclass(frozen=True)
class _Tower:
    """The layout clip.cpp loads for one projector type (tools/mtmd/clip.cpp ``load_tensors`` and the
    graph in tools/mtmd/models/), as data for the one writer, :mod:`.projector`."""
    head: _Head
    norm: str = "layer"  # "layer" (weight + bias) or "rms" (weight only)
    bias: bool = True  # biases on the attention and ffn matrices
    gated: bool = False  # SiLU-gated ffn (ffn_gate) instead of GELU
    patch_bias: bool = True
    patch_convs: int = 1  # qwen2.5-vl: a second patch conv (for the second frame of a video pair); audio: 0
    class_embd: bool = False
    pos_embd: str = "patches"  # "patches" (one per patch, plus the class token), "grid" (70x70),
    # "frames" (one per conv output frame of a 3000-frame mel chunk), "" (RoPE)
    pre_ln: bool = False
    post_ln: bool = False
    layer_scale: bool = False  # internvl: ls1 / ls2
    qkv: bool = False  # one fused attn_qkv matrix (and bias) per block instead of attn_q / attn_k / attn_v
    # Tensors written once per deepstack layer i of Preset.deepstack_layers, names formatted with {i}.
    deepstack: _Head = ()
    merge_key: str = ""  # the metadata key that takes n_merge
    # A whisper-style audio encoder (tools/mtmd/models/whisper-enc.cpp): clip.audio.* keys, "a." tensors,
    # two conv1d over the mel frames (the second of stride 2) instead of a patch conv, one learned position
    # per conv output frame; whisper's attention has biases on q and v but none on k.
    audio: bool = False
    frames_per_token: int = 2  # mel frames per output token: the stride-2 conv, times any pooling


_TOWERS: dict[str, _Tower] = {
    "mlp": _Tower(_mlp(0, 2), class_embd=True, pre_ln=True),
    "gemma3": _Tower((("mm.soft_emb_norm.weight", "norm0", ("v",)), ("mm.input_projection.weight", "linear", ("v", "t"))),
                     post_ln=True, merge_key="clip.vision.projector.scale_factor"),
    "qwen2.5vl_merger": _Tower(_mlp(0, 2, into="m"), norm="rms", gated=True, patch_bias=False, patch_convs=2,
                               pos_embd="", post_ln=True, merge_key="clip.vision.spatial_merge_size"),
    # Qwen3-VL (tools/mtmd/models/qwen3vl.cpp): layer norms, GELU ffn, fused qkv, a patch bias and learned
    # positions on top of the two patch convs; the merger norm before the 2x2 merge is v.post_ln. Each
    # deepstack merger normalises the merged width itself, then fc1 -> GELU -> fc2 into the text width.
    "qwen3vl_merger": _Tower(_mlp(0, 2, into="m"), patch_convs=2, post_ln=True, qkv=True,
                             merge_key="clip.vision.spatial_merge_size",
                             deepstack=(("v.deepstack.{i}.norm.weight", "norm", ("m",)),
                                        ("v.deepstack.{i}.norm.bias", "bias", ("m",)),
                                        ("v.deepstack.{i}.fc1.weight", "linear", ("h", "m")),
                                        ("v.deepstack.{i}.fc1.bias", "bias", ("h",)),
                                        ("v.deepstack.{i}.fc2.weight", "linear", ("t", "h")),
                                        ("v.deepstack.{i}.fc2.bias", "bias", ("t",)))),
    "idefics3": _Tower((("mm.model.fc.weight", "linear", ("t", "m")),), post_ln=True,
                       merge_key="clip.vision.projector.scale_factor"),
    "pixtral": _Tower(_mlp(1, 2) + (("v.token_embd.img_break", "bias", ("t",)),), norm="rms", bias=False,
                      gated=True, patch_bias=False, pos_embd="", pre_ln=True),
    "resampler": _Tower(
        (("resampler.pos_embed_k", "embed", ("g", "t")), ("resampler.query", "embed", ("q", "t")),
         ("resampler.kv.weight", "linear", ("t", "v")))
        + tuple((f"resampler.attn.{x}.{part}", kind, ("t", "t") if part == "weight" else ("t",))
                for x in ("q", "k", "v", "out") for part, kind in (("weight", "linear"), ("bias", "bias")))
        + tuple((f"resampler.ln_{x}.{part}", kind, ("t",))
                for x in ("q", "kv", "post") for part, kind in (("weight", "norm"), ("bias", "bias")))
        + (("resampler.proj.weight", "linear", ("t", "t")),),
        pos_embd="grid", post_ln=True),
    "internvl": _Tower((("mm.model.mlp.0.weight", "norm", ("m",)), ("mm.model.mlp.0.bias", "bias", ("m",)),
                        ("mm.model.mlp.1.weight", "linear", ("h", "m")), ("mm.model.mlp.1.bias", "bias", ("h",)),
                        ("mm.model.mlp.3.weight", "linear", ("t", "h")), ("mm.model.mlp.3.bias", "bias", ("t",))),
                       class_embd=True, layer_scale=True, merge_key="clip.vision.projector.scale_factor"),
    # Qwen2-Audio: an average pool of 2 after the blocks, then one linear layer.
    "qwen2a": _Tower((("mm.a.fc.weight", "linear", ("t", "v")), ("mm.a.fc.bias", "bias", ("t",))),
                     patch_bias=False, patch_convs=0, pos_embd="frames", post_ln=True, audio=True,
                     frames_per_token=4),
}

# mtmd's whisper front end pads a clip to 30 s and cuts the mel spectrogram into chunks of 3000 frames.
_WHISPER_FRAMES = 3000
