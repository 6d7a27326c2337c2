"""The text-model GGUF writer: what each text architecture's llama.cpp loader requires (``_ARCHS``) and
``_write_text_model``, which writes a preset's random-weight text model with its tokenizer and chat
template.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .presets import Preset
from .vocab import _CHATS, _vocab
from .weights import _finish, _Weights


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
