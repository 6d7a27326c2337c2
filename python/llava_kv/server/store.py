"""Conversations out of their slots: saved slot states by conversation key, in host memory up to a
byte budget and, with ``--state-dir``, on disk; and the prefix signatures the engine matches requests
against them with."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional, Sequence

from .. import saved
from ..chat import plan_edit
from ..errors import LlavaKVError
from ..model import Model

__all__ = ["ConversationStore", "Stored", "signature", "reusable_cells"]


def signature(timeline: Sequence[Any]) -> list[list[Any]]:
    """What prefix matching needs of a timeline: per chunk its cells and text (or media digest)."""
    out: list[list[Any]] = []
    for c in timeline:
        if c.media is not None:
            out.append(["m", c.n_tokens, c.media.digest])
        else:
            out.append(["t", c.n_tokens, c.text or "", bool(c.generated)])
    return out


def _as_chunks(sig: Sequence[Sequence[Any]]) -> list[Any]:
    chunks = []
    for entry in sig:
        if entry[0] == "m":
            chunks.append(SimpleNamespace(n_tokens=entry[1], media=SimpleNamespace(digest=entry[2]), text=None,
                                          generated=False))
        else:
            chunks.append(SimpleNamespace(n_tokens=entry[1], media=None, text=entry[2], generated=entry[3]))
    return chunks


def reusable_cells(chunks: Sequence[Any], items: Sequence[Any]) -> int:
    """KV cells of ``chunks`` a conversation rendered as ``items`` keeps (its common prefix)."""
    first, _ = plan_edit(chunks, items)
    return sum(c.n_tokens for c in chunks[:first])


@dataclass
class Stored:
    """A conversation saved out of its slot: in host memory (``blob``), on disk (``path``), or both."""
    key: str
    sig: list[list[Any]]
    n_cells: int
    blob: Optional[bytes] = None
    path: Optional[Path] = None
    last_used: float = field(default_factory=time.monotonic)


class ConversationStore:
    """Saved slot states by conversation key: host memory up to a byte budget (least recently used
    leave first), mirrored to ``state_dir`` when there is one, one ``<key>.state`` file each in the
    saved-conversation format (:mod:`llava_kv.saved`, as ``Session.save`` writes it), whose header
    also holds the pool's shape and what prefix matching needs; written to a new file and renamed."""

    def __init__(self, model: Model, slots: int, n_ctx: int, budget_bytes: int, state_dir: Optional[str]) -> None:
        self._model = model
        self._slots = slots
        self._n_ctx = n_ctx
        self._budget = budget_bytes
        self._entries: dict[str, Stored] = {}
        self._lock = threading.Lock()
        self.dir = Path(state_dir) if state_dir else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._scan()

    def _scan(self) -> None:
        assert self.dir is not None
        for state in sorted(self.dir.glob("*.state")):
            try:
                meta = saved.read_header(state, self._model)
            except (OSError, LlavaKVError):
                continue  # another model's, or not a saved conversation
            if meta.get("slots") != self._slots or meta.get("n_ctx") != self._n_ctx:
                continue  # another pool shape's
            sig = meta.get("signature")
            if not isinstance(sig, list) or not isinstance(meta.get("n_cells"), int):
                continue
            self._entries[state.stem] = Stored(state.stem, sig, meta["n_cells"], None, state, 0.0)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def host_bytes(self) -> int:
        with self._lock:
            return sum(len(e.blob) for e in self._entries.values() if e.blob is not None)

    def best(self, items: Sequence[Any], exclude: set[str]) -> tuple[Optional[Stored], int]:
        with self._lock:
            entries = [e for k, e in self._entries.items() if k not in exclude]
        best, cells = None, 0
        for e in entries:
            n = reusable_cells(_as_chunks(e.sig), items)
            if n > cells:
                best, cells = e, n
        return best, cells

    def put(self, key: str, sig: list[list[Any]], n_cells: int, blob: bytes, *, to_disk: bool) -> None:
        path = None
        if to_disk and self.dir is not None:
            path = self._write(key, sig, n_cells, blob)
        with self._lock:
            old = self._entries.get(key)
            self._entries[key] = Stored(key, sig, n_cells, blob, path or (old.path if old else None))
            self._trim_locked()

    def persist(self, key: str, sig: list[list[Any]], n_cells: int, blob: bytes) -> None:
        """Write a conversation still in its slot to disk (its host copy, if any, is now stale)."""
        if self.dir is None:
            return
        path = self._write(key, sig, n_cells, blob)
        with self._lock:
            self._entries[key] = Stored(key, sig, n_cells, None, path)

    def _write(self, key: str, sig: list[list[Any]], n_cells: int, blob: bytes) -> Path:
        assert self.dir is not None
        state = self.dir / f"{key}.state"
        saved.write(state, saved.header_for(self._model, slots=self._slots, n_ctx=self._n_ctx, n_cells=n_cells,
                                            signature=sig), blob)
        return state

    def take(self, key: str) -> tuple[bytes, str]:
        """The saved state and where it came from ("memory" or "disk"); the entry stays (on disk)."""
        with self._lock:
            e = self._entries[key]
            e.last_used = time.monotonic()
            blob, path = e.blob, e.path
        if blob is not None:
            return blob, "memory"
        assert path is not None
        return saved.read(path, self._model)[1], "disk"

    def forget(self, key: str) -> None:
        """Drop the host copy of a conversation back in a slot (its file, if any, stays until replaced)."""
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                return
            if e.path is None:
                del self._entries[key]
            else:
                e.blob = None

    def _trim_locked(self) -> None:
        used = sum(len(e.blob) for e in self._entries.values() if e.blob is not None)
        for e in sorted(self._entries.values(), key=lambda e: e.last_used):
            if used <= self._budget:
                break
            if e.blob is None:
                continue
            used -= len(e.blob)
            e.blob = None
            if e.path is None:
                del self._entries[e.key]
