"""What the pinned llama.cpp and mtmd can load, as tables: the text architectures and projector
types they know, which families are hybrid or use latent attention, tokenizer models, layer,
expert and size limits, which vision towers have which tensors, and the metadata keys mtmd reads
with a typed getter. The checks in :mod:`.text_checks` and :mod:`.projector_checks` hold files to
these facts; they come from ``src/llama-arch.cpp``, ``src/llama-hparams.h``,
``src/llama-model.cpp``, ``src/llama-vocab.cpp``, ``ggml/include/ggml.h``, ``tools/mtmd/clip.cpp``
and ``tools/mtmd/clip-impl.h``, so update them here when the pin moves.
"""
from __future__ import annotations

from .reader import T_BOOL, T_F32, T_I32, T_STRING, T_U32

__all__ = ["TEXT_ARCHITECTURES", "PROJECTOR_TYPES"]

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
