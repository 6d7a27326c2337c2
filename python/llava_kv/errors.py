"""The exceptions llava-kv raises. Everything it raises on purpose derives from LlavaKVError."""
from __future__ import annotations

__all__ = [
    "LlavaKVError",
    "ModelLoadError",
    "MediaError",
    "ImageError",
    "ImageTooLargeError",
    "AudioError",
    "ContextFullError",
    "ClosedError",
    "CancelledError",
    "GrammarError",
]


class LlavaKVError(RuntimeError):
    """Base class of llava-kv's errors."""


class ModelLoadError(LlavaKVError):
    """A GGUF could not be loaded: corrupt, incompatible, or a projector that does not fit the model."""


class MediaError(LlavaKVError):
    """An image or audio clip could not be read, decoded or encoded: always raised as one of its two
    subclasses, so ``except MediaError`` catches a bad input of either kind."""


class ImageError(MediaError):
    """An image could not be read, decoded or encoded by the projector."""


class ImageTooLargeError(ImageError):
    """An image has more pixels than the limit (``pixels`` and ``limit`` carry the two numbers); only
    its header was read."""

    def __init__(self, message: str, pixels: int, limit: int) -> None:
        super().__init__(message)
        self.pixels = pixels
        self.limit = limit


class AudioError(MediaError):
    """An audio clip could not be read (unreadable file, wrong shape or dtype, NaN or infinite
    samples) or encoded by the projector."""


class ContextFullError(LlavaKVError):
    """The timeline would need more KV cells than the session's context holds.

    ``needed`` and ``available`` carry the two numbers.
    """

    def __init__(self, message: str, needed: int | None = None, available: int | None = None) -> None:
        super().__init__(message)
        self.needed = needed
        self.available = available


class ClosedError(LlavaKVError, ValueError):
    """A model or session was used after close() (a ValueError too, like a closed file)."""


class CancelledError(LlavaKVError):
    """A long call was cancelled (cancel() or Ctrl-C); the session is as it was before the call."""


class GrammarError(LlavaKVError):
    """Constrained generation (``grammar=``, ``json_schema=``, ``response_format=``) reached a point
    where the grammar allows no token of the model's vocabulary; what was generated before stays."""
