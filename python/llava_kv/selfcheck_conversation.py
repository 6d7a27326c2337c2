"""The conversation the self-check evaluates (:mod:`llava_kv.selfcheck`), and a context that holds it.

Text around two media items, ending in text so that it has logits, fed with ``append_text`` /
``append_image`` / ``append_audio`` exactly as a user would: the media marker is never written here.
On a sliding-window model the question is made longer than the window, so that edits re-decode
across its edge. The context is sized by running each media item through a probe session first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .audio import load_audio
from .errors import ContextFullError, LlavaKVError, MediaError
from .gguf import read_gguf
from .images import ImageInput, load_image
from .testing import random_audio, random_image

if TYPE_CHECKING:
    from .model import Model
    from .session import Session
    from .timeline import Chunk

__all__ = ["MediaSet", "Plan", "APPENDED_TEXT", "image_set", "audio_set", "append_media", "conversation",
           "plan_conversation", "build_session", "feed_timeline", "rebatched", "session_tokens", "kind_of"]

_OPENING = "USER: look at these and describe them"
_BETWEEN = " and then this one"
_QUESTION = " what changed between them?"
_ANSWER = "\nASSISTANT:"
APPENDED_TEXT = " and now?"
# Lengthens the question past a sliding window, so that edits re-decode across the window's edge.
_FILLER = " the picture shows a red car near a green tree under a blue sky."
_MAX_PADDED_WINDOW = 4096
_DEFAULT_N_CTX = 4096
_DEFAULT_N_BATCH = 512


# -- the media and the conversation ---------------------------------------------------------------


@dataclass
class MediaSet:
    """Three distinct items of one kind: A and B in the conversation, C what the edits bring in."""

    kind: str  # "image" or "audio"
    items: list[np.ndarray]  # as the session takes them: HxWx3 uint8 or 1-D float32
    sources: list[str]
    by_digest: dict[str, np.ndarray]


def image_set(model: "Model", images: Sequence[ImageInput]) -> MediaSet:
    if images:
        loaded = [load_image(x, model.projector_id) for x in images[:3]]
        items = [x.pixels for x in loaded]
        sources = [x.source for x in loaded]
        # Fewer than three: mirrored copies are as realistic as the user's own and differ from them.
        if len(items) < 3:
            items.append(np.ascontiguousarray(items[0][:, ::-1]))
            sources.append(f"{sources[0]} (mirrored)")
        if len(items) < 3:
            items.append(np.ascontiguousarray(items[0][::-1]))
            sources.append(f"{sources[0]} (upside down)")
    else:
        items = [random_image(seed) for seed in (1, 2, 3)]
        sources = [f"<generated image {seed}>" for seed in (1, 2, 3)]
    return MediaSet("image", items, sources, {load_image(x, model.projector_id).digest: x for x in items})


def audio_set(model: "Model") -> MediaSet:
    rate = model.audio_sample_rate or 16000
    items = [random_audio(seed, seconds=0.5, rate=rate) for seed in (1, 2, 3)]
    return MediaSet("audio", items, [f"<generated clip {seed}, 0.5 s>" for seed in (1, 2, 3)],
                    {load_audio(x, model).digest: x for x in items})


def append_media(s: "Session", kind: str, x: np.ndarray) -> None:
    if kind == "audio":
        s.append_audio(x)
    else:
        s.append_image(x)


def conversation(media: MediaSet | None, question: str) -> list[Any]:
    """The conversation: text, A, text, B, text (text alone without media)."""
    if media is None:
        return [_OPENING, _BETWEEN, question + _ANSWER]
    a, b = media.items[:2]
    return [_OPENING, a, _BETWEEN, b, question + _ANSWER]


def _sliding_window(model_path: str) -> int:
    """The text model's attention window in tokens (0: none), as its GGUF says."""
    metadata = read_gguf(model_path).metadata
    window = metadata.get(f"{metadata.get('general.architecture')}.attention.sliding_window")
    return int(window) if isinstance(window, (int, np.integer)) and window > 0 else 0


# -- sizing ---------------------------------------------------------------------------------------


@dataclass
class Plan:
    """The sessions' sizes, and the question (lengthened past a sliding window where there is one)."""

    n_ctx: int
    n_batch: int
    question: str


def plan_conversation(model: "Model", media: list[MediaSet], n_ctx: int | None, n_batch: int | None,
                      notes: list[str]) -> Plan:
    """Context and batch sizes that hold the longest timeline the checks build, found by running
    each media item through a probe session (which also puts every embedding in the cache)."""
    window = _sliding_window(model.path)
    probe_ctx, probe_batch = n_ctx or _DEFAULT_N_CTX, n_batch or _DEFAULT_N_BATCH
    batch_grew = False
    for _ in range(8):
        try:
            with model.session(n_ctx=probe_ctx, n_batch=probe_batch) as s:
                question = _QUESTION
                if window and window <= _MAX_PADDED_WINDOW:
                    question += _FILLER * (window // max(1, len(s.tokenize(_FILLER))) + 2)
                texts = [_OPENING, _BETWEEN, question + _ANSWER, APPENDED_TEXT]
                text_cells = len(s.tokenize("", add_special=True)) + sum(len(s.tokenize(t)) for t in texts)
                media_cells, widest = 0, 0
                for m in media:
                    cells = []
                    for x in m.items:
                        s.clear()
                        append_media(s, m.kind, x)
                        cells.append(s._core.n_cells)
                    media_cells, widest = max(media_cells, sum(cells)), max(widest, *cells)
            break
        except ContextFullError as e:
            if n_ctx is not None:
                raise _too_small(None, n_ctx) from None  # e.needed counts one item alone
            probe_ctx = max(2 * probe_ctx, (e.needed or 0) + 64)
        except MediaError:
            raise
        except LlavaKVError:
            # A projector that attends over a whole image at once needs all of it in one batch.
            if n_batch is not None or probe_batch >= probe_ctx:
                raise
            probe_batch, batch_grew = probe_ctx, True
    else:
        raise LlavaKVError(f"could not size a context for the checks (tried up to {probe_ctx} cells): "
                           "give n_ctx (--n-ctx)")
    if window and window <= _MAX_PADDED_WINDOW:
        notes.append(f"the model attends over a {window}-token sliding window: the question was lengthened "
                     "past it, so that edits re-decode across the window's edge")
    elif window:
        notes.append(f"the model's {window}-token sliding window is not crossed (edits are checked inside it)")
    need = text_cells + media_cells + 32
    if n_ctx is not None and need > n_ctx:
        raise _too_small(need, n_ctx)
    final_batch = n_batch or (_round_up(max(widest, _DEFAULT_N_BATCH), 64) if batch_grew else probe_batch)
    final_ctx = n_ctx or _round_up(need, 256)
    return Plan(final_ctx, min(final_batch, final_ctx), question)


def _too_small(needed: int | None, n_ctx: int) -> ContextFullError:
    return ContextFullError(f"the checked conversation needs {needed or 'more'} KV cells, n_ctx is {n_ctx}: give a "
                            "larger n_ctx (--n-ctx), or none to size it to the conversation", needed, n_ctx)


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


# -- sessions -------------------------------------------------------------------------------------


def build_session(model: "Model", plan: Plan, kind: str | None, parts: list[Any],
                  positions: list[np.ndarray] | None = None) -> "Session":
    """A session fed ``parts``; the logits after each text part go to ``positions``."""
    s = model.session(n_ctx=plan.n_ctx, n_batch=plan.n_batch)
    try:
        for part in parts:
            if isinstance(part, str):
                s.append_text(part)
                if positions is not None:
                    positions.append(s.logits())
            else:
                assert kind is not None
                append_media(s, kind, part)
    except BaseException:
        s.close()
        raise
    return s


def feed_timeline(model: "Model", plan: Plan, timeline: list["Chunk"], media: MediaSet) -> "Session":
    """A fresh session fed ``timeline`` chunk by chunk (the same chunk layout), media by digest."""
    parts = [c.text if c.media is None else media.by_digest[c.media.digest] for c in timeline]
    return build_session(model, plan, media.kind, parts)


def rebatched(parts: list[Any]) -> list[Any]:
    """``parts`` with each text cut before its first and last space: the same tokens (for tokenizers
    that keep a space with the word after it) in other batches, as mtmd's layout moves a marker token
    from one batch to the next at each media edge."""
    out: list[Any] = []
    for part in parts:
        if not isinstance(part, str):
            out.append(part)
            continue
        cuts = sorted({i for i in (part.find(" ", 1), part.rfind(" ")) if i > 0})
        out += [part[i:j] for i, j in zip([0, *cuts], [*cuts, len(part)])]
    return out


def session_tokens(s: "Session") -> list[int]:
    """The session's tokens as reference_eval lists them: media positions as -1, BOS where added."""
    bos = s.tokenize("", add_special=True)
    out: list[int] = []
    for c in s.timeline:
        if c.media is not None:
            out += [-1] * c.n_tokens
        else:
            out += (bos if c.pos0 == 0 else []) + list(c.tokens)
    return out


def kind_of(media: MediaSet | None) -> str | None:
    return media.kind if media else None
