"""The saved-conversation file, written by :meth:`Session.save` and by the server's conversation
store (``--state-dir``): one JSON header line (what the file is, the model it belongs to, and what its
writer records), then the native state (timeline, embeddings, KV cells; its sizes and a checksum,
which ``_core.inspect_state`` verifies). Written to a new file and renamed over the target, so a
reader never sees half a file."""
from __future__ import annotations

import json
import os
import uuid
from typing import TYPE_CHECKING, Any

from .errors import LlavaKVError

if TYPE_CHECKING:
    from .model import Model

__all__ = ["FORMAT", "VERSION", "header_for", "write", "read_header", "read"]

FORMAT = "llava-kv-session"
VERSION = 2  # 2: the native state carries its sizes and a checksum
_HEADER_TYPES = {"format": str, "version": int, "model_fingerprint": str, "projector_id": str}
_MAX_HEADER_BYTES = 1 << 20  # a server conversation's header holds its prefix signature


def header_for(model: "Model", **fields: Any) -> dict[str, Any]:
    """The header of a conversation saved from ``model``, with the writer's own ``fields``."""
    return {"format": FORMAT, "version": VERSION, "model_fingerprint": model.fingerprint,
            "projector_id": model.projector_id, **fields}


def write(path: str | os.PathLike[str], header: dict[str, Any], blob: bytes) -> None:
    """``header`` and the native state ``blob`` into ``path``, atomically (a new file, fsynced, renamed)."""
    target = os.fspath(path)
    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(json.dumps(header).encode() + b"\n")
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _header(f: Any, name: str, model: "Model") -> dict[str, Any]:
    try:
        header = json.loads(f.readline(_MAX_HEADER_BYTES))
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise LlavaKVError(f"{name!r} is not a llava-kv session file")
    for key, kind in _HEADER_TYPES.items():
        if not isinstance(header.get(key), kind):
            raise LlavaKVError(f"{name!r}: the session header's {key!r} is missing or not a "
                               f"{kind.__name__} ({header.get(key)!r})")
    if header["version"] != VERSION:
        raise LlavaKVError(f"{name!r} has session format version {header['version']}, "
                           f"this llava-kv reads version {VERSION}")
    if header["model_fingerprint"] != model.fingerprint or header["projector_id"] != model.projector_id:
        raise LlavaKVError(f"{name!r} was saved from a different model or projector than "
                           f"{model.path!r}; load it with the model it was saved from")
    return header


def read_header(path: str | os.PathLike[str], model: "Model") -> dict[str, Any]:
    """The header of the conversation saved in ``path``; LlavaKVError naming the problem unless it
    is a llava-kv session file of this format version, saved from ``model``."""
    with open(path, "rb") as f:
        return _header(f, os.fspath(path), model)


def read(path: str | os.PathLike[str], model: "Model") -> tuple[dict[str, Any], bytes]:
    """The header (checked as :func:`read_header` does) and the native state of ``path``."""
    with open(path, "rb") as f:
        header = _header(f, os.fspath(path), model)
        return header, f.read()
