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
- ``realistic``: SmolVLM-256M-like shapes (llama, n_embd 576, 30 layers, 9 heads / 3 KV heads,
  49152-token vocabulary) + a CLIP ``mlp`` projector (width 768, 12 layers, 224 px / patch 14 =
  256 image tokens), f16. For CPU benchmarks.
- ``llava-7b``: LLaVA-1.5-7B shapes (llama, n_embd 4096, 32 layers, 32000 tokens) + CLIP-L/336
  ``mlp`` projector (576 image tokens), f16, about 14 GB. For GPU benchmarks.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

__all__ = ["Preset", "PRESETS", "TestModel", "make_test_model", "random_image", "rss_bytes", "main"]

# Bump when the files written for the same preset and seed change.
FORMAT_VERSION = 2


@dataclass(frozen=True)
class Preset:
    name: str
    arch: str  # "llama" or "gemma3"
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    projector: str  # "mlp" or "gemma3"
    image_size: int
    patch_size: int
    v_width: int
    v_ff: int
    v_layers: int
    v_heads: int
    proj_hidden: int = 0  # mlp projector's hidden width (0: the text width)
    n_merge: int = 1  # gemma3 projector: pooling kernel per side
    sliding_window: int = 0  # gemma3: window of the local layers
    dtype: str = "f32"
    description: str = ""

    @property
    def image_tokens(self) -> int:
        side = self.image_size // self.patch_size
        if self.projector == "gemma3":
            side //= self.n_merge
        return side * side


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny-llava", "llama", n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128, n_vocab=1024,
               n_ctx_train=4096, projector="mlp", image_size=96, patch_size=16, v_width=32, v_ff=48,
               v_layers=3, v_heads=4, proj_hidden=64,
               description="llama + CLIP mlp projector, 36 image tokens, causal image decode"),
        Preset("tiny-gemma3", "gemma3", n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128, n_vocab=1024,
               n_ctx_train=4096, projector="gemma3", image_size=96, patch_size=16, v_width=32, v_ff=48,
               v_layers=2, v_heads=4, n_merge=2, sliding_window=64,
               description="gemma3 + Gemma 3 projector, 9 image tokens between begin/end markers, "
                           "non-causal image decode"),
        Preset("realistic", "llama", n_embd=576, n_layer=30, n_head=9, n_head_kv=3, n_ff=1536, n_vocab=49152,
               n_ctx_train=8192, projector="mlp", image_size=224, patch_size=14, v_width=768, v_ff=3072,
               v_layers=12, v_heads=12, proj_hidden=576, dtype="f16",
               description="SmolVLM-256M-like text shapes + CLIP mlp projector, 256 image tokens"),
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

_CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + "
    "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)


def _vocab(n_vocab: int, specials: list[str]) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + specials
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


def _write_text_model(path: Path, p: Preset, seed: int) -> None:
    import gguf

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
    if p.arch == "gemma3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(p.sliding_window)
        specials = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>"]
        template = _GEMMA_TEMPLATE
    else:
        writer.add_rope_dimension_count(head_dim)
        specials = ["<|im_start|>", "<|im_end|>"]
        template = _CHATML_TEMPLATE

    tokens, scores, types = _vocab(p.n_vocab, specials)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2 if p.arch == "llama" else tokens.index("<end_of_turn>"))
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(template)

    kv = p.n_head_kv * head_dim
    writer.add_tensor(names[T.TOKEN_EMBD] + ".weight", w.embedding(p.n_vocab, p.n_embd, 1.0))
    writer.add_tensor(names[T.OUTPUT_NORM] + ".weight", w.norm(p.n_embd, 0.0 if p.arch == "gemma3" else 1.0))
    # A separate output matrix: with tied embeddings a random model only repeats its last token.
    writer.add_tensor(names[T.OUTPUT] + ".weight", w.linear(p.n_vocab, p.n_embd))
    for i in range(p.n_layer):
        def name(t: "gguf.MODEL_TENSOR") -> str:
            return names[t].format(bid=i) + ".weight"

        gemma = p.arch == "gemma3"
        writer.add_tensor(name(T.ATTN_NORM), w.norm(p.n_embd, 0.0 if gemma else 1.0))
        writer.add_tensor(name(T.ATTN_Q), w.linear(p.n_head * head_dim, p.n_embd))
        writer.add_tensor(name(T.ATTN_K), w.linear(kv, p.n_embd))
        writer.add_tensor(name(T.ATTN_V), w.linear(kv, p.n_embd))
        writer.add_tensor(name(T.ATTN_OUT), w.linear(p.n_embd, p.n_head * head_dim))
        writer.add_tensor(name(T.FFN_NORM), w.norm(p.n_embd, 0.0 if gemma else 1.0))
        writer.add_tensor(name(T.FFN_GATE), w.linear(p.n_ff, p.n_embd))
        writer.add_tensor(name(T.FFN_UP), w.linear(p.n_ff, p.n_embd))
        writer.add_tensor(name(T.FFN_DOWN), w.linear(p.n_embd, p.n_ff))
        if gemma:
            writer.add_tensor(name(T.ATTN_POST_NORM), w.norm(p.n_embd, 0.0))
            writer.add_tensor(name(T.FFN_POST_NORM), w.norm(p.n_embd, 0.0))
            writer.add_tensor(name(T.ATTN_Q_NORM), w.norm(head_dim, 0.0))
            writer.add_tensor(name(T.ATTN_K_NORM), w.norm(head_dim, 0.0))
    _finish(writer)


def _write_projector(path: Path, p: Preset, seed: int) -> None:
    import gguf

    w = _Weights(seed + 1_000_003, p.dtype)
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_name(f"llava-kv test projector {p.name} seed {seed}")
    writer.add_description(f"random weights: {p.description}")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if p.dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_string("clip.projector_type", p.projector)
    writer.add_bool("clip.use_gelu", True)
    writer.add_uint32("clip.vision.image_size", p.image_size)
    writer.add_uint32("clip.vision.patch_size", p.patch_size)
    writer.add_uint32("clip.vision.embedding_length", p.v_width)
    writer.add_uint32("clip.vision.feed_forward_length", p.v_ff)
    writer.add_uint32("clip.vision.block_count", p.v_layers)
    writer.add_uint32("clip.vision.projection_dim", p.n_embd)
    writer.add_uint32("clip.vision.attention.head_count", p.v_heads)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    if p.projector == "gemma3":
        writer.add_uint32("clip.vision.projector.scale_factor", p.n_merge)

    n_patches = (p.image_size // p.patch_size) ** 2
    writer.add_tensor("v.patch_embd.weight",
                      w.embedding(p.v_width * 3 * p.patch_size * p.patch_size, 1, 1.0 / p.patch_size)
                      .reshape(p.v_width, 3, p.patch_size, p.patch_size))
    writer.add_tensor("v.patch_embd.bias", w.bias(p.v_width))
    if p.projector == "mlp":
        writer.add_tensor("v.class_embd", w.bias(p.v_width))
        writer.add_tensor("v.position_embd.weight", w.embedding(n_patches + 1, p.v_width, 0.02))
        writer.add_tensor("v.pre_ln.weight", w.norm(p.v_width))
        writer.add_tensor("v.pre_ln.bias", w.bias(p.v_width))
    else:
        writer.add_tensor("v.position_embd.weight", w.embedding(n_patches, p.v_width, 0.02))
    for i in range(p.v_layers):
        for part, (n_out, n_in) in {"attn_q": (p.v_width, p.v_width), "attn_k": (p.v_width, p.v_width),
                                    "attn_v": (p.v_width, p.v_width), "attn_out": (p.v_width, p.v_width),
                                    "ffn_up": (p.v_ff, p.v_width), "ffn_down": (p.v_width, p.v_ff)}.items():
            writer.add_tensor(f"v.blk.{i}.{part}.weight", w.linear(n_out, n_in))
            writer.add_tensor(f"v.blk.{i}.{part}.bias", w.bias(n_out))
        for norm in ("ln1", "ln2"):
            writer.add_tensor(f"v.blk.{i}.{norm}.weight", w.norm(p.v_width))
            writer.add_tensor(f"v.blk.{i}.{norm}.bias", w.bias(p.v_width))
    if p.projector == "mlp":
        hidden = p.proj_hidden or p.n_embd
        writer.add_tensor("mm.0.weight", w.linear(hidden, p.v_width))
        writer.add_tensor("mm.0.bias", w.bias(hidden))
        writer.add_tensor("mm.2.weight", w.linear(p.n_embd, hidden))
        writer.add_tensor("mm.2.bias", w.bias(p.n_embd))
    else:
        writer.add_tensor("v.post_ln.weight", w.norm(p.v_width))
        writer.add_tensor("v.post_ln.bias", w.bias(p.v_width))
        writer.add_tensor("mm.soft_emb_norm.weight", w.norm(p.v_width, 0.0))
        # clip.cpp applies it transposed: ggml shape [n_embd, v_width], i.e. numpy (v_width, n_embd).
        writer.add_tensor("mm.input_projection.weight", w.linear(p.v_width, p.n_embd))
    _finish(writer)


def _finish(writer: "object") -> None:
    writer.write_header_to_file()  # type: ignore[attr-defined]
    writer.write_kv_data_to_file()  # type: ignore[attr-defined]
    writer.write_tensors_to_file()  # type: ignore[attr-defined]
    writer.close()  # type: ignore[attr-defined]


def default_cache_dir() -> Path:
    base = os.environ.get("LLAVA_KV_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "llava-kv")
    return Path(base) / "test-models"


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
    wanted = {"format": FORMAT_VERSION, "preset": asdict(p), "seed": seed}
    fresh = (not overwrite and model_path.exists() and mmproj_path.exists() and stamp.exists()
             and json.loads(stamp.read_text()) == wanted)
    if not fresh:
        for target, writer in ((model_path, _write_text_model), (mmproj_path, _write_projector)):
            tmp = target.with_name(target.name + ".tmp")
            writer(tmp, p, seed)
            tmp.replace(target)
        stamp.write_text(json.dumps(wanted, indent=1))
    return TestModel(model_path, mmproj_path, p, seed)


def random_image(seed: int, size: tuple[int, int] = (96, 96)) -> np.ndarray:
    """A deterministic HxWx3 uint8 test image: smooth colour fields plus noise."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(xx / (5 + 10 * rng.random()) + rng.random() * 6) for _ in range(3)], axis=-1)
    base += np.stack([np.cos(yy / (5 + 10 * rng.random()) + rng.random() * 6) for _ in range(3)], axis=-1)
    img = 127.5 + 50 * base + rng.normal(0, 20, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


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


def iter_presets() -> Iterator[Preset]:
    return iter(PRESETS.values())


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
                      "note": "random weights: output text is gibberish"}, indent=1))
    return 0
