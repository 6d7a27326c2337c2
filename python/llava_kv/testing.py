"""Small random-weight GGUF pairs (text model + mmproj projector) for tests, demos and benchmarks.

No model can be downloaded here, so llava-kv writes its own with the ``gguf`` package. Random
weights give gibberish text but real shapes, real code paths and deterministic logits, which is
what edit-equivalence, leak and speed tests need. Files are deterministic for a given preset and
seed, and are cached: asking twice for the same pair returns the existing files.

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

import argparse
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .paths import cache_dir

__all__ = ["Preset", "PRESETS", "TestModel", "make_test_model", "make_test_projector", "random_image",
           "random_audio", "wav_bytes", "rss_bytes", "main"]

# Bump when the files written for the same preset and seed change.
FORMAT_VERSION = 2


@dataclass(frozen=True)
class Preset:
    name: str
    arch: str  # text architecture: a key of _ARCHS ("llama", "gemma3", "qwen2", "qwen2vl", "qwen3vl")
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    projector: str  # clip.projector_type: a key of _TOWERS
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
    chat: str = "chatml"  # tokenizer specials + chat template: a key of _CHATS
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


@dataclass(frozen=True)
class TestModel:
    model_path: Path
    mmproj_path: Path
    preset: Preset = field(compare=False)
    seed: int = 0


# --- tokenizer -------------------------------------------------------------------------------

_WORDS = """the of and to in is it you that he was for on are with as I his they be at one have this
from or had by hot but some what there we can out other were all your when up use word how said an
each she which do their time if will way about many then them would write like so these her long make
thing see him two has look more day could go come did my sound no most number who over know water
than call first people may down side been now find any new work part take get place made live where
after back little only round man year came show every good me give our under name very through just
form much great think say help low line before turn cause same mean differ move right boy old too
does tell sentence set three want air well also play small end put home read hand port large spell
add even land here must big high such follow act why ask men change went light kind off need house
picture try us again animal point mother world near build self earth father image cat dog red blue
green photo describe what color left right top bottom person car tree sky white black picture shows
USER ASSISTANT user assistant system question answer""".split()

# SentencePiece token types (llama.cpp's llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class _Chat:
    """A family's special tokens and chat template (written here after the family's own, so that
    llama.cpp's template detection picks the family's built-in renderer)."""
    specials: tuple[str, ...]
    template: str
    eos: str = "</s>"
    bos: str = "<s>"
    add_bos: bool = True


_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CHATML_SPECIALS = ("<|im_start|>", "<|im_end|>")

_CHATS: dict[str, _Chat] = {
    "chatml": _Chat(_CHATML_SPECIALS, _CHATML),
    "gemma": _Chat(
        ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>"),
        "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
        "else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + "
        "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}",
        eos="<end_of_turn>"),
    # Qwen2-VL / Qwen2.5-VL: ChatML without BOS; images between <|vision_start|> and <|vision_end|>.
    "qwen2vl": _Chat(_CHATML_SPECIALS + ("<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"),
                     _CHATML, eos="<|im_end|>", add_bos=False),
    # SmolVLM: <|im_start|> opens the prompt, turns are "User:" / "Assistant:" closed by <end_of_utterance>.
    "smolvlm": _Chat(
        ("<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<global-img>", "<image>", "\n\n")
        + tuple(f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)),
        "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}"
        "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}",
        eos="<end_of_utterance>", bos="<|im_start|>", add_bos=False),
    # Pixtral / Mistral Small 3.x: the v7 instruct format.
    "mistral": _Chat(
        ("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"),
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ '[SYSTEM_PROMPT] ' + message['content'] + '[/SYSTEM_PROMPT]' }}{% elif message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + '[/INST]' }}{% else %}{{ ' ' + message['content'] + eos_token }}"
        "{% endif %}{% endfor %}"),
    # MiniCPM-V 2.6 (qwen2 text): ChatML; an image is <image>overview</image> then <slice>...</slice> rows.
    "minicpmv": _Chat(_CHATML_SPECIALS + ("<|endoftext|>", "<image>", "</image>", "<slice>", "</slice>"),
                      _CHATML, eos="<|im_end|>", add_bos=False),
    # InternVL 2.5 / 3 (qwen2 text): ChatML; tiles and thumbnail between <img> and </img>.
    "internvl": _Chat(_CHATML_SPECIALS + ("<|endoftext|>", "<img>", "</img>", "<IMG_CONTEXT>"),
                      _CHATML, eos="<|im_end|>", add_bos=False),
    # Qwen2-Audio (qwen2 text): ChatML; mtmd puts <|audio_bos|> / <|audio_eos|> around a clip's embeddings.
    "qwen2a": _Chat(_CHATML_SPECIALS + ("<|endoftext|>", "<|audio_bos|>", "<|audio_eos|>", "<|AUDIO|>"),
                    _CHATML, eos="<|im_end|>", add_bos=False),
    # LLaVA-1.6 (vicuna): "USER: ... ASSISTANT:".
    "vicuna": _Chat(
        (),
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ message['content'] + '\\n' }}{% elif message['role'] == 'user' %}{{ 'USER: ' + message['content'] + "
        "'\\n' }}{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT: ' }}{% endif %}"),
}


def _vocab(n_vocab: int, specials: Sequence[str]) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + list(specials)
    types = [_UNKNOWN, _CONTROL, _CONTROL] + [_CONTROL] * len(specials)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [_BYTE] * 256
    pieces: list[str] = ["\u2581"] + [chr(c) for c in range(33, 127)]
    seen = set(pieces)
    for word in _WORDS:
        for k in range(1, len(word) + 1):
            piece = "\u2581" + word[:k]
            if piece not in seen:
                seen.add(piece)
                pieces.append(piece)
    for piece in pieces:
        tokens.append(piece)
        types.append(_NORMAL)
    if len(tokens) > n_vocab:
        raise ValueError(f"n_vocab={n_vocab} is below the {len(tokens)} tokens the test vocabulary needs")
    # Pad with ordinary pieces, so that what a random model writes is visible (gibberish) text.
    while len(tokens) < n_vocab:
        tokens.append(f"\u2581w{len(tokens):x}")
        types.append(_NORMAL)
    # SentencePiece merges the highest-scoring pair first: prefer longer pieces.
    scores = [0.0 if t != _NORMAL else -1000.0 + len(tok) for tok, t in zip(tokens, types)]
    return tokens, scores, types


# --- weights ---------------------------------------------------------------------------------


class _Weights:
    def __init__(self, seed: int, dtype: str) -> None:
        self.rng = np.random.default_rng(seed)
        self.dtype = np.float16 if dtype == "f16" else np.float32

    def linear(self, n_out: int, n_in: int) -> np.ndarray:
        w = self.rng.standard_normal((n_out, n_in), dtype=np.float32) / np.sqrt(n_in)
        return w.astype(self.dtype)

    def embedding(self, n: int, dim: int, scale: float = 1.0) -> np.ndarray:
        return (self.rng.standard_normal((n, dim), dtype=np.float32) * scale).astype(self.dtype)

    def norm(self, n: int, center: float = 1.0) -> np.ndarray:
        # Norm weights stay f32 (llama.cpp keeps 1-D tensors in f32).
        return (center + 0.1 * self.rng.standard_normal(n, dtype=np.float32)).astype(np.float32)

    def bias(self, n: int) -> np.ndarray:
        return (0.02 * self.rng.standard_normal(n, dtype=np.float32)).astype(np.float32)


@dataclass(frozen=True)
class _TextArch:
    """What a text architecture's loader in llama.cpp (src/models/<arch>.cpp) requires beyond llama's."""
    qkv_bias: bool = False  # qwen2: biases on q, k, v
    qk_norm: bool = False  # RMS norms of each head's q and k (gemma3, qwen3)
    gemma: bool = False  # gemma3: norms centred at 0, post-attention/ffn norms, sliding window


_ARCHS: dict[str, _TextArch] = {
    "llama": _TextArch(),
    "gemma3": _TextArch(qk_norm=True, gemma=True),
    "qwen2": _TextArch(qkv_bias=True),
    "qwen2vl": _TextArch(qkv_bias=True),
    # src/models/qwen3vl.cpp: interleaved M-RoPE (rope sections required), and deepstack: an input
    # embedding n_embd * (1 + n_deepstack_layers) wide whose slice k+1 is added after layer k.
    "qwen3vl": _TextArch(qk_norm=True),
}


def _write_text_model(path: Path, p: Preset, seed: int) -> None:
    import gguf

    a, chat = _ARCHS[p.arch], _CHATS[p.chat]
    w = _Weights(seed, p.dtype)
    names = gguf.TENSOR_NAMES
    T = gguf.MODEL_TENSOR
    writer = gguf.GGUFWriter(str(path), p.arch)
    head_dim = p.n_embd // p.n_head
    writer.add_name(f"llava-kv test model {p.name} seed {seed}")
    writer.add_description(f"random weights: {p.description}")
    writer.add_context_length(p.n_ctx_train)
    writer.add_embedding_length(p.n_embd)
    writer.add_block_count(p.n_layer)
    writer.add_feed_forward_length(p.n_ff)
    writer.add_head_count(p.n_head)
    writer.add_head_count_kv(p.n_head_kv)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(p.n_vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if p.dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    if a.gemma:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(p.sliding_window)
    else:
        writer.add_rope_dimension_count(head_dim)
    if p.rope_sections:
        writer.add_rope_dimension_sections(list(p.rope_sections))
    if p.deepstack_layers:
        writer.add_num_deepstack_layers(len(p.deepstack_layers))

    tokens, scores, types = _vocab(p.n_vocab, chat.specials)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(tokens.index(chat.bos))
    writer.add_eos_token_id(tokens.index(chat.eos))
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(chat.add_bos)
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat.template)

    kv = p.n_head_kv * head_dim
    center = 0.0 if a.gemma else 1.0  # gemma's norms add 1 to their weight
    writer.add_tensor(names[T.TOKEN_EMBD] + ".weight", w.embedding(p.n_vocab, p.n_embd, 1.0))
    writer.add_tensor(names[T.OUTPUT_NORM] + ".weight", w.norm(p.n_embd, center))
    # A separate output matrix: with tied embeddings a random model only repeats its last token.
    writer.add_tensor(names[T.OUTPUT] + ".weight", w.linear(p.n_vocab, p.n_embd))
    for i in range(p.n_layer):
        def add(t: "gguf.MODEL_TENSOR", value: np.ndarray, part: str = "weight") -> None:
            writer.add_tensor(names[t].format(bid=i) + "." + part, value)

        add(T.ATTN_NORM, w.norm(p.n_embd, center))
        for t, n_out in ((T.ATTN_Q, p.n_head * head_dim), (T.ATTN_K, kv), (T.ATTN_V, kv)):
            add(t, w.linear(n_out, p.n_embd))
            if a.qkv_bias:
                add(t, w.bias(n_out), "bias")
        add(T.ATTN_OUT, w.linear(p.n_embd, p.n_head * head_dim))
        add(T.FFN_NORM, w.norm(p.n_embd, center))
        add(T.FFN_GATE, w.linear(p.n_ff, p.n_embd))
        add(T.FFN_UP, w.linear(p.n_ff, p.n_embd))
        add(T.FFN_DOWN, w.linear(p.n_embd, p.n_ff))
        if a.gemma:
            add(T.ATTN_POST_NORM, w.norm(p.n_embd, 0.0))
            add(T.FFN_POST_NORM, w.norm(p.n_embd, 0.0))
        if a.qk_norm:
            add(T.ATTN_Q_NORM, w.norm(head_dim, center))
            add(T.ATTN_K_NORM, w.norm(head_dim, center))
    _finish(writer)


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
    graph in tools/mtmd/models/), as data for the one writer below."""
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


def _finish(writer: "object") -> None:
    writer.write_header_to_file()  # type: ignore[attr-defined]
    writer.write_kv_data_to_file()  # type: ignore[attr-defined]
    writer.write_tensors_to_file()  # type: ignore[attr-defined]
    writer.close()  # type: ignore[attr-defined]


def default_cache_dir() -> Path:
    """Where generated test models go by default: ``test-models`` in llava-kv's cache (:mod:`llava_kv.paths`)."""
    return cache_dir() / "test-models"


def make_test_model(out_dir: str | os.PathLike[str] | None = None, preset: str | Preset = "tiny-llava", *,
                    seed: int = 0, overwrite: bool = False) -> TestModel:
    """Write (or reuse) the random-weight GGUF pair of ``preset`` under ``out_dir``.

    ``preset`` is a name from PRESETS or a Preset (e.g. ``dataclasses.replace(PRESETS["tiny-llava"],
    name="wide", n_embd=96)``). Returns the paths. Files are written to a temporary name and
    renamed, so an interrupted run never leaves a half-written model that a later call would reuse.
    """
    if isinstance(preset, Preset):
        p = preset
    elif preset in PRESETS:
        p = PRESETS[preset]
    else:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    out = Path(out_dir) if out_dir is not None else default_cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{p.name}-s{seed}"
    model_path = out / f"{stem}.gguf"
    mmproj_path = out / f"{stem}-mmproj.gguf"
    stamp = out / f"{stem}.json"
    # Through JSON and back, so that tuples compare equal to the lists the stamp file holds.
    wanted = json.loads(json.dumps({"format": FORMAT_VERSION, "preset": asdict(p), "seed": seed}))
    fresh = (not overwrite and model_path.exists() and mmproj_path.exists() and stamp.exists()
             and json.loads(stamp.read_text()) == wanted)
    if not fresh:
        for target, writer in ((model_path, _write_text_model), (mmproj_path, _write_projector)):
            tmp = target.with_name(target.name + ".tmp")
            writer(tmp, p, seed)
            tmp.replace(target)
        stamp.write_text(json.dumps(wanted, indent=1))
    return TestModel(model_path, mmproj_path, p, seed)


def make_test_projector(text_width: int, out_dir: str | os.PathLike[str] | None = None,
                        preset: str | Preset = "tiny-gemma3", *, seed: int = 0) -> Path:
    """Write (or reuse) only the random-weight projector of ``preset``, sized for a text model of
    width ``text_width``: the projector half of a pair whose text model is a real GGUF (e.g. a
    Gemma 3 projector of width 640 for Gemma 3 270M). Returns its path."""
    import dataclasses

    base = preset if isinstance(preset, Preset) else PRESETS[preset]
    if text_width < 1:
        raise ValueError(f"text_width must be >= 1, got {text_width}")
    p = dataclasses.replace(base, name=f"{base.name}-w{text_width}", n_embd=text_width)
    out = Path(out_dir) if out_dir is not None else default_cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{p.name}-s{seed}-mmproj.gguf"
    stamp = path.with_name(path.name + ".json")
    wanted = json.loads(json.dumps({"format": FORMAT_VERSION, "preset": asdict(p), "seed": seed}))
    if not (path.exists() and stamp.exists() and json.loads(stamp.read_text()) == wanted):
        tmp = path.with_name(path.name + ".tmp")
        _write_projector(tmp, p, seed)
        tmp.replace(path)
        stamp.write_text(json.dumps(wanted, indent=1))
    return path


def random_image(seed: int, size: tuple[int, int] = (96, 96)) -> np.ndarray:
    """A deterministic HxWx3 uint8 test image: smooth colour fields plus noise."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(xx / (5 + 10 * rng.random()) + rng.random() * 6) for _ in range(3)], axis=-1)
    base += np.stack([np.cos(yy / (5 + 10 * rng.random()) + rng.random() * 6) for _ in range(3)], axis=-1)
    img = 127.5 + 50 * base + rng.normal(0, 20, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def random_audio(seed: int, seconds: float = 1.0, rate: int = 16000) -> np.ndarray:
    """A deterministic mono test clip of float32 samples in [-1, 1): a few tones plus noise, rounded to
    16-bit steps, so that it survives a 16-bit WAV round trip (:func:`wav_bytes`) bit for bit."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * rate)), dtype=np.float64) / rate
    x = sum(0.2 * np.sin(2 * np.pi * rng.uniform(80, 4000) * t + rng.uniform(0, 2 * np.pi)) for _ in range(3))
    x = x + rng.normal(0, 0.05, t.size)
    pcm = np.clip(np.round(x * 32768), -32768, 32767)
    return (pcm / 32768).astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int = 16000) -> bytes:
    """``samples`` (mono floats in [-1, 1)) as a 16-bit PCM WAV file."""
    import io
    import wave

    pcm = np.clip(np.round(np.asarray(samples, dtype=np.float64) * 32768), -32768, 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())
    return buf.getvalue()


def rss_bytes() -> int:
    """This process's resident memory, after handing freed heap back to the OS (glibc keeps it
    otherwise, which would hide whether native memory really came back). Linux only."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llava-kv make-test-model",
                                     description="Write a random-weight GGUF pair (text model + mmproj).")
    parser.add_argument("--preset", default="tiny-llava", choices=list(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help=f"output folder (default: {default_cache_dir()})")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    tm = make_test_model(args.out, args.preset, seed=args.seed, overwrite=args.overwrite)
    print(json.dumps({"model": str(tm.model_path), "mmproj": str(tm.mmproj_path), "preset": tm.preset.name,
                      "seed": tm.seed, "image_tokens": tm.preset.image_tokens,
                      **({"audio_tokens": tm.preset.audio_tokens} if tm.preset.audio_tokens else {}),
                      "note": "random weights: output text is gibberish"}, indent=1))
    return 0
