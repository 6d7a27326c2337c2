"""Checks of a GGUF text model: its architecture is one llava-kv loads, its hyperparameters
(layers, width, heads, experts, epsilons, rope) are in the ranges llama.cpp can live with, its
vocabulary is well formed (no duplicate token, BOS/EOS ids inside it) and its tensor table matches
what the hyperparameters say. :func:`check_text_model` is the entry point.
"""
from __future__ import annotations

import os

import numpy as np

from .facts import (
    _DEFAULT_BOS,
    _HYBRID_ARCHITECTURES,
    _MLA_ARCHITECTURES,
    _ROPE_SCALING_TYPES,
    _TOKENIZER_MODELS,
    LLAMA_MAX_EXPERTS,
    LLAMA_MAX_LAYERS,
    MAX_CONTEXT,
    MAX_EMBD,
    MAX_FF,
    MAX_HEAD_DIM,
    MAX_HEADS,
    MAX_VOCAB,
    TEXT_ARCHITECTURES,
)
from .reader import (
    _INT_TYPES,
    _TYPE_NAMES,
    T_ARRAY,
    T_BOOL,
    T_F32,
    T_I32,
    T_STRING,
    GGUFFile,
    read_gguf,
)
from .tensor_checks import _check_tensor_types
from .typed_access import _describe, _float, _get, _int, _per_layer, _str, _tensor

__all__ = ["check_text_model"]


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
