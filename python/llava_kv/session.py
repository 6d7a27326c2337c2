"""Session: one conversation over a model, with a timeline of text and images kept in step with
the KV cache by the native ImageEmbedRegistry."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterable, Sequence, Union, cast

import numpy as np

from . import _core, saved
from .arguments import check_int
from .native import NativeObject
from .errors import ContextFullError, LlavaKVError
from .audio import AudioInput, load_audio, looks_like_audio
from .images import ImageInput, load_image
from .session_generation import Generating
from .timeline import MEDIA_KINDS, Chunk, ImageList, ImageRef, SessionStats, _chunk_from_core

if TYPE_CHECKING:
    from .model import Model

__all__ = ["Session"]

EDIT_MODES = ("exact", "shift", "blend")
# mode="blend": the leading tokens of each later image decoded again (the rest keep their KV cells).
DEFAULT_BLEND_K = 32


class Session(Generating, NativeObject[_core.Session]):
    """A conversation: append text and images, edit images anywhere, read logits.

    Every edit keeps the timeline, the embeddings and the KV cache consistent; a failed call leaves
    all three exactly as they were. Use ``with`` or :meth:`close` to free the context.
    """

    def __init__(self, model: "Model", core: _core.Session) -> None:
        self._model = model
        self._core = core
        self._cancel_requested = False
        self._generations = 0  # generate() calls so far: with the session seed, the next call's seed
        self.last_finish_reason: str | None = None
        # What the last blend edit did: tokens decoded and kept, what the exact edit would have
        # decoded, k asked for and applied (None before the first).
        self.last_blend: dict[str, int] | None = None

    # -- lifetime ---------------------------------------------------------------------------

    def __repr__(self) -> str:
        if self.closed:
            return "<llava_kv.Session closed>"
        tl = self._core.timeline()
        n_images = sum(1 for c in tl if c.kind == _core.ChunkKind.IMAGE)
        n_audio = sum(1 for c in tl if c.kind == _core.ChunkKind.AUDIO)
        return (f"<llava_kv.Session n_past={self._core.n_past} n_ctx={self._core.n_ctx} chunks={len(tl)} "
                f"images={n_images}" + (f" audio={n_audio}>" if n_audio else ">"))

    def cancel(self) -> None:
        """Stop the call running in another thread: an edit raises CancelledError and changes
        nothing; a generation stops after the tokens already produced (they stay in the timeline)."""
        self._cancel_requested = True
        self._core.cancel()

    # -- reading ----------------------------------------------------------------------------

    @property
    def model(self) -> "Model":
        return self._model

    @property
    def n_past(self) -> int:
        """KV positions in use (the next token's position)."""
        return self._core.n_past

    @property
    def n_ctx(self) -> int:
        return self._core.n_ctx

    @property
    def n_cells(self) -> int:
        """KV cells the timeline takes (what :meth:`snapshot` carries; at most ``n_ctx``)."""
        return self._core.n_cells

    @property
    def timeline(self) -> list[Chunk]:
        return [_chunk_from_core(d) for d in self._core.timeline()]

    @property
    def images(self) -> "ImageList":
        """Live list view of the timeline's images; edits through it go through the registry."""
        return ImageList(self, ("image",))  # a fresh view each time: a stored one would make a reference cycle

    @property
    def media(self) -> "ImageList":
        """Live list view of the timeline's images and audio clips, in order (``ref.kind`` tells which)."""
        return ImageList(self, MEDIA_KINDS)

    @property
    def stats(self) -> SessionStats:
        """Counters of work done: tokens_decoded, media_encoded (= images_encoded), embed_cache_hits/misses,
        kv_cells_removed..."""
        return cast(SessionStats, self._core.stats().as_dict())

    def logits(self) -> np.ndarray:
        """Logits (float32, n_vocab) after the last token of the timeline."""
        return self._core.logits()

    def tokenize(self, text: str, *, add_special: bool = False) -> list[int]:
        return list(self._core.tokenize(text, add_special))

    # -- edits ------------------------------------------------------------------------------

    def _image(self, image: ImageInput) -> _core.MediaItem:
        img = load_image(image, self._model.projector_id)
        return _core.MediaItem(img.pixels, img.digest, img.source)

    def _audio(self, audio: AudioInput) -> _core.MediaItem:
        clip = load_audio(audio, self._model)
        return _core.MediaItem(clip.samples, clip.digest, clip.source)

    def _media(self, kind: str, x: Any) -> _core.MediaItem:
        return self._audio(x) if kind == "audio" else self._image(x)

    def _splice(self, begin: int, end: int, items: Sequence[Any]) -> list[int]:
        return list(self._core.splice(begin, end, list(items)))

    def _ref(self, chunk_id: int) -> ImageRef:
        for c in self._core.timeline():
            if c.id == chunk_id:
                ref = _chunk_from_core(c).media
                assert ref is not None
                return ref
        raise KeyError(chunk_id)

    def _index(self, ref: ImageRef | int, kind: str = "image") -> int:
        chunk_id = ref.chunk_id if isinstance(ref, ImageRef) else ref
        if not isinstance(chunk_id, int):
            raise TypeError(f"expected an ImageRef, not {type(ref).__name__}")
        index = self._core.index_of(chunk_id)
        if self._core.timeline()[index].kind.name.lower() != kind:
            raise KeyError(f"chunk {chunk_id} is not {'an image' if kind == 'image' else 'an audio clip'}")
        return index

    def _append_media(self, kind: str, x: Any) -> ImageRef:
        n = len(self._core.timeline())
        (chunk_id,) = self._splice(n, n, [self._media(kind, x)])
        return self._ref(chunk_id)

    def _edit(self, begin: int, end: int, items: list[Any], mode: str, k: int | None,
              allow_drift: bool = False) -> list[int]:
        """Replace chunks [begin, end) with ``items`` in ``mode`` ("exact" or "blend")."""
        if mode not in ("exact", "blend"):
            raise ValueError(f"mode must be 'exact' or 'blend' here, not {mode!r}")
        if (k is not None or allow_drift) and mode != "blend":
            raise ValueError("k and allow_drift apply to mode='blend' only")
        if mode == "exact":
            return self._splice(begin, end, items)
        if k is None:
            k = DEFAULT_BLEND_K
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an integer >= 0, not {k!r}")
        ids, report = self._core.splice_blend(begin, end, items, k, bool(allow_drift))
        self.last_blend = report.as_dict()
        return list(ids)

    def _insert_media(self, kind: str, index: int, x: Any, mode: str = "exact", k: int | None = None,
                      allow_drift: bool = False) -> ImageRef:
        n = len(self._core.timeline())
        if not 0 <= index <= n:
            raise IndexError(f"chunk index {index} is outside 0..{n}")
        (chunk_id,) = self._edit(index, index, [self._media(kind, x)], mode, k, allow_drift)
        return self._ref(chunk_id)

    def _replace_media(self, kind: str, ref: ImageRef, x: Any, mode: str = "exact", k: int | None = None,
                       allow_drift: bool = False) -> ImageRef:
        index = self._index(ref, kind)
        (chunk_id,) = self._edit(index, index + 1, [self._media(kind, x)], mode, k, allow_drift)
        return self._ref(chunk_id)

    def _remove_media(self, kind: str, ref: ImageRef, mode: str, k: int | None = None,
                      allow_drift: bool = False) -> None:
        if mode not in EDIT_MODES:
            raise ValueError(f"mode must be one of {EDIT_MODES}, not {mode!r}")
        index = self._index(ref, kind)
        if mode == "shift":
            if k is not None or allow_drift:
                raise ValueError("k and allow_drift apply to mode='blend' only")
            self._core.remove_shift(self._core.timeline()[index].id)
        else:
            self._edit(index, index + 1, [], mode, k, allow_drift)

    # -- approximate edits ------------------------------------------------------------------

    @property
    def exact(self) -> bool:
        """Whether every KV cell is what a fresh run computes: False after a ``mode="blend"`` or
        ``mode="shift"`` edit, until :meth:`recompute`, an exact edit at or before the first
        approximate chunk, or :meth:`clear`. Saved, loaded and forked with the session."""
        return bool(self._core.exact)

    def recompute(self) -> int:
        """Make the session exact again: decode from the first approximate chunk on (nothing when
        already exact). Logits then equal a fresh run's bit for bit. Returns the tokens decoded; on
        failure or cancel the session is as before the call."""
        return int(self._core.recompute())

    def append_text(self, text: str) -> None:
        """Append text (special tokens in it are parsed; BOS is added before the first chunk)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        self._splice(len(self._core.timeline()), len(self._core.timeline()), [text])

    def append_image(self, image: ImageInput) -> ImageRef:
        """Append an image (path, bytes, PIL image or HxWx3 uint8 array); returns its ref."""
        return self._append_media("image", image)

    def insert_image(self, index: int, image: ImageInput, mode: str = "exact", k: int | None = None, *,
                     allow_drift: bool = False) -> ImageRef:
        """Insert an image before the ``index``-th chunk of the timeline (``len(timeline)`` appends);
        ``mode`` as for :meth:`replace_image`."""
        return self._insert_media("image", index, image, mode, k, allow_drift)

    def insert_text(self, index: int, text: str) -> None:
        """Insert text before the ``index``-th chunk of the timeline."""
        n = len(self._core.timeline())
        if not 0 <= index <= n:
            raise IndexError(f"chunk index {index} is outside 0..{n}")
        self._splice(index, index, [text])

    def replace_image(self, ref: ImageRef, image: ImageInput, mode: str = "exact", k: int | None = None, *,
                      allow_drift: bool = False) -> ImageRef:
        """Replace the image ``ref`` with ``image``; only the timeline from that image on is recomputed.

        ``mode="exact"`` (default): everything after it is decoded again; the result equals a fresh
        run. ``mode="blend"`` (approximate, opt-in): the new image is decoded after the exact prefix,
        every later text token and the first ``k`` tokens (default 32) of each later image again,
        and the rest of each later image keeps its KV cells. :attr:`exact` is then False and
        :attr:`last_blend` says what was decoded and kept; :meth:`recompute` makes it exact. Where
        later positions would move (a different token count) the model's cache must be able to
        shift them (not M-RoPE, not sliding-window); under M-RoPE ``k`` counts as 0 (an image's
        cells share one position). Refused for sliding-window models (Gemma 3), where its drift
        measured on real weights was too large to be useful, unless ``allow_drift=True``."""
        return self._replace_media("image", ref, image, mode, k, allow_drift)

    def remove_image(self, ref: ImageRef, mode: str = "exact", k: int | None = None, *,
                     allow_drift: bool = False) -> None:
        """Remove the image ``ref``.

        ``mode="exact"`` (default) re-decodes what followed it, so the result equals a fresh run.
        ``mode="shift"`` deletes its KV span and shifts later positions without re-decoding: fast
        but approximate (later tokens keep having attended to the image); refused with LlavaKVError
        for M-RoPE models and memories that cannot shift. ``mode="blend"`` (approximate) also
        shifts them, then decodes every later text token and the first ``k`` tokens of each later
        image again (see :meth:`replace_image`; same refusals as ``"shift"``). Both leave
        :attr:`exact` False.
        """
        self._remove_media("image", ref, mode, k, allow_drift)

    def append_audio(self, audio: AudioInput) -> ImageRef:
        """Append an audio clip: a wav/mp3/flac path or bytes, or a 1-D float32 array of mono samples at
        ``model.audio_sample_rate``. Same registry as images: cached by content, edited like them."""
        return self._append_media("audio", audio)

    def insert_audio(self, index: int, audio: AudioInput, mode: str = "exact", k: int | None = None, *,
                     allow_drift: bool = False) -> ImageRef:
        """Insert an audio clip before the ``index``-th chunk of the timeline (``mode`` as for
        :meth:`replace_image`)."""
        return self._insert_media("audio", index, audio, mode, k, allow_drift)

    def replace_audio(self, ref: ImageRef, audio: AudioInput, mode: str = "exact", k: int | None = None, *,
                      allow_drift: bool = False) -> ImageRef:
        """Replace the audio clip ``ref``; only the timeline from it on is recomputed (``mode`` as
        for :meth:`replace_image`)."""
        return self._replace_media("audio", ref, audio, mode, k, allow_drift)

    def remove_audio(self, ref: ImageRef, mode: str = "exact", k: int | None = None, *,
                     allow_drift: bool = False) -> None:
        """Remove the audio clip ``ref`` (``mode`` as for :meth:`remove_image`)."""
        self._remove_media("audio", ref, mode, k, allow_drift)

    def truncate(self, n_chunks: int) -> None:
        """Keep the first ``n_chunks`` chunks of the timeline and drop the rest."""
        n = len(self._core.timeline())
        if not 0 <= n_chunks <= n:
            raise IndexError(f"n_chunks {n_chunks} is outside 0..{n}")
        if n_chunks < n:
            self._splice(n_chunks, n, [])

    def edit(self, begin: int, end: int, items: Iterable[Union[str, ImageInput]]) -> None:
        """Replace timeline chunks ``[begin, end)`` with ``items``: a ``str`` is text, a 1-D float array
        or a .wav/.mp3/.flac path audio, anything else an image (give image paths as ``pathlib.Path``).
        One edit: only from ``begin`` on is recomputed."""
        n = len(self._core.timeline())
        if not 0 <= begin <= end <= n:
            raise IndexError(f"chunk range [{begin}, {end}) is outside the timeline of {n} chunks")
        self._splice(begin, end, [x if isinstance(x, str) else self._media("audio" if looks_like_audio(x) else "image", x)
                                  for x in items])

    def clear(self) -> None:
        """Remove everything: timeline, KV cache and the session's references to embeddings."""
        self._core.clear()

    # -- state ------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the session (KV cache, timeline, image refs and their embeddings) to ``path``.

        The file is written next to ``path`` and renamed over it, so ``path`` never holds half a
        session; the native part carries a checksum that :meth:`load` verifies.
        """
        saved.write(path, saved.header_for(self._model, n_ctx=self.n_ctx, n_past=self.n_past),
                    self._core.save_state())

    def snapshot(self) -> bytes:
        """The session's whole state (timeline, logits, KV cache of its sequence) as a checksummed
        blob: what :meth:`save` writes, in memory (a server's conversation store keeps these)."""
        return self._core.save_state()

    def restore(self, blob: bytes, *, allow_drift: bool = False) -> None:
        """Put a :meth:`snapshot` into this session, which must be empty (:meth:`clear`). The blob is
        checked first (checksum, sizes, what computed it: see :meth:`load` for ``allow_drift``); on
        failure the session stays empty. A pool slot's snapshot restores into any slot of a pool with
        the same number of slots."""
        self._core.load_state(blob, allow_drift)

    @classmethod
    def load(cls, model: "Model", path: str | os.PathLike[str], *, n_ctx: int | None = None,
             n_batch: int | None = None, allow_drift: bool = False) -> "Session":
        """Open a session saved by :meth:`save` on ``model``, which must be the model it was saved
        from (same weights and projector, same KV type); otherwise LlavaKVError names the mismatch.

        A file records what computed its KV cache: the llama.cpp llava-kv was built on, where the
        layers ran (``"CPU"``, ``"Vulkan0"``) and ggml's CPU kernels (``"zen4"``). Loaded where any
        of them differs, the cache is valid but is not what a fresh run here would compute, so such a
        file is refused (naming the difference) unless ``allow_drift=True``; the session is then
        approximate (``session.exact`` is False) until :meth:`recompute`.

        The file is checked before anything is allocated for it: header keys and types, the native
        state's checksum, its sizes against this model. ``n_ctx`` defaults to the saved one, which
        must not exceed the model's training context unless the saved timeline needs more; a smaller
        ``n_ctx`` than the timeline needs raises ContextFullError.
        """
        name = os.fspath(path)
        _, blob = saved.read(path, model)
        try:
            state = _core.inspect_state(model._core, blob)
        except LlavaKVError as e:
            raise LlavaKVError(f"{name!r}: {e}") from None
        needed = state.n_cells
        if n_ctx is None:
            n_ctx = state.n_ctx
            limit = max(model.n_ctx_train, needed)
            if n_ctx > limit:
                raise LlavaKVError(f"{name!r} declares n_ctx={n_ctx}, more than this model's training context "
                                   f"({model.n_ctx_train}) and more than the {needed} cells its timeline takes; "
                                   f"pass n_ctx= to choose the size")
        else:
            n_ctx = check_int("n_ctx", n_ctx)
        if n_ctx < needed:
            raise ContextFullError(f"{name!r} needs {needed} KV cells but n_ctx={n_ctx}; pass n_ctx >= {needed}",
                                   needed=needed, available=n_ctx)
        n_batch = n_batch or state.n_batch
        session = model.session(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=min(state.n_ubatch, n_batch))
        try:
            session._core.load_state(blob, allow_drift)
        except BaseException:
            session.close()
            raise
        return session

    def fork(self) -> "Session":
        """A new, independent session holding a copy of this one (KV cache included): try two
        continuations, or two different images, side by side without recomputing the prefix."""
        blob = self._core.save_state()
        other = self._model.session(n_ctx=self.n_ctx, n_batch=self._core.n_batch, n_ubatch=self._core.n_ubatch,
                                    seed=self._core.seed)
        other._generations = self._generations  # a fork samples on as this session would
        try:
            other._core.load_state(blob)
        except BaseException:
            other.close()
            raise
        return other
