"""The text of one generation as it grows (used by Session.generate and the session pool)."""
from __future__ import annotations

from typing import Sequence

from . import _core

__all__ = ["TextStream"]


class TextStream:
    """The text of one generation as it grows: raw bytes in, whole characters out, cut at the first
    stop string (native, the batch runner's logic); text that may be the start of a stop string
    is held back until it is known not to be."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._matcher = _core.StopStrings(list(stops))
        self._sent = 0

    def stopped_by(self, raw: bytes) -> bool:
        """Add a token's bytes; True if the text now holds a stop string (generation must end)."""
        return bool(self._matcher.feed(raw))

    def take(self) -> str:
        """The text that became final since the last call."""
        safe = self._matcher.safe_size
        if safe <= self._sent:
            return ""
        piece = self._matcher.text[self._sent:safe].decode("utf-8", errors="replace")
        self._sent = safe
        return piece

    def finish(self, held_back: bytes = b"") -> str:
        """The rest once generation has ended (``held_back``: the bytes of an incomplete character)."""
        if not self._matcher.stopped and held_back:
            self._matcher.feed(held_back)
        rest = self._matcher.text[self._sent:]
        self._sent = len(self._matcher.text)
        return rest.decode("utf-8", errors="replace")

    @property
    def text(self) -> str:
        """Everything final so far, up to (not including) a stop string."""
        return self._matcher.text[:self._sent].decode("utf-8", errors="replace")
