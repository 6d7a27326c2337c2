"""Model: a text model plus its optional projector, loaded once and shared by sessions."""
from __future__ import annotations

import atexit
import itertools
import os
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, TypedDict

from . import _core

if TYPE_CHECKING:
    from .pool import SessionPool
    import numpy as np
from .arguments import UINT32_MAX, check_int, sampling_params
from .native import NativeObject
from .gguf import check_model_files
from .images import file_fingerprint
from .session import Session

__all__ = ["Model", "MemoryReport"]

# The names Model.load takes: the native enums' members, lower-cased ("auto", "on", "off"; "f16", ...).
_FLASH_ATTN = {name.lower(): value for name, value in _core.FlashAttn.__members__.items()}
_KV_TYPES = {name.lower(): value for name, value in _core.KvType.__members__.items()}


def _kv_types(kv_type: Any) -> tuple[_core.KvType, _core.KvType]:
    """The K and V cache types ``kv_type`` names: one type for both, or a (k, v) pair."""
    pair = (kv_type, kv_type) if isinstance(kv_type, str) else kv_type
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and
            all(isinstance(t, str) and t in _KV_TYPES for t in pair)):
        raise ValueError(f"kv_type must be one of {', '.join(map(repr, _KV_TYPES))} or a (k, v) pair of them, "
                         f"got {kv_type!r}")
    return _KV_TYPES[pair[0]], _KV_TYPES[pair[1]]


class MemoryReport(TypedDict):
    """Bytes per component and device (``{device: bytes}``), sessions by id, and each device's memory."""

    weights: dict[str, int]
    projector: dict[str, int]
    embedding_cache: dict[str, int]
    sessions: dict[int, dict[str, dict[str, int]]]  # id -> {"kv": {dev: n}, "compute": {dev: n}}
    batches: dict[int, dict[str, dict[str, int]]]  # a live batch runner's context, the same way
    total: dict[str, int]
    devices: dict[str, _core.Device]

# Every open model, so that interpreter exit can stop what still runs natively (batch workers, edits
# in other threads) before Python tears down: no native thread may outlive the interpreter.
_live_models: "weakref.WeakSet[Model]" = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    for model in list(_live_models):
        try:
            model.close()
        except Exception:  # noqa: BLE001 - exiting: a model that fails to close must not stop the others
            pass


def _check_file(path: str | os.PathLike[str], what: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(2, f"No such {what} file", str(path))
    return str(p)


class Model(NativeObject[_core.Model]):
    """A loaded vision-language model. Use :meth:`load`; close with :meth:`close` or ``with``.

    ``close()`` closes every session made from the model, then frees the projector, then the
    weights; it is idempotent, and any later use raises :class:`llava_kv.ClosedError`.
    """

    def __init__(self, core: _core.Model, projector_id: str) -> None:
        self._core = core
        self._projector_id = projector_id
        self._fingerprint: str | None = None

    @classmethod
    def load(cls, model_path: str | os.PathLike[str], mmproj_path: str | os.PathLike[str] | None = None, *,
             n_gpu_layers: int = 0, mmproj_use_gpu: bool = True, n_threads: int | None = None,
             verbose: bool = False, embed_cache_bytes: int = 1 << 30, flash_attn: str = "auto",
             main_gpu: str | None = None, kv_type: str | tuple[str, str] = "f16") -> "Model":
        """Load a GGUF text model and, optionally, its mmproj projector.

        Where things live (GPU builds; see :func:`llava_kv.devices`): ``n_gpu_layers`` layers of the
        text model (-1: all) go to the GPU, and their KV cache and compute buffers with them;
        ``mmproj_use_gpu`` puts the projector there too. ``main_gpu`` names the device for both
        ("Vulkan0", "CUDA1"); None lets llama.cpp spread layers over every GPU it sees and gives the
        projector the first. ``kv_type`` is the KV cache's element type: "f16", or "q8_0"/"q4_0" for
        about half/a quarter of the memory, for K and V alike, or a ``(k, v)`` pair ("q8_0", "f16");
        a quantized V cache needs flash attention, a quantized K cache does not. ``flash_attn`` is llama.cpp's choice
        for every context of the model: "auto" (llama.cpp decides; on for CPU), "on" or "off". Logits
        equal another runtime's only with the same setting (llama-cpp-python's ``Llama()`` defaults to
        off). Raises FileNotFoundError for a missing file and :class:`llava_kv.ModelLoadError` for a
        corrupt or incompatible one.
        """
        if not isinstance(flash_attn, str) or flash_attn not in _FLASH_ATTN:
            raise ValueError(f"flash_attn must be one of {', '.join(map(repr, _FLASH_ATTN))}, got {flash_attn!r}")
        type_k, type_v = _kv_types(kv_type)
        if main_gpu is not None and not isinstance(main_gpu, str):
            raise TypeError(f"main_gpu must be a device name such as 'Vulkan0' (or None), got {main_gpu!r}")
        model = _check_file(model_path, "model")
        mmproj = _check_file(mmproj_path, "mmproj") if mmproj_path is not None else ""
        check_int("n_gpu_layers", n_gpu_layers, -1)
        check_int("n_threads", n_threads, 1, allow_none=True)
        check_int("embed_cache_bytes", embed_cache_bytes, 0, 2**63 - 1)
        check_model_files(model, mmproj or None)  # llama.cpp asserts on malformed files: refuse them first
        core = _core.Model.load(model, mmproj, n_gpu_layers=n_gpu_layers, mmproj_use_gpu=mmproj_use_gpu,
                                n_threads=n_threads or 0, verbose=verbose, embed_cache_bytes=embed_cache_bytes,
                                flash_attn=_FLASH_ATTN[flash_attn], main_gpu=main_gpu or "",
                                type_k=type_k, type_v=type_v)
        loaded = cls(core, file_fingerprint(mmproj) if mmproj else "")
        _live_models.add(loaded)
        return loaded

    # -- lifetime ---------------------------------------------------------------------------

    def __repr__(self) -> str:
        if self.closed:
            return f"<llava_kv.Model {Path(self._core.path).name!r} closed>"
        proj = Path(self._core.mmproj_path).name if self._core.mmproj_path else None
        return (f"<llava_kv.Model {Path(self._core.path).name!r} mmproj={proj!r} n_embd={self.n_embd} "
                f"n_vocab={self.n_vocab} sessions={self._core.n_open_sessions()}>")

    # -- properties -------------------------------------------------------------------------

    @property
    def path(self) -> str:
        return self._core.path

    @property
    def mmproj_path(self) -> str | None:
        return self._core.mmproj_path or None

    @property
    def n_embd(self) -> int:
        return self._core.n_embd

    @property
    def n_vocab(self) -> int:
        return self._core.n_vocab

    @property
    def n_ctx_train(self) -> int:
        return self._core.n_ctx_train

    @property
    def has_vision(self) -> bool:
        return self._core.has_vision

    @property
    def description(self) -> str:
        """llama.cpp's one-line description of the text model (architecture, size, type)."""
        return self._core.description

    @property
    def uses_mrope(self) -> bool:
        """Whether image positions are M-RoPE (an image takes fewer positions than KV cells)."""
        return self._core.uses_mrope

    @property
    def media_marker(self) -> str:
        """The text that stands for an image or audio clip in a prompt (mtmd's marker)."""
        return self._core.media_marker

    def render_chat(self, messages: list[tuple[str, str]], *, add_assistant: bool = True,
                    template: str = "") -> str:
        """``(role, content)`` pairs rendered by llama.cpp's template engine with ``template`` (a
        built-in name or a template string; "" for the model's own). See :mod:`llava_kv.chat` for
        choosing the template.

        Contents may hold NUL characters (a model can generate one, and its reply comes back as the
        next turn's history): the engine reads C strings and would end a content at the first NUL,
        so a stand-in found in no content takes each NUL's place while it renders. Roles and
        templates must not hold one."""
        messages = list(messages)
        for role, _ in messages:
            if "\0" in role:
                raise ValueError(f"a message role must not contain a NUL character: {role!r}")
        if "\0" in template:
            raise ValueError("the chat template must not contain a NUL character")
        if not any("\0" in content for _, content in messages):
            return self._core.apply_chat_template(messages, add_assistant, template)
        taken = template + "".join(role + content for role, content in messages)
        stand_in = next(s for s in (f"\ue000nul{n}\ue001" for n in itertools.count()) if s not in taken)
        safe = [(role, content.replace("\0", stand_in)) for role, content in messages]
        return self._core.apply_chat_template(safe, add_assistant, template).replace(stand_in, "\0")

    def _start_batch_runner(self, **params: Any) -> _core.BatchRunner:
        """The native runner behind :func:`llava_kv.batch.iter_run` (private to that module)."""
        return _core.BatchRunner.start(self._core, **params)

    def tokenize(self, text: str, *, add_special: bool = False) -> list[int]:
        """The model's tokens for ``text`` (special tokens written in it are parsed; ``add_special``:
        BOS first where the model adds one)."""
        return self._core.tokenize(text, add_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of ``tokens``, as llama.cpp writes it back (the space a tokenizer adds before the
        first word is removed, so ``detokenize(tokenize(t)) == t``); ValueError for an id outside
        the vocabulary; bytes that are not UTF-8 become U+FFFD."""
        return self._core.detokenize([check_int("token id", t, 0) for t in tokens]).decode("utf-8", errors="replace")

    def token_bytes(self, tokens: Sequence[int]) -> bytes:
        """The bytes ``tokens`` stand for, joined (a token may hold part of a UTF-8 character)."""
        return b"".join(self.token_pieces(tokens))

    def token_pieces(self, tokens: Sequence[int]) -> list[bytes]:
        """The bytes of each of ``tokens``, one entry per token; ValueError for an id outside the
        vocabulary."""
        return self._core.token_pieces([check_int("token id", t, 0) for t in tokens])

    def check_sampling(self, **options: Any) -> None:
        """Raise ValueError for sampling settings (``generate``'s keywords: temperature, top_k, top_p,
        min_p, repeat_penalty, presence_penalty, frequency_penalty, logit_bias, grammar, seed) that
        generation with this model would refuse, naming the setting: out of range, a ``logit_bias``
        token id outside the vocabulary, a grammar llama.cpp cannot parse. Nothing is decoded."""
        self._core.check_sampling(sampling_params(**options))

    @property
    def has_audio(self) -> bool:
        """Whether the projector has an audio encoder (``Session.append_audio``)."""
        return self._core.has_audio

    @property
    def audio_sample_rate(self) -> int | None:
        """The sample rate audio arrays must have (e.g. 16000), None without audio."""
        rate = self._core.audio_sample_rate
        return rate if rate > 0 else None

    def decode_audio(self, data: bytes) -> "np.ndarray":
        """wav/mp3/flac bytes -> mono float32 samples at :attr:`audio_sample_rate` (mtmd's decoder)."""
        return self._core.decode_audio(bytes(data))

    @property
    def main_gpu(self) -> str | None:
        """The device named at load, None for llama.cpp's choice."""
        return self._core.main_gpu or None

    @property
    def kv_type(self) -> str | tuple[str, str]:
        """The KV cache's element type: "f16", "q8_0" or "q4_0"; a (k, v) pair where they differ."""
        k, v = self._core.type_k.name.lower(), self._core.type_v.name.lower()
        return k if k == v else (k, v)

    @property
    def flash_attn(self) -> str:
        """The flash-attention setting of the model's contexts: "auto", "on" or "off"."""
        return self._core.flash_attn.name.lower()

    @property
    def projector_id(self) -> str:
        """Content fingerprint of the mmproj file; part of every image digest."""
        return self._projector_id

    @property
    def fingerprint(self) -> str:
        """Content fingerprint of the text model file (saved sessions only load into the same model)."""
        if self._fingerprint is None:
            self._fingerprint = file_fingerprint(self._core.path)
        return self._fingerprint

    # -- sessions and reports ---------------------------------------------------------------

    def session(self, *, n_ctx: int = 4096, n_batch: int = 512, n_ubatch: int | None = None, seed: int = 0,
                n_threads: int | None = None) -> Session:
        """Open a conversation with its own KV cache of ``n_ctx`` cells (edits are checked against
        ``n_ctx``; llama.cpp may allocate a few more). ``seed`` makes sampled text reproducible per
        session: ``generate(seed=None)`` draws each call's seed from it (see ``Session.generate``)."""
        check_int("n_ctx", n_ctx)
        check_int("n_batch", n_batch)
        check_int("n_ubatch", n_ubatch, allow_none=True)
        check_int("seed", seed, 0, UINT32_MAX)
        check_int("n_threads", n_threads, allow_none=True)
        core = self._core.session(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch or 0, seed=seed,
                                  n_threads=n_threads or 0)
        return Session(self, core)

    def session_pool(self, slots: int, *, n_ctx: int = 4096, n_batch: int = 512, n_ubatch: int | None = None,
                     seed: int = 0, n_threads: int | None = None) -> "SessionPool":
        """``slots`` sessions sharing one context, ``n_ctx`` KV cells each: every slot is a full
        :class:`Session`, and their generation steps can run as one batched decode
        (:class:`llava_kv.pool.SessionPool`). Slot ``i`` is seeded ``seed + i``."""
        from .pool import SessionPool

        check_int("slots", slots, 1, 256)
        check_int("n_ctx", n_ctx)
        check_int("n_batch", n_batch, slots)
        check_int("n_ubatch", n_ubatch, allow_none=True)
        check_int("seed", seed, 0, UINT32_MAX - slots)
        check_int("n_threads", n_threads, allow_none=True)
        cores = self._core.session_pool(slots, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch or 0, seed=seed,
                                        n_threads=n_threads or 0)
        return SessionPool(self, cores)

    def chat_session(self, *, n_ctx: int = 4096, n_batch: int = 512, seed: int = 0,
                     n_threads: int | None = None) -> Session:
        """A session for :meth:`Session.chat` (the same object: chat keeps its conversation in the timeline)."""
        return self.session(n_ctx=n_ctx, n_batch=n_batch, seed=seed, n_threads=n_threads)

    @property
    def chat_template(self) -> str | None:
        return self._core.chat_template or None

    def memory(self) -> "MemoryReport":
        """Bytes held, per component and device, plus each device's free/total memory.

        ``{"weights": {dev: n}, "projector": {dev: n}, "embedding_cache": {dev: n},
        "sessions": {id: {"kv": {dev: n}, "compute": {dev: n}}}, "batches": {id: {...}} (the context
        of each batch runner alive, e.g. a :class:`llava_kv.batch.Runner`), "total": {dev: n},
        "devices": {name: Device}}``: each :class:`llava_kv.Device` with its ``type``, ``free``,
        ``total`` and ``allocated`` (this process's live buffers there, the device ledger).
        """
        native = self._core.memory()
        report: MemoryReport = {"weights": {}, "projector": {}, "embedding_cache": {}, "sessions": {}, "batches": {},
                                "total": {}, "devices": {}}
        for e in native.entries:
            slot: dict[str, int]
            if e.session_id or e.batch_id:
                owners = report["sessions"] if e.session_id else report["batches"]
                slot = owners.setdefault(e.session_id or e.batch_id, {"kv": {}, "compute": {}})[e.component]
            else:
                slot = report[e.component]  # type: ignore[literal-required]
            slot[e.device] = slot.get(e.device, 0) + e.bytes
            report["total"][e.device] = report["total"].get(e.device, 0) + e.bytes
        report["devices"] = {device.name: device for device in native.devices}
        return report

    def embedding_cache_stats(self) -> dict[str, int]:
        """Hits, misses, evictions, entries and bytes of the shared embedding cache."""
        return self._core.cache_stats().as_dict()
