"""The shapes of the test pairs: ``Preset`` (one text model + projector configuration) and ``PRESETS``,
the named ones tests, demos and benchmarks ask for, one tiny CI-sized pair per supported family and a
few realistic ones for benchmarks. A preset is data only; the writers in :mod:`.text_model` and
:mod:`.projector` turn it into files.

Presets (``PRESETS``):

- ``tiny-llava``: llama text model (n_embd 64, 2 layers) + CLIP ``mlp`` projector, 96 px images,
  36 image tokens, causal image decode. Seconds to make; for CI.
- ``tiny-gemma3``: gemma3 text model (sliding-window attention, q/k norms) + Gemma 3 projector
  (SigLIP tower, average pooling, soft-embedding norm): image wrapped in ``<start_of_image>`` /
  ``<end_of_image>`` text and decoded with non-causal attention. For CI.
- ``tiny-qwen25vl``: qwen2vl text model (M-RoPE, ``rope.dimension_sections``) + Qwen2.5-VL projector
  (``qwen2.5vl_merger``: window attention, 2x2 patch merge). A 96 px image takes 11 KV cells but
  only 5 positions (``<|vision_start|>``, 3x3 merged tokens on 3 positions, ``<|vision_end|>``).
- ``tiny-qwen3vl``: qwen3vl text model (interleaved M-RoPE, q/k norms) + Qwen3-VL projector
  (``qwen3vl_merger``: fused qkv, learned positions resized to the image, 2x2 patch merge) with deepstack
  mergers after two of its three ViT blocks. Each image token's embedding is 3 slices wide (main merger
  + 2 deepstack slices, ``n_embd_inp`` = 3 x ``n_embd``); the text model adds slice k+1 to the output of
  its layer k. A 96 px image takes 11 KV cells but only 5 positions, as under Qwen2.5-VL.
- ``tiny-smolvlm``: llama + Idefics3 projector (pixel shuffle), SmolVLM's tokens and chat template;
  a 96 px image becomes 2x2 tiles and an overview between ``<row_i_col_j>`` / ``<global-img>`` markers.
- ``tiny-pixtral``: llama + Pixtral projector (2-D RoPE), Mistral v7 template; ``[IMG_BREAK]`` after
  each row but the last, then ``[IMG_END]``. The pinned llama.cpp's Pixtral graph reads an
  uninitialised buffer, so its logits are not reproducible (tests/test_families.py).
- ``tiny-minicpmv``: qwen2 + MiniCPM-V 2.6 resampler (``resampler``, version 3); a 96 px image becomes
  an overview and 2x2 slices (``<image>``, ``<slice>`` markers), 8 queries each.
- ``tiny-internvl``: qwen2 + InternVL projector (pixel shuffle); 2x2 tiles and a thumbnail between
  ``<img>`` and ``</img>``.
- ``tiny-llava-next``: llama + CLIP ``mlp`` projector with ``image_grid_pinpoints`` (LLaVA-NeXT anyres),
  vicuna template; a 96 px image becomes an overview and 2x2 tiles.
- ``tiny-qwen2a``: qwen2 + Qwen2-Audio projector (``qwen2a``: whisper encoder, two conv1d over 128 mel
  bins, average pool, ``mm.a.fc``), audio only. mtmd pads every clip to 30 s of mel frames, so a clip
  under 30 s is 750 audio tokens between ``<|audio_bos|>`` and ``<|audio_eos|>``. ``random_audio`` and
  ``wav_bytes`` make the clips.
- ``realistic``: SmolVLM-256M-like shapes (llama, n_embd 576, 30 layers, 9 heads / 3 KV heads,
  49152-token vocabulary) + a CLIP ``mlp`` projector (width 768, 12 layers, 224 px / patch 14 =
  256 image tokens), f16. For CPU benchmarks.
- ``realistic-qwen25vl``: Qwen2.5-VL-3B widths (qwen2vl text 2048 wide with M-RoPE, 151936 tokens; ViT
  1280 wide, window attention, 2x2 merge) and its 256 image tokens for a 448 px image, but 4 of 36 text
  and 8 of 32 vision layers, f16 (about 2.3 GB). For CPU benchmarks of the M-RoPE path.
- ``llava-7b``: LLaVA-1.5-7B shapes (llama, n_embd 4096, 32 layers, 32000 tokens) + CLIP-L/336
  ``mlp`` projector (576 image tokens), f16, about 14 GB. For GPU benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .towers import _TOWERS, _WHISPER_FRAMES


@dataclass(frozen=True)
class Preset:
    name: str
    arch: str  # text architecture: a key of text_model._ARCHS ("llama", "gemma3", "qwen2", "qwen2vl", "qwen3vl")
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    projector: str  # clip.projector_type: a key of towers._TOWERS
    image_size: int
    patch_size: int
    v_width: int  # v_*: the encoder's shapes (the audio encoder's for an audio projector)
    v_ff: int
    v_layers: int
    v_heads: int
    proj_hidden: int = 0  # hidden width of the projector's MLP (0: the text width)
    n_merge: int = 1  # patches merged per side (pooling, pixel shuffle, 2x2 patch merge)
    sliding_window: int = 0  # gemma3: window of the local layers
    rope_sections: tuple[int, ...] = ()  # qwen2vl, qwen3vl: M-RoPE sections (time, height, width, extra)
    chat: str = "chatml"  # tokenizer specials + chat template: a key of vocab._CHATS
    n_mel: int = 0  # audio projectors: mel bins of the whisper front end
    vision_keys: tuple[tuple[str, Any], ...] = ()  # further clip.* metadata the projector reads
    dtype: str = "f32"
    description: str = ""

    @property
    def image_tokens(self) -> int:
        """Embedding tokens of one ``image_size`` tile (a whole image for single-tile projectors)."""
        if _TOWERS[self.projector].audio:
            return 0
        side = self.image_size // self.patch_size
        if self.projector in ("gemma3", "idefics3", "internvl", "qwen2.5vl_merger", "qwen3vl_merger"):
            side //= self.n_merge
        if self.projector == "resampler":
            return int(dict(self.vision_keys)["clip.minicpmv_query_num"])
        if self.projector == "pixtral":
            return side * side + side - 1  # one [IMG_BREAK] between rows
        return side * side

    @property
    def deepstack_layers(self) -> tuple[int, ...]:
        """The ViT blocks whose output a deepstack merger projects into an extra embedding slice
        (``clip.vision.is_deepstack_layers``, as Qwen3-VL's converter writes it); the text model reads
        their count as ``<arch>.n_deepstack_layers`` and adds the slices to its first layers."""
        flags = dict(self.vision_keys).get("clip.vision.is_deepstack_layers", ())
        return tuple(i for i, flag in enumerate(flags) if flag)

    @property
    def audio_tokens(self) -> int:
        """Embedding tokens of one audio clip of up to 30 s (0 without an audio encoder): mtmd pads the
        clip to 30 s, 3000 mel frames, and the encoder keeps one token per ``frames_per_token``."""
        tw = _TOWERS[self.projector]
        return _WHISPER_FRAMES // tw.frames_per_token if tw.audio else 0


def _tiny(name: str, arch: str, projector: str, **kw: Any) -> Preset:
    """A CI-sized preset: a 2-layer text model of width 64 over a 1024-token vocabulary."""
    text = dict(n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128, n_vocab=1024, n_ctx_train=4096)
    vision = dict(image_size=96, patch_size=16, v_width=32, v_ff=48, v_layers=2, v_heads=4)
    return Preset(name, arch, projector=projector, **{**text, **vision, **kw})


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _tiny("tiny-llava", "llama", "mlp", v_layers=3, proj_hidden=64,
              description="llama + CLIP mlp projector, 36 image tokens, causal image decode"),
        _tiny("tiny-gemma3", "gemma3", "gemma3", n_merge=2, sliding_window=64, chat="gemma",
              description="gemma3 + Gemma 3 projector, 9 image tokens between begin/end markers, "
                          "non-causal image decode"),
        # Patch 28 and merge 2 make the 96 px test image a 3x3 grid of merged tokens (the projector
        # upsizes it to its 8-token minimum), so 2x2 attention windows (window 112 px) really split it.
        _tiny("tiny-qwen25vl", "qwen2vl", "qwen2.5vl_merger", image_size=112, patch_size=28, v_heads=2, n_merge=2,
              rope_sections=(2, 3, 3, 0), chat="qwen2vl", vision_keys=(("clip.vision.n_wa_pattern", 2),),
              description="qwen2vl (M-RoPE) + Qwen2.5-VL projector (window attention, 2x2 patch merge): "
                          "a 96 px image takes 9 KV cells but 3 positions"),
        # Patch 16 and merge 2 (Qwen3-VL's own) make the 96 px test image a 3x3 grid of merged tokens;
        # image_size 128 gives an 8x8 table of learned positions, so the 6x6 patch grid of the test image
        # is resized from it as real Qwen3-VL resizes its 48x48 table. Sections 3/3/2 interleave over the
        # 8 rotary pairs of a 16-wide head (Qwen3-VL-2B: 24/20/20 over 64). Deepstack mergers after ViT
        # blocks 0 and 1 of 3 feed text layers 0 and 1. Three text layers, not two: the pinned graph
        # (src/models/qwen3vl.cpp) drops the rows it does not output in the last layer before adding that
        # layer's deepstack slice, so a last layer that also takes a slice fails ggml_add's shape check
        # (real Qwen3-VL adds 3 slices to 28+ layers).
        _tiny("tiny-qwen3vl", "qwen3vl", "qwen3vl_merger", n_layer=3, image_size=128, v_layers=3, v_heads=2,
              n_merge=2, proj_hidden=128, rope_sections=(3, 3, 2, 0), chat="qwen2vl",
              vision_keys=(("clip.vision.is_deepstack_layers", [True, True, False]),),
              description="qwen3vl (interleaved M-RoPE, q/k norms) + Qwen3-VL projector with 2 deepstack "
                          "mergers: a 96 px image takes 11 KV cells but 5 positions, 3 embedding slices "
                          "per token"),
        _tiny("tiny-smolvlm", "llama", "idefics3", image_size=48, patch_size=8, n_merge=2, chat="smolvlm",
              vision_keys=(("clip.vision.preproc_image_size", 96),),
              description="llama + Idefics3 projector (pixel shuffle): a 96 px image becomes 2x2 tiles "
                          "plus an overview, 9 tokens each, between <row_i_col_j> markers"),
        _tiny("tiny-pixtral", "llama", "pixtral", v_heads=2, chat="mistral",
              description="llama + Pixtral projector (2-D RoPE): 36 image tokens, an [IMG_BREAK] after "
                          "each row but the last, then [IMG_END]"),
        _tiny("tiny-minicpmv", "qwen2", "resampler", n_embd=128, image_size=48, patch_size=8, chat="minicpmv",
              vision_keys=(("clip.minicpmv_version", 3), ("clip.minicpmv_query_num", 8)),
              description="qwen2 + MiniCPM-V 2.6 resampler: a 96 px image becomes an overview and 2x2 "
                          "slices of 8 tokens each"),
        _tiny("tiny-internvl", "qwen2", "internvl", image_size=48, patch_size=8, n_merge=2, chat="internvl",
              vision_keys=(("clip.vision.preproc_max_tiles", 4),),
              description="qwen2 + InternVL projector (pixel shuffle): a 96 px image becomes 2x2 tiles "
                          "and a thumbnail, 9 tokens each, between <img> and </img>"),
        _tiny("tiny-llava-next", "llama", "mlp", image_size=48, v_layers=3, proj_hidden=64, chat="vicuna",
              vision_keys=(("clip.vision.image_grid_pinpoints", [48, 96, 96, 48, 96, 96]),),
              description="LLaVA-NeXT anyres: llama + CLIP mlp projector with grid pinpoints, a 96 px "
                          "image becomes an overview and 2x2 tiles of 9 tokens"),
        _tiny("tiny-qwen2a", "qwen2", "qwen2a", n_mel=128, chat="qwen2a",
              description="qwen2 + Qwen2-Audio projector (whisper encoder over 128 mel bins, average pool, "
                          "mm.a.fc): a clip under 30 s is 750 audio tokens between <|audio_bos|> and "
                          "<|audio_eos|>"),
        Preset("realistic", "llama", n_embd=576, n_layer=30, n_head=9, n_head_kv=3, n_ff=1536, n_vocab=49152,
               n_ctx_train=8192, projector="mlp", image_size=224, patch_size=14, v_width=768, v_ff=3072,
               v_layers=12, v_heads=12, proj_hidden=576, dtype="f16",
               description="SmolVLM-256M-like text shapes + CLIP mlp projector, 256 image tokens"),
        # Qwen2.5-VL-3B's widths (text 2048 wide, 16 heads / 2 KV heads, ffn 11008, 151936 tokens, M-RoPE
        # sections 16/24/24; ViT 1280 wide, ffn 3420, 16 heads, patch 14, 2x2 merge into a 5120-wide merger,
        # a full-attention block every 8th) and its 256 image tokens for a 448 px image, with fewer layers
        # (4 of 36 text, 8 of 32 vision) so that a 2-core CPU runs it in minutes.
        Preset("realistic-qwen25vl", "qwen2vl", n_embd=2048, n_layer=4, n_head=16, n_head_kv=2, n_ff=11008,
               n_vocab=151936, n_ctx_train=32768, projector="qwen2.5vl_merger", image_size=448, patch_size=14,
               v_width=1280, v_ff=3420, v_layers=8, v_heads=16, proj_hidden=5120, n_merge=2,
               rope_sections=(16, 24, 24, 0), chat="qwen2vl", vision_keys=(("clip.vision.n_wa_pattern", 8),),
               dtype="f16",
               description="Qwen2.5-VL-3B widths, 4 of 36 text layers, 8 of 32 vision layers; M-RoPE, window "
                           "attention, 256 image tokens for a 448 px image"),
        Preset("llava-7b", "llama", n_embd=4096, n_layer=32, n_head=32, n_head_kv=32, n_ff=11008, n_vocab=32000,
               n_ctx_train=4096, projector="mlp", image_size=336, patch_size=14, v_width=1024, v_ff=4096,
               v_layers=24, v_heads=16, proj_hidden=4096, dtype="f16",
               description="LLaVA-1.5-7B shapes + CLIP-L/336 mlp projector, 576 image tokens"),
    )
}
