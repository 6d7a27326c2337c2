"""What a session's timeline is made of, as Python sees it: the chunks (text, or an image or audio
clip and its ImageRef), the live list view of a session's media, and the session's counters."""
from __future__ import annotations

from collections.abc import MutableSequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, TypedDict, overload

from . import _core
from .audio import looks_like_audio

if TYPE_CHECKING:
    from .session import Session

__all__ = ["SessionStats", "ImageRef", "Chunk", "ImageList", "MEDIA_KINDS"]

MEDIA_KINDS = ("image", "audio")


class SessionStats(TypedDict):
    """Counters of the work a session did (since it was opened); media counters count audio too."""

    tokens_decoded: int  # text + media tokens written into the KV cache
    text_tokens_decoded: int
    image_tokens_decoded: int
    images_decoded: int  # media chunks written into the KV cache (from embeddings)
    images_encoded: int  # media run through the projector (cache misses)
    media_encoded: int  # the same count as images_encoded, under a name that says clips count too
    embed_cache_hits: int
    embed_cache_misses: int
    batched_encodes: int  # projector calls that encoded several at once
    tokens_generated: int
    kv_cells_removed: int
    decode_calls: int
    full_redecodes: int  # edits where the memory refused a partial removal
    shift_edits: int
    blend_edits: int  # approximate edits (mode="blend")
    blend_tokens_kept: int  # KV cells of later chunks those kept instead of decoding
    batched_steps: int  # generated tokens decoded in a step shared with other slots (session pools)


@dataclass(frozen=True)
class ImageRef:
    """An image (or, with ``kind="audio"``, an audio clip) in a session's timeline. ``source`` is the
    path it was given as, or a short description of the object (``"<array 96x96>"``); ``pos0``/``pos1``
    are its KV positions when the ref was made."""

    source: str
    digest: str
    n_tokens: int
    pos0: int
    pos1: int
    chunk_id: int
    kind: str = "image"  # "image" or "audio"

    @property
    def path(self) -> str:
        """The older name of :attr:`source` (it holds a description, not a path, for non-files)."""
        return self.source


@dataclass(frozen=True)
class Chunk:
    """One element of the timeline: text tokens or one image, with its KV span ``[pos0, pos1)``."""

    kind: str  # "text", "image" or "audio"
    n_tokens: int
    pos0: int
    pos1: int
    chunk_id: int
    text: str | None = None
    image: ImageRef | None = None
    generated: bool = False
    audio: ImageRef | None = None
    tokens: tuple[int, ...] = ()  # token ids of a text chunk (BOS excluded)

    @property
    def media(self) -> ImageRef | None:
        """The image or audio clip of a media chunk."""
        return self.image or self.audio


def _chunk_from_core(c: _core.ChunkInfo) -> Chunk:
    kind = c.kind.name.lower()
    if kind in MEDIA_KINDS:
        ref = ImageRef(c.source, c.digest, c.n_tokens, c.pos0, c.pos1, c.id, kind)
        return Chunk(kind, c.n_tokens, c.pos0, c.pos1, c.id,
                     image=ref if kind == "image" else None, audio=ref if kind == "audio" else None)
    return Chunk("text", c.n_tokens, c.pos0, c.pos1, c.id, text=c.source, generated=c.generated,
                 tokens=tuple(c.tokens))


class ImageList(MutableSequence):  # type: ignore[type-arg]
    """The images (``session.images``) or all media (``session.media``: images and audio clips) of a
    session's timeline, in order. A view: reads reflect the session now, and ``del``, assignment,
    ``insert`` and ``clear`` are edits through the registry."""

    def __init__(self, session: Session, kinds: tuple[str, ...] = ("image",)) -> None:
        self._session = session
        self._kinds = kinds

    def _refs(self) -> list[ImageRef]:
        return [c.media for c in self._session.timeline if c.media is not None and c.kind in self._kinds]

    def _kind_of(self, x: Any) -> str:
        return "audio" if "audio" in self._kinds and looks_like_audio(x) else "image"

    def __len__(self) -> int:
        return len(self._refs())

    def __eq__(self, other: object) -> bool:
        """Equal to a list (or another view) of the same refs: ``session.images == []``."""
        if isinstance(other, ImageList):
            return self._refs() == other._refs()
        if isinstance(other, (list, tuple)):
            return self._refs() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # a live view: equal to what the session holds now

    @overload
    def __getitem__(self, index: int) -> ImageRef: ...

    @overload
    def __getitem__(self, index: slice) -> list[ImageRef]: ...

    def __getitem__(self, index: int | slice) -> ImageRef | list[ImageRef]:
        return self._refs()[index]

    def __iter__(self) -> Iterator[ImageRef]:
        return iter(self._refs())

    def __setitem__(self, index: Any, item: Any) -> None:
        if isinstance(index, slice):
            raise TypeError("assign one at a time: session.images[i] = image")
        ref = self._refs()[index]
        self._session._replace_media(ref.kind, ref, item)  # an image stays an image, a clip a clip

    def __delitem__(self, index: int | slice) -> None:
        refs = self._refs()
        if isinstance(index, slice):
            self._session._core.remove_chunks([r.chunk_id for r in refs[index]])
        else:
            self._session._remove_media(refs[index].kind, refs[index], "exact")

    def insert(self, index: int, item: Any) -> None:
        refs = self._refs()
        kind = self._kind_of(item)
        if index < 0:
            index = max(0, len(refs) + index)
        if index >= len(refs):
            self._session._append_media(kind, item)
        else:
            self._session._insert_media(kind, self._session._core.index_of(refs[index].chunk_id), item)

    def clear(self) -> None:
        """Remove every item of the view from the timeline, the KV cache and the session's embedding
        refs, in one edit."""
        self._session._core.remove_chunks([r.chunk_id for r in self._refs()])

    def __repr__(self) -> str:
        return f"{'MediaList' if 'audio' in self._kinds else 'ImageList'}({self._refs()!r})"
