"""Session: one conversation over a model, with a timeline of text and images kept in step with
the KV cache by the native ImageEmbedRegistry."""
from __future__ import annotations

from collections.abc import MutableSequence
from dataclasses import dataclass
import json
import os
import time
import uuid
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence, Union, overload

import numpy as np

from . import _core
from .native import NativeObject
from .chat import plan_edit, render_messages
from .errors import CancelledError, LlavaKVError
from .images import ImageInput, load_image

if TYPE_CHECKING:
    from .model import Model

__all__ = ["Session", "ImageRef", "Chunk", "ImageList"]

EDIT_MODES = ("exact", "shift")


@dataclass(frozen=True)
class ImageRef:
    """An image in a session's timeline. ``pos0``/``pos1`` are its KV positions when the ref was made."""

    path: str
    digest: str
    n_tokens: int
    pos0: int
    pos1: int
    chunk_id: int


@dataclass(frozen=True)
class Chunk:
    """One element of the timeline: text tokens or one image, with its KV span ``[pos0, pos1)``."""

    kind: str  # "text" or "image"
    n_tokens: int
    pos0: int
    pos1: int
    chunk_id: int
    text: str | None = None
    image: ImageRef | None = None
    generated: bool = False


def _chunk_from_core(d: dict[str, Any]) -> Chunk:
    if d["kind"] == "image":
        ref = ImageRef(d["source"], d["digest"], d["n_tokens"], d["pos0"], d["pos1"], d["id"])
        return Chunk("image", d["n_tokens"], d["pos0"], d["pos1"], d["id"], image=ref)
    return Chunk("text", d["n_tokens"], d["pos0"], d["pos1"], d["id"], text=d["source"], generated=d["generated"])


class Session(NativeObject):
    """A conversation: append text and images, edit images anywhere, read logits.

    Every edit keeps the timeline, the embeddings and the KV cache consistent; a failed call leaves
    all three exactly as they were. Use ``with`` or :meth:`close` to free the context.
    """

    def __init__(self, model: "Model", core: _core.Session) -> None:
        self._model = model
        self._core = core
        self._cancel_requested = False
        self.last_finish_reason: str | None = None

    # -- lifetime ---------------------------------------------------------------------------

    def __repr__(self) -> str:
        if self.closed:
            return "<llava_kv.Session closed>"
        tl = self._core.timeline()
        n_images = sum(1 for c in tl if c["kind"] == "image")
        return (f"<llava_kv.Session n_past={self._core.n_past} n_ctx={self._core.n_ctx} chunks={len(tl)} "
                f"images={n_images}>")

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
    def timeline(self) -> list[Chunk]:
        return [_chunk_from_core(d) for d in self._core.timeline()]

    @property
    def images(self) -> "ImageList":
        """Live list view of the timeline's images; edits through it go through the registry."""
        return ImageList(self)  # a fresh view each time: a stored one would make a reference cycle

    @property
    def stats(self) -> dict[str, int]:
        """Counters of work done: tokens_decoded, images_encoded, embed_cache_hits/misses, kv_cells_removed..."""
        return dict(self._core.stats())

    def logits(self) -> np.ndarray:
        """Logits (float32, n_vocab) after the last token of the timeline."""
        return self._core.logits()

    def tokenize(self, text: str, *, add_special: bool = False) -> list[int]:
        return list(self._core.tokenize(text, add_special))

    # -- edits ------------------------------------------------------------------------------

    def _image(self, image: ImageInput) -> tuple[np.ndarray, str, str]:
        img = load_image(image, self._model.projector_id)
        return (img.pixels, img.digest, img.source)

    def _splice(self, begin: int, end: int, items: Sequence[Any]) -> list[int]:
        return list(self._core.splice(begin, end, list(items)))

    def _ref(self, chunk_id: int) -> ImageRef:
        for d in self._core.timeline():
            if d["id"] == chunk_id:
                chunk = _chunk_from_core(d)
                assert chunk.image is not None
                return chunk.image
        raise KeyError(chunk_id)

    def _index(self, ref: ImageRef | int) -> int:
        chunk_id = ref.chunk_id if isinstance(ref, ImageRef) else ref
        if not isinstance(chunk_id, int):
            raise TypeError(f"expected an ImageRef, not {type(ref).__name__}")
        index = self._core.index_of(chunk_id)
        if self._core.timeline()[index]["kind"] != "image":
            raise KeyError(f"chunk {chunk_id} is not an image")
        return index

    def append_text(self, text: str) -> None:
        """Append text (special tokens in it are parsed; BOS is added before the first chunk)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        self._splice(len(self._core.timeline()), len(self._core.timeline()), [text])

    def append_image(self, image: ImageInput) -> ImageRef:
        """Append an image (path, bytes, PIL image or HxWx3 uint8 array); returns its ref."""
        n = len(self._core.timeline())
        (chunk_id,) = self._splice(n, n, [self._image(image)])
        return self._ref(chunk_id)

    def insert_image(self, index: int, image: ImageInput) -> ImageRef:
        """Insert an image before the ``index``-th chunk of the timeline (``len(timeline)`` appends)."""
        n = len(self._core.timeline())
        if not 0 <= index <= n:
            raise IndexError(f"chunk index {index} is outside 0..{n}")
        (chunk_id,) = self._splice(index, index, [self._image(image)])
        return self._ref(chunk_id)

    def insert_text(self, index: int, text: str) -> None:
        """Insert text before the ``index``-th chunk of the timeline."""
        n = len(self._core.timeline())
        if not 0 <= index <= n:
            raise IndexError(f"chunk index {index} is outside 0..{n}")
        self._splice(index, index, [text])

    def replace_image(self, ref: ImageRef, image: ImageInput) -> ImageRef:
        """Replace the image ``ref`` with ``image``; only the timeline from that image on is recomputed."""
        index = self._index(ref)
        item = self._image(image)
        (chunk_id,) = self._splice(index, index + 1, [item])
        return self._ref(chunk_id)

    def remove_image(self, ref: ImageRef, mode: str = "exact") -> None:
        """Remove the image ``ref``.

        ``mode="exact"`` (default) re-decodes what followed it, so the result equals a fresh run.
        ``mode="shift"`` deletes its KV span and shifts later positions without re-decoding: fast
        but approximate (later tokens keep having attended to the image); refused with LlavaKVError
        for M-RoPE models and memories that cannot shift.
        """
        if mode not in EDIT_MODES:
            raise ValueError(f"mode must be one of {EDIT_MODES}, not {mode!r}")
        index = self._index(ref)
        if mode == "shift":
            self._core.remove_shift(self._core.timeline()[index]["id"])
        else:
            self._splice(index, index + 1, [])

    def truncate(self, n_chunks: int) -> None:
        """Keep the first ``n_chunks`` chunks of the timeline and drop the rest."""
        n = len(self._core.timeline())
        if not 0 <= n_chunks <= n:
            raise IndexError(f"n_chunks {n_chunks} is outside 0..{n}")
        if n_chunks < n:
            self._splice(n_chunks, n, [])

    def edit(self, begin: int, end: int, items: Iterable[Union[str, ImageInput]]) -> None:
        """Replace timeline chunks ``[begin, end)`` with ``items``: a ``str`` is text, anything else an
        image (give image paths as ``pathlib.Path``). One edit: only from ``begin`` on is recomputed."""
        n = len(self._core.timeline())
        if not 0 <= begin <= end <= n:
            raise IndexError(f"chunk range [{begin}, {end}) is outside the timeline of {n} chunks")
        self._splice(begin, end, [x if isinstance(x, str) else self._image(x) for x in items])

    def clear(self) -> None:
        """Remove everything: timeline, KV cache and the session's references to embeddings."""
        self._core.clear()

    # -- state ------------------------------------------------------------------------------

    _STATE_FORMAT = "llava-kv-session"
    _STATE_VERSION = 1

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the session (KV cache, timeline, image refs and their embeddings) to ``path``."""
        header = {"format": self._STATE_FORMAT, "version": self._STATE_VERSION,
                  "model_fingerprint": self._model.fingerprint, "projector_id": self._model.projector_id,
                  "n_ctx": self.n_ctx, "n_batch": self._core.n_batch, "n_past": self.n_past}
        blob = self._core.save_state()
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "wb") as f:
            f.write(json.dumps(header).encode() + b"\n")
            f.write(blob)
        os.replace(tmp, path)

    @classmethod
    def load(cls, model: "Model", path: str | os.PathLike[str], *, n_ctx: int | None = None,
             n_batch: int | None = None) -> "Session":
        """Open a session saved by :meth:`save` on ``model``, which must be the model it was saved
        from (same weights and projector); otherwise LlavaKVError names the mismatch."""
        with open(path, "rb") as f:
            line = f.readline()
            try:
                header = json.loads(line)
            except ValueError:
                header = None
            if not isinstance(header, dict) or header.get("format") != cls._STATE_FORMAT:
                raise LlavaKVError(f"{os.fspath(path)!r} is not a llava-kv session file")
            if header.get("version") != cls._STATE_VERSION:
                raise LlavaKVError(f"{os.fspath(path)!r} has session format version {header.get('version')}, "
                                   f"this llava-kv reads version {cls._STATE_VERSION}")
            if header["model_fingerprint"] != model.fingerprint or header["projector_id"] != model.projector_id:
                raise LlavaKVError(f"{os.fspath(path)!r} was saved from a different model or projector than "
                                   f"{model.path!r}; load it with the model it was saved from")
            blob = f.read()
        session = model.session(n_ctx=n_ctx or header["n_ctx"], n_batch=n_batch or header["n_batch"])
        try:
            session._core.load_state(blob)
        except BaseException:
            session.close()
            raise
        return session

    def fork(self) -> "Session":
        """A new, independent session holding a copy of this one (KV cache included): try two
        continuations, or two different images, side by side without recomputing the prefix."""
        blob = self._core.save_state()
        other = self._model.session(n_ctx=self.n_ctx, n_batch=self._core.n_batch)
        try:
            other._core.load_state(blob)
        except BaseException:
            other.close()
            raise
        return other

    # -- generation -------------------------------------------------------------------------

    def generate(self, max_tokens: int = 64, *, temperature: float = 0.0, top_k: int = 40, top_p: float = 0.95,
                 min_p: float = 0.05, repeat_penalty: float = 1.0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, stream: bool = False) -> Any:
        """Continue the timeline with up to ``max_tokens`` sampled tokens (greedy at temperature 0).

        Generated tokens become part of the timeline, so later turns and edits reuse them. Returns
        the text, or with ``stream=True`` an iterator of text pieces (whole UTF-8 characters);
        leaving the iterator early stops generating. Generation ends at an end-of-generation token,
        at ``max_tokens``, or when the text contains a ``stop`` string (which is not returned).
        ``last_finish_reason`` is then "stop" or "length".
        """
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(x, str) or not x for x in stops):
            raise ValueError("stop strings must be non-empty str")
        self._core.begin_generation(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                    repeat_penalty=repeat_penalty,
                                    seed=self._core.id * 7919 + 17 if seed is None else seed)
        self._cancel_requested = False
        pieces = self._pieces(max_tokens, stops)
        return pieces if stream else "".join(pieces)

    def _pieces(self, max_tokens: int, stops: list[str]) -> Iterator[str]:
        hold = max((len(x) for x in stops), default=1) - 1
        text, sent = "", 0
        self.last_finish_reason = "length"
        try:
            for _ in range(max_tokens):
                if self._cancel_requested:
                    raise CancelledError("generation was cancelled; the tokens generated so far stay in the session")
                _, raw, end = self._core.generate_step()
                if end:
                    self.last_finish_reason = "stop"
                    break
                text += raw.decode("utf-8", errors="replace")
                hit = min((i for i in (text.find(x, max(0, sent - hold)) for x in stops) if i >= 0), default=-1)
                if hit >= 0:
                    if hit > sent:
                        yield text[sent:hit]
                    sent = len(text)
                    self.last_finish_reason = "stop"
                    return
                safe = len(text) - hold
                if safe > sent:
                    yield text[sent:safe]
                    sent = safe
            text += self._core.flush_generation().decode("utf-8", errors="replace")
            if len(text) > sent:
                yield text[sent:]
        finally:
            self._core.flush_generation()

    def chat(self, messages: Sequence[dict[str, Any]], *, max_tokens: int = 256, temperature: float = 0.0,
             top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
             seed: int | None = None, stop: str | Sequence[str] | None = None, stream: bool = False,
             chat_template: str | None = None) -> Any:
        """Answer OpenAI-style ``messages`` (content: a string, or parts of type "text",
        "image_url" (path, file:// or base64 data: URI) and "image" (path, bytes, PIL, array)).

        The session keeps the conversation: a new turn only appends to the timeline; a changed
        earlier message or image is an edit from the first difference on. Returns a
        ``chat.completion`` dict (or, with ``stream=True``, an iterator of ``chat.completion.chunk``
        dicts) shaped as in the OpenAI / llama-cpp-python APIs.
        """
        items = render_messages(self._model, messages, chat_template=chat_template)
        timeline = self.timeline
        first, rest = plan_edit(timeline, items)
        before = self._core.stats()
        self._splice(first, len(timeline), [x if isinstance(x, str) else (x.pixels, x.digest, x.source) for x in rest])
        prompt_tokens = self._core.n_past
        reused = timeline[first].pos0 if first < len(timeline) else (timeline[-1].pos1 if timeline else 0)
        after = self._core.stats()
        meta = {"reused_tokens": reused,
                "decoded_tokens": after["tokens_decoded"] - before["tokens_decoded"],
                "images_encoded": after["images_encoded"] - before["images_encoded"]}
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        pieces = self.generate(max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                               repeat_penalty=repeat_penalty, seed=seed, stop=stop, stream=True)
        if stream:
            return self._chat_chunks(pieces, cid, created)
        content = "".join(pieces)
        completion = self.n_past - prompt_tokens
        return {
            "id": cid, "object": "chat.completion", "created": created, "model": self._model.path,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": self.last_finish_reason}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion},
            "llava_kv": meta,
        }

    def _chat_chunks(self, pieces: Iterator[str], cid: str, created: int) -> Iterator[dict[str, Any]]:
        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self._model.path,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        yield chunk({"role": "assistant"}, None)
        for piece in pieces:
            yield chunk({"content": piece}, None)
        yield chunk({}, self.last_finish_reason)


class ImageList(MutableSequence):  # type: ignore[type-arg]
    """The images of a session's timeline, in order. A view: reads reflect the session now, and
    ``del``, assignment, ``insert`` and ``clear`` are edits through the registry."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def _refs(self) -> list[ImageRef]:
        return [c.image for c in self._session.timeline if c.image is not None]

    def __len__(self) -> int:
        return len(self._refs())

    @overload
    def __getitem__(self, index: int) -> ImageRef: ...

    @overload
    def __getitem__(self, index: slice) -> list[ImageRef]: ...

    def __getitem__(self, index: int | slice) -> ImageRef | list[ImageRef]:
        return self._refs()[index]

    def __iter__(self) -> Iterator[ImageRef]:
        return iter(self._refs())

    def __setitem__(self, index: Any, image: Any) -> None:
        if isinstance(index, slice):
            raise TypeError("assign images one at a time: session.images[i] = image")
        self._session.replace_image(self._refs()[index], image)

    def __delitem__(self, index: int | slice) -> None:
        refs = self._refs()
        if isinstance(index, slice):
            self._session._core.remove_chunks([r.chunk_id for r in refs[index]])
        else:
            self._session.remove_image(refs[index])

    def insert(self, index: int, image: Any) -> None:
        refs = self._refs()
        if index < 0:
            index = max(0, len(refs) + index)
        if index >= len(refs):
            self._session.append_image(image)
        else:
            self._session.insert_image(self._session._core.index_of(refs[index].chunk_id), image)

    def clear(self) -> None:
        """Remove every image from the timeline, the KV cache and the session's embedding refs, in one edit."""
        self._session._core.remove_chunks([r.chunk_id for r in self._refs()])

    def __repr__(self) -> str:
        return f"ImageList({self._refs()!r})"
